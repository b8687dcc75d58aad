"""Which KVM is this: hardware (Intel VT-x, AMD-V) or PVM, and what that implies.

Users run vmm on ordinary hosts (``kvm_intel`` / ``kvm_amd``); our CI host runs
KVM's PVM backend (``kvm_pvm``, pagetable-based virtualization without VT-x),
where guest kernel code runs in KVM's instruction emulator. The flavour decides
which workarounds vmm applies (see vmm/arch/x86_64/pvm.py) and is printed by
``vmm check`` and every benchmark.
"""

from __future__ import annotations

from pathlib import Path

SYS_MODULE = Path("/sys/module")

FLAVOURS = {
    "kvm_pvm": "pvm",
    "kvm_intel": "intel",
    "kvm_amd": "amd",
}


def detect_flavour(sys_module: Path = SYS_MODULE) -> str:
    """'pvm', 'intel', 'amd' or 'unknown', from the loaded KVM vendor module.

    PVM wins when several are loaded: a host can load kvm_intel for nothing
    (no VT-x exposed) and kvm_pvm for real; PVM's behaviour is what we must
    accommodate then.
    """
    for module, name in FLAVOURS.items():
        if (sys_module / module).exists():
            return name
    return "unknown"


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
    "pvm": "KVM PVM (no hardware virtualization: guest kernel code is emulated, slow boots)",
    "intel": "KVM on Intel VT-x",
    "amd": "KVM on AMD-V",
    "unknown": "KVM of an unknown flavour (no kvm_intel, kvm_amd or kvm_pvm module found)",
}
