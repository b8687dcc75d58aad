"""The device model: every device of a Linux guest, described once, iterated by everyone.

A *device type* is registered once (vmm/devices/platform.py) with two functions:

* ``plan(config, slots)``: which devices of this type a configuration makes, each
  a :class:`DeviceSpec`: its stable id (``com1``, ``blk0``, ``net1``), its
  resources (port and MMIO windows, IRQs) and what the guest sees of it (a MAC,
  an MTU, the features offered, a disk's serial). Pure: no I/O, no KVM. The
  snapshot cache key, a snapshot's device table and the check a restore makes
  all read these specs, made from the configuration before anything is built.
* ``make(spec, wiring)``: the device itself, its interrupt wired, its backend
  opened, its threads started; an :class:`Attached` saying what a snapshot
  saves of it, how a guest without ACPI finds it (a command-line fragment),
  which threads it runs and how to close it.
* ``acpi(spec)``, when the guest can see the device in ACPI: its ``Device``
  term for the DSDT (vmm/acpi/), what a distribution's kernel finds it by.

The :class:`DeviceManager` makes them in order, puts each on its bus at its
resources, and is what the rest of vmm iterates: the kernel command line, a
snapshot's records and their restore, ``vmm snapshot show``, ``--metrics``.
Devices themselves stay as they were: a register model that knows nothing of
KVM or its address, with its state a plain value (``state()``/``restore()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from vmm.arch.x86_64.layout import (
    VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_IRQ_BASE,
    VIRTIO_MMIO_MAX_DEVICES,
    VIRTIO_MMIO_SIZE,
)
from vmm.errors import DeviceError, SnapshotError

if TYPE_CHECKING:
    from vmm.builder import GuestEvents
    from vmm.config import VmConfig
    from vmm.devices.irq import InterruptLine
    from vmm.machine import Machine


class DeviceKind(StrEnum):
    SERIAL = "serial"  # a 16550A UART
    I8042 = "i8042"  # the keyboard controller: its reset line is how Linux reboots
    RTC = "rtc"  # the MC146818 CMOS clock
    POST = "post"  # port 0x80, Linux's I/O delay
    DEBUG_EXIT = "debug-exit"  # a byte written ends the VM with that status
    POWER = "power"  # an ACPI guest's sleep registers and power button
    BOOT_TIMER = "boot-timer"  # /init's "I am here" marks
    MAILBOX = "mailbox"  # /init's ready point and request buffer
    VIRTIO_BLK = "virtio-blk"
    VIRTIO_NET = "virtio-net"


GuestValue = str | int | bool | None


@dataclass(frozen=True)
class PortWindow:
    base: int
    length: int
    offset: int = 0  # the device's register offset at ``base`` (two windows of one device)


@dataclass(frozen=True)
class Resources:
    ports: tuple[PortWindow, ...] = ()
    mmio: tuple[tuple[int, int], ...] = ()  # (guest-physical base, size)
    irqs: tuple[int, ...] = ()


@dataclass(frozen=True)
class DeviceSpec:
    """One device as the configuration decides it, before anything is made."""

    id: str  # stable: the bus name, the snapshot's key, what messages name
    kind: DeviceKind
    resources: Resources
    guest: dict[str, GuestValue]  # what the guest sees; a restore must find the same
    source: Any = field(default=None, compare=False)  # the DiskConfig or NetConfig it came from

    def record(self) -> "DeviceRecord":
        return DeviceRecord(self.id, self.kind.value, self.resources, dict(self.guest))


@dataclass(frozen=True)
class DeviceRecord:
    """A spec as a snapshot keeps it (and the cache key hashes it)."""

    id: str
    kind: str
    resources: Resources
    guest: dict[str, GuestValue]


class Stateful(Protocol):
    """What a snapshot saves of a device: a plain value, given back at restore."""

    def state(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


@dataclass
class Attached:
    """A device made: what the manager and everyone after it need of it."""

    spec: DeviceSpec
    device: Any  # on the bus at the spec's windows (the transport, for a virtio device)
    saved: Stateful | None = None  # what a snapshot saves; None: nothing to save
    cmdline: tuple[str, ...] = ()  # options the guest's kernel needs, ACPI or not
    discovery: tuple[str, ...] = ()  # how a guest without ACPI finds it (virtio_mmio.device=)
    threads: tuple[str, ...] = ()  # the threads it runs, by name
    counters: Callable[[], dict[str, Any]] | None = None  # for --metrics
    acpi: bytes | None = None  # its DSDT entry (AML), set by the manager from its type


class Slots:
    """The virtio-mmio windows and IRQs, handed out in the order devices are planned."""

    def __init__(self) -> None:
        self.used = 0

    def next_virtio(self, what: str) -> Resources:
        if self.used >= VIRTIO_MMIO_MAX_DEVICES:
            raise DeviceError(f"{what}: at most {VIRTIO_MMIO_MAX_DEVICES} virtio devices")
        base = VIRTIO_MMIO_BASE + self.used * VIRTIO_MMIO_SIZE
        irq = VIRTIO_MMIO_IRQ_BASE + self.used
        self.used += 1
        return Resources(mmio=((base, VIRTIO_MMIO_SIZE),), irqs=(irq,))


@dataclass
class Wiring:
    """What ``make`` gets: the machine, the configuration, and what the devices report to."""

    machine: "Machine"
    config: "VmConfig"
    output: Callable[[bytes], None]  # the console
    events: "GuestEvents"
    trace: Callable[[str], None] | None = None
    warn: Callable[[str], None] = field(default=lambda message: _warn(message))
    irq_lines: Callable[[int], "InterruptLine"] | None = None  # else KVM_IRQ_LINE on the VM
    _said: set[str] = field(default_factory=set)

    def warn_once(self, message: str) -> None:
        """A warning about the host, said once however many devices meet it."""
        if message not in self._said:
            self._said.add(message)
            self.warn(message)

    def irq_line(self, irq: int) -> "InterruptLine":
        if self.irq_lines is not None:
            return self.irq_lines(irq)
        from vmm.devices.irq import IrqLine

        return IrqLine(self.machine.vm.irq_line, irq)


def _warn(message: str) -> None:
    import sys

    print(f"vmm: warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class DeviceType:
    kind: DeviceKind
    plan: Callable[["VmConfig", Slots], list[DeviceSpec]]
    make: Callable[[DeviceSpec, Wiring], Attached]
    state_type: type | None = None  # the dataclass of its saved state
    acpi: Callable[[DeviceSpec], bytes] | None = None  # its DSDT entry, if ACPI shows it


def fixed(kind: DeviceKind, device_id: str, make: Callable[[DeviceSpec, Wiring], Attached], *,
          ports: tuple[PortWindow, ...] = (), irqs: tuple[int, ...] = (),
          state_type: type | None = None, acpi: Callable[[DeviceSpec], bytes] | None = None,
          when: Callable[["VmConfig"], bool] = lambda config: True) -> DeviceType:
    """A device type of one device at fixed resources (the PC's legacy devices)."""

    def plan(config: "VmConfig", slots: Slots) -> list[DeviceSpec]:
        if not when(config):
            return []
        return [DeviceSpec(device_id, kind, Resources(ports=ports, irqs=irqs), {})]

    return DeviceType(kind, plan, make, state_type, acpi)


def planned(types: tuple[DeviceType, ...], config: "VmConfig") -> list[tuple[DeviceType, DeviceSpec]]:
    """Every device ``config`` makes, in order, with the type that makes it (ids unique)."""
    slots, devices = Slots(), []
    for device_type in types:
        devices += [(device_type, spec) for spec in device_type.plan(config, slots)]
    ids = [spec.id for _, spec in devices]
    if len(set(ids)) != len(ids):
        raise DeviceError(f"two devices with one id: {ids}")
    return devices


def plan_devices(types: tuple[DeviceType, ...], config: "VmConfig") -> list[DeviceSpec]:
    """Every device ``config`` makes, in order: what the cache key and a restore compare."""
    return [spec for _, spec in planned(types, config)]


class DeviceManager:
    """The devices of one VM, by id, in the order they were made."""

    def __init__(self) -> None:
        self.attached: dict[str, Attached] = {}

    # --- making ---------------------------------------------------------------------------
    @classmethod
    def build(cls, types: tuple[DeviceType, ...], wiring: Wiring) -> "DeviceManager":
        manager = cls()
        for device_type, spec in planned(types, wiring.config):
            attached = device_type.make(spec, wiring)
            if device_type.acpi is not None:
                attached.acpi = device_type.acpi(spec)
            manager.add(attached, wiring.machine)
        return manager

    def add(self, attached: Attached, machine: "Machine") -> None:
        spec = attached.spec
        for window in spec.resources.ports:
            machine.pio.register(window.base, window.length, attached.device, spec.id,
                                 offset=window.offset)
        for base, size in spec.resources.mmio:
            machine.mmio.register(base, size, attached.device, spec.id)
        self.attached[spec.id] = attached

    # --- what everyone iterates ------------------------------------------------------------
    def __iter__(self) -> Iterator[Attached]:
        return iter(self.attached.values())

    def __getitem__(self, device_id: str) -> Any:
        return self.attached[device_id].device

    def get(self, device_id: str) -> Any:
        entry = self.attached.get(device_id)
        return entry.device if entry is not None else None

    def of_kind(self, *kinds: DeviceKind) -> list[Any]:
        return [a.device for a in self if a.spec.kind in kinds]

    def cmdline(self, acpi: bool) -> list[str]:
        """What the kernel command line needs of the devices: their options, and, for a
        guest without ACPI tables, how to find them (a kernel that has both would register
        a virtio device twice)."""
        return [fragment for a in self
                for fragment in (a.cmdline if acpi else a.discovery + a.cmdline)]

    def dsdt_entries(self) -> list[bytes]:
        return [a.acpi for a in self if a.acpi is not None]

    @property
    def threads(self) -> dict[str, tuple[str, ...]]:
        return {a.spec.id: a.threads for a in self if a.threads}

    def counters(self) -> dict[str, dict[str, Any]]:
        return {a.spec.id: a.counters() for a in self if a.counters is not None}

    # The devices run_linux and the runtime talk to.
    @property
    def serial(self) -> Any:
        return self["com1"]

    @property
    def stderr_serial(self) -> Any:
        return self.get("com2")

    @property
    def mailbox(self) -> Any:
        return self["mailbox"]

    @property
    def boot_timer(self) -> Any:
        return self["boot-timer"]

    @property
    def virtio(self) -> list[Any]:
        """The virtio-mmio transports, disks then NICs."""
        return self.of_kind(DeviceKind.VIRTIO_BLK, DeviceKind.VIRTIO_NET)

    # --- snapshots ------------------------------------------------------------------------
    def records(self) -> tuple[DeviceRecord, ...]:
        return tuple(a.spec.record() for a in self)

    def states(self) -> dict[str, Any]:
        return {a.spec.id: a.saved.state() for a in self if a.saved is not None}

    def check_records(self, saved: tuple[DeviceRecord, ...], name: str) -> None:
        """This VM's devices are the snapshot's, field by field; else one line naming
        the device and the field."""
        check_same_devices(saved, self.records(), name)

    def restore(self, states: dict[str, Any]) -> None:
        for attached in self:
            if attached.saved is not None:
                attached.saved.restore(states[attached.spec.id])


def check_same_devices(saved: tuple[DeviceRecord, ...], now: tuple[DeviceRecord, ...],
                       name: str) -> None:
    """SnapshotError naming the first device and field that differ."""
    old = {r.id: r for r in saved}
    new = {r.id: r for r in now}
    for device_id in old.keys() - new.keys():
        raise SnapshotError(f"{name}: the snapshot's VM has device {device_id} "
                            f"({old[device_id].kind}), this one does not")
    for device_id in new.keys() - old.keys():
        raise SnapshotError(f"{name}: this VM has device {device_id} ({new[device_id].kind}), "
                            "the snapshot's does not")
    for device_id, record in new.items():
        before = old[device_id]
        if before.kind != record.kind:
            raise SnapshotError(f"{name}: device {device_id} is a {before.kind} in the snapshot, "
                                f"a {record.kind} here")
        if before.resources != record.resources:
            raise SnapshotError(f"{name}: device {device_id}: its resources differ "
                                f"({before.resources} in the snapshot)")
        for key in sorted(before.guest.keys() | record.guest.keys()):
            was, is_ = before.guest.get(key), record.guest.get(key)
            if was != is_:
                raise SnapshotError(f"{name}: device {device_id}: {key} is {was!r} in the "
                                    f"snapshot, {is_!r} in this VM")


__all__ = ["Attached", "DeviceKind", "DeviceManager", "DeviceRecord", "DeviceSpec", "DeviceType",
           "PortWindow", "Resources", "Slots", "Stateful", "Wiring", "fixed", "plan_devices"]
