"""vCPU state for the first instruction: registers, segments, CPUID, MSRs.

The CPUID table itself is worked out in cpuid.py (no KVM there, so it can be
tested on recorded tables); here it is fetched and set. Two starting points:

* the reset vector (firmware): 16-bit real mode at F000:FFF0, as a PC's CPU
  comes out of reset;
* the Linux 64-bit boot protocol and PVH entry: see :func:`setup_long_mode`
  and :func:`setup_protected_mode` (Documentation/x86/boot.rst).
"""

from __future__ import annotations

from vmm.arch.x86_64 import cpuid, layout
from vmm.kvm.system import Kvm
from vmm.kvm.vcpu import Vcpu

def guest_cpus(kvm: Kvm, bsp: Vcpu, cpus: int, flavour) -> list["cpuid.GuestCpu"]:
    """What decides each vCPU's CPUID table, from this KVM (vmm/arch/x86_64/cpuid.py)."""
    from vmm.kvm.flavour import Flavour
    from vmm.kvm.ioctl import lib

    tsc_khz = bsp.get_tsc_khz() if kvm.check_extension(lib.KVM_CAP_GET_TSC_KHZ) else None
    deadline = bool(kvm.check_extension(lib.KVM_CAP_TSC_DEADLINE_TIMER))
    return [cpuid.GuestCpu(vcpu_id, cpus, paravirt=flavour is not Flavour.PVM,
                           tsc_deadline=deadline, tsc_khz=tsc_khz or None)
            for vcpu_id in range(cpus)]


def guest_table(kvm: Kvm, flavour, cpus: int, vcpu_id: int = 0
                ) -> tuple["cpuid.GuestCpu", "cpuid.CpuTable"]:
    """The table vCPU ``vcpu_id`` of a ``cpus``-vCPU guest would get (a throw-away VM asks KVM).

    For `vmm check --cpuid` and benchmarks/bench_hardware.py; a boot sets its vCPUs' own.
    """
    import contextlib

    with contextlib.closing(kvm.create_vm()) as vm, contextlib.closing(vm.create_vcpu(0)) as bsp:
        model = guest_cpus(kvm, bsp, cpus, flavour)[vcpu_id]
    return model, cpuid.normalize(kvm.get_supported_cpuid(), model)


def setup_cpuid(vcpu: Vcpu, supported: list[cpuid.Entry], guest: "cpuid.GuestCpu") -> None:
    """KVM_SET_CPUID2 with vmm's normalized table for this vCPU."""
    vcpu.set_cpuid2(cpuid.normalize(supported, guest).entries)


def setup_reset_vector(vcpu: Vcpu) -> None:
    """Real mode at F000:FFF0 with CS based at 0xF0000 (the top of the first MiB).

    KVM's own reset state puts CS's base at 0xFFFF0000 (the top of 4 GiB,
    where a real PC's flash is aliased); we have no ROM there, so the base
    is the first-MiB alias, where the builder put the image.
    """
    sregs = vcpu.get_sregs()
    sregs.cs.selector = layout.RESET_CS_SELECTOR
    sregs.cs.base = layout.RESET_CS_BASE
    sregs.cs.limit = 0xFFFF
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.selector = 0
        seg.base = 0
        seg.limit = 0xFFFF
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = layout.RESET_IP
    regs.rflags = 0x2  # bit 1 is always set; interrupts off
    vcpu.set_regs(regs)


# --- Linux entry: GDT, page tables, segment and control registers -------------------

# GDT entries (flat segments). The 64-bit boot protocol wants __BOOT_CS = 0x10
# and __BOOT_DS = 0x18 (Documentation/x86/boot.rst); PVH wants a flat 32-bit
# code segment, which we put at 0x08. A TSS descriptor at 0x20 makes TR valid.
GDT_ENTRIES = [
    0x0000000000000000,  # 0x00 null
    0x00CF9B000000FFFF,  # 0x08 32-bit code, base 0, limit 4 GiB (PVH)
    0x00AF9B000000FFFF,  # 0x10 64-bit code (L=1)
    0x00CF93000000FFFF,  # 0x18 data, base 0, limit 4 GiB
    0x0080890000000000,  # 0x20 TSS (available 32/64-bit), base 0, limit 0
]
CODE32_SELECTOR = 0x08
CODE64_SELECTOR = 0x10
DATA_SELECTOR = 0x18
TSS_SELECTOR = 0x20

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

PAGE_PRESENT_RW = 0x3
PAGE_PS = 0x80  # a 2 MiB page in a page-directory entry


def gdt_bytes() -> bytes:
    return b"".join(entry.to_bytes(8, "little") for entry in GDT_ENTRIES)


