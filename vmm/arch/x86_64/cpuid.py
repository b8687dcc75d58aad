"""The CPU a guest sees: KVM's supported CPUID, normalized for one vCPU of this VM.

``KVM_GET_SUPPORTED_CPUID`` answers "what could a guest be told?": the host's
features that KVM can virtualize, with the host's own identity in some fields
(the APIC id of whichever CPU ran the ioctl, the host's topology). A VMM turns
that into the table each vCPU is given with ``KVM_SET_CPUID2``, as
Firecracker's ``cpu_config/x86_64/cpuid`` normalization and kvmtool's
``x86/cpuid.c`` do. On hardware KVM the guest's ``cpuid`` instruction returns
exactly this table. (On KVM PVM the guest kernel's ``cpuid`` runs in KVM's
emulator and returns it too; only the guest's user-mode code reads the host's
own values: docs/cpu-model.md.)

What vmm changes, and why (each change is recorded, for ``vmm check --cpuid``):

* identity (leaf 1): each vCPU's own APIC id; HTT and a logical-processor
  count only when the VM has more than one vCPU;
* topology (leaves 4, 0xB, 0x1F; AMD 0x80000008, 0x8000001D, 0x8000001E):
  ``--cpus`` N vCPUs are N cores of one socket, one thread each, x2APIC id =
  vCPU index; not the host's sockets and SMT siblings, which the guest's
  scheduler would otherwise plan for;
* timers (leaf 1 ECX[24]): TSC-deadline when KVM says it has it
  (``KVM_CAP_TSC_DEADLINE_TIMER``); KVM reports the bit in its supported CPUID
  only from Linux 6.14, and without it the guest calibrates its LAPIC timer
  against the PIT (~100 ms of every boot);
* TSC frequency (Intel's leaves 0x15 and 0x16, KVM's 0x40000010): from
  ``KVM_GET_TSC_KHZ``, so the guest needs no calibration loop;
* paravirtualization (leaf 1 ECX[31] and leaves 0x40000000-0x40000010): the
  hypervisor bit and KVM's signature with the PV features vmm supports, so a
  guest uses kvmclock; except on PVM, where ``vmcall`` hangs inside KVM and the
  guest must not know it runs on KVM (vmm/arch/x86_64/pvm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# (function, index, flags, eax, ebx, ecx, edx): KVM's struct kvm_cpuid_entry2.
Entry = tuple[int, int, int, int, int, int, int]
REGISTERS = ("eax", "ebx", "ecx", "edx")
INTEL = "GenuineIntel"
AMD = "AuthenticAMD"

LEAF_VENDOR = 0x0
LEAF_FEATURES = 0x1
LEAF_CACHE = 0x4  # Intel deterministic cache parameters, one subleaf per cache
LEAF_TOPOLOGY = 0xB  # x2APIC topology: one subleaf per level (SMT, core)
LEAF_TSC = 0x15  # TSC / core crystal clock ratio
LEAF_FREQUENCY = 0x16  # processor base/max/bus frequency (MHz)
LEAF_TOPOLOGY_V2 = 0x1F  # like 0xB, with more level types; Linux prefers it
LEAF_KVM_SIGNATURE = 0x40000000
LEAF_KVM_FEATURES = 0x40000001
LEAF_KVM_TIMING = 0x40000010  # TSC and APIC bus frequency (kHz), the hypervisor timing leaf
LEAF_EXT_FEATURES = 0x80000001
LEAF_AMD_SIZES = 0x80000008  # ECX: core count and APIC id size
LEAF_AMD_CACHE = 0x8000001D  # AMD's leaf 4
LEAF_AMD_TOPOLOGY = 0x8000001E  # AMD extended APIC id, core and node ids

FEATURES_ECX_TSC_DEADLINE = 1 << 24
FEATURES_ECX_HYPERVISOR = 1 << 31
FEATURES_EDX_HTT = 1 << 28
EXT_FEATURES_ECX_TOPOEXT = 1 << 22

LEAF_NAMES = {
    0x0: "max basic leaf, vendor", 0x1: "family/model, APIC id, features", 0x2: "cache descriptors",
    0x4: "cache parameters (Intel)", 0x6: "thermal and power", 0x7: "structured features",
    0xB: "x2APIC topology", 0xD: "XSAVE state", 0x15: "TSC/crystal ratio (Intel)",
    0x16: "processor frequency (Intel)", 0x1F: "x2APIC topology v2",
    0x40000000: "hypervisor signature", 0x40000001: "KVM PV features",
    0x40000010: "TSC and APIC bus frequency", 0x80000000: "max extended leaf, vendor",
    0x80000001: "extended features", 0x80000002: "brand string", 0x80000003: "brand string",
    0x80000004: "brand string", 0x80000008: "address sizes, core count (AMD)",
    0x8000001D: "cache topology (AMD)", 0x8000001E: "core/node ids (AMD)",
}

# kvm_cpuid_entry2.flags: the index (subleaf) is significant.
FLAG_SIGNIFICANT_INDEX = 1

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
# KVM's LAPIC timer counts at 1 GHz (APIC_BUS_CYCLE_NS = 1): the crystal
# frequency a guest reads from leaf 0x15 is what it programs the timer with.
KVM_APIC_BUS_HZ = 1_000_000_000

TOPOLOGY_LEVEL_INVALID = 0
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2

# KVM paravirtual features (leaf 0x40000001 EAX; Documentation/virt/kvm/x86/cpuid.rst)
# that vmm lets a guest use: each is served by KVM itself, and its MSRs are in
# KVM_GET_MSR_INDEX_LIST, so snapshots carry them. Bits not listed need the
# VMM's help (MSI_EXT_DEST_ID: extended destination ids in MSI routes vmm does
# not build; HC_MAP_GPA_RANGE and MIGRATION_CONTROL: hypercalls that exit to
# the VMM) or are new to vmm, so the guest is not told of them.
KVM_PV_FEATURES = {
    0: "CLOCKSOURCE (kvmclock, old MSRs)",
    1: "NOP_IO_DELAY (no port-0x80 delays)",
    3: "CLOCKSOURCE2 (kvmclock)",
    4: "ASYNC_PF",
    5: "STEAL_TIME",
    6: "PV_EOI",
    7: "PV_UNHALT",
    9: "PV_TLB_FLUSH",
    10: "ASYNC_PF_VMEXIT",
    11: "PV_SEND_IPI",
    12: "POLL_CONTROL",
    13: "PV_SCHED_YIELD",
    14: "ASYNC_PF_INT",
    24: "CLOCKSOURCE_STABLE_BIT",
}
KVM_PV_FEATURE_MASK = sum(1 << bit for bit in KVM_PV_FEATURES)


@dataclass(frozen=True)
class GuestCpu:
    """Everything the table depends on besides KVM's supported CPUID."""

    vcpu_id: int
    cpus: int
    paravirt: bool = True  # hypervisor bit and KVM leaves (False on PVM)
    tsc_deadline: bool = False  # KVM_CAP_TSC_DEADLINE_TIMER
    tsc_khz: int | None = None  # KVM_GET_TSC_KHZ; None when KVM cannot say


