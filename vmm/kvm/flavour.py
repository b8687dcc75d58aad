"""Which KVM is this: hardware (Intel VT-x, AMD-V) or PVM, and what that implies.

Users run vmm on ordinary hosts (``kvm_intel`` / ``kvm_amd``); our CI host runs
KVM's PVM backend (``kvm_pvm``, pagetable-based virtualization without VT-x),
where guest kernel code runs in KVM's instruction emulator. The flavour decides
which workarounds vmm applies (see vmm/arch/x86_64/pvm.py) and is printed by
``vmm check`` and every benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

SYS_MODULE = Path("/sys/module")


class Flavour(StrEnum):
    """Which KVM this is. A str: it prints, compares and goes into JSON as its value."""

    PVM = "pvm"
    INTEL = "intel"
    AMD = "amd"
    UNKNOWN = "unknown"


FLAVOURS = {
    "kvm_pvm": Flavour.PVM,
    "kvm_intel": Flavour.INTEL,
    "kvm_amd": Flavour.AMD,
}
# The CPU flag a hardware vendor module cannot initialise without. A built-in
# kvm_intel keeps its /sys/module entry (its parameters) even when its init
# failed for want of VT-x, e.g. in a cloud VM without nested virtualization.
NEEDS_CPU_FLAG = {Flavour.INTEL: "vmx", Flavour.AMD: "svm"}
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class FlavourEvidence:
    """What decided the flavour, for `vmm check` to show."""

    flavour: Flavour
    modules: tuple[str, ...]  # vendor modules present in /sys/module
    ruled_out: tuple[str, ...]  # ... that cannot be serving /dev/kvm, and why
    why: str


def cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The first CPU's ``name`` field in /proc/cpuinfo ("model name", "flags"), or None."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The first CPU's flags in /proc/cpuinfo (empty if unreadable)."""
    return frozenset((cpuinfo_field("flags", cpuinfo) or "").split())


def flavour_evidence(sys_module: Path = SYS_MODULE, cpuinfo: Path = CPUINFO) -> FlavourEvidence:
    """Which vendor module serves /dev/kvm, as far as the host shows it.

    /dev/kvm itself does not say: it is one misc device of kvm.ko whichever
    vendor module registered with it (/proc/misc: "232 kvm"), and a built-in
    module has no holders or refcount in /sys/module. What can be known: which
    vendor modules exist, and whether the CPU has the feature a hardware one
    needs. Upstream Linux lets one vendor module register at a time (a second
    fails with EEXIST), so one candidate left is the answer. If PVM and a
    hardware module both remain, PVM is assumed: its workarounds also work on
    hardware KVM (slower), while hardware settings hang a PVM guest (vmcall).
    """
    modules = tuple(m for m in FLAVOURS if (sys_module / m).exists())
    # Read only when a hardware module is there to check (every VM start asks).
    flags = cpu_flags(cpuinfo) if any(FLAVOURS[m] in NEEDS_CPU_FLAG for m in modules) else frozenset()
    candidates, ruled_out = [], []
    for module in modules:
        flag = NEEDS_CPU_FLAG.get(FLAVOURS[module])
        if flag and flags and flag not in flags:
            ruled_out.append(f"{module} (no '{flag}' in /proc/cpuinfo: its init cannot have succeeded)")
        else:
            candidates.append(module)
    if not candidates:
        return FlavourEvidence(Flavour.UNKNOWN, modules, tuple(ruled_out),
                               "no KVM vendor module that can be active")
    if len(candidates) == 1:
        why = f"{candidates[0]} is the only vendor module that can be active"
        return FlavourEvidence(FLAVOURS[candidates[0]], modules, tuple(ruled_out), why)
    if "kvm_pvm" in candidates:
        why = (f"{' and '.join(candidates)} are all present and /dev/kvm does not say which one "
               "serves it: assumed PVM, whose workarounds are safe on either")
        return FlavourEvidence(Flavour.PVM, modules, tuple(ruled_out), why)
    why = f"{' and '.join(candidates)} both present (upstream KVM allows one): took the first"
    return FlavourEvidence(FLAVOURS[candidates[0]], modules, tuple(ruled_out), why)


def detect_flavour(sys_module: Path = SYS_MODULE, cpuinfo: Path = CPUINFO) -> Flavour:
    """PVM, INTEL, AMD or UNKNOWN: see :func:`flavour_evidence`."""
    return flavour_evidence(sys_module, cpuinfo).flavour


def cpu_model() -> str:
    """The host CPU's model name, as /proc/cpuinfo gives it (printed beside every figure)."""
    name = cpuinfo_field("model name")
    if name is not None:
        return name
    import platform

    return platform.processor() or "unknown"


DESCRIPTIONS = {
    Flavour.PVM: "KVM PVM (no hardware virtualization: guest kernel code is emulated, slow boots)",
    Flavour.INTEL: "KVM on Intel VT-x",
    Flavour.AMD: "KVM on AMD-V",
    Flavour.UNKNOWN: "KVM of an unknown flavour (no kvm_intel, kvm_amd or kvm_pvm module found)",
}
