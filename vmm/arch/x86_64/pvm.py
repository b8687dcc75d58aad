"""Everything this host's KVM PVM backend needs, and nothing else does.

PVM ("pagetable-based virtual machine", the kvm_pvm module) runs guests
without VT-x/AMD-V. Guest kernel code runs in KVM's x86 instruction emulator,
which cannot do everything a CPU does. Each quirk below was measured on our CI
host (see ../shared/PLATFORM.md and docs/); none applies on hardware KVM,
where vmm never loads this module's workarounds (builder: only when
``detect_flavour() is Flavour.PVM``).

1. Emulation failures the guest survives (KVM_EXIT_INTERNAL_ERROR, suberror 1,
   instruction bytes given): re-entering KVM_RUN would retry the same
   instruction forever (QEMU hangs there), so we complete it ourselves:
   * ``int3`` (0xCC, the kernel's self-test, once per boot): advance RIP by 1
     and inject #BP (vector 3), which is what the CPU would have done;
   * ``fwait`` (0x9B, once per process exit in the FPU code): a no-op when no
     x87 exception is pending, so advance RIP by 1;
   * ``ldmxcsr m32`` / ``stmxcsr m32`` (0F AE /2, /3: a distribution's kernel
     sets MXCSR in ``kernel_fpu_begin``, Debian's cloud kernel at its first
     FPU use in kernel mode on AMD hosts): the memory operand decoded
     (vmm/arch/x86_64/insn.py), its address translated through the guest's
     page tables, MXCSR read or written in the ``KVM_GET/SET_XSAVE`` area, RIP
     advanced; a reserved bit set in the new value is the CPU's #GP(0).
   Any other failure ends the run with RIP, bytes and the guest symbol.
2. Kernel command-line options, each avoiding an instruction the emulator
   cannot run in guest kernel mode or a hang:
   * ``clearcpuid=hypervisor``: a guest that believes it runs on KVM makes
     hypercalls (kvmclock, ptp_kvm); ``vmcall`` hangs inside KVM on PVM;
   * ``clearcpuid=...`` for features the kernel patches in through
     alternatives and the emulator cannot run (see PVM_HIDDEN_FEATURES);
   and options that only save emulated work (PVM_COST_OPTIONS).
3. The guest kernel itself carries our patch for PVM's broken ``syscall``
   (guest-kernel/patches/0001-...): nothing to do here at run time.
"""

from __future__ import annotations

from pathlib import Path

from vmm.arch.x86_64 import insn
from vmm.arch.x86_64.paging import translator
from vmm.kvm.exits import InternalErrorExit
from vmm.kvm.vcpu import Vcpu
from vmm.loader.symbols import SymbolTable

INT3 = 0xCC
FWAIT = 0x9B
BP_VECTOR, GP_VECTOR = 3, 13
EFER_LMA = 1 << 10
XSAVE_MXCSR_WORD = 6  # struct kvm_xsave's region[]: MXCSR at byte 24 of the legacy area
XSAVE_XSTATE_BV_WORD = 128  # the XSAVE header's XSTATE_BV (byte 512): components not in init
XFEATURE_SSE = 1 << 1  # MXCSR belongs to the SSE component
MXCSR_WRITABLE = 0xFFFF  # MXCSR_MASK of the CPUs PVM runs on (DAZ included): the rest #GP

# CPU features the host's CPUID shows the guest (KVM_SET_CPUID2 has no effect
# on PVM) whose instructions fail in the emulator in kernel mode. ``clearcpuid``
# takes /proc/cpuinfo names on Linux 6.1+.
PVM_HIDDEN_FEATURES = (
    "hypervisor",  # no KVM paravirt: vmcall hangs
    # xsave*/xrstor* fail, and so do VEX-encoded (AVX) instructions. Clearing xsave
    # clears what depends on it (arch/x86/kernel/cpu/cpuid-deps.c): xsaveopt, xsavec,
    # xsaves, avx and so avx2, avx512*, pku; the guest's /proc/cpuinfo shows none of
    # them (tests/test_platform.py boots to check).
    "xsave",
    "popcnt",  # popcnt fails (hweight via alternatives)
    "rdpid", "rdtscp",  # rdpid → #UD, rdtscp fails
    "smap",  # stac/clac fail
    "ospke",  # wrpkru/rdpkru fail (pku goes with xsave)
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
    "erms", "fsrm",
    # SIMD in kernel mode: the emulator runs none of SSSE3's and later instructions.
    # Debian's kernel stopped at `movd %ecx,%xmm15` in blake2s_compress_ssse3 (the
    # random pool, built in) while unpacking its initramfs; with them hidden, the
    # kernel's crypto takes its generic C code and udev loads no SIMD module by CPU
    # modalias (aesni_intel, crc32c_intel for ext4's checksums, ghash_clmulni...),
    # whose self-tests would run the instructions at load. Guest user code runs
    # natively and reads the real CPUID: glibc keeps its SSE4/AVX2 string functions.
    "ssse3", "sse4_1", "sse4_2", "pclmulqdq", "aes", "sha_ni",
    # NB clearcpuid= is read into a 128-byte buffer (CLEARCPUID_LIMIT).
)
CLEARCPUID_LIMIT = 127

