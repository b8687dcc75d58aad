"""The virtio device types: a virtio-blk device per --disk, a virtio-net per --net.

Each gets the next virtio-mmio window and IRQ (vmm/devices/model.py, Slots):
disks first, then NICs, so disk i is at VIRTIO_MMIO_BASE + i * 4 KiB with IRQ
VIRTIO_MMIO_IRQ_BASE + i, and a ``virtio_mmio.device=4K@<base>:<irq>`` on the
kernel command line lets the guest find it (/dev/vda is blk0, eth0 is net0).

``--virtio-notify`` picks how queue notifications arrive (docs/virtio.md has the
measurements): ``exit``, an MMIO exit handled in the vCPU thread and an
interrupt by ``KVM_IRQ_LINE``; or ``ioeventfd``, an eventfd per queue that KVM
signals without an exit, served by one I/O thread per device
(vmm/devices/virtio/iothread.py), and the interrupt through an irqfd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from typing import TYPE_CHECKING

from vmm.arch.x86_64.layout import VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE
from vmm.config import DiskConfig, NetConfig, NotifyPath, VmConfig
from vmm.devices.model import (
    Attached,
    DeviceKind,
    DeviceSpec,
    DeviceType,
    GuestValue,
    Slots,
    Wiring,
)
from vmm.devices.virtio.state import TransportState

if TYPE_CHECKING:
    from vmm.devices.irq import InterruptLine
    from vmm.devices.virtio.mmio import VirtioMmioTransport


@dataclass(frozen=True)
class _Disk:
    config: DiskConfig
    notify: NotifyPath


# --- virtio-blk ------------------------------------------------------------------------------
def plan_disks(config: VmConfig, slots: Slots) -> list[DeviceSpec]:
    paths = list(config.notify_paths) or [NotifyPath.EXIT]  # one per disk; the last for the rest
    return [DeviceSpec(f"blk{i}", DeviceKind.VIRTIO_BLK, slots.next_virtio(f"--disk {disk.path}"),
                       {"read_only": disk.read_only, "serial": disk.serial},
                       source=_Disk(disk, paths[min(i, len(paths) - 1)]))
            for i, disk in enumerate(config.disks)]


def make_disk(spec: DeviceSpec, wiring: Wiring) -> Attached:
    # The device and its transport are imported here, not above: planning the table (the
    # warm start's cache key) needs none of them, and a VM without a disk never does.
    from vmm.devices.disk import RawDiskImage
    from vmm.devices.virtio.block import VirtioBlock

    disk = spec.source
    backend = RawDiskImage(disk.config.path, disk.config.read_only)
    wiring.machine.closers.append(backend.close)
    device = VirtioBlock(backend, serial=disk.config.serial)
    for message in device.warnings:
        wiring.warn(message)
    return _on_transport(spec, wiring, device, disk.notify)


VIRTIO_BLK = DeviceType(DeviceKind.VIRTIO_BLK, plan_disks, make_disk, TransportState,
                        acpi=lambda spec: virtio_aml(spec))


# --- virtio-net ------------------------------------------------------------------------------
def plan_nics(config: VmConfig, slots: Slots) -> list[DeviceSpec]:
    """The NICs, and what each guest interface is: the kernel's ip= names eth<i> (the first
    NIC given an address), the MAC, the MTU and the features the device offers."""
    if not config.nets:
        return []  # and the NIC modules stay unimported
    from vmm.devices.netbackend import PASST_MTU, PasstBackend, TapBackend
    from vmm.devices.virtio.net import default_mac, offered_features, parse_mac

    specs = []
    for i, net in enumerate(config.nets):
        mac = parse_mac(net.mac) if net.mac else default_mac(i)
        # passt takes frames of up to 65,520 bytes of payload: so does the guest (fewer,
        # bigger packets through its emulated stack); a TAP device keeps Ethernet's 1,500.
        mtu = PASST_MTU if net.backend == "user" else 1500
        vnet_header = (TapBackend if net.backend == "tap" else PasstBackend).vnet_header
        guest: dict[str, GuestValue] = {
            "backend": net.backend, "mac": mac.hex(":"), "mtu": mtu, "offload": net.offload,
            "features": offered_features(mtu, net.offload, vnet_header),
            "ip": net.ip, "gateway": net.gateway, "dns": net.dns}
        specs.append(DeviceSpec(f"net{i}", DeviceKind.VIRTIO_NET,
                                slots.next_virtio(f"--net {net.backend}"), guest, source=net))
    first = next((i for i, net in enumerate(config.nets) if net.ip), None)
    for spec in specs:  # the kernel's ip= configures one interface
        spec.guest["kernel_ip"] = spec.id == f"net{first}"
    return specs


def make_nic(spec: DeviceSpec, wiring: Wiring) -> Attached:
    from vmm.devices.netbackend import DEFAULT_TAP_NAME, PasstBackend, TapBackend
    from vmm.devices.virtio.net import VirtioNet

    net: NetConfig = spec.source
    mac = bytes.fromhex(str(spec.guest["mac"]).replace(":", ""))
    backend: TapBackend | PasstBackend
    if net.backend == "tap":
        backend = TapBackend(net.name or DEFAULT_TAP_NAME)  # the builder says the name
    else:
        backend = PasstBackend(mac, net.forwards)
    wiring.machine.closers.append(backend.close)  # closers run in reverse: after the I/O thread
    device = VirtioNet(backend, mac, mtu=int(spec.guest["mtu"] or 1500), offload=net.offload)
    attached = _on_transport(spec, wiring, device, NotifyPath.IOEVENTFD)
    device.transport = attached.device
    backend.start(device.receive)
    index = int(spec.id.removeprefix("net"))
    option = net.kernel_ip_option(index) if spec.guest["kernel_ip"] else None
    attached.cmdline += (option,) if option else ()
    attached.threads += backend.threads
    return attached


VIRTIO_NET = DeviceType(DeviceKind.VIRTIO_NET, plan_nics, make_nic, TransportState,
                        acpi=lambda spec: virtio_aml(spec))


# --- the transport, shared -------------------------------------------------------------------
def _on_transport(spec: DeviceSpec, wiring: Wiring, device, path: NotifyPath) -> Attached:
    """``device`` behind a virtio-mmio transport at the spec's window and IRQ (the manager
    puts it on the bus)."""
    from vmm.devices.virtio.mmio import VirtioMmioTransport

    machine = wiring.machine
    (base, size), (irq,) = spec.resources.mmio[0], spec.resources.irqs
    if path is NotifyPath.IOEVENTFD and not ioeventfd_supported(machine.vm):
        wiring.warn_once("this KVM has no ioeventfd/irqfd: virtio notifications fall back to "
                         "MMIO exits")
        path = NotifyPath.EXIT
    line: InterruptLine
    if path is NotifyPath.IOEVENTFD:
        from vmm.devices.virtio.iothread import IrqfdLine

        line = IrqfdLine(machine.vm.irqfd, irq)
        machine.closers.append(line.close)
    else:
        line = wiring.irq_line(irq)
    name = f"virtio-{spec.id}"
    transport = VirtioMmioTransport(device, machine.memory, line, name=name)
    transport.trace = wiring.trace
    threads: tuple[str, ...] = ()
    if path is NotifyPath.IOEVENTFD:
        threads = (_attach_ioeventfds(machine, transport, base, wiring.trace),)
    return Attached(spec, transport, saved=transport, threads=threads,
                    discovery=(f"virtio_mmio.device={size // 1024}K@{base:#x}:{irq}",),
                    counters=transport.counters)


def virtio_aml(spec: DeviceSpec) -> bytes:
    """A virtio-mmio transport in the DSDT: what Debian's virtio_mmio module is loaded for
    (its only ACPI alias is LNRO0005), its window and its interrupt (an edge: irqfd)."""
    from vmm.acpi import aml

    (base, size), (irq,) = spec.resources.mmio[0], spec.resources.irqs
    slot = (base - VIRTIO_MMIO_BASE) // VIRTIO_MMIO_SIZE
    return aml.device(spec.id.upper(), aml.name("_HID", "LNRO0005"), aml.name("_UID", slot),
                      aml.name("_CCA", 1),  # cache-coherent DMA: guest RAM is the host's
                      aml.name("_CRS", aml.resources(aml.memory32_fixed(base, size),
                                                     aml.interrupt(irq))))


def ioeventfd_supported(vm) -> bool:
    from vmm.kvm.ioctl import lib

    return bool(vm.check_extension(lib.KVM_CAP_IOEVENTFD)
                and vm.check_extension(lib.KVM_CAP_IRQFD))


def _attach_ioeventfds(machine, transport: VirtioMmioTransport, base: int,
                       trace: Callable[[str], None] | None) -> str:
    """One eventfd per queue on QueueNotify (datamatch = queue index), one I/O thread:
    its name."""
    from vmm.devices.virtio.iothread import IoEventThread
    from vmm.devices.virtio.mmio import QUEUE_NOTIFY

    thread = IoEventThread(transport.notify, name=f"{transport.name}-io", trace=trace)
    machine.closers.append(thread.close)  # closers run in reverse: before the disk closes
    for queue_index in range(len(transport.queues)):
        fd = thread.add_queue(queue_index)
        machine.vm.ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=queue_index)
    thread.start()
    transport.notify_path = NotifyPath.IOEVENTFD
    transport.io_thread = thread
    return thread.name
