"""containerd runs an image through vmm-runtime: the real client, its shim, and our VM.

The test starts Debian's containerd with its own root, state and socket under
a temporary directory (no CRI plugin, nothing shared with a system containerd),
imports a busybox image written by vmm/oci/imagelayout.py, and runs it with
``ctr run --runc-binary`` (containerd's io.containerd.runc.v2 shim calls
vmm-runtime as it calls runc). Two cold boots (~11 s each on our PVM host).
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.guest import BOOT_TIMEOUT
from tests.packages import require
from vmm.oci.containerd import BUSYBOX_IMAGE, PrivateContainerd, image_from_busybox
from vmm.oci.containerd import runtime_binary as vmm_runtime

pytestmark = [pytest.mark.boot, pytest.mark.kvm]

IMAGE = BUSYBOX_IMAGE


def runtime_binary() -> str:
    path = vmm_runtime()
    assert path.exists(), f"{path}: not installed (pip install -e .)"
    return str(path)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    for program in ("containerd", "ctr", "containerd-shim-runc-v2"):
        require(program)
    work = tmp_path_factory.mktemp("containerd")
    daemon = PrivateContainerd(work)
    daemon.start()
    try:
        daemon.import_image(image_from_busybox(work))
        yield daemon.ctr, work
    finally:
        daemon.stop()


def test_ctr_run_prints_and_returns_the_process_status(containerd):
    ctr, _work = containerd
    result = subprocess.run(
        [*ctr, "run", "--rm", "--runc-binary", runtime_binary(), IMAGE, "echo1",
         "sh", "-c", "echo hello; echo oops >&2; id -u; ls /nonexistent; exit 5"],
        capture_output=True, timeout=BOOT_TIMEOUT)
    assert result.stdout.decode().splitlines() == ["hello", "0"], result.stderr.decode()
    # stderr through the guest's second UART, to the shim's stderr FIFO: apart, as with runc
    assert result.stderr.decode().splitlines() == [
        "oops", "ls: /nonexistent: No such file or directory"]
    assert result.returncode == 5
    listed = subprocess.run([*ctr, "containers", "ls", "-q"], capture_output=True)
    assert b"echo1" not in listed.stdout  # --rm: gone, and vmm-runtime's state with it


def test_ctr_task_kill_stops_a_long_running_container(containerd):
    ctr, work = containerd
    started = subprocess.run(
        [*ctr, "run", "-d", "--runc-binary", runtime_binary(), IMAGE, "sleeper", "sleep", "600"],
        capture_output=True, timeout=BOOT_TIMEOUT)
    assert started.returncode == 0, started.stderr.decode()
    tasks = subprocess.run([*ctr, "task", "ls"], capture_output=True, text=True).stdout
    assert any(line.split()[:1] == ["sleeper"] and "RUNNING" in line for line in tasks.splitlines())
    def status() -> str:
        listed = subprocess.run([*ctr, "task", "ls"], capture_output=True, text=True).stdout
        return next(line.split()[-1] for line in listed.splitlines() if line.startswith("sleeper"))

    assert subprocess.run([*ctr, "task", "pause", "sleeper"], capture_output=True).returncode == 0
    assert status() == "PAUSED"
    assert subprocess.run([*ctr, "task", "resume", "sleeper"], capture_output=True).returncode == 0
    assert status() == "RUNNING"
    assert subprocess.run([*ctr, "task", "kill", "sleeper"], capture_output=True).returncode == 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tasks = subprocess.run([*ctr, "task", "ls"], capture_output=True, text=True).stdout
        if any(line.split()[:1] == ["sleeper"] and "STOPPED" in line for line in tasks.splitlines()):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"not stopped: {tasks}")
    assert subprocess.run([*ctr, "task", "rm", "sleeper"], capture_output=True).returncode == 0
    assert subprocess.run([*ctr, "containers", "rm", "sleeper"], capture_output=True).returncode == 0


def test_ctr_run_t_gives_a_working_terminal(containerd):
    """process.terminal: a pty through --console-socket; a shell prompt, typed input, its status."""
    import os
    import pty
    import select

    ctr, _work = containerd
    pid, fd = pty.fork()
    if pid == 0:  # ctr needs a terminal of its own for -t
        os.execvp(ctr[0], [*ctr, "run", "-t", "--rm", "--runc-binary", runtime_binary(), IMAGE,
                           "tty1", "sh"])
    output = bytearray()

    def read_until(marker: bytes | None, timeout: float) -> bool:
        """Read until ``marker`` shows (None: until ctr closes the terminal)."""
        deadline = time.monotonic() + timeout
        while (marker is None or marker not in output) and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: ctr exited, its terminal closed
                    break
                if not data:
                    break
                output.extend(data)
        return marker is None or marker in output

    assert read_until(b"/ # ", BOOT_TIMEOUT), bytes(output)  # the shell's prompt
    os.write(fd, b"tty; echo $((6*7)); exit 3\r")
    read_until(None, 60)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = bytes(output).replace(b"\r", b"").decode(errors="replace")
    assert "/dev/console" in text  # a terminal: the guest's console
    assert "\n42\n" in text
    assert os.waitstatus_to_exitcode(status) == 3