# Not needed for correctness, only cheaper when every kernel instruction is
# emulated (each measured: `vmm run --boot-timer -- true`, interleaved runs).
PVM_COST_OPTIONS = (
    # Per-cpu first chunk from 4 KiB pages instead of one 2 MiB block per CPU
    # that memblock zeroes whole (0.5 M emulated stores): boot to init
    # 12.4 s -> 11.8 s. On hardware KVM the embedded 2 MiB block is better
    # (per-cpu data in large pages) and zeroing it takes microseconds.
    "percpu_alloc=page",
    # No address-space randomization in the guest: each exec drew random
    # numbers for the stack, mmap base, brk and vDSO, generated by ChaCha20 in
    # emulated kernel code. `echo` run in a restored guest: 420 -> 380 ms. The
    # guest is one user's sandbox for one command; on hardware KVM, where the
    # randomness costs microseconds, the guest keeps its ASLR.
    "norandmaps",  # (our kernel only: PVM_OUR_KERNEL_OPTIONS)
    # Map only the page a file fault asks for, not 16 around it (guest-kernel
    # patch 0007 makes this a boot option): each page mapped costs emulated
    # work twice, at the fault and at the process's exit, touched or not.
    # `echo` in a restored guest 382 -> 360 ms; boot to init unchanged.
    "fault_around_bytes=4096",
)

# A restored guest's clocks jump forward by the time its snapshot spent on
# disk: PVM cannot offset the guest's TSC (guest user code runs natively and
# reads the host's TSC; a KVM_SET_MSRS of IA32_TSC is accepted and ignored:
# saved 0x3dc7f92d0c79, read back 0x4144e3cb676c), and with `tsc=reliable` the
# TSC is the guest's clocksource. RCU's stall detector then sees a grace
# period 21 s old and asks the other vCPUs for backtraces by NMI, and any NMI
# ends a PVM guest: its entry (paranoid_entry) reads the per-CPU base with
# `lsl`, which the emulator cannot run. Measured: a `--cpus 2` snapshot saved
# in TSC-deadline mode and restored 16 min later died at paranoid_entry+0x56
# on every restore (`/proc/uptime` there: 977 s). There is no stall to
# report: the time passed outside the guest.
PVM_CLOCK_OPTIONS = ("rcupdate.rcu_cpu_stall_suppress=1",)

# Our kernel's sandbox for one command gives up ASLR and takes patch 0007's option; a
# distribution's machine keeps its ASLR (its user code runs natively, where randomness
# is the defence it is everywhere), and would pass the unknown option to its init.
PVM_OUR_KERNEL_ONLY = ("norandmaps", "fault_around_bytes=4096")

# (Linux 6.1 knows no `noxsave` any more: "Unknown kernel command line parameters
# noxsave ..., will be passed to user space", ours and Debian's alike; clearcpuid=xsave
# is what hides XSAVE.)
PVM_CMDLINE = ("clearcpuid=" + ",".join(PVM_HIDDEN_FEATURES),
               *(o for o in PVM_COST_OPTIONS if o not in PVM_OUR_KERNEL_ONLY),
               *PVM_CLOCK_OPTIONS)
PVM_OUR_KERNEL_OPTIONS = tuple(o for o in PVM_COST_OPTIONS if o in PVM_OUR_KERNEL_ONLY)