@dataclass(frozen=True)
class Change:
    """One register of one leaf that vmm set differently from KVM's supported value."""

    function: int
    index: int
    register: str  # "eax", "ebx", "ecx", "edx"; "" when the whole leaf was added or removed
    old: int | None  # None: the leaf was not in KVM's table
    new: int | None  # None: vmm removed the leaf
    why: str


@dataclass(frozen=True)
class CpuTable:
    entries: list[Entry]
    changes: list[Change]


def apic_id_shift(cpus: int) -> int:
    """Bits of the APIC id that number the cores of the socket: ceil(log2(cpus))."""
    return max(cpus - 1, 0).bit_length()


class _Table:
    """KVM's entries by (function, index), edited in place with every change recorded."""

    def __init__(self, supported: list[Entry]) -> None:
        self.leaves: dict[tuple[int, int], list[int]] = {
            (f, i): [flags, eax, ebx, ecx, edx] for f, i, flags, eax, ebx, ecx, edx in supported
        }
        self.changes: list[Change] = []

    def has(self, function: int, index: int = 0) -> bool:
        return (function, index) in self.leaves

    def get(self, function: int, index: int, register: str) -> int:
        return self.leaves[function, index][1 + REGISTERS.index(register)]

    def set(self, function: int, index: int, register: str, value: int, why: str) -> None:
        leaf = self.leaves[function, index]
        slot = 1 + REGISTERS.index(register)
        if leaf[slot] != value:
            self.changes.append(Change(function, index, register, leaf[slot], value, why))
            leaf[slot] = value

    def set_bit(self, function: int, index: int, register: str, bit: int, on: bool, why: str) -> None:
        value = self.get(function, index, register)
        self.set(function, index, register, value | bit if on else value & ~bit, why)

    def put(self, function: int, index: int, flags: int, values: tuple[int, int, int, int],
            why: str) -> None:
        """Set a whole leaf, adding it if KVM's table lacks it."""
        if not self.has(function, index):
            self.leaves[function, index] = [flags, *values]
            self.changes.append(Change(function, index, "", None, None, "added: " + why))
            return
        self.leaves[function, index][0] = flags
        for register, value in zip(REGISTERS, values):
            self.set(function, index, register, value, why)

    def remove(self, function: int, why: str, *, from_index: int = 0) -> None:
        """Drop the leaf's subleaves from ``from_index`` on (all of them by default)."""
        for key in [k for k in self.leaves if k[0] == function and k[1] >= from_index]:
            del self.leaves[key]
            self.changes.append(Change(key[0], key[1], "", None, None, "removed: " + why))

    def subleaves(self, function: int) -> list[int]:
        return sorted(i for f, i in self.leaves if f == function)

    def max_basic(self) -> int:
        return self.get(LEAF_VENDOR, 0, "eax") if self.has(LEAF_VENDOR) else 0

    def vendor(self) -> str:
        return vendor([e for e in self.entries() if e[0] == LEAF_VENDOR])

    def entries(self) -> list[Entry]:
        return [(f, i, v[0], v[1], v[2], v[3], v[4]) for (f, i), v in sorted(self.leaves.items())]


