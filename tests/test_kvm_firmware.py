"""Our firmware payloads under real KVM, in-process, under both run loops.

Each payload's serial output, exit status and exit counts are exact (see
firmware/README.md for where the numbers come from). Marked ``kvm``: these
fail, never skip, without a usable /dev/kvm (tests/conftest.py).
"""

from __future__ import annotations

import io
import subprocess
import sys
import re
import time

import pytest

from vmm.arch.x86_64.layout import BENCH_PORT, COM1_PORT, EXIT_PORT, MiB
from vmm.config import VmConfig
from vmm.kvm.flavour import Flavour, detect_flavour
from vmm.outcome import EXIT_TIMEOUT, StopReason
from vmm.session import run_firmware

pytestmark = pytest.mark.kvm

LOOPS = ["c", "python"]

# name → (serial output, exit status, serial bytes, total exits)
PAYLOADS = {
    "hello": (b"Hello from the guest!\n", 0, 22, 23),
    "longmode": (b"real mode\nprotected mode\nlong mode\n", 0, 35, 36),
    "fail": (b"failing with 42\n", 42, 16, 17),
}

# Real mode at the reset vector F000:FFF0: print "r\n" on COM1, then `jmp $` forever.
#   mov $0x3f8, %dx; mov $'r', %al; out %al, %dx; mov $'\n', %al; out %al, %dx; jmp .
SPIN_IMAGE = bytes.fromhex("baf803" "b072" "ee" "b00a" "ee" "ebfe").ljust(16, b"\xf4")


def run(name, runloop, **kwargs):
    bench_count = kwargs.pop("bench_count", 0)
    kwargs.setdefault("mem", 2 * MiB)
    config = VmConfig(firmware=str(name), runloop=runloop, **kwargs)
    out, err = io.BytesIO(), io.StringIO()
    result = run_firmware(config, stdout=out, stderr=err, bench_count=bench_count,
                          handle_signals=False)
    return result, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("runloop", LOOPS)
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_output_status_and_exits(name, runloop):
    output, status, serial, total = PAYLOADS[name]
    result, out, err = run(name, runloop)
    assert out == output
    assert result.status == status
    assert result.outcome.reason is StopReason.GUEST_EXIT
    assert err == ""
    stats = result.stats
    # On PVM longmode's ldmxcsr and stmxcsr stop the emulator: two exits vmm finishes.
    finished = 2 if name == "longmode" and detect_flavour() is Flavour.PVM else 0
    assert stats.total == total + finished
    assert dict(stats.by_reason) == {"io": total, **({"internal_error": 2} if finished else {})}
    serial_place = ("io", "fast" if runloop == "c" else "out", COM1_PORT)
    assert stats.by_place[serial_place] == serial
    assert stats.by_place[("io", "out", EXIT_PORT)] == 1
    assert sum(stats.by_place.values()) == total
    # The C loop completes every console byte itself; Python sees only the exit port.
    assert stats.exits_in_c == (serial if runloop == "c" else 0)


@pytest.mark.parametrize("runloop", LOOPS)
def test_exitbench_counts(runloop):
    n = 1000
    result, out, _ = run("exitbench", runloop, bench_count=n)
    assert out == b"exitbench: done\n"
    assert result.status == 0
    stats = result.stats
    assert stats.total == n + 18  # 1 in + N outs + 16 characters + 1 exit
    if runloop == "c":
        assert stats.by_place[("io", "fast", BENCH_PORT)] == n + 1  # the in and the N outs
        assert stats.by_place[("io", "fast", COM1_PORT)] == 16
        assert stats.exits_in_c == stats.total - 1  # all but the exit port
    else:
        assert stats.by_place[("io", "out", BENCH_PORT)] == n
        assert stats.by_place[("io", "in", BENCH_PORT)] == 1
        assert stats.by_place[("io", "out", COM1_PORT)] == 16
        assert stats.exits_in_c == 0


def test_exitbench_default_count_is_100000():
    result, out, _ = run("exitbench", "c")
    assert out == b"exitbench: done\n"
    assert result.stats.total == 100_018


