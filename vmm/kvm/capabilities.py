"""The KVM capabilities vmm uses, why, and which kind of VM needs each.

One table for `vmm check` (which prints it) and for the builders, which ask
:func:`require` before they create anything: a host without an in-kernel
irqchip gets "this KVM lacks KVM_CAP_IRQCHIP (...)" instead of a bare
``KVM_CREATE_IRQCHIP failed: EINVAL`` half-way through a build.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.errors import KvmUnavailableError

FIRMWARE = "firmware"  # our bare payloads
LINUX = "linux"  # a Linux guest
SNAPSHOT = "snapshot"  # saving or restoring one
DEBUG = "debug"  # vmm run --gdb


@dataclass(frozen=True)
class Capability:
    name: str  # the KVM_CAP_* constant
    why: str
    needed_for: frozenset[str] = frozenset()  # empty: optional, vmm does without


CAPABILITIES = (
    Capability("KVM_CAP_USER_MEMORY", "guest RAM from our own mmap", frozenset({FIRMWARE, LINUX})),
    Capability("KVM_CAP_SET_TSS_ADDR", "real mode on Intel", frozenset({FIRMWARE, LINUX})),
    Capability("KVM_CAP_EXT_CPUID", "KVM_GET_SUPPORTED_CPUID", frozenset({FIRMWARE, LINUX})),
    Capability("KVM_CAP_IRQCHIP", "in-kernel PIC/IOAPIC/LAPIC for Linux guests", frozenset({LINUX})),
    Capability("KVM_CAP_PIT2", "in-kernel timer for Linux guests", frozenset({LINUX})),
    Capability("KVM_CAP_IMMEDIATE_EXIT", "stopping a vCPU promptly", frozenset({FIRMWARE, LINUX})),
    Capability("KVM_CAP_IRQFD", "device interrupts without an ioctl per IRQ"),
    Capability("KVM_CAP_IOEVENTFD", "virtio notifications without a round trip to Python"),
    Capability("KVM_CAP_VCPU_EVENTS", "pending exceptions and interrupts: PVM workarounds, snapshots",
               frozenset({SNAPSHOT})),
    Capability("KVM_CAP_MP_STATE", "SMP start-up state; snapshots", frozenset({SNAPSHOT})),
    Capability("KVM_CAP_PIT_STATE2", "saving and restoring the PIT (snapshots)", frozenset({SNAPSHOT})),
    Capability("KVM_CAP_XSAVE", "the whole FPU/SSE/AVX state in snapshots (else x87+SSE only)"),
    Capability("KVM_CAP_ADJUST_CLOCK", "the kvmclock in snapshots"),
    Capability("KVM_CAP_COALESCED_PIO", "batched port writes"),
    Capability("KVM_CAP_READONLY_MEM", "read-only memory slots"),
    Capability("KVM_CAP_SET_GUEST_DEBUG", "vmm run --gdb: single-step, breakpoints, watchpoints",
               frozenset({DEBUG})),
)


def missing(kvm, purpose: str) -> list[Capability]:
    """The capabilities ``purpose`` needs that this KVM does not report."""
    from vmm.kvm.ioctl import lib

    return [c for c in CAPABILITIES
            if purpose in c.needed_for and not kvm.check_extension(getattr(lib, c.name))]


def require(kvm, *purposes: str) -> None:
    """Raise one clear error if this KVM lacks anything the purposes need."""
    absent = [c for purpose in purposes for c in missing(kvm, purpose)]
    if absent:
        names = ", ".join(f"{c.name} ({c.why})" for c in dict.fromkeys(absent))
        raise KvmUnavailableError(f"this host's KVM lacks {names}: `vmm check` lists what it has")
