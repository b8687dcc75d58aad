"""Give a machine its disks: one virtio-blk device per --disk, each on virtio-mmio.

For disk i: the window at VIRTIO_MMIO_BASE + i * 4 KiB, IRQ VIRTIO_MMIO_IRQ_BASE + i,
and a ``virtio_mmio.device=4K@<base>:<irq>`` on the kernel command line so the
guest finds it (/dev/vda is disk 0, /dev/vdb disk 1, ...).
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
from vmm.config import DiskConfig
from vmm.devices.disk import RawDiskImage
from vmm.devices.virtio.block import VirtioBlock
from vmm.devices.virtio.mmio import VirtioMmioTransport
from vmm.errors import DeviceError


def _warn(message: str) -> None:
    print(f"vmm: warning: {message}", file=sys.stderr)


def attach_block_devices(
    machine,
    disks: tuple[DiskConfig, ...],
    irq_line_factory: Callable[[int], object],
    warn: Callable[[str], None] = _warn,
) -> list[str]:
    """Open, create and register every disk; return the kernel command-line fragments."""
    if len(disks) > VIRTIO_MMIO_MAX_DEVICES:
        raise DeviceError(f"{len(disks)} disks: at most {VIRTIO_MMIO_MAX_DEVICES}")
    fragments = []
    for i, disk in enumerate(disks):
        base = VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE
        irq = VIRTIO_MMIO_IRQ_BASE + i
        backend = RawDiskImage(disk.path, disk.read_only)
        machine.closers.append(backend.close)
        device = VirtioBlock(backend, serial=disk.serial)
        for message in device.warnings:
            warn(message)
        name = f"virtio-blk{i}"
        transport = VirtioMmioTransport(device, machine.memory, irq_line_factory(irq), name=name)
        machine.mmio.register(base, VIRTIO_MMIO_SIZE, transport, name)
        fragments.append(f"virtio_mmio.device={VIRTIO_MMIO_SIZE // 1024}K@{base:#x}:{irq}")
    return fragments
