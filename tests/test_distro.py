"""Debian as it ships: its own kernel and its own initramfs, booted by `vmm run`.

One boot for the whole module, the most expensive thing the tests do: a
distribution's kernel runs in PVM's emulator (docs/distro.md: ~11.5 minutes to
its /init on an AMD EPYC host, most of it the kernel's 250 Hz timer tick). The
root is made by mmdebstrap (vmm/images/debian.py: bookworm, systemd-sysv, udev,
linux-image-cloud-amd64, initramfs-tools); vmm runs it as a user would, `vmm run
--kernel vmlinuz --initrd initrd.img --disk root.img --cmdline 'root=/dev/vda
ro'`, no command: the guest's own init runs, its console is vmm's stdout.

What this run can show on PVM, and does: Debian's LZ4 bzImage and zstd initramfs
decompressed by vmm and booted by PVH; the kernel taking vmm's ACPI tables without
an error; the TSC's frequency told (no delay-loop calibration); no SIMD instruction
the emulator cannot run; and user space: Debian's initramfs /init (a shell script:
fork, exec, every system call finished by vmm's fix-up, vmm/arch/x86_64/
pvm_syscall.py) starting systemd-udevd. Then SIGTERM: the power button is pressed,
nothing in an initramfs listens to it, and after --stop-timeout vmm stops the VM
hard (143), the disk clean. systemd itself, login and its clean power-off are
beyond a CI run here: udev's coldplug alone ran past 17 minutes (docs/distro.md).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.packages import require
from vmm.bench.console import Console

# s from vmm's start to the initramfs starting udev: 740 s measured here (AMD EPYC,
# PVM); the Intel hosts of this kind run the same boot ~1.7x slower.
BOOT_LIMIT = 1800
STOP_TIMEOUT = 10  # --stop-timeout: nothing in an initramfs powers off on the button
USERSPACE = b"Starting systemd-udevd"

pytestmark = [pytest.mark.boot, pytest.mark.time_limit(BOOT_LIMIT + 300)]


@dataclass
class DebianRun:
    disk: Path
    userspace_seconds: float = 0.0  # vmm started -> the initramfs started udev
    stop_seconds: float = 0.0  # SIGTERM -> vmm exited
    status: int | None = None
    console: bytes = b""
    stderr: str = ""
    milestones: dict[str, float | None] = field(default_factory=dict)  # s from the start
    fsck: subprocess.CompletedProcess | None = None  # e2fsck -fn on the image after the stop


@pytest.fixture(scope="module")
def debian(tmp_path_factory) -> DebianRun:
    from vmm.images.debian import debian_disk, debian_system

    require("mmdebstrap")
    e2fsck = require("e2fsck")
    system = debian_system(lambda line: print(line, file=sys.stderr))
    disk = tmp_path_factory.mktemp("debian") / "root.img"
    debian_disk(system, disk, 2 << 30)
    run = DebianRun(disk)
    stderr = disk.with_name("vmm.stderr").open("w+b")  # a file: a full pipe would stall vmm
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "vmm", "run", "--kernel", str(system.kernel),
         "--initrd", str(system.initrd), "--disk", str(disk), "--mem", "512M",
         "--cmdline", "root=/dev/vda ro", "--stop-timeout", str(STOP_TIMEOUT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    console = Console(process, started)
    try:
        console.wait_for(USERSPACE, 0, BOOT_LIMIT)
        run.userspace_seconds = time.monotonic() - started
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        run.status = process.wait(timeout=STOP_TIMEOUT + 60)
        run.stop_seconds = time.monotonic() - asked
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        stderr.seek(0)
        run.stderr = stderr.read().decode(errors="replace")
        run.console = console.finish()
        run.milestones = console.milestones()
    print(f"Debian: {run.milestones}; udev started {run.userspace_seconds:.0f} s after vmm; "
          f"stopped {run.stop_seconds:.1f} s after SIGTERM", file=sys.stderr)
    run.fsck = subprocess.run([e2fsck, "-fn", str(disk)], capture_output=True, text=True)
    return run


def kernel_log(run: DebianRun) -> str:
    return run.console.decode(errors="replace")


def test_debians_own_kernel_boots_decompressed_by_vmm(debian):
    log = kernel_log(debian)
    assert re.search(r"Linux version 6\.1\.\S+-cloud-amd64 \(debian-kernel@lists\.debian\.org\)", log)
    # started by its PVH entry from the vmlinux vmm decompressed: no decompressor ran
    assert "Decompressing Linux" not in log
    assert "Calibrating delay loop (skipped)" in log  # tsc_early_khz= from KVM
    assert "emulation failure" not in debian.stderr  # no SIMD, no instruction left over


def test_the_kernel_takes_vmms_acpi_tables_without_an_error(debian):
    log = kernel_log(debian)
    for table in ("RSDP", "XSDT", "FACP", "DSDT", "APIC"):
        assert re.search(rf"ACPI: {table} 0x[0-9A-F]+ [0-9A-F]+ \(v0\d VMM ", log), table
    assert "ACPI: Interpreter enabled" in log
    assert "ACPI: PM: (supports S0 S5)" in log  # \_S5: power-off through vmm's register
    assert "pnp: PnP ACPI: found 2 devices" in log  # the UART and the RTC
    assert "ttyS0 at I/O 0x3f8" in log
    assert not re.search(r"ACPI (BIOS )?Error|ACPI Warning", log), \
        [line for line in log.splitlines() if "ACPI" in line and ("Error" in line or "Warning" in line)]


def test_its_own_initramfs_runs_user_space_on_pvm(debian):
    log = kernel_log(debian)
    assert "Run /init as init process" in log
    assert "Loading, please wait..." in log  # Debian's /init, a shell script
    assert "Starting systemd-udevd version" in log  # fork + exec of udevd
    assert "segfault" not in log  # every user syscall finished (pvm_syscall.py)


def test_sigterm_presses_the_button_then_stops_hard_after_the_timeout(debian):
    assert debian.status == 143, debian.stderr
    assert STOP_TIMEOUT <= debian.stop_seconds <= STOP_TIMEOUT + 30
    assert f"the guest did not power off within {STOP_TIMEOUT} s (--stop-timeout) of the " \
           "power button" in debian.stderr, debian.stderr
    assert debian.fsck.returncode == 0, debian.fsck.stdout + debian.fsck.stderr  # nothing lost
