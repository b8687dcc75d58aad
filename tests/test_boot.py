"""Whole-guest boots through the real CLI: our kernel, our initramfs, real commands.

Each test is one boot (12-30 s on our PVM CI host, where guest kernel code runs
in KVM's emulator; well under a second on hardware KVM), so each boot checks
as much as it can.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from tests.guest import BOOT_TIMEOUT, guest_kernel, vmm_run
from vmm.kvm.flavour import Flavour, detect_flavour
from vmm.outcome import EXIT_GUEST_PANIC, EXIT_TIMEOUT

pytestmark = [pytest.mark.boot, pytest.mark.kvm]


@pytest.mark.parametrize("start", [["--cold"], []], ids=["cold", "warm"])
def test_command_output_argv_and_exit_status(start: list[str]) -> None:
    """argv survives the kernel command line (--cold) or the snapshot's mailbox; the status comes back."""
    tricky = ["a b", '"quoted"', "$HOME", "ü", "", "--", "x=1 y"]
    result = vmm_run(*start, "--", "sh", "-c", 'printf "[%s]" "$@"; echo; uname -sr; exit 7', "sh",
                     *tricky)
    out = result.stdout.decode()
    assert result.returncode == 7, result.stderr.decode()
    assert out.splitlines()[0] == "".join(f"[{a}]" for a in tricky)
    assert out.splitlines()[1] == f"Linux {guest_kernel().release}"
    # Quiet by default: nothing but the command's output.
    assert len(out.splitlines()) == 2


def test_two_cpus_and_module_parameters_in_sysfs() -> None:
    """2 vCPUs; and patch 0004 (each built-in module's sysfs parameters created once)."""
    script = (
        "nproc; cat /sys/module/kernel/parameters/panic /sys/module/printk/parameters/time; "
        "ls /sys/module/rcutree/parameters | wc -l; ls /sys/module/kernel/parameters"
    )
    result = vmm_run("--cpus", "2", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().split()
    assert lines[0] == "2"
    assert lines[1] == "-1"  # panic=-1 from vmm's command line, read back through sysfs
    assert lines[2] == "Y"  # CONFIG_PRINTK_TIME
    assert lines[3] == "22"  # every rcutree parameter, not only the last one
    assert {"panic", "initcall_debug", "pvm_syscall_fixup", "pvm_brk_populate"} <= set(lines[4:])


def test_kernel_panic_has_its_own_status() -> None:
    result = vmm_run("--cold", "--cmdline", "rdinit=/no/such/init")
    assert result.returncode == EXIT_GUEST_PANIC, result.stderr.decode()
    assert "Kernel panic" in result.stderr.decode()


def test_timeout() -> None:
    started = time.monotonic()
    result = vmm_run("--timeout", "3", "--", "sleep", "1000")
    assert result.returncode == EXIT_TIMEOUT
    assert "timeout" in result.stderr.decode()
    assert time.monotonic() - started < 30


def test_pvm_syscall_patch_is_what_makes_userspace_work() -> None:
    """Our guest-kernel patch finishes PVM's broken `syscall`; turned off, init dies.

    On hardware KVM the patch is inert and the option changes nothing.
    """
    result = vmm_run("--cold", "--cmdline", "pvm_syscall_fixup=0", "--", "true")
    if detect_flavour() is Flavour.PVM:
        assert result.returncode == EXIT_GUEST_PANIC, result.stderr.decode()
        assert "Attempted to kill init" in result.stderr.decode()
    else:
        assert result.returncode == 0


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"did not see {needle!r}; got {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_interactive_shell_through_a_pty() -> None:
    """No command: a shell on the console. Type into it, read it, Ctrl-A x quits."""
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    process = subprocess.Popen([sys.executable, "-m", "vmm", "run"], stdin=slave, stdout=slave,
                               stderr=slave, start_new_session=True)
    try:
        _read_until(master, b"#", BOOT_TIMEOUT)  # the shell's prompt
        # While vmm runs, the terminal is raw (no echo, no line editing by the host).
        assert not termios.tcgetattr(slave)[3] & termios.ECHO
        os.write(master, b"echo $((6 * 7))\r")
        assert b"42" in _read_until(master, b"42", 120)
        os.write(master, b"\x01x")  # Ctrl-A x
        assert process.wait(timeout=60) == 0
        assert termios.tcgetattr(slave) == before  # the terminal is restored
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        os.close(master)
        os.close(slave)