def vendor(supported: list[Entry]) -> str:
    """'GenuineIntel', 'AuthenticAMD', ... from leaf 0 (EBX, EDX, ECX in that order)."""
    for function, index, _flags, _eax, ebx, ecx, edx in supported:
        if function == LEAF_VENDOR and index == 0:
            return b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode("latin-1")
    return ""


def normalize(supported: list[Entry], guest: GuestCpu) -> CpuTable:
    """The CPUID table for one vCPU: KVM's supported table with vmm's changes applied."""
    table = _Table(supported)
    _identity(table, guest)
    _timers(table, guest)
    _topology(table, guest)
    _tsc_frequency(table, guest)
    _paravirt(table, guest)
    return CpuTable(table.entries(), table.changes)


def _identity(table: _Table, guest: GuestCpu) -> None:
    if not table.has(LEAF_FEATURES):
        return
    ebx = table.get(LEAF_FEATURES, 0, "ebx")
    # EBX[31:24] initial APIC id; EBX[23:16] addressable logical ids in the
    # package, valid only with HTT (EDX[28]): a one-vCPU VM is no multi-core package.
    logical = 1 << apic_id_shift(guest.cpus) if guest.cpus > 1 else 1
    table.set(LEAF_FEATURES, 0, "ebx", (ebx & 0xFFFF) | (guest.vcpu_id << 24) | (logical << 16),
              f"this vCPU's APIC id ({guest.vcpu_id}) and {logical} logical id(s) in the package")
    table.set_bit(LEAF_FEATURES, 0, "edx", FEATURES_EDX_HTT, guest.cpus > 1,
                  "HTT: a package of more than one logical CPU" if guest.cpus > 1
                  else "HTT off: one vCPU")


def _timers(table: _Table, guest: GuestCpu) -> None:
    if not table.has(LEAF_FEATURES):
        return
    table.set_bit(LEAF_FEATURES, 0, "ecx", FEATURES_ECX_TSC_DEADLINE, guest.tsc_deadline,
                  "TSC-deadline LAPIC timer: KVM_CAP_TSC_DEADLINE_TIMER (no LAPIC calibration)"
                  if guest.tsc_deadline else "no TSC-deadline timer in this KVM")