def test_exitbench_times_add_up():
    result, _, _ = run("exitbench", "c", bench_count=20_000)
    stats = result.stats
    assert 0 < stats.ns_in_guest <= stats.wall_ns
    assert stats.ns_in_vmm < stats.ns_in_guest  # the C loop adds little to KVM's own cost


@pytest.mark.parametrize("runloop", LOOPS)
def test_trace_prints_one_line_per_exit(runloop):
    result, out, err = run("hello", runloop, trace=True)
    assert out == b"Hello from the guest!\n"
    trace = err.splitlines()
    assert len(trace) == 23 == result.stats.total
    pattern = re.compile(r"^\[\s*(\d+)\] vcpu0 io out port=(0x[0-9a-f]{4}) size=1 data=([0-9a-f]{2}) "
                         r"\((com1|debug-exit)\) rip=0x[0-9a-f]+$")
    matches = [pattern.match(line) for line in trace]
    assert all(matches), trace
    assert [int(m[1]) for m in matches] == list(range(1, 24))
    assert bytes(int(m[3], 16) for m in matches[:22]) == b"Hello from the guest!\n"
    assert {m[2] for m in matches[:22]} == {"0x03f8"}
    assert (matches[22][2], matches[22][3], matches[22][4]) == ("0x0501", "00", "debug-exit")
    assert result.stats.exits_in_c == 0  # --trace sends every exit through Python


def test_trace_shows_the_32_bit_in_of_exitbench():
    _, _, err = run("exitbench", "python", trace=True, bench_count=3)
    first = err.splitlines()[0]
    assert re.match(r"^\[\s*1\] vcpu0 io in  port=0x0502 size=4 \(bench\) rip=0x", first), first
    assert len(err.splitlines()) == 3 + 18


@pytest.mark.parametrize("runloop", LOOPS)
def test_stats_report(runloop):
    _, _, err = run("exitbench", runloop, stats=True, bench_count=500)
    in_c = 517 if runloop == "c" else 0
    assert f"exits: 518 total, {in_c} completed in the C loop" in err
    assert re.search(r"^  io\s+518$", err, re.M)
    place = "io fast 0x502" if runloop == "c" else "io out 0x502"
    assert re.search(rf"^  {place}\s+{501 if runloop == 'c' else 500}  bench$", err, re.M)
    assert re.search(r"^exits per second: [\d,]+$", err, re.M)
    assert re.search(r"^time: [\d.]+ s wall; in guest \(KVM_RUN\) [\d.]+ s, in VMM [\d.]+ s$", err, re.M)
    assert "VMM time per exit:" in err


@pytest.mark.parametrize("runloop", LOOPS)
def test_timeout_stops_a_guest_that_never_ends(tmp_path, runloop):
    spin = tmp_path / "spin.bin"
    spin.write_bytes(SPIN_IMAGE)
    start = time.monotonic()
    result, out, err = run(spin, runloop, timeout=0.5)
    elapsed = time.monotonic() - start
    assert result.status == EXIT_TIMEOUT == 124
    assert result.outcome.reason == "timeout"
    assert out == b"r\n"
    assert "vmm: guest stopped: timeout" in err and "(exit status 124)" in err
    assert elapsed < 2.0


@pytest.mark.parametrize("runloop", LOOPS)
def test_timeout_stops_a_busy_exitbench(runloop):
    start = time.monotonic()
    result, out, _ = run("exitbench", runloop, timeout=0.5, bench_count=0xFFFFFFFF)
    assert result.status == 124
    assert out == b""
    assert time.monotonic() - start < 2.0
    assert result.stats.total > 1000  # it was really running exits when stopped


def test_kvm_error_from_a_real_ioctl(kvm):
    from vmm.errors import KvmError

    vm = kvm.create_vm()
    try:
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(0, 0, 4095, 0x10000)  # size not page aligned
        assert str(info.value) == "KVM_SET_USER_MEMORY_REGION failed: EINVAL (Invalid argument)"
    finally:
        vm.close()