# A distribution's kernel (Debian 12's cloud kernel measured, vmm run --profile) on a
# diet a command line can put it on, as ours went on one by Kconfig:
PVM_FOREIGN_KERNEL_OPTIONS = (
    # Guest kernel code never runs on the CPU under PVM: KVM's emulator executes every
    # instruction of it (../shared/PLATFORM.md), so no speculative-execution gadget in
    # it can run, and the mitigations only add emulated instructions (return thunks,
    # buffer clears on every entry and exit: ~8 % of the boot's samples were
    # srso_return_thunk/retbleed ones). Guest user code runs natively on a host kernel
    # that keeps its own mitigations.
    "mitigations=off",
    # The soft-lockup watchdog fires every 28 s of a boot whose emulated initcalls
    # hold a CPU for minutes, and prints stack traces (emulated too) about it.
    "nowatchdog",
    # Two initcalls that hand minutes of emulated work to a kernel thread, which then
    # holds locks other initcalls wait for: ftrace_check_for_weak_functions queues a
    # kallsyms lookup for each of the 37,697 ftrace records (ftrace_check_work_func ran
    # over 5 minutes, holding ftrace_lock while init_kprobe_trace waited on it: hung-task
    # warnings), trace_eval_init rewrites every trace event's format with enum values.
    # Without them: no check that an ftrace record is not a discarded weak function's
    # (only matters to a user of ftrace), and trace event formats show enum names.
    # (Both are subsys_initcalls in 6.1; the boot's other trace set-up, ~30 s of it,
    # trace_init() and ftrace_init() in start_kernel, no command line can skip.)
    "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init",
    # The crypto API tests every algorithm when it registers (not in FIPS mode, where
    # fips=1 keeps the tests). Emulated, a test can outlast the 60 s a user of the
    # algorithm waits for it: "Loading compiled-in X.509 certificates", then 60 s
    # later "Problem loading in-kernel X.509 certificate (-110)" (ETIMEDOUT, from
    # crypto_larval_wait), Debian 12's kernel on AMD EPYC.
    "cryptomgr.notests=1",
)

# Our guest kernel's PVM patches (guest-kernel/patches/0001, 0003) default to on
# so that a plain `vmm run` works here; on any other KVM they are turned off
# explicitly: the syscall fix-up is inert on hardware (it recognises a fault
# only PVM produces) and brk pre-population is a PVM workaround that costs
# memory elsewhere. Only our kernel knows them (another kernel would hand the
# unknown options to /init as environment variables).
OUR_KERNEL_ELSEWHERE = ("pvm_syscall_fixup=0", "pvm_brk_populate=0")


# With segmentation offloaded (a TAP NIC: HOST_TSO4/6), Linux sizes each TCP
# segment it hands the NIC to about 1 ms of its sending rate
# (tcp_tso_autosize), and no less than tcp_min_tso_segs MSS, 2 by default. On
# PVM every frame costs the guest ~10 ms of emulated kernel work whatever its
# size, so the rate stays low and the segments stay at 2 MSS: guest -> host
# through a TAP device 0.24 MB/s with 2.8 KB frames. At 44 MSS (63,712 bytes,
# under the 64 KiB a segment may be) the frames average 45 KB: 1.24 MB/s
# (busybox httpd's sendfile, 8 MiB; docs/networking.md). `sysctl.` options on
# the command line are applied by the kernel before /init (Linux 5.8+).
PVM_NET_OPTIONS = ("sysctl.net.ipv4.tcp_min_tso_segs=44",)


# The TSC's frequency, told on the command line: a guest that must not know it runs on
# KVM (no kvmclock, no leaf 0x40000010) on an AMD host (Intel's leaves 0x15/0x16 say
# it, vmm/arch/x86_64/cpuid.py) otherwise measures it against the PIT, which fails in
# the emulator ("tsc: Unable to calibrate against PIT ... Marking TSC unstable"), and
# then calibrates its delay loop against jiffies: Debian's 6.1 kernel spent over 10
# minutes in calibrate_delay there (vmm run --profile) and never reached init; ours, 0.1 s.
#
# --pvm-time-scale N tells it a frequency N times the real one: its clocks then run N
# times slower, its timer ticks N times less often per real second. Debian's kernel
# ticks at 250 Hz and its tick handler, emulated, took 59 % of the boot's profile
# samples; with N = 4 it reached /init in 345 s instead of 688 s (AMD EPYC). The guest's
# date falls behind and its timeouts stretch N times: opt-in.
def tsc_option(tsc_khz: int | None, time_scale: int = 1) -> tuple[str, ...]:
    return (f"tsc_early_khz={tsc_khz * time_scale}",) if tsc_khz else ()


