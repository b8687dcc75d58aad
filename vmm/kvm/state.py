"""What KVM holds of a VM's state, as plain values: read with KVM_GET_*, put back with KVM_SET_*.

A snapshot is guest RAM, the devices' states, and this: per vCPU, everything
the CPU holds (registers, segments and control registers, the FPU/SSE
registers, MSRs, the local APIC, pending events), and per VM the interrupt
controllers and the timer KVM emulates in the kernel (PIC, IOAPIC, PIT) and
its clock. Each part is kept as the bytes of the KVM structure that the
``KVM_GET_*`` ioctl filled: that is KVM's ABI, stable across kernels, and the
same bytes go back through ``KVM_SET_*``. docs/snapshots.md walks each one.

The order of the calls is KVM's, not ours (Firecracker's vstate and QEMU's
kvm_arch_put_registers explain the same constraints):

* reading, ``KVM_GET_MP_STATE`` first: it may deliver a pending INIT/SIPI and
  so change the registers read after it;
* writing, CPUID first (KVM checks MSRs and XCRs against it); ``SET_REGS``
  clears a pending exception, so ``SET_VCPU_EVENTS``, which restores it,
  comes last; ``SET_SREGS`` sets the APIC base, so ``SET_LAPIC`` follows it;
  ``SET_MSRS`` after the LAPIC (the TSC-deadline MSR is refused while the
  LAPIC is not in TSC-deadline mode).

Every vCPU must be stopped (out of ``KVM_RUN``) while its state is read or
written, and not in the middle of an I/O exit: see :meth:`Runner.pause`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.errors import SnapshotError
from vmm.kvm.ioctl import ffi, lib

# The structures a vCPU's and a VM's state are made of, and their sizes here.
VCPU_STRUCTS = {
    "regs": "struct kvm_regs",
    "sregs": "struct kvm_sregs",
    "xsave": "struct kvm_xsave",
    "fpu": "struct kvm_fpu",
    "xcrs": "struct kvm_xcrs",
    "debugregs": "struct kvm_debugregs",
    "lapic": "struct kvm_lapic_state",
    "events": "struct kvm_vcpu_events",
}
VM_STRUCTS = {
    "pic_master": "struct kvm_irqchip",
    "pic_slave": "struct kvm_irqchip",
    "ioapic": "struct kvm_irqchip",
    "pit2": "struct kvm_pit_state2",
    "clock": "struct kvm_clock_data",
}


def to_bytes(cdata) -> bytes:
    """The bytes of a cffi struct pointer (what the ioctl filled)."""
    return bytes(ffi.buffer(cdata))


def from_bytes(ctype: str, data: bytes, what: str):
    """A new cffi struct filled from saved bytes, which must be exactly its size."""
    size = ffi.sizeof(ctype)
    if len(data) != size:
        raise SnapshotError(f"{what}: {len(data)} bytes, {ctype} is {size} here")
    cdata = ffi.new(ctype + " *")
    ffi.memmove(cdata, data, size)
    return cdata


@dataclass(frozen=True)
class VcpuState:
    """One vCPU. Optional parts are None where this KVM lacks the capability."""

    vcpu_id: int
    cpuid: tuple[tuple[int, int, int, int, int, int, int], ...]  # what KVM_SET_CPUID2 was given
    mp_state: int
    regs: bytes
    sregs: bytes
    xsave: bytes | None  # KVM_GET_XSAVE (x87, SSE, AVX...), or else
    fpu: bytes | None  # KVM_GET_FPU (x87 and SSE only)
    xcrs: bytes | None
    debugregs: bytes | None
    lapic: bytes
    msrs: tuple[tuple[int, int], ...]  # (index, value), in KVM_GET_MSR_INDEX_LIST order
    events: bytes

    def rip(self) -> int:
        return from_bytes("struct kvm_regs", self.regs, "regs").rip


@dataclass(frozen=True)
class VmState:
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit2: bytes
    clock: bytes | None  # kvmclock; None without KVM_CAP_ADJUST_CLOCK


@dataclass(frozen=True)
class Capabilities:
    """Which optional state ioctls this KVM has (the same on save and restore)."""

    xsave: bool
    xcrs: bool
    debugregs: bool
    clock: bool

    @classmethod
    def of(cls, vm) -> "Capabilities":
        return cls(
            xsave=bool(vm.check_extension(lib.KVM_CAP_XSAVE)),
            xcrs=bool(vm.check_extension(lib.KVM_CAP_XCRS)),
            debugregs=bool(vm.check_extension(lib.KVM_CAP_DEBUGREGS)),
            clock=bool(vm.check_extension(lib.KVM_CAP_ADJUST_CLOCK)),
        )


# --- vCPUs ---------------------------------------------------------------------------
def read_msrs(vcpu, indices: list[int]) -> tuple[tuple[int, int], ...]:
    """Every MSR of the list KVM can read for this vCPU.

    KVM_GET_MSRS stops at the first MSR it cannot read and says how many it
    read; the list KVM reports can hold MSRs a given vCPU lacks (a vendor's
    MSR on the other vendor's CPU model), so read on past each refusal.
    """
    values: list[tuple[int, int]] = []
    remaining = list(indices)
    while remaining:
        got = vcpu.get_msrs(remaining)
        values += [(index, got[index]) for index in remaining[: len(got)]]
        remaining = remaining[len(got) + 1 :]  # skip the one refused
    return tuple(values)


def capture_vcpu(vcpu, cpuid, msr_indices: list[int], caps: Capabilities) -> VcpuState:
    mp_state = vcpu.get_mp_state()  # first: it may change the rest
    return VcpuState(
        vcpu_id=vcpu.id,
        cpuid=tuple(tuple(entry) for entry in cpuid),
        mp_state=mp_state,
        regs=to_bytes(vcpu.get_regs()),
        sregs=to_bytes(vcpu.get_sregs()),
        xsave=to_bytes(vcpu.get_xsave()) if caps.xsave else None,
        fpu=None if caps.xsave else to_bytes(vcpu.get_fpu()),
        xcrs=to_bytes(vcpu.get_xcrs()) if caps.xcrs else None,
        debugregs=to_bytes(vcpu.get_debugregs()) if caps.debugregs else None,
        lapic=to_bytes(vcpu.get_lapic()),
        msrs=read_msrs(vcpu, msr_indices),
        events=to_bytes(vcpu.get_vcpu_events()),
    )


def restore_vcpu(vcpu, state: VcpuState) -> None:
    """Put a saved state into a new vCPU, in the order KVM needs (module docstring)."""
    what = f"vcpu{state.vcpu_id}"
    vcpu.set_cpuid2(list(state.cpuid))
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs(from_bytes("struct kvm_regs", state.regs, f"{what}.regs"))
    vcpu.set_sregs(from_bytes("struct kvm_sregs", state.sregs, f"{what}.sregs"))
    if state.xsave is not None:
        vcpu.set_xsave(from_bytes("struct kvm_xsave", state.xsave, f"{what}.xsave"))
    elif state.fpu is not None:
        vcpu.set_fpu(from_bytes("struct kvm_fpu", state.fpu, f"{what}.fpu"))
    if state.xcrs is not None:
        vcpu.set_xcrs(from_bytes("struct kvm_xcrs", state.xcrs, f"{what}.xcrs"))
    if state.debugregs is not None:
        vcpu.set_debugregs(from_bytes("struct kvm_debugregs", state.debugregs, f"{what}.debugregs"))
    vcpu.set_lapic(from_bytes("struct kvm_lapic_state", state.lapic, f"{what}.lapic"))
    msrs = dict(state.msrs)
    if msrs:
        taken = vcpu.set_msrs(msrs)
        if taken != len(msrs):
            index = list(msrs)[taken]
            raise SnapshotError(f"{what}: KVM refused MSR {index:#x} ({taken} of {len(msrs)} set)")
    vcpu.set_vcpu_events(from_bytes("struct kvm_vcpu_events", state.events, f"{what}.events"))


# --- the VM: interrupt controllers, PIT, clock --------------------------------------------
def capture_vm(vm, caps: Capabilities) -> VmState:
    clock = None
    if caps.clock:
        clock = to_bytes(vm.get_clock())
    return VmState(
        pic_master=to_bytes(vm.get_irqchip(lib.KVM_IRQCHIP_PIC_MASTER)),
        pic_slave=to_bytes(vm.get_irqchip(lib.KVM_IRQCHIP_PIC_SLAVE)),
        ioapic=to_bytes(vm.get_irqchip(lib.KVM_IRQCHIP_IOAPIC)),
        pit2=to_bytes(vm.get_pit2()),
        clock=clock,
    )


def restore_vm(vm, state: VmState) -> None:
    for name, chip_id in (("pic_master", lib.KVM_IRQCHIP_PIC_MASTER),
                          ("pic_slave", lib.KVM_IRQCHIP_PIC_SLAVE),
                          ("ioapic", lib.KVM_IRQCHIP_IOAPIC)):
        chip = from_bytes("struct kvm_irqchip", getattr(state, name), name)
        if chip.chip_id != chip_id:
            raise SnapshotError(f"{name}: irqchip id {chip.chip_id}, expected {chip_id}")
        vm.set_irqchip(chip)
    vm.set_pit2(from_bytes("struct kvm_pit_state2", state.pit2, "pit2"))
    if state.clock is not None:
        clock = from_bytes("struct kvm_clock_data", state.clock, "clock")
        # The saved value as it was: the guest's clocks stand still while it is
        # saved, as its TSC does (restored from MSR 0x10); /init sets the wall
        # clock from the host. No KVM_CLOCK_REALTIME/HOST_TSC: those would make
        # KVM advance the clock by the time spent on disk. (On PVM the TSC
        # cannot be restored: the guest reads the host's; see
        # vmm/arch/x86_64/pvm.py, PVM_CLOCK_OPTIONS.)
        clock.flags = 0
        vm.set_clock(clock)
