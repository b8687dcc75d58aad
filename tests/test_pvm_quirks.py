"""vmm/arch/x86_64/pvm.py without KVM: what the PVM quirks do to a vCPU's state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.insn import GPRS
from vmm.arch.x86_64.pvm import BP_VECTOR, GP_VECTOR, PVM_CMDLINE, PvmQuirks
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
    vcpu, quirks = FakeVcpu(0x1000), PvmQuirks(None)
    assert quirks.handle_internal_error(vcpu, emulation_failure(b"\xcc\x90")) == "int3"
    assert vcpu.regs.rip == 0x1001
    assert vcpu.events_set and vcpu.events.exception.nr == BP_VECTOR
    assert (vcpu.events.exception.injected, vcpu.events.exception.has_error_code) == (1, 0)


def test_fwait_is_skipped_other_failures_are_not_handled() -> None:
    vcpu, quirks = FakeVcpu(0x2000), PvmQuirks(None)
    assert quirks.handle_internal_error(vcpu, emulation_failure(b"\x9b")) == "fwait"
    assert vcpu.regs.rip == 0x2001
    assert quirks.handle_internal_error(vcpu, emulation_failure(b"\x0f\x01\xc1")) is None  # vmcall
    assert vcpu.regs.rip == 0x2001
    assert quirks.handle_internal_error(vcpu, InternalErrorExit(3, (), b"")) is None


def test_failure_is_described_with_the_guest_symbol_read_only_when_needed(tmp_path) -> None:
    system_map = tmp_path / "System.map"
    quirks = PvmQuirks(None, system_map)  # not read yet: the file does not even exist
    system_map.write_text("ffffffff81000000 T _text\nffffffff81000100 t do_thing\n"
                          "ffffffff81000200 D some_data\n")
    vcpu = FakeVcpu(0xFFFFFFFF81000123)
    text = quirks.describe_failure(vcpu, emulation_failure(b"\x0f\x01\xc1"))
    assert "rip 0xffffffff81000123 (do_thing+0x23)" in text
    assert "bytes 0f 01 c1" in text
    assert "rip 0x10, bytes 0f " in PvmQuirks(None, None).describe_failure(FakeVcpu(0x10),
                                                                           emulation_failure(b"\x0f"))


def test_cost_options_are_on_the_pvm_command_line() -> None:
    assert "percpu_alloc=page" in PVM_CMDLINE


class LongModeVcpu(FakeVcpu):
    """A vCPU in 64-bit mode with every general register, its page tables at PML4 and an
    XSAVE area (the MXCSR): what the completion of ldmxcsr/stmxcsr reads and writes."""

    def __init__(self, rip: int, **registers: int) -> None:
        super().__init__(rip)
        for name in GPRS:
            setattr(self.regs, name, registers.get(name, 0))
        segment = lambda base=0: SimpleNamespace(base=base)  # noqa: E731
        self.sregs = SimpleNamespace(efer=1 << 10 | 1 << 8, cs=SimpleNamespace(l=1),
                                     cr3=layout.PML4, fs=segment(), gs=segment(0x20_0000))
        # MXCSR at byte 24; XSTATE_BV (byte 512) 0: every component in its init state,
        # as the host's XSAVE leaves a guest that has not touched SSE
        self.xsave = SimpleNamespace(region=[0] * 6 + [0x1F80] + [0] * 1017)

    @property
    def mxcsr(self) -> int:
        return self.xsave.region[6]

    def get_sregs(self):
        return self.sregs

    def get_xsave(self):
        return self.xsave

    def set_xsave(self, xsave) -> None:
        """As Linux's copy_uabi_to_xstate: MXCSR is taken only when the header says the
        x87 or SSE component is in use, else the component stays in its init state."""
        region = list(xsave.region)
        if not region[128] & 0b11:
            region[6] = 0x1F80
        self.xsave = SimpleNamespace(region=region)


@pytest.fixture
def memory():
    """4 MiB of guest RAM, identity-mapped by the page tables vmm gives a Linux guest."""
    from vmm.arch.x86_64 import cpu
    from vmm.memory import GuestMemory

    ram = GuestMemory([(0, 4 << 20)])
    for address, page in cpu.identity_page_tables().items():
        ram.write(address, page)
    yield ram
    ram.close()


def test_ldmxcsr_from_the_stack_is_completed_as_the_cpu_would(memory):
    """Debian's kernel_fpu_begin: ldmxcsr 0x4(%rsp), bytes 0f ae 54 24 04."""
    memory.write_u32(0x30_0004, 0x9F80)
    vcpu = LongModeVcpu(0xFFFF_8000, rsp=0x30_0000)
    quirks = PvmQuirks(memory)
    assert quirks.handle_internal_error(vcpu, emulation_failure(bytes.fromhex("0f ae 54 24 04"))) \
        == "ldmxcsr"
    assert vcpu.mxcsr == 0x9F80 and vcpu.regs.rip == 0xFFFF_8005


def test_stmxcsr_through_a_rex_register_and_a_gs_base(memory):
    vcpu = LongModeVcpu(0x1000, r9=0x10)
    vcpu.xsave.region[6] = 0x1FC0
    stored = emulation_failure(bytes.fromhex("65 41 0f ae 59 f8"))  # stmxcsr %gs:-0x8(%r9)
    assert PvmQuirks(memory).handle_internal_error(vcpu, stored) == "stmxcsr"
    assert memory.read_u32(0x20_0008) == 0x1FC0 and vcpu.regs.rip == 0x1006


def test_a_reserved_mxcsr_bit_is_the_cpus_general_protection_fault(memory):
    memory.write_u32(0x30_0004, 0x1_0000)  # bit 16: reserved
    vcpu = LongModeVcpu(0x1000, rsp=0x30_0000)
    assert PvmQuirks(memory).handle_internal_error(
        vcpu, emulation_failure(bytes.fromhex("0f ae 54 24 04"))) == "ldmxcsr"
    assert vcpu.mxcsr == 0x1F80 and vcpu.regs.rip == 0x1000  # unchanged: the fault's
    assert (vcpu.events.exception.nr, vcpu.events.exception.has_error_code,
            vcpu.events.exception.error_code) == (GP_VECTOR, 1, 0)


def test_an_unmapped_or_page_crossing_operand_is_left_as_a_failure(memory):
    quirks = PvmQuirks(memory)
    code = emulation_failure(bytes.fromhex("0f ae 54 24 04"))
    assert quirks.handle_internal_error(LongModeVcpu(0x1000, rsp=0x7FFF_F000_0000), code) is None
    assert quirks.handle_internal_error(LongModeVcpu(0x1000, rsp=0x30_0FFA), code) is None  # 0x300ffe


def test_the_hidden_features_fit_the_kernels_clearcpuid_buffer():
    from vmm.arch.x86_64.pvm import CLEARCPUID_LIMIT, PVM_HIDDEN_FEATURES

    assert len(",".join(PVM_HIDDEN_FEATURES)) <= CLEARCPUID_LIMIT  # else truncated silently
