"""vmm/arch/x86_64/pvm.py without KVM: what the PVM quirks do to a vCPU's state."""

from __future__ import annotations

from types import SimpleNamespace

from vmm.arch.x86_64.pvm import BP_VECTOR, PVM_CMDLINE, PvmQuirks
from vmm.kvm.exits import InternalErrorExit
from vmm.kvm.ioctl import lib


class FakeVcpu:
    def __init__(self, rip: int) -> None:
        self.regs = SimpleNamespace(rip=rip)
        self.events = SimpleNamespace(
            exception=SimpleNamespace(injected=0, nr=0, has_error_code=1, error_code=9), flags=7)
        self.events_set = False

    def get_regs(self):
        return self.regs

    def set_regs(self, regs) -> None:
        self.regs = regs

    def get_vcpu_events(self):
        return self.events

    def set_vcpu_events(self, events) -> None:
        self.events, self.events_set = events, True


def emulation_failure(instruction: bytes) -> InternalErrorExit:
    return InternalErrorExit(lib.KVM_INTERNAL_ERROR_EMULATION, (1, len(instruction)), instruction)


def test_int3_is_skipped_and_breakpoint_injected() -> None:
    vcpu, quirks = FakeVcpu(0x1000), PvmQuirks()
    assert quirks.handle_internal_error(vcpu, emulation_failure(b"\xcc\x90"))
    assert vcpu.regs.rip == 0x1001
    assert vcpu.events_set and vcpu.events.exception.nr == BP_VECTOR
    assert (vcpu.events.exception.injected, vcpu.events.exception.has_error_code) == (1, 0)
    assert quirks.completed == {"int3": 1}


def test_fwait_is_skipped_other_failures_are_not_handled() -> None:
    vcpu, quirks = FakeVcpu(0x2000), PvmQuirks()
    assert quirks.handle_internal_error(vcpu, emulation_failure(b"\x9b"))
    assert vcpu.regs.rip == 0x2001
    assert not quirks.handle_internal_error(vcpu, emulation_failure(b"\x0f\x01\xc1"))  # vmcall
    assert vcpu.regs.rip == 0x2001
    assert not quirks.handle_internal_error(vcpu, InternalErrorExit(3, (), b""))
    assert quirks.completed == {"fwait": 1}


def test_failure_is_described_with_the_guest_symbol_read_only_when_needed(tmp_path) -> None:
    system_map = tmp_path / "System.map"
    quirks = PvmQuirks(system_map)  # not read yet: the file does not even exist
    system_map.write_text("ffffffff81000000 T _text\nffffffff81000100 t do_thing\n"
                          "ffffffff81000200 D some_data\n")
    vcpu = FakeVcpu(0xFFFFFFFF81000123)
    text = quirks.describe_failure(vcpu, emulation_failure(b"\x0f\x01\xc1"))
    assert "rip 0xffffffff81000123 (do_thing+0x23)" in text
    assert "bytes 0f 01 c1" in text
    assert "rip 0x10, bytes 0f " in PvmQuirks(None).describe_failure(FakeVcpu(0x10), emulation_failure(b"\x0f"))


def test_cost_options_are_on_the_pvm_command_line() -> None:
    assert "percpu_alloc=page" in PVM_CMDLINE
