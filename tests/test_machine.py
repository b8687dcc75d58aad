"""A guest whose own init runs (`--initrd`) is a machine: a reboot boots it again, or with
--no-reboot ends vmm with status 0; no command; its console is stdin and stdout.

Our kernel with our initramfs named explicitly (`--initrd PATH`): vmm then treats its
/init as the guest's own, which with no vmm.argv gives a shell on the console. The
test types `reboot -f` there (busybox: the kernel resets through the i8042, reboot=k)
and watches what vmm does. Debian's systemd machine, with the ACPI power button:
test_distro.py.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vmm.bench.console import Console

pytestmark = [pytest.mark.boot, pytest.mark.time_limit(300)]
PROMPT = b"# "


def machine(*options: str) -> tuple[subprocess.Popen, Console]:
    from vmm.images.initramfs import default_initramfs

    process = subprocess.Popen(
        [sys.executable, "-m", "vmm", "run", "--initrd", str(default_initramfs()), *options],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return process, Console(process)


def test_with_no_reboot_a_reboot_ends_vmm_with_status_0():
    process, console = machine("--no-reboot")
    try:
        console.wait_for(PROMPT, 0, 120)
        console.type("reboot -f")
        status = process.wait(timeout=120)
    finally:
        process.kill()
    stderr = process.stderr.read().decode()
    assert status == 0, stderr
    assert "booting it again" not in stderr


def test_a_reboot_boots_the_machine_again():
    process, console = machine()
    try:
        console.wait_for(PROMPT, 0, 120)
        first_boot = console.data.count(b"Linux version ")
        typed_at = len(console.data)
        console.type("reboot -f")
        at = console.wait_for(b"Linux version ", typed_at, 120)
        console.wait_for(PROMPT, at, 120)  # the second boot's shell
        time.sleep(0.5)
        console.type("exit 3")  # /init reports the shell's status
        status = process.wait(timeout=60)
    finally:
        process.kill()
    stderr = process.stderr.read().decode()
    assert first_boot == 1
    assert "the guest rebooted: booting it again" in stderr, stderr
    assert status == 3, stderr