def test_kvm_api_version_and_capabilities(kvm):
    from vmm.kvm.ioctl import lib

    assert kvm.get_api_version() == 12
    assert kvm.check_extension(lib.KVM_CAP_USER_MEMORY)
    assert kvm.check_extension(lib.KVM_CAP_IMMEDIATE_EXIT)
    assert kvm.get_vcpu_mmap_size() >= 4096
    assert kvm.max_vcpus() >= 1
    assert kvm.get_supported_cpuid()


@pytest.mark.parametrize("runloop", LOOPS)
def test_pause_stops_every_vcpu_after_its_last_exit_and_resumes_exactly(runloop):
    """Runner.pause: the action runs with no vCPU in KVM_RUN; no exit is lost or done twice.

    The guest cannot finish first on any host (2**32 - 1 exits), and its own counter
    (ECX, what is left to do) checks the VMM's count of its exits at the end.
    """
    import threading

    from vmm.builder import build_firmware_vm
    from vmm.runner import Runner

    count = 0xFFFFFFFF
    runner = Runner(runloop=runloop)  # before the VM: its exit port is wired to it
    machine = build_firmware_vm(VmConfig(mem=2 * MiB, firmware="exitbench", runloop=runloop),
                                io.BytesIO().write,
                                lambda status: runner.stop(status, StopReason.GUEST_EXIT),
                                bench_count=count)
    try:
        seen = []

        def action():
            seen.append((threading.current_thread() is threading.main_thread(),
                         machine.vcpus[0].get_regs().rip, runner.outcome))
            time.sleep(0.2)  # the guest must not move meanwhile
            seen.append(machine.vcpus[0].get_regs().rip)

        threading.Timer(0.3, runner.pause, args=(action,)).start()
        outcome = runner.run(machine.vcpus, machine.pio, machine.mmio, timeout=1.0)
        left = machine.vcpus[0].get_regs().rcx & 0xFFFFFFFF  # stopped just after an `out`
    finally:
        machine.close()
    assert outcome.reason is StopReason.TIMEOUT  # still running when the time was up
    (in_main, rip, outcome_then), rip_after = seen
    assert in_main and rip == rip_after
    assert outcome_then is None  # paused mid-run
    # The bench port: one read of the count, then one write per `out` the guest did. Each
    # `out` is followed by `dec %ecx`; stopped just after an `out`'s exit, the guest may or
    # may not have had it completed (KVM finishes it at the next KVM_RUN, which a stop
    # skips), and registers alone cannot tell: the counts agree to that one instruction.
    bench = runner.stats.by_place[("io", "fast" if runloop == "c" else "out", BENCH_PORT)]
    outs = bench - (1 if runloop == "c" else 0)
    assert outs > 1 and count - left <= outs <= count - left + 1, (outs, count - left)


@pytest.mark.parametrize("mem", [3 * 1024 * MiB, 8 * 1024 * MiB])
def test_firmware_ram_is_split_around_the_gap_like_linux(mem):
    """--firmware X --mem 8G: RAM below 3 GiB and from 4 GiB, KVM's TSS pages free in the gap."""
    from vmm.arch.x86_64 import layout
    from vmm.builder import build_firmware_vm

    machine = build_firmware_vm(VmConfig(mem=mem, firmware="longmode"), io.BytesIO().write,
                                lambda status: None)
    try:
        regions = [(r.start, r.size) for r in machine.memory]
    finally:
        machine.close()
    assert regions == layout.ram_ranges(mem)
    result, out, _err = run("longmode", "c", mem=mem)
    assert result.status == 0 and b"long mode" in out


