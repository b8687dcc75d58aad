"""vCPU state for the first instruction: registers, segments, CPUID, MSRs.

Two starting points:

* the reset vector (firmware): 16-bit real mode at F000:FFF0, as a PC's CPU
  comes out of reset;
* the Linux 64-bit boot protocol and PVH entry: see :func:`setup_long_mode`
  and :func:`setup_protected_mode` (Documentation/x86/boot.rst).
"""

from __future__ import annotations

from vmm.arch.x86_64 import layout
from vmm.kvm.system import Kvm
from vmm.kvm.vcpu import Vcpu

# CPUID leaves we edit.
CPUID_FEATURES = 0x1
CPUID_EXT_FEATURES = 0x7
CPUID_TOPOLOGY = 0xB
CPUID_FEATURES_ECX_HYPERVISOR = 1 << 31
CPUID_FEATURES_ECX_X2APIC = 1 << 21


def supported_cpuid(kvm: Kvm, vcpu_id: int, cpus: int) -> list[tuple[int, int, int, int, int, int, int]]:
    """KVM's supported CPUID, made per-vCPU: each vCPU's own APIC id and count."""
    entries = []
    for function, index, flags, eax, ebx, ecx, edx in kvm.get_supported_cpuid():
        if function == CPUID_FEATURES:
            # EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
            ebx = (ebx & 0x0000FFFF) | (vcpu_id << 24) | (max(cpus, 1) << 16)
            edx |= 1 << 28  # HTT: the count in EBX[23:16] is valid
        elif function == CPUID_TOPOLOGY:
            edx = vcpu_id  # x2APIC id of this logical processor
        entries.append((function, index, flags, eax, ebx, ecx, edx))
    return entries




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