def _topology(table: _Table, guest: GuestCpu) -> None:
    shift = apic_id_shift(guest.cpus)
    cores = 1 << shift
    apic_id = guest.vcpu_id
    why = f"{guest.cpus} vCPU(s) = cores of one socket, one thread each"
    # Leaf 4: EAX[31:26] cores in the package - 1; EAX[25:14] logical CPUs
    # sharing the cache - 1.
    for index, shared in _caches(table, LEAF_CACHE):
        eax = table.get(LEAF_CACHE, index, "eax") & 0x3FFF
        sharing = cores - 1 if shared else 0
        table.set(LEAF_CACHE, index, "eax", eax | ((cores - 1) << 26) | (sharing << 14), why)
    # Leaves 0xB and 0x1F: SMT level (1 thread), core level (the whole VM), end.
    for leaf in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
        if not table.has(leaf) or table.max_basic() < leaf:
            continue
        table.remove(leaf, "levels beyond the core: " + why, from_index=3)
        table.put(leaf, 0, FLAG_SIGNIFICANT_INDEX, (0, 1, TOPOLOGY_LEVEL_SMT << 8, apic_id), why)
        table.put(leaf, 1, FLAG_SIGNIFICANT_INDEX,
                  (shift, guest.cpus, (TOPOLOGY_LEVEL_CORE << 8) | 1, apic_id), why)
        table.put(leaf, 2, FLAG_SIGNIFICANT_INDEX, (0, 0, (TOPOLOGY_LEVEL_INVALID << 8) | 2, apic_id),
                  why)
    if table.vendor() != AMD:
        return
    # AMD: NC (cores - 1) and the APIC id bits they take; caches as in leaf 4.
    if table.has(LEAF_AMD_SIZES):
        ecx = table.get(LEAF_AMD_SIZES, 0, "ecx") & ~0xF0FF
        table.set(LEAF_AMD_SIZES, 0, "ecx", ecx | (shift << 12) | (guest.cpus - 1), why)
    for index, shared in _caches(table, LEAF_AMD_CACHE):
        eax = table.get(LEAF_AMD_CACHE, index, "eax") & ~(0xFFF << 14)
        table.set(LEAF_AMD_CACHE, index, "eax", eax | ((cores - 1 if shared else 0) << 14), why)
    topoext = (table.has(LEAF_EXT_FEATURES)
               and table.get(LEAF_EXT_FEATURES, 0, "ecx") & EXT_FEATURES_ECX_TOPOEXT)
    if topoext and table.has(LEAF_AMD_TOPOLOGY):
        # EAX extended APIC id; EBX[15:8] threads per core - 1, EBX[7:0] core id;
        # ECX[10:8] nodes per socket - 1, ECX[7:0] node id.
        table.put(LEAF_AMD_TOPOLOGY, 0, 0, (apic_id, apic_id & 0xFF, 0, 0), why)


def _caches(table: _Table, leaf: int) -> list[tuple[int, bool]]:
    """(subleaf, shared by the socket?) for each cache a leaf 4 / 0x8000001D lists.

    EAX[4:0] is the cache type (0: no more caches), EAX[7:5] its level: L1 and
    L2 are a core's own, the last level beyond L2 is the whole socket's.
    """
    levels = [(i, (table.get(leaf, i, "eax") >> 5) & 7) for i in table.subleaves(leaf)
              if table.get(leaf, i, "eax") & 0x1F]
    last = max((level for _i, level in levels), default=0)
    return [(index, level == last and level > 2) for index, level in levels]