SIGNAL_WHILE_LOCKED = """
import os, signal, sys
from vmm.builder import build_firmware_vm
from vmm.config import VmConfig
from vmm.outcome import StopReason
from vmm.runner import Runner, install_stop_signals

runner = Runner(runloop=sys.argv[1])
machine = build_firmware_vm(VmConfig(mem=2 << 20, firmware="exitbench", runloop=sys.argv[1]),
                            lambda data: None,
                            lambda status: runner.stop(status, StopReason.GUEST_EXIT),
                            bench_count=0xFFFFFFFF)
install_stop_signals(runner)
with runner._stop_lock:  # what stop() holds, in the main thread, where handlers run
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):  # bytecodes: the handler runs between two of them, lock held
        handled = runner.stopping
print("handled while locked:", handled, flush=True)
outcome = runner.run(machine.vcpus, machine.pio, machine.mmio, timeout=60)
machine.close()
print(outcome.status, outcome.reason, flush=True)
"""


@pytest.mark.parametrize("runloop", ["c", "python"])
def test_a_sigterm_while_stop_holds_its_lock_ends_the_run(runloop):
    """The handler takes no lock (it ran into stop()'s own, non-reentrant, and hung vmm):
    it sets a flag the run turns into the stop, with SIGTERM's status."""
    result = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_LOCKED, runloop],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["handled while locked: True", "143 SIGTERM"], result.stderr


def test_longmode_sets_mxcsr_and_pvm_gets_its_instructions_finished_by_vmm(kvm):
    """ldmxcsr/stmxcsr in kernel mode: PVM's emulator stops at them, vmm completes them
    (vmm/arch/x86_64/pvm.py); on hardware KVM the CPU runs them and nothing is noted."""
    result, out, _ = run("longmode", "c")
    assert result.status == 0 and out.endswith(b"long mode\n"), out
    completed = dict(result.stats.completed)
    if detect_flavour() is Flavour.PVM:
        assert completed == {"ldmxcsr": 1, "stmxcsr": 1}
        assert result.stats.by_reason["internal_error"] == 2  # each exit counted once
    else:
        assert completed == {}


GRACEFUL = """
import os, signal, sys, threading, time
from vmm.builder import build_firmware_vm
from vmm.config import VmConfig
from vmm.outcome import StopReason
from vmm.runner import GracefulStop, Runner, install_stop_signals

scenario = sys.argv[1]
runner = Runner()
machine = build_firmware_vm(VmConfig(mem=2 << 20, firmware="exitbench"), lambda data: None,
                            lambda status: runner.stop(status, StopReason.GUEST_EXIT),
                            bench_count=0xFFFFFFFF)  # runs for hours unless stopped
asked = []

def ask():  # what the power button's press stands for: the guest powers off, or not
    asked.append(time.monotonic())
    if scenario == "obeys":
        threading.Timer(0.3, runner.stop, (0, StopReason.GUEST_POWEROFF)).start()

runner.graceful = GracefulStop(ask, timeout=1.0)
install_stop_signals(runner)
signals = {"obeys": [signal.SIGTERM], "ignores": [signal.SIGTERM],
           "twice": [signal.SIGTERM, signal.SIGTERM], "sigint": [signal.SIGINT]}[scenario]

def send():
    for signum in signals:
        time.sleep(0.2)
        os.kill(os.getpid(), signum)

threading.Thread(target=send).start()
started = time.monotonic()
outcome = runner.run(machine.vcpus, machine.pio, machine.mmio, timeout=30)
machine.close()
print(len(asked), outcome.status, outcome.reason, round(time.monotonic() - started), flush=True)
print(outcome.detail)
"""


@pytest.mark.parametrize("scenario, expected", [
    ("obeys", "1 0 guest powered off 1"),  # pressed once, powered off: status 0
    ("ignores", "1 143 SIGTERM 1"),  # pressed, 1 s of grace, then stopped hard
    ("twice", "1 143 SIGTERM 0"),  # a second SIGTERM does not wait for the grace
    ("sigint", "0 130 SIGINT 0"),  # not among GracefulStop.signals: stopped at once
])
def test_sigterm_asks_a_graceful_guest_first(scenario, expected):
    result = subprocess.run([sys.executable, "-c", GRACEFUL, scenario],
                            capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert lines[:1] == [expected], result.stderr
    if scenario == "ignores":
        assert lines[1] == ("the guest did not power off within 1 s (--stop-timeout) "
                            "of the power button")
