"""Give a machine its disks and NICs: a virtio-blk device per --disk, a virtio-net per --net.

For disk i: the window at VIRTIO_MMIO_BASE + i * 4 KiB, IRQ VIRTIO_MMIO_IRQ_BASE + i,
and a ``virtio_mmio.device=4K@<base>:<irq>`` on the kernel command line so the
guest finds it (/dev/vda is disk 0, /dev/vdb disk 1, ...).

``notify`` picks how queue notifications arrive (docs/virtio.md has the
measurements): ``"exit"``, an MMIO exit handled in the vCPU thread and an
interrupt by ``KVM_IRQ_LINE``; or ``"ioeventfd"``, an eventfd per queue that KVM
signals without an exit, served by one I/O thread per device
(vmm/devices/virtio/iothread.py), and the interrupt through an irqfd.
"""

from __future__ import annotations

import sys
from typing import Callable

from vmm.arch.x86_64.layout import (
    VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_IRQ_BASE,
    VIRTIO_MMIO_MAX_DEVICES,
    VIRTIO_MMIO_SIZE,
)
from vmm.config import DiskConfig, NetConfig, NotifyPath
from vmm.devices.disk import RawDiskImage
from vmm.devices.virtio.block import VirtioBlock
from vmm.devices.virtio.mmio import QUEUE_NOTIFY, VirtioMmioTransport
from vmm.errors import DeviceError


def _warn(message: str) -> None:
    print(f"vmm: warning: {message}", file=sys.stderr)


def attach_block_devices(
    machine,
    disks: tuple[DiskConfig, ...],
    irq_line_factory: Callable[[int], object],
    warn: Callable[[str], None] = _warn,
    *,
    notify: tuple[NotifyPath, ...] = (NotifyPath.EXIT,),
    trace: Callable[[str], None] | None = None,
) -> list[str]:
    """Open, create and register every disk; return the kernel command-line fragments.

    ``notify``: one path per disk in order (the last one holds for the rest).
    """
    paths = list(notify) or [NotifyPath.EXIT]
    if NotifyPath.IOEVENTFD in paths and not ioeventfd_supported(machine.vm):
        warn("this KVM has no ioeventfd/irqfd: virtio notifications fall back to MMIO exits")
        paths = [NotifyPath.EXIT]
    if len(disks) > VIRTIO_MMIO_MAX_DEVICES:
        raise DeviceError(f"{len(disks)} disks: at most {VIRTIO_MMIO_MAX_DEVICES}")
    fragments = []
    for i, disk in enumerate(disks):
        backend = RawDiskImage(disk.path, disk.read_only)
        machine.closers.append(backend.close)
        device = VirtioBlock(backend, serial=disk.serial)
        for message in device.warnings:
            warn(message)
        path = paths[min(i, len(paths) - 1)]
        fragment, _ = _attach_transport(machine, device, i, f"virtio-blk{i}", path,
                                        irq_line_factory, trace)
        fragments.append(fragment)
    return fragments


def attach_net_devices(
    machine,
    nets: tuple[NetConfig, ...],
    first_slot: int,
    irq_line_factory: Callable[[int], object],
    *,
    notify: NotifyPath = NotifyPath.IOEVENTFD,
    trace: Callable[[str], None] | None = None,
) -> list[str]:
    """A virtio-net device per --net, in the virtio-mmio slots after the disks' (eth0, eth1...).

    Returns the command-line fragments: each device's, and the kernel's ``ip=``
    for the first NIC given an address.
    """
    from vmm.devices.netbackend import DEFAULT_TAP_NAME, PASST_MTU, PasstBackend, TapBackend
    from vmm.devices.virtio.net import VirtioNet, default_mac, parse_mac

    if first_slot + len(nets) > VIRTIO_MMIO_MAX_DEVICES:
        raise DeviceError(f"{first_slot} disks and {len(nets)} NICs: at most "
                          f"{VIRTIO_MMIO_MAX_DEVICES} virtio devices")
    if notify is NotifyPath.IOEVENTFD and not ioeventfd_supported(machine.vm):
        notify = NotifyPath.EXIT
    fragments, ip_given = [], False
    for i, net in enumerate(nets):
        mac = parse_mac(net.mac) if net.mac else default_mac(i)
        if net.backend == "tap":
            backend = TapBackend(net.name or DEFAULT_TAP_NAME)  # builder: says the name
        else:
            backend = PasstBackend(mac, net.forwards)
        machine.closers.append(backend.close)  # closers run in reverse: after the I/O thread
        # passt takes frames of up to 65,520 bytes of payload: so does the guest (fewer,
        # bigger packets through its emulated stack); a TAP device keeps Ethernet's 1,500.
        device = VirtioNet(backend, mac, mtu=PASST_MTU if net.backend == "user" else 1500,
                           offload=net.offload)
        fragment, device.transport = _attach_transport(machine, device, first_slot + i,
                                                       f"virtio-net{i}", notify,
                                                       irq_line_factory, trace)
        fragments.append(fragment)
        backend.start(device.receive)
        option = net.kernel_ip_option(i)
        if option and not ip_given:  # the kernel's ip= configures one interface
            fragments.append(option)
            ip_given = True
    return fragments


def _attach_transport(machine, device, slot: int, name: str, path: NotifyPath,
                      irq_line_factory: Callable[[int], object],
                      trace: Callable[[str], None] | None) -> tuple[str, VirtioMmioTransport]:
    """``device`` on the virtio-mmio window and IRQ of ``slot``: (its command-line fragment,
    its transport)."""
    base = VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE
    irq = VIRTIO_MMIO_IRQ_BASE + slot
    if path is NotifyPath.IOEVENTFD:
        from vmm.devices.virtio.iothread import IrqfdLine

        line = IrqfdLine(machine.vm.irqfd, irq)
        machine.closers.append(line.close)
    else:
        line = irq_line_factory(irq)
    transport = VirtioMmioTransport(device, machine.memory, line, name=name)
    transport.trace = trace
    if path is NotifyPath.IOEVENTFD:
        _attach_ioeventfds(machine, transport, base, trace)
    machine.mmio.register(base, VIRTIO_MMIO_SIZE, transport, name)
    return f"virtio_mmio.device={VIRTIO_MMIO_SIZE // 1024}K@{base:#x}:{irq}", transport


def ioeventfd_supported(vm) -> bool:
    from vmm.kvm.ioctl import lib

    return bool(vm.check_extension(lib.KVM_CAP_IOEVENTFD)
                and vm.check_extension(lib.KVM_CAP_IRQFD))


def _attach_ioeventfds(machine, transport: VirtioMmioTransport, base: int,
                       trace: Callable[[str], None] | None) -> None:
    """One eventfd per queue on QueueNotify (datamatch = queue index), one I/O thread."""
    from vmm.devices.virtio.iothread import IoEventThread

    thread = IoEventThread(transport.notify, name=f"{transport.name}-io", trace=trace)
    machine.closers.append(thread.close)  # closers run in reverse: before the disk closes
    for queue_index in range(len(transport.queues)):
        fd = thread.add_queue(queue_index)
        machine.vm.ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=queue_index)
    thread.start()
    transport.notify_path = NotifyPath.IOEVENTFD
    transport.io_thread = thread


def device_counters(machine) -> dict[str, dict]:
    """Every virtio transport's statistics, by device name."""
    return {m.name: m.device.counters() for m in machine.mmio.mappings()
            if isinstance(m.device, VirtioMmioTransport)}