def _tsc_frequency(table: _Table, guest: GuestCpu) -> None:
    if not guest.tsc_khz:
        return
    khz = guest.tsc_khz
    why = f"TSC {khz} kHz from KVM_GET_TSC_KHZ: no calibration in the guest"
    if table.vendor() != INTEL:
        return  # leaves 0x15/0x16 are Intel's; AMD guests learn it from kvmclock (0x40000010)
    if table.has(LEAF_TSC) and table.max_basic() >= LEAF_TSC:
        # TSC Hz = ECX * EBX / EAX. ECX is the crystal that also drives the
        # LAPIC timer, which KVM runs at 1 GHz; EBX/EAX = tsc_khz / 10^6 is exact
        # in Linux's integer arithmetic (crystal_khz * EBX / EAX).
        table.put(LEAF_TSC, 0, 0, (1_000_000, khz, KVM_APIC_BUS_HZ, 0), why)
    if table.has(LEAF_FREQUENCY) and table.max_basic() >= LEAF_FREQUENCY:
        mhz = khz // 1000
        table.put(LEAF_FREQUENCY, 0, 0, (mhz, mhz, KVM_APIC_BUS_HZ // 1_000_000, 0), why)


def _paravirt(table: _Table, guest: GuestCpu) -> None:
    if not guest.paravirt:
        why = "PVM: vmcall hangs inside KVM, so the guest must not find KVM (pvm.py)"
        if table.has(LEAF_FEATURES):
            table.set_bit(LEAF_FEATURES, 0, "ecx", FEATURES_ECX_HYPERVISOR, False, why)
        for function in sorted({f for f, _i in table.leaves if f >> 28 == 0x4}):
            table.remove(function, why)
        return
    if table.has(LEAF_FEATURES):
        table.set_bit(LEAF_FEATURES, 0, "ecx", FEATURES_ECX_HYPERVISOR, True,
                      "hypervisor bit: the guest looks for KVM's leaves")
    supported_pv = (table.get(LEAF_KVM_FEATURES, 0, "eax") if table.has(LEAF_KVM_FEATURES)
                    else 0)
    last = LEAF_KVM_TIMING if guest.tsc_khz else LEAF_KVM_FEATURES
    ebx, ecx, edx = (int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8))
    table.put(LEAF_KVM_SIGNATURE, 0, 0, (last, ebx, ecx, edx),
              f"KVM's signature; leaves up to {last:#x}")
    table.put(LEAF_KVM_FEATURES, 0, 0, (supported_pv & KVM_PV_FEATURE_MASK, 0, 0, 0),
              "the PV features KVM offers that vmm supports (kvmclock, ...)")
    if guest.tsc_khz:
        table.put(LEAF_KVM_TIMING, 0, 0, (guest.tsc_khz, KVM_APIC_BUS_HZ // 1000, 0, 0),
                  "TSC and LAPIC timer frequencies (kHz)")


# --- "the same CPU model": what the snapshot cache compares ---------------------------

# Fields of KVM_GET_SUPPORTED_CPUID that name the host CPU the ioctl ran on,
# not a feature: they change from call to call (measured: leaf 1's APIC id and
# leaf 0xB's x2APIC id differ between two runs on the same host).
_PER_CPU_FIELDS = {
    LEAF_FEATURES: (0xFFFFFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF),  # EBX[31:16]: APIC id, count
    LEAF_TOPOLOGY: (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0),  # EDX: x2APIC id
    LEAF_TOPOLOGY_V2: (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0),  # EDX: x2APIC id
    LEAF_AMD_TOPOLOGY: (0, 0, 0, 0),  # extended APIC id, core and node ids
}


def cpuid_features(entries: list[Entry]) -> list[Entry]:
    """A CPUID table without its per-CPU identity fields: what says "the same CPU model"."""
    out = []
    for function, index, flags, eax, ebx, ecx, edx in entries:
        keep = _PER_CPU_FIELDS.get(function, (0xFFFFFFFF,) * 4)
        out.append((function, index, flags, eax & keep[0], ebx & keep[1], ecx & keep[2],
                    edx & keep[3]))
    return out


def describe(table: CpuTable) -> list[str]:
    """The table leaf by leaf, each change under its leaf with the reason (vmm check --cpuid)."""
    by_leaf: dict[tuple[int, int], list[Change]] = {}
    for change in table.changes:
        by_leaf.setdefault((change.function, change.index), []).append(change)
    lines = []
    for function, index, _flags, *values in table.entries:
        name = LEAF_NAMES.get(function, "")
        registers = "  ".join(f"{r}={v:08x}" for r, v in zip(REGISTERS, values))
        lines.append(f"{function:#010x}.{index:<2} {registers}  {name}".rstrip())
        for change in by_leaf.pop((function, index), []):
            if change.register:
                lines.append(f"    {change.register}: {change.old:08x} -> {change.new:08x}  {change.why}")
            else:
                lines.append(f"    {change.why}")
    for (function, index), changes in sorted(by_leaf.items()):  # removed leaves
        for change in changes:
            lines.append(f"{function:#010x}.{index:<2} {change.why}")
    return lines
