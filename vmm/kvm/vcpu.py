"""Vcpu: a KVM vCPU file descriptor and its shared ``kvm_run`` page.

One method per vCPU ioctl. Register state goes in and out as cffi structs
(``struct kvm_regs``, ``struct kvm_sregs``, ...) whose layout the compiler took
from <linux/kvm.h>.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Any

from vmm.kvm.ioctl import ffi, ioctl, ioctl_read, lib
from vmm.kvm.system import cpuid_entries

if TYPE_CHECKING:
    from vmm.kvm.vm import Vm


class Vcpu:
    def __init__(self, vm: "Vm", vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        size = vm.kvm.get_vcpu_mmap_size()
        # The kvm_run page(s): KVM writes each exit's details here.
        self._run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct: Any = ffi.cast("struct kvm_run *", ffi.from_buffer(self._run_map))

    def close(self) -> None:
        if self.fd >= 0:
            self.run_struct = None
            self._run_map.close()
            os.close(self.fd)
            self.fd = -1

    # --- one method per ioctl ---------------------------------------------------
    def run(self) -> None:
        """KVM_RUN: enter the guest until the next exit (GIL released meanwhile)."""
        ioctl(self.fd, "KVM_RUN")

    def get_regs(self) -> Any:
        return ioctl_read(self.fd, "KVM_GET_REGS", "struct kvm_regs")

    def set_regs(self, regs: Any) -> None:
        ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self) -> Any:
        return ioctl_read(self.fd, "KVM_GET_SREGS", "struct kvm_sregs")

    def set_sregs(self, sregs: Any) -> None:
        ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def get_fpu(self) -> Any:
        return ioctl_read(self.fd, "KVM_GET_FPU", "struct kvm_fpu")

    def set_fpu(self, fpu: Any) -> None:
        ioctl(self.fd, "KVM_SET_FPU", fpu)

    def set_cpuid2(self, entries: list[tuple[int, int, int, int, int, int, int]]) -> None:
        """KVM_SET_CPUID2 from (function, index, flags, eax, ebx, ecx, edx) tuples."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for slot, (function, index, flags, eax, ebx, ecx, edx) in zip(cpuid.entries, entries):
            slot.function, slot.index, slot.flags = function, index, flags
            slot.eax, slot.ebx, slot.ecx, slot.edx = eax, ebx, ecx, edx
        ioctl(self.fd, "KVM_SET_CPUID2", cpuid)

    def get_cpuid2(self, max_entries: int = 256) -> list[tuple[int, int, int, int, int, int, int]]:
        """KVM_GET_CPUID2: the table this vCPU was given, as KVM holds it."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        ioctl(self.fd, "KVM_GET_CPUID2", cpuid)
        return cpuid_entries(cpuid)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for entry, index in zip(msrs.entries, indices):
            entry.index = index
        count = ioctl(self.fd, "KVM_GET_MSRS", msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(count)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were set (KVM stops at the first it refuses)."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for entry, (index, data) in zip(msrs.entries, values.items()):
            entry.index, entry.data = index, data
        return ioctl(self.fd, "KVM_SET_MSRS", msrs)

    def get_vcpu_events(self) -> Any:
        return ioctl_read(self.fd, "KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events")

    def set_vcpu_events(self, events: Any) -> None:
        ioctl(self.fd, "KVM_SET_VCPU_EVENTS", events)

    def get_mp_state(self) -> int:
        return ioctl_read(self.fd, "KVM_GET_MP_STATE", "struct kvm_mp_state").mp_state

    def set_mp_state(self, mp_state: int) -> None:
        ioctl(self.fd, "KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}))

    def get_lapic(self) -> Any:
        return ioctl_read(self.fd, "KVM_GET_LAPIC", "struct kvm_lapic_state")

    def set_lapic(self, lapic: Any) -> None:
        ioctl(self.fd, "KVM_SET_LAPIC", lapic)

    def get_xsave(self) -> Any:
        """KVM_GET_XSAVE: x87, SSE and (where XCR0 enables them) AVX... registers, 4 KiB."""
        return ioctl_read(self.fd, "KVM_GET_XSAVE", "struct kvm_xsave")

    def set_xsave(self, xsave: Any) -> None:
        ioctl(self.fd, "KVM_SET_XSAVE", xsave)

    def get_xcrs(self) -> Any:
        return ioctl_read(self.fd, "KVM_GET_XCRS", "struct kvm_xcrs")

    def set_xcrs(self, xcrs: Any) -> None:
        ioctl(self.fd, "KVM_SET_XCRS", xcrs)

    def get_debugregs(self) -> Any:
        return ioctl_read(self.fd, "KVM_GET_DEBUGREGS", "struct kvm_debugregs")

    def set_debugregs(self, debugregs: Any) -> None:
        ioctl(self.fd, "KVM_SET_DEBUGREGS", debugregs)

    def set_guest_debug(self, control: int, debugreg: tuple[int, ...] = (0,) * 8) -> None:
        """KVM_SET_GUEST_DEBUG: single-step, breakpoints (KVM_GUESTDBG_* in ``control``).

        ``debugreg``: DR0-DR3 (addresses), DR6 unused, DR7 (their enables, kinds
        and lengths) when ``control`` has KVM_GUESTDBG_USE_HW_BP. Stops come back
        as KVM_EXIT_DEBUG (vmm/kvm/exits.py ``DebugExit``).
        """
        debug = ffi.new("struct kvm_guest_debug *")
        debug.control = control
        for i, value in enumerate(debugreg[:8]):
            debug.arch.debugreg[i] = value
        ioctl(self.fd, "KVM_SET_GUEST_DEBUG", debug)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest's TSC frequency (the host's, without TSC scaling)."""
        return ioctl(self.fd, "KVM_GET_TSC_KHZ")

    # --- helpers on the kvm_run page --------------------------------------------
    def request_immediate_exit(self) -> None:
        """Make the current or next KVM_RUN return EINTR at once (KVM_CAP_IMMEDIATE_EXIT)."""
        if self.run_struct is not None:
            self.run_struct.immediate_exit = 1

    def clear_immediate_exit(self) -> None:
        if self.run_struct is not None:
            self.run_struct.immediate_exit = 0


__all__ = ["Vcpu", "lib"]
