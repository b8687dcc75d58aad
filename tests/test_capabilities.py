"""Build-time checks: the capabilities a kind of VM needs, the MSRs KVM must take (no KVM needed)."""

from __future__ import annotations

import pytest

from vmm.arch.x86_64 import cpu
from vmm.errors import KvmUnavailableError, VmmError
from vmm.kvm.capabilities import CAPABILITIES, FIRMWARE, LINUX, SNAPSHOT, missing, require
from vmm.kvm.ioctl import lib


class FakeKvm:
    def __init__(self, *absent: str) -> None:
        self.absent = {getattr(lib, name) for name in absent}

    def check_extension(self, capability: int) -> int:
        return 0 if capability in self.absent else 1


def test_a_linux_build_names_the_missing_capability() -> None:
    with pytest.raises(KvmUnavailableError, match=r"lacks KVM_CAP_IRQCHIP \(in-kernel PIC/IOAPIC/LAPIC"):
        require(FakeKvm("KVM_CAP_IRQCHIP"), LINUX)
    require(FakeKvm("KVM_CAP_IRQCHIP"), FIRMWARE)  # firmware needs no irqchip


def test_snapshots_need_their_own_and_optional_ones_are_never_required() -> None:
    assert [c.name for c in missing(FakeKvm("KVM_CAP_PIT_STATE2"), SNAPSHOT)] == ["KVM_CAP_PIT_STATE2"]
    optional = [c.name for c in CAPABILITIES if not c.needed_for]
    assert "KVM_CAP_IOEVENTFD" in optional
    for purpose in (FIRMWARE, LINUX, SNAPSHOT):
        require(FakeKvm(*optional), purpose)


class FakeVcpu:
    def __init__(self, takes: int) -> None:
        self.takes = takes

    def set_msrs(self, values: dict[int, int]) -> int:
        return min(self.takes, len(values))


def test_boot_msrs_refused_by_kvm_are_an_error_naming_the_msr() -> None:
    cpu.setup_msrs(FakeVcpu(99))
    with pytest.raises(VmmError, match=r"set 2 of 11 boot MSRs: KVM refused MSR 0x176"):
        cpu.setup_msrs(FakeVcpu(2))
