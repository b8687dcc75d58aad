"""Everything this host's KVM PVM backend needs, and nothing else does.

PVM ("pagetable-based virtual machine", the kvm_pvm module) runs guests
without VT-x/AMD-V. Guest kernel code runs in KVM's x86 instruction emulator,
which cannot do everything a CPU does. Each quirk below was measured on our CI
host (see ../shared/PLATFORM.md and docs/); none applies on hardware KVM,
where vmm never loads this module's workarounds (builder: only when
``detect_flavour() == "pvm"``).

1. Emulation failures the guest survives (KVM_EXIT_INTERNAL_ERROR, suberror 1,
   instruction bytes given): re-entering KVM_RUN would retry the same
   instruction forever (QEMU hangs there), so we complete it ourselves:
   * ``int3`` (0xCC, the kernel's self-test, once per boot): advance RIP by 1
     and inject #BP (vector 3), which is what the CPU would have done;
   * ``fwait`` (0x9B, once per process exit in the FPU code): a no-op when no
     x87 exception is pending, so advance RIP by 1.
   Any other failure ends the run with RIP, bytes and the guest symbol.
2. Kernel command-line options, each avoiding an instruction the emulator
   cannot run in guest kernel mode or a hang:
   * ``clearcpuid=hypervisor``: a guest that believes it runs on KVM makes
     hypercalls (kvmclock, ptp_kvm); ``vmcall`` hangs inside KVM on PVM;
   * ``noxsave``: FPU set-up would use ``xsave``/``xrstor``, which fail;
   * ``clearcpuid=...`` for features the kernel patches in through
     alternatives and the emulator cannot run (see PVM_HIDDEN_FEATURES);
   and options that only save emulated work (PVM_COST_OPTIONS).
3. The guest kernel itself carries our patch for PVM's broken ``syscall``
   (guest-kernel/patches/0001-...): nothing to do here at run time.
"""

from __future__ import annotations

from pathlib import Path

from vmm.kvm.exits import InternalErrorExit
from vmm.kvm.vcpu import Vcpu
from vmm.loader.symbols import SymbolTable

INT3 = 0xCC
FWAIT = 0x9B
BP_VECTOR = 3

# CPU features the host's CPUID shows the guest (KVM_SET_CPUID2 has no effect
# on PVM) whose instructions fail in the emulator in kernel mode. ``clearcpuid``
# takes /proc/cpuinfo names on Linux 6.1+.
PVM_HIDDEN_FEATURES = (
    "hypervisor",  # no KVM paravirt: vmcall hangs
    "xsave", "xsaveopt", "xsavec", "xsaves",  # xsave*/xrstor* fail
    "avx", "avx2", "avx512f",  # VEX-encoded instructions fail
    "popcnt",  # popcnt fails (hweight via alternatives)
    "rdpid", "rdtscp",  # rdpid → #UD, rdtscp fails
    "smap",  # stac/clac fail
    "pku", "ospke",  # wrpkru/rdpkru fail
    "invpcid",
    # (monitor/mwait fail too, but the kernel does not pick them for idle here
    # and "mwait" is no flag name: Linux 6.1 logged it as unknown, so it is gone.)
    "movbe",  # #UD
    "cx16",  # cmpxchg16b fails (SLUB's cmpxchg_double, at ___slab_alloc; our kernel now has SLAB)
    # Not a failure but a cost: with ERMS/FSRM the kernel copies and clears with
    # byte-wise `rep movsb`/`stosb`, which the emulator runs one byte per
    # iteration; without them memcpy/memset/clear_page use `rep movsq`/`stosq`.
    # Measured with `vmm run --profile` (docs/profiling.md): memcpy in the
    # initramfs unpack ~12x cheaper (264 samples of memcpy_erms against 22
    # of memcpy, normalised to the unchanged cpio header parsing).
    # NB clearcpuid= is read into a 128-byte buffer: this list is 120 characters.
    "erms", "fsrm",
)

# Not needed for correctness, only cheaper when every kernel instruction is
# emulated (each measured: `vmm run --boot-timer -- true`, interleaved runs).
PVM_COST_OPTIONS = (
    # Per-cpu first chunk from 4 KiB pages instead of one 2 MiB block per CPU
    # that memblock zeroes whole (0.5 M emulated stores): boot to init
    # 12.4 s -> 11.8 s. On hardware KVM the embedded 2 MiB block is better
    # (per-cpu data in large pages) and zeroing it takes microseconds.
    "percpu_alloc=page",
)

PVM_CMDLINE = ("noxsave", "clearcpuid=" + ",".join(PVM_HIDDEN_FEATURES), *PVM_COST_OPTIONS)


def cmdline_options() -> tuple[str, ...]:
    return PVM_CMDLINE


class PvmQuirks:
    """The runner's ExitQuirks for PVM hosts: fix what the emulator cannot do."""

    def __init__(self, system_map: Path | None = None) -> None:
        self.system_map = system_map
        self._symbols: SymbolTable | None = None
        self.completed: dict[str, int] = {}  # "int3" → times completed for the guest

    def handle_internal_error(self, vcpu: Vcpu, exit: InternalErrorExit) -> bool:
        if not exit.is_emulation_failure or not exit.instruction:
            return False
        opcode = exit.instruction[0]
        if opcode == INT3:
            self._skip(vcpu, 1)
            events = vcpu.get_vcpu_events()
            events.exception.injected = 1
            events.exception.nr = BP_VECTOR
            events.exception.has_error_code = 0
            events.exception.error_code = 0
            events.flags = 0
            vcpu.set_vcpu_events(events)
            self._count("int3")
            return True
        if opcode == FWAIT:
            self._skip(vcpu, 1)
            self._count("fwait")
            return True
        return False

    def _skip(self, vcpu: Vcpu, length: int) -> None:
        regs = vcpu.get_regs()
        regs.rip += length
        vcpu.set_regs(regs)

    def _count(self, what: str) -> None:
        self.completed[what] = self.completed.get(what, 0) + 1

    def describe_failure(self, vcpu: Vcpu, exit: InternalErrorExit) -> str:
        rip = vcpu.get_regs().rip
        text = f"KVM could not emulate the guest instruction at rip {rip:#x}"
        if self.system_map is not None:
            # Read only now: parsing System.map (~40,000 lines) would cost every
            # boot ~20 ms before the first KVM_RUN, for a failure that is rare.
            if self._symbols is None:
                self._symbols = SymbolTable.from_system_map(self.system_map)
            text += f" ({self._symbols.describe(rip)})"
        if exit.instruction:
            text += f", bytes {exit.instruction.hex(' ')}"
        text += f" (KVM_EXIT_INTERNAL_ERROR suberror {exit.suberror}; a PVM host limitation)"
        return text
