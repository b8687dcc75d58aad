"""`vmm` as a user runs it: a real process, its exit status, signals (needs /dev/kvm)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from tests.guest import read_line

pytestmark = pytest.mark.kvm

VMM = [sys.executable, "-m", "vmm"]
SPIN_IMAGE = bytes.fromhex("baf803" "b072" "ee" "b00a" "ee" "ebfe").ljust(16, b"\xf4")


def vmm(*args, timeout=60):
    return subprocess.run([*VMM, *args], capture_output=True, timeout=timeout)


@pytest.mark.parametrize("runloop", ["c", "python"])
def test_hello_process(runloop):
    result = vmm("run", "--firmware", "hello", "--runloop", runloop)
    assert result.stdout == b"Hello from the guest!\n"
    assert result.stderr == b""
    assert result.returncode == 0


@pytest.mark.parametrize("runloop", ["c", "python"])
def test_fail_process_exits_with_the_guest_status(runloop):
    result = vmm("run", "--firmware", "fail", "--runloop", runloop)
    assert result.stdout == b"failing with 42\n"
    assert result.returncode == 42


def test_longmode_process():
    result = vmm("run", "--firmware", "longmode")
    assert result.stdout == b"real mode\nprotected mode\nlong mode\n"
    assert result.returncode == 0


def test_console_script_is_installed():
    import shutil

    script = shutil.which("vmm") or os.path.join(os.path.dirname(sys.executable), "vmm")
    result = subprocess.run([script, "run", "--firmware", "hello"], capture_output=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, b"Hello from the guest!\n")


def test_trace_and_stats_from_the_cli():
    result = vmm("run", "--firmware", "fail", "--trace", "--stats")
    err = result.stderr.decode()
    assert len(re.findall(r"^\[\s*\d+\] vcpu0 io out ", err, re.M)) == 17
    assert "exits: 17 total" in err
    assert result.returncode == 42


def test_timeout_from_the_cli(tmp_path):
    spin = tmp_path / "spin.bin"
    spin.write_bytes(SPIN_IMAGE)
    start = time.monotonic()
    result = vmm("run", "--firmware", str(spin), "--timeout", "0.5")
    assert result.returncode == 124
    assert result.stdout == b"r\n"
    assert re.fullmatch(rb"vmm: guest stopped: timeout: .*\(exit status 124\)\n", result.stderr)
    assert time.monotonic() - start < 5


def _sigterm_within_a_second(argv, settle: float = 0.2):
    """Start argv, wait for its "r" line and ``settle`` s more, SIGTERM it: (status, s taken, stderr)."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_line(process.stdout, 60) == b"r\n"  # the guest is running
        time.sleep(settle)
        assert process.poll() is None
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=5)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return status, took, process.stderr.read().decode()


@pytest.mark.parametrize("runloop", ["c", "python"])
def test_sigterm_stops_a_spinning_guest(tmp_path, runloop):
    spin = tmp_path / "spin.bin"
    spin.write_bytes(SPIN_IMAGE)
    status, took, err = _sigterm_within_a_second([*VMM, "run", "--firmware", str(spin), "--runloop", runloop])
    assert status == 143, err
    assert took < 1.0
    assert "vmm: guest stopped: SIGTERM (exit status 143)" in err


@pytest.mark.parametrize("runloop", ["c", "python"])
def test_sigterm_stops_exitbench_with_a_huge_count(runloop):
    # `vmm run --firmware exitbench` has no option for N: run the same session
    # code as the CLI, with signal handling on, and a count of 2**32-1 (hours).
    program = textwrap.dedent(f"""
        import sys
        from vmm.config import VmConfig
        from vmm.session import run_firmware
        print("r", flush=True)
        result = run_firmware(VmConfig(mem=2 << 20, firmware="exitbench", runloop="{runloop}"),
                              bench_count=0xFFFFFFFF)
        sys.exit(result.status)
    """)
    # settle 1 s: well into the loop of exits
    status, took, err = _sigterm_within_a_second([sys.executable, "-c", program], settle=1.0)
    assert status == 143, err
    assert took < 1.0


def test_check_reports_a_usable_kvm():
    from vmm.cli import main
    from vmm.kvm.flavour import detect_flavour

    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(rf"^kvm: {detect_flavour()}  \(", out, re.M)
    assert "/dev/kvm: usable, API version 12" in out
    assert re.search(r"^  immediate_exit\s+yes ", out, re.M)
    assert "create VM: ok" in out
    assert out.rstrip().endswith("ready: this host can run vmm guests")
    assert "MISSING" not in out


def test_check_cpuid_prints_the_guest_table_with_vmms_changes():
    """vmm check --cpuid: this host's KVM table for vCPU 1 of 2, with every change explained."""
    from vmm.cli import main
    from vmm.kvm.flavour import Flavour, detect_flavour

    result = CliRunner().invoke(main, ["check", "--cpuid", "--cpus", "2", "--vcpu", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("CPUID of vCPU 1 of a 2-vCPU guest") for line in lines)
    leaf1 = next(line for line in lines if line.startswith("0x00000001.0 "))
    assert int(re.search(r"ebx=([0-9a-f]{8})", leaf1)[1], 16) >> 24 == 1  # vCPU 1's APIC id
    assert int(re.search(r"edx=([0-9a-f]{8})", leaf1)[1], 16) & (1 << 28)  # HTT: 2 vCPUs
    core = next(line for line in lines if line.startswith("0x0000000b.1 "))
    assert "ebx=00000002" in core and "edx=00000001" in core  # 2 cores, x2APIC id 1
    hypervisor = int(re.search(r"ecx=([0-9a-f]{8})", leaf1)[1], 16) & (1 << 31)
    if detect_flavour() is Flavour.PVM:
        assert not hypervisor and not any(line.startswith("0x40000000.0  eax") for line in lines)
    else:
        assert hypervisor and any(line.startswith("0x40000000.0  eax") for line in lines)
    summary = re.search(r"^(\d+) leaves, (\d+) changed by vmm$", result.output, re.M)
    assert summary and int(summary[2]) > 0
    assert all(line.split(":", 1)[1].strip() for line in lines
               if re.match(r"^    (eax|ebx|ecx|edx): ", line))  # every change has a reason


def test_check_cpuid_refuses_a_vcpu_the_guest_does_not_have():
    from vmm.cli import main

    result = CliRunner().invoke(main, ["check", "--cpuid", "--cpus", "2", "--vcpu", "2"])
    assert result.exit_code == 2
    assert "--vcpu 2: a 2-vCPU guest has vCPUs 0-1" in result.output


def test_check_names_the_flavour_of_this_host():
    from vmm.kvm.flavour import detect_flavour

    first = vmm("check").stdout.decode().splitlines()[0]
    assert first.startswith(f"kvm: {detect_flavour()}  (")
    if os.path.exists("/sys/module/kvm_pvm"):  # the development and CI hosts
        assert first.startswith("kvm: pvm  (")
