"""containerd runs an image through vmm-runtime: the real client, its shim, and our VM.

The test starts Debian's containerd with its own root, state and socket under
a temporary directory (no CRI plugin, nothing shared with a system containerd),
imports a busybox image written by vmm/oci/imagelayout.py, and runs it with
``ctr run --runc-binary`` (containerd's io.containerd.runc.v2 shim calls
vmm-runtime as it calls runc). Two cold boots (~11 s each on our PVM host).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest import BOOT_TIMEOUT

pytestmark = [pytest.mark.boot, pytest.mark.kvm]

IMAGE = "docker.io/library/vmmbox:latest"
APPLETS = "sh echo cat hostname id pwd env ls sleep mount sort grep head true false".split()


def runtime_binary() -> str:
    """vmm-runtime next to this Python (the console script pip installed)."""
    path = Path(sys.executable).with_name("vmm-runtime")
    assert path.exists(), f"{path}: not installed (pip install -e .)"
    return str(path)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2"):
        assert shutil.which(tool), f"{tool} not found: apt-get install containerd (.ci/run does)"
    from vmm.images.initramfs import default_busybox
    from vmm.oci.imagelayout import write_image_archive

    work = tmp_path_factory.mktemp("containerd")
    socket = work / "containerd.sock"
    (work / "config.toml").write_text(f"""version = 2
root = "{work}/root"
state = "{work}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
""")
    log = open(work / "containerd.log", "wb")
    daemon = subprocess.Popen(["containerd", "--config", str(work / "config.toml")],
                              stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while not socket.exists() and time.monotonic() < deadline:
        assert daemon.poll() is None, (work / "containerd.log").read_text()
        time.sleep(0.05)
    root = work / "image"
    for sub in ("bin", "proc", "sys", "dev", "tmp", "etc"):
        (root / sub).mkdir(parents=True)
    shutil.copy(default_busybox(), root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    archive = work / "image.tar"
    write_image_archive(root, IMAGE, archive)
    ctr = ["ctr", "--address", str(socket)]
    imported = subprocess.run([*ctr, "images", "import", str(archive)], capture_output=True)
    assert imported.returncode == 0, imported.stderr.decode()
    yield ctr, work
    daemon.terminate()
    daemon.wait(timeout=30)
    log.close()


def test_ctr_run_prints_and_returns_the_process_status(containerd):
    ctr, _work = containerd
    result = subprocess.run(
        [*ctr, "run", "--rm", "--runc-binary", runtime_binary(), IMAGE, "echo1",
         "sh", "-c", "echo hello; id -u; exit 5"],
        capture_output=True, timeout=BOOT_TIMEOUT)
    assert result.stdout.decode().splitlines() == ["hello", "0"], result.stderr.decode()
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
