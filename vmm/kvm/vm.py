"""Vm: a KVM virtual machine file descriptor. One method per VM ioctl."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from vmm.kvm.ioctl import ffi, ioctl, ioctl_read, lib

if TYPE_CHECKING:
    from vmm.kvm.system import Kvm
    from vmm.kvm.vcpu import Vcpu


class Vm:
    """A VM: memory slots, the in-kernel irqchip and PIT, vCPUs, interrupt lines."""

    def __init__(self, kvm: "Kvm", fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, capability: int) -> int:
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", capability)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
        flags: int = 0,
    ) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr,
            "memory_size": memory_size, "userspace_addr": userspace_addr,
        })
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def set_tss_addr(self, address: int) -> None:
        ioctl(self.fd, "KVM_SET_TSS_ADDR", address)

    def set_identity_map_addr(self, address: int) -> None:
        addr = ffi.new("uint64_t *", address)
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", addr)

    def create_irqchip(self) -> None:
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = 0) -> None:
        config = ffi.new("struct kvm_pit_config *", {"flags": flags})
        ioctl(self.fd, "KVM_CREATE_PIT2", config)

    def get_irqchip(self, chip_id: int) -> Any:
        """KVM_GET_IRQCHIP: one of the in-kernel PIC master, PIC slave or IOAPIC."""
        return ioctl_read(self.fd, "KVM_GET_IRQCHIP", "struct kvm_irqchip", {"chip_id": chip_id})

    def set_irqchip(self, chip: Any) -> None:
        ioctl(self.fd, "KVM_SET_IRQCHIP", chip)

    def get_pit2(self) -> Any:
        return ioctl_read(self.fd, "KVM_GET_PIT2", "struct kvm_pit_state2")

    def set_pit2(self, pit: Any) -> None:
        ioctl(self.fd, "KVM_SET_PIT2", pit)

    def get_clock(self) -> Any:
        """KVM_GET_CLOCK: the VM's kvmclock (ns), what a paravirtual guest reads as time."""
        return ioctl_read(self.fd, "KVM_GET_CLOCK", "struct kvm_clock_data")

    def set_clock(self, clock: Any) -> None:
        ioctl(self.fd, "KVM_SET_CLOCK", clock)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ on the VM (Linux 5.17+; older ones answer it per vCPU only):
        the TSC frequency vCPUs get, the host's unless scaled."""
        return ioctl(self.fd, "KVM_GET_TSC_KHZ")

    def irq_line(self, irq: int, level: int) -> None:
        line = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        ioctl(self.fd, "KVM_IRQ_LINE", line)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        request = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi,
                                                  "flags": 1 if deassign else 0})
        ioctl(self.fd, "KVM_IRQFD", request)

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None) -> None:
        flags = lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        request = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd,
            "flags": flags,
        })
        ioctl(self.fd, "KVM_IOEVENTFD", request)

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        from vmm.kvm.vcpu import Vcpu

        return Vcpu(self, vcpu_id, ioctl(self.fd, "KVM_CREATE_VCPU", vcpu_id))
