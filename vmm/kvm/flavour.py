"""Which KVM is this: hardware (Intel VT-x, AMD-V) or PVM, and what that implies.

Users run vmm on ordinary hosts (``kvm_intel`` / ``kvm_amd``); our CI host runs
KVM's PVM backend (``kvm_pvm``, pagetable-based virtualization without VT-x),
where guest kernel code runs in KVM's instruction emulator. The flavour decides
which workarounds vmm applies (see vmm/arch/x86_64/pvm.py) and is printed by
``vmm check`` and every benchmark.
"""

from __future__ import annotations

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


def detect_flavour(sys_module: Path = SYS_MODULE) -> Flavour:
    """PVM, INTEL, AMD or UNKNOWN, from the loaded KVM vendor module.

    PVM wins when several are loaded: a host can load kvm_intel for nothing
    (no VT-x exposed) and kvm_pvm for real; PVM's behaviour is what we must
    accommodate then.
    """
    for module, name in FLAVOURS.items():
        if (sys_module / module).exists():
            return name
    return Flavour.UNKNOWN


def cpu_model() -> str:
    """The host CPU's model name, as /proc/cpuinfo gives it (printed beside every figure)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


DESCRIPTIONS = {
    Flavour.PVM: "KVM PVM (no hardware virtualization: guest kernel code is emulated, slow boots)",
    Flavour.INTEL: "KVM on Intel VT-x",
    Flavour.AMD: "KVM on AMD-V",
    Flavour.UNKNOWN: "KVM of an unknown flavour (no kvm_intel, kvm_amd or kvm_pvm module found)",
}