def _segment_from_gdt(segment, selector: int) -> None:
    """Fill a kvm_segment from our GDT entry, as the CPU would on a load."""
    entry = GDT_ENTRIES[selector >> 3]
    segment.selector = selector
    segment.base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    segment.g = (entry >> 55) & 1
    segment.limit = (limit << 12) | 0xFFF if segment.g else limit
    segment.type = (entry >> 40) & 0xF
    segment.s = (entry >> 44) & 1
    segment.dpl = (entry >> 45) & 3
    segment.present = (entry >> 47) & 1
    segment.avl = (entry >> 52) & 1
    segment.l = (entry >> 53) & 1
    segment.db = (entry >> 54) & 1
    segment.unusable = 0


def identity_page_tables() -> dict[int, bytes]:
    """PML4 → PDPT → 4 page directories: the first 4 GiB mapped 1:1 with 2 MiB pages.

    Returns {guest address: page bytes}; the builder writes them to memory.
    """
    from vmm.arch.x86_64 import layout

    pml4 = (layout.PDPTE | PAGE_PRESENT_RW).to_bytes(8, "little").ljust(4096, b"\0")
    pdpt = b"".join(
        (layout.PDE + i * 4096 | PAGE_PRESENT_RW).to_bytes(8, "little")
        for i in range(layout.PDE_PAGES)
    ).ljust(4096, b"\0")
    pds = b"".join(
        ((i << 21) | PAGE_PRESENT_RW | PAGE_PS).to_bytes(8, "little")
        for i in range(512 * layout.PDE_PAGES)
    )
    return {layout.PML4: pml4, layout.PDPTE: pdpt, layout.PDE: pds}


def _common_sregs(sregs) -> None:
    from vmm.arch.x86_64 import layout

    sregs.gdt.base = layout.BOOT_GDT
    sregs.gdt.limit = len(GDT_ENTRIES) * 8 - 1
    sregs.idt.base = layout.BOOT_IDT
    sregs.idt.limit = 0
    _segment_from_gdt(sregs.tr, TSS_SELECTOR)
    sregs.tr.type = 0xB  # busy TSS: what the CPU sets after LTR
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment_from_gdt(seg, DATA_SELECTOR)


def setup_long_mode(vcpu: Vcpu, entry: int, zero_page: int) -> None:
    """64-bit boot protocol: long mode, paging on (identity map), RSI = zero page."""
    from vmm.arch.x86_64 import layout

    sregs = vcpu.get_sregs()
    _common_sregs(sregs)
    _segment_from_gdt(sregs.cs, CODE64_SELECTOR)
    sregs.cr3 = layout.PML4
    sregs.cr4 |= CR4_PAE
    sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rflags = 0x2
    regs.rip = entry
    regs.rsi = zero_page
    regs.rsp = layout.BOOT_STACK
    regs.rbp = layout.BOOT_STACK
    vcpu.set_regs(regs)


def setup_protected_mode(vcpu: Vcpu, entry: int, start_info: int) -> None:
    """PVH entry: 32-bit flat protected mode, paging off, EBX = hvm_start_info."""
    sregs = vcpu.get_sregs()
    _common_sregs(sregs)
    _segment_from_gdt(sregs.cs, CODE32_SELECTOR)
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & ~CR0_PG
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rflags = 0x2
    regs.rip = entry
    regs.rbx = start_info
    vcpu.set_regs(regs)


# --- MSRs, FPU, local APIC ------------------------------------------------------------
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE_WRITEBACK = (1 << 11) | 6


def setup_msrs(vcpu: Vcpu) -> None:
    """Boot MSR values (as Firecracker sets them), every one checked to have been taken."""
    values = {
        MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
        MSR_IA32_TSC: 0, MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WRITEBACK,
    }
    # KVM_SET_MSRS returns how many it set, stopping at the first it refuses.
    taken = vcpu.set_msrs(values)
    if taken != len(values):
        from vmm.errors import VmmError

        raise VmmError(f"KVM_SET_MSRS set {taken} of {len(values)} boot MSRs: KVM refused MSR "
                       f"{list(values)[taken]:#x}")


def setup_fpu(vcpu: Vcpu) -> None:
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F  # x87 default: all exceptions masked, 64-bit precision
    fpu.mxcsr = 0x1F80  # SSE default: all exceptions masked
    vcpu.set_fpu(fpu)


APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4


def setup_lint(vcpu: Vcpu) -> None:
    """LINT0 = ExtINT (the PIC's output), LINT1 = NMI: the PC's virtual-wire mode."""
    from vmm.kvm.ioctl import ffi

    lapic = vcpu.get_lapic()
    registers = ffi.buffer(lapic.regs)

    def update(offset: int, mode: int) -> None:
        value = int.from_bytes(registers[offset : offset + 4], "little")
        value = (value & ~0x700) | (mode << 8)
        registers[offset : offset + 4] = value.to_bytes(4, "little")

    update(APIC_LVT0, APIC_MODE_EXTINT)
    update(APIC_LVT1, APIC_MODE_NMI)
    vcpu.set_lapic(lapic)