def cmdline_options(flavour, our_kernel: bool, *, segmentation_offload: bool = False,
                    tsc_khz: int | None = None, time_scale: int = 1) -> tuple[str, ...]:
    """The PVM-specific part of a Linux guest's command line for this KVM flavour;
    ``segmentation_offload``: a NIC offers TSO; ``tsc_khz``: KVM_GET_TSC_KHZ;
    ``time_scale``: --pvm-time-scale."""
    from vmm.kvm.flavour import Flavour

    if flavour is Flavour.PVM:
        return (PVM_CMDLINE + (PVM_OUR_KERNEL_OPTIONS if our_kernel else PVM_FOREIGN_KERNEL_OPTIONS)
                + tsc_option(tsc_khz, time_scale)
                + (PVM_NET_OPTIONS if segmentation_offload else ()))
    return OUR_KERNEL_ELSEWHERE if our_kernel else ()


class PvmQuirks:
    """The runner's ExitQuirks for PVM hosts: fix what the emulator cannot do."""

    def __init__(self, memory, system_map: Path | None = None) -> None:
        self.memory = memory  # guest RAM: the memory operands of ldmxcsr/stmxcsr
        self.system_map = system_map
        self._symbols: SymbolTable | None = None

    def handle_internal_error(self, vcpu: Vcpu, exit: InternalErrorExit) -> str | None:
        if not exit.is_emulation_failure or not exit.instruction:
            return None
        opcode = exit.instruction[0]
        if opcode == INT3:
            self._skip(vcpu, 1)
            self._inject(vcpu, BP_VECTOR)
            return "int3"
        if opcode == FWAIT:
            self._skip(vcpu, 1)
            return "fwait"
        try:
            instruction = insn.decode(exit.instruction)
        except insn.DecodeError:
            return None
        return self._complete_mxcsr(vcpu, instruction)

    def _complete_mxcsr(self, vcpu: Vcpu, instruction: insn.Instruction) -> str | None:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        if not sregs.efer & EFER_LMA or not sregs.cs.l:
            return None  # decoded for 64-bit mode only: the kernel's
        registers = {name: getattr(regs, name) for name in insn.GPRS}
        next_rip = regs.rip + instruction.length
        linear = instruction.operand.address(registers, next_rip,
                                             {"fs": sregs.fs.base, "gs": sregs.gs.base})
        translate = translator(self.memory, sregs.cr3)
        physical = translate(linear)
        if physical is None or linear & 0xFFF > 0xFFC:  # unmapped, or across two pages
            return None  # (the kernel's operand is on its stack: never seen)
        # MXCSR through the XSAVE area's legacy region (bytes 24-27): on PVM KVM_GET_FPU
        # reads 0 and KVM_SET_FPU changes nothing (measured), the XSAVE area is the state.
        xsave = vcpu.get_xsave()
        if instruction.operation is insn.Operation.LDMXCSR:
            value = self.memory.read_u32(physical)
            if value & ~MXCSR_WRITABLE:
                self._inject(vcpu, GP_VECTOR, error_code=0)  # as the CPU: RIP stays
                return "ldmxcsr"
            xsave.region[XSAVE_MXCSR_WORD] = value
            # With SSE in its init state (XSTATE_BV bit 1 clear: untouched XMM registers,
            # the default MXCSR) the kernel's KVM_SET_XSAVE ignores the MXCSR written: set
            # the bit, or the write is lost whenever the host last saved SSE as init.
            xsave.region[XSAVE_XSTATE_BV_WORD] |= XFEATURE_SSE
            vcpu.set_xsave(xsave)
        else:
            self.memory.write_u32(physical, xsave.region[XSAVE_MXCSR_WORD])
        regs.rip = next_rip
        vcpu.set_regs(regs)
        return instruction.operation.value

    @staticmethod
    def _inject(vcpu: Vcpu, vector: int, error_code: int | None = None) -> None:
        events = vcpu.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = int(error_code is not None)
        events.exception.error_code = error_code or 0
        events.flags = 0
        vcpu.set_vcpu_events(events)

    def _skip(self, vcpu: Vcpu, length: int) -> None:
        regs = vcpu.get_regs()
        regs.rip += length
        vcpu.set_regs(regs)

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
