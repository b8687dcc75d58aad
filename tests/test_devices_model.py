"""The device model (vmm/devices/model.py, platform.py) and the threads around it.

Without KVM: the table a configuration makes (ids, resources, what the guest sees),
a device type added with one registration, each device made by the type that
planned it, clean-up that always finishes. With KVM: nothing is imported once the
guest runs (a jail will refuse it), and a stalled passt (SIGSTOP) leaves the guest
running and the NIC counting what it could not pass on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from tests.guest import BOOT_TIMEOUT, read_line
from tests.packages import require
from tests.test_net import _children_named
from vmm.config import DiskConfig, NetConfig, VmConfig
from vmm.devices.bus import Bus
from vmm.devices.model import (
    Attached,
    DeviceKind,
    DeviceManager,
    PortWindow,
    Wiring,
    fixed,
    plan_devices,
)
from vmm.devices.platform import LINUX_DEVICES


def table(config: VmConfig) -> list[tuple[str, str]]:
    return [(spec.id, spec.kind.value) for spec in plan_devices(LINUX_DEVICES, config)]


def test_a_configuration_makes_one_table_of_devices_with_stable_ids(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    config = VmConfig(disks=(DiskConfig(str(disk)), DiskConfig(str(disk), read_only=True)),
                      nets=(NetConfig.parse("user"), NetConfig.parse("tap=t0,ip=10.0.0.2/24")),
                      stderr_uart=True)
    assert table(config) == [
        ("com1", "serial"), ("com2", "serial"), ("i8042", "i8042"), ("rtc", "rtc"),
        ("post", "post"), ("debug-exit", "debug-exit"), ("boot-timer", "boot-timer"),
        ("mailbox", "mailbox"), ("blk0", "virtio-blk"), ("blk1", "virtio-blk"),
        ("net0", "virtio-net"), ("net1", "virtio-net")]
    specs = {s.id: s for s in plan_devices(LINUX_DEVICES, config)}
    # virtio-mmio windows in order, disks first: what the guest's virtio_mmio.device= says
    assert [specs[i].resources.irqs for i in ("blk0", "blk1", "net0", "net1")] == [(5,), (6,), (7,), (8,)]
    assert specs["net0"].guest["mac"] == "52:54:00:12:34:56" and specs["net0"].guest["mtu"] == 65520
    assert specs["net1"].guest["mtu"] == 1500
    # the kernel's ip= configures one interface: the first with an address (passt's 10.0.2.15)
    assert [specs[i].guest["kernel_ip"] for i in ("net0", "net1")] == [True, False]
    assert specs["blk1"].guest == {"read_only": True, "serial": ""}
    assert table(VmConfig())[-1] == ("mailbox", "mailbox")  # no disk, no NIC, no second UART


@dataclass
class Doorbell:
    """The smallest device: a port that counts what is written to it, its state that count."""

    rings: int = 0

    def read(self, offset: int, size: int) -> bytes:
        return self.rings.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self.rings += 1

    def state(self) -> int:
        return self.rings

    def restore(self, state: int) -> None:
        self.rings = state


class FakeMachine:
    def __init__(self):
        self.pio, self.mmio, self.closers = Bus("pio"), Bus("mmio"), []


def test_a_new_device_is_one_module_and_one_registration():
    """Its id, its port and its maker in one entry: it is on the bus, in the table, saved."""
    def make(spec, wiring):
        bell = Doorbell()
        return Attached(spec, bell, saved=bell, cmdline=("doorbell=0x700",))

    types = (*LINUX_DEVICES[:1],
             fixed(DeviceKind.POST, "doorbell", make, ports=(PortWindow(0x700, 1),), state_type=int))
    machine = FakeMachine()
    wiring = Wiring(machine, VmConfig(), lambda data: None, events=None,
                    irq_lines=lambda irq: _NoLine())
    devices = DeviceManager.build(types, wiring)
    machine.pio.write(0x700, b"\x01")
    machine.pio.write(0x700, b"\x01")
    assert [m.name for m in machine.pio.mappings()] == ["com1", "doorbell"]
    assert devices.cmdline(acpi=False) == ["doorbell=0x700"]
    assert devices.states()["doorbell"] == 2 and [r.id for r in devices.records()] == ["com1", "doorbell"]


class _NoLine:
    def set_level(self, high: bool) -> None:
        pass


def test_each_device_is_made_by_the_type_that_planned_it():
    """Two types of one kind (the console and the stderr UART): each its own maker (the
    console once got the stderr UART's output)."""
    console, errors = [], []
    from vmm.builder import GuestEvents

    machine = FakeMachine()
    events = GuestEvents(lambda status: None, lambda: None, on_error_output=errors.append)
    devices = DeviceManager.build(LINUX_DEVICES[:2], Wiring(
        machine, VmConfig(stderr_uart=True), console.append, events, irq_lines=lambda irq: _NoLine()))
    devices["com1"].write(0, b"o")
    devices["com2"].write(0, b"e")
    assert (console, errors) == ([b"o"], [b"e"])
    assert devices.cmdline(acpi=True) == devices.cmdline(acpi=False) == ["8250.nr_uarts=2"]


def test_machine_close_runs_every_step_whichever_fails_and_twice_is_harmless():
    from vmm.machine import Machine

    calls = []

    class Part:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def close(self):
            calls.append(self.name)
            if self.fail:
                raise OSError(f"{self.name} failed")

    machine = Machine(Part("kvm"), Part("vm", fail=True), Part("memory"))
    machine.closers += [Part("disk").close, Part("io-thread", fail=True).close]
    with pytest.raises(OSError, match="io-thread failed"):  # the first failure, after all ran
        machine.close()
    assert calls == ["io-thread", "disk", "vm", "memory", "kvm"]
    calls.clear()
    with pytest.raises(OSError, match="vm failed"):
        machine.close()  # the KVM objects' own close() is safe twice; the closers ran once
    assert calls == ["vm", "memory", "kvm"]


# --- with KVM ------------------------------------------------------------------------------
LATE_IMPORTS = """
import atexit, runpy, sys
import vmm.runner
late, running = [], [False]
first_run = vmm.runner.Runner._mark_first_run
def mark(self):
    running[0] = True
    first_run(self)
vmm.runner.Runner._mark_first_run = mark
sys.addaudithook(lambda event, args: late.append(args[0]) if event == "import" and running[0] else None)
atexit.register(lambda: print("imported while the guest ran:", sorted(set(late)), file=sys.stderr))
sys.argv = ["vmm", *sys.argv[1:]]
runpy.run_module("vmm", run_name="__main__")
"""


@pytest.mark.boot
@pytest.mark.kvm
@pytest.mark.parametrize("options", [(), ("--net", "user"), ("--cold",)])
def test_nothing_is_imported_once_the_guest_runs(tmp_path, options):
    """The first of the session's runs boots, saves at the ready point and runs on (the
    ready point translates the mailbox, the save writes the snapshot); the next restore."""
    for attempt in range(2):
        result = subprocess.run([sys.executable, "-c", LATE_IMPORTS, "run", *options, "--",
                                 "true"], capture_output=True, text=True, timeout=BOOT_TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert "imported while the guest ran: []" in result.stderr, result.stderr


@pytest.mark.boot
@pytest.mark.kvm
def test_a_stalled_passt_leaves_the_guest_running_and_counting_drops(tmp_path):
    """passt stopped (SIGSTOP) while the guest sends 200 frames of 60 KB: the NIC's sends go
    to a bounded queue a writer thread empties into passt's socket, so neither the vCPU
    nor the NIC's I/O thread waits on it; what does not fit is dropped and counted."""
    require("passt")
    metrics = tmp_path / "metrics.json"
    script = ("ping -c 1 -W 10 10.0.2.2 >/dev/null; echo go; sleep 1; "  # the gateway's MAC first
              "ping -q -c 200 -s 60000 -i 0.01 -W 1 10.0.2.2 >/dev/null; echo done")
    vmm = subprocess.Popen([sys.executable, "-m", "vmm", "run", "--net", "user", "--metrics",
                            str(metrics), "--", "sh", "-c", script], stdout=subprocess.PIPE)
    passt: list[int] = []
    try:
        assert read_line(vmm.stdout) == b"go\n"
        passt = _children_named(vmm.pid, "passt")
        assert len(passt) == 1, passt
        os.kill(passt[0], signal.SIGSTOP)
        assert read_line(vmm.stdout) == b"done\n"  # the guest ran on to its end
    finally:
        for pid in passt:
            os.kill(pid, signal.SIGCONT)
        if vmm.poll() is None:
            time.sleep(0.1)
    assert vmm.wait(timeout=60) == 0
    nic = json.loads(metrics.read_text())["devices"]["net0"]
    # Some frames passed (the queue, the socket's buffer), the rest were counted as dropped;
    # how many reached the NIC at all is the guest's business (its stack drops some too).
    assert nic["backend_dropped"] > 0 and nic["frames_sent"] > nic["backend_dropped"], nic
