"""The ioeventfd notification path without KVM: eventfds, the I/O thread, irqfd.

A fake VM records what would be registered with KVM (``KVM_IOEVENTFD``,
``KVM_IRQFD``) and the test plays KVM's part: a guest write to QueueNotify that
matches becomes an ``eventfd_write`` on the queue's eventfd, and an interrupt
is whatever was written to the irqfd's eventfd.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time

import pytest

from tests.test_virtio_blk import attach_disks
from vmm.config import DiskConfig, NotifyPath, VmConfig
from vmm.devices.bus import Bus
from vmm.devices.virtio import mmio
from vmm.devices.virtio.iothread import IoEventThread, IrqfdLine
from vmm.errors import UsageError
from vmm.memory import GuestMemory
from virtio_driver import RAM_SIZE, FakeInterrupt, MockDriver

DISK_SIZE = 1 << 20
BASE = 0xD000_0000


def wait_readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_io_thread_runs_notify_for_the_kicked_queue_and_stops_on_close():
    calls = []
    done = threading.Event()

    def notify(queue, kicks):
        calls.append((queue, kicks, threading.current_thread().name))
        done.set()

    thread = IoEventThread(notify, name="blk-io")
    fds = [thread.add_queue(0), thread.add_queue(1)]
    thread.start()
    assert thread.running
    os.eventfd_write(fds[1], 1)
    assert done.wait(5)
    assert calls == [(1, 1, "blk-io")]
    assert thread.kicks == 1 and thread.wakeups == 1
    thread.close()
    assert not thread.running
    for fd in fds:  # the eventfds are closed
        with pytest.raises(OSError):
            os.fstat(fd)
    thread.close()  # twice is harmless


def test_kicks_that_pile_up_are_served_by_one_pass():
    gate, calls = threading.Event(), []
    first = threading.Event()

    def notify(queue, kicks):
        calls.append(kicks)
        first.set()
        gate.wait(5)

    thread = IoEventThread(notify)
    fd = thread.add_queue(0)
    thread.start()
    os.eventfd_write(fd, 1)
    assert first.wait(5)  # the thread is busy in notify...
    for _ in range(3):  # ...while the guest kicks three more times
        os.eventfd_write(fd, 1)
    gate.set()
    deadline = time.monotonic() + 5
    while sum(calls) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread.close()
    assert calls == [1, 3]
    assert thread.kicks == 4


def test_close_waits_for_the_request_in_progress():
    started, finished = threading.Event(), []

    def notify(queue, kicks):
        started.set()
        time.sleep(0.2)
        finished.append(queue)

    thread = IoEventThread(notify)
    fd = thread.add_queue(0)
    thread.start()
    os.eventfd_write(fd, 1)
    assert started.wait(5)
    thread.close()
    assert finished == [0]


def test_irqfd_line_pulses_are_eventfd_writes():
    registered = []
    line = IrqfdLine(lambda fd, gsi: registered.append((fd, gsi)), 5)
    assert registered == [(line.fd, 5)]
    line.pulse()
    line.pulse()
    assert os.eventfd_read(line.fd) == 2 and line.raised == 2
    line.close()
    line.close()


# --- the whole path, through attach_block_devices ------------------------------------------------
class FakeVm:
    """Records KVM_IOEVENTFD and KVM_IRQFD registrations."""

    def __init__(self, capable=True):
        self.capable = capable
        self.ioeventfds = []  # (fd, addr, length, datamatch)
        self.irqfds = {}  # gsi -> fd

    def check_extension(self, capability):
        return int(self.capable)

    def ioeventfd(self, fd, addr, length, *, pio=False, datamatch=None):
        assert not pio
        self.ioeventfds.append((fd, addr, length, datamatch))

    def irqfd(self, fd, gsi, deassign=False):
        self.irqfds[gsi] = fd

    def guest_write(self, bus, addr, value):
        """What KVM does with a 4-byte guest store: an ioeventfd if one matches, else an exit."""
        for fd, a, length, datamatch in self.ioeventfds:
            if a == addr and length == 4 and datamatch in (None, value):
                os.eventfd_write(fd, 1)
                return "ioeventfd"
        bus.write(addr, struct.pack("<I", value))
        return "exit"


class FakeMachine:
    def __init__(self, vm):
        self.vm = vm
        self.memory = GuestMemory([(0, RAM_SIZE)])
        self.mmio = Bus("mmio")
        self.closers = []

    def close(self):
        for close in reversed(self.closers):
            close()
        self.memory.close()


class EventfdDriver(MockDriver):
    """The mock Linux driver, its notify a guest store that KVM may turn into an eventfd kick."""

    def __init__(self, machine, transport, irq_fd, **kw):
        super().__init__(transport, machine.memory, **kw)
        self.machine = machine
        self.irq_fd = irq_fd
        self.paths = []

    def notify(self, queue=0):
        self.paths.append(self.machine.vm.guest_write(self.machine.mmio, BASE + mmio.QUEUE_NOTIFY,
                                                       queue))

    def ack_interrupt(self):
        assert wait_readable(self.irq_fd), "no interrupt through the irqfd"
        os.eventfd_read(self.irq_fd)
        return super().ack_interrupt()


@pytest.fixture
def attached(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISK_SIZE))
    vm = FakeVm()
    machine = FakeMachine(vm)
    lines = []
    devices = attach_disks(machine, (DiskConfig(str(path)),),
                           lambda irq: lines.append(irq) or FakeInterrupt(), notify="ioeventfd")
    yield path, vm, machine, devices, lines
    machine.close()


def test_attach_registers_one_ioeventfd_per_queue_on_queue_notify(attached):
    path, vm, machine, devices, lines = attached
    assert devices.cmdline(acpi=False) == ["virtio_mmio.device=4K@0xd0000000:5"]
    assert devices.threads == {"blk0": ("virtio-blk0-io",)}
    assert lines == []  # no KVM_IRQ_LINE line: the interrupt is an irqfd on GSI 5
    assert list(vm.irqfds) == [5]
    transport = machine.mmio.mappings()[0].device
    assert [(addr, length, dm) for _, addr, length, dm in vm.ioeventfds] == [
        (BASE + mmio.QUEUE_NOTIFY, 4, q) for q in range(len(transport.queues))]
    assert transport.notify_path == "ioeventfd" and transport.io_thread.running


def test_requests_complete_through_the_io_thread(attached):
    path, vm, machine, devices, _ = attached
    transport = machine.mmio.mappings()[0].device
    driver = EventfdDriver(machine, transport, vm.irqfds[5]).init()
    data = path.read_bytes()
    assert driver.read(8, 4).data == data[8 * 512:12 * 512]
    pattern = bytes(range(256)) * 4
    driver.write(100, pattern)
    assert driver.read(100, 2).data == pattern
    assert path.read_bytes()[100 * 512:102 * 512] == pattern
    assert driver.paths and set(driver.paths) == {"ioeventfd"}  # no notify was an MMIO exit
    counters = devices.counters()["blk0"]
    assert counters["requests"] == 3
    assert counters["notifications"] == len(driver.paths)
    assert counters["interrupts"] == 3 and counters["interrupt"] == "irqfd"
    assert counters["notify_path"] == "ioeventfd"
    # Exits left per request: the interrupt handler's InterruptStatus read and ACK write.
    before = (transport.stats.register_reads, transport.stats.register_writes)
    driver.read(0, 1)
    assert (transport.stats.register_reads - before[0], transport.stats.register_writes - before[1]) == (1, 1)


def test_a_guest_reset_keeps_the_registration_working(attached):
    path, vm, machine, _, _ = attached
    transport = machine.mmio.mappings()[0].device
    driver = EventfdDriver(machine, transport, vm.irqfds[5]).init()
    driver.read(0, 1)
    registered = list(vm.ioeventfds)
    driver = EventfdDriver(machine, transport, vm.irqfds[5]).init()  # writes Status 0 first
    assert vm.ioeventfds == registered  # nothing re-registered
    assert driver.read(1, 1).data == path.read_bytes()[512:1024]


def test_a_kick_before_the_queue_is_ready_is_refused_like_the_register_write(attached):
    _, vm, machine, _, _ = attached
    transport = machine.mmio.mappings()[0].device
    assert vm.guest_write(machine.mmio, BASE + mmio.QUEUE_NOTIFY, 0) == "ioeventfd"
    deadline = time.monotonic() + 5
    while not transport.stats.errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert transport.stats.errors["notify while the device is not running"] == 1
    # A queue index with no eventfd is no match for KVM: an ordinary exit, refused the same way.
    assert vm.guest_write(machine.mmio, BASE + mmio.QUEUE_NOTIFY, 7) == "exit"
    assert transport.stats.errors["notify while the device is not running"] == 2


def test_machine_close_stops_the_io_thread(attached):
    _, _, machine, _, _ = attached
    thread = machine.mmio.mappings()[0].device.io_thread
    machine.close()
    machine.closers.clear()
    assert not thread.running


def test_no_ioeventfd_in_this_kvm_falls_back_to_exits(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK_SIZE))
    machine = FakeMachine(FakeVm(capable=False))
    warnings = []
    attach_disks(machine, (DiskConfig(str(path)),), lambda irq: FakeInterrupt(),
                 warnings.append, notify="ioeventfd")
    assert machine.mmio.mappings()[0].device.notify_path == "exit"
    assert machine.vm.ioeventfds == [] and "fall back" in warnings[0]
    machine.close()


def test_config_refuses_an_unknown_notify_path():
    with pytest.raises(UsageError, match="--virtio-notify 'doorbell': 'exit' or 'ioeventfd'"):
        VmConfig(virtio_notify="doorbell")
    assert VmConfig(virtio_notify="exit,ioeventfd").notify_paths == (NotifyPath.EXIT, NotifyPath.IOEVENTFD)


def test_one_notification_path_per_disk(tmp_path):
    disks = []
    for i in range(3):
        path = tmp_path / f"d{i}.img"
        path.write_bytes(bytes(DISK_SIZE))
        disks.append(DiskConfig(str(path)))
    machine = FakeMachine(FakeVm())
    attach_disks(machine, tuple(disks), lambda irq: FakeInterrupt(), notify="exit,ioeventfd")
    assert [m.device.notify_path for m in machine.mmio.mappings()] == ["exit", "ioeventfd", "ioeventfd"]
    assert sorted(machine.vm.irqfds) == [6, 7]
    machine.close()
    assert VmConfig(virtio_notify="exit,ioeventfd").virtio_notify == "exit,ioeventfd"
    with pytest.raises(UsageError):
        VmConfig(virtio_notify="exit,")
