"""Exit decoding from hand-built kvm_run pages, KvmError, the ioctl choke point,
and KVM flavour detection. No /dev/kvm needed."""

from __future__ import annotations

import errno

import pytest

from vmm.errors import KvmError, KvmUnavailableError, VmmError
from vmm.kvm import exits
from vmm.kvm.exits import (
    FailEntryExit, HltExit, InternalErrorExit, IoExit, MmioExit, OtherExit, ShutdownExit,
    SystemEventExit, decode_exit,
)
from vmm.kvm.flavour import DESCRIPTIONS, detect_flavour
from vmm.kvm.ioctl import ffi, ioctl, lib

PAGE_SIZE = 4096
DATA_OFFSET = 0xA00  # past the end of struct kvm_run, where KVM puts I/O data


@pytest.fixture
def run():
    """A zeroed page seen as ``struct kvm_run *``, as KVM's mmap is (buffer kept alive)."""
    buffer = ffi.new("char[]", PAGE_SIZE)
    yield ffi.cast("struct kvm_run *", buffer)
    del buffer


def _io(run, direction, port, size, count, data=b""):
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.direction = direction
    run.io.port = port
    run.io.size = size
    run.io.count = count
    run.io.data_offset = DATA_OFFSET
    ffi.memmove(ffi.cast("char *", run) + DATA_OFFSET, data, len(data))


# --- port I/O ----------------------------------------------------------------------
def test_io_out_one_byte(run):
    _io(run, lib.KVM_EXIT_IO_OUT, 0x3F8, 1, 1, b"H")
    assert decode_exit(run) == IoExit(True, 0x3F8, 1, 1, DATA_OFFSET, b"H")
    assert decode_exit(run).reason == "io"


def test_io_out_rep_carries_every_byte(run):
    _io(run, lib.KVM_EXIT_IO_OUT, 0x501, 2, 3, b"\x01\x00\x02\x00\x03\x00")
    exit = decode_exit(run)
    assert (exit.is_write, exit.port, exit.size, exit.count) == (True, 0x501, 2, 3)
    assert exit.data == b"\x01\x00\x02\x00\x03\x00"


def test_io_in_has_no_data_and_is_completed_at_data_offset(run):
    _io(run, lib.KVM_EXIT_IO_IN, 0x502, 4, 1)
    exit = decode_exit(run)
    assert exit == IoExit(False, 0x502, 4, 1, DATA_OFFSET, b"")
    exits.complete_io_in(run, exit, b"\x10\x27\x00\x00")
    assert bytes(ffi.buffer(ffi.cast("char *", run) + DATA_OFFSET, 4)) == b"\x10\x27\x00\x00"


def test_io_in_answer_of_wrong_length_is_refused(run):
    _io(run, lib.KVM_EXIT_IO_IN, 0x60, 1, 2)
    with pytest.raises(ValueError, match="2 bytes"):
        exits.complete_io_in(run, decode_exit(run), b"\x00")


# --- MMIO ----------------------------------------------------------------------------
def test_mmio_write(run):
    run.exit_reason = lib.KVM_EXIT_MMIO
    run.mmio.phys_addr = 0xD0000050
    run.mmio.len = 4
    run.mmio.is_write = 1
    run.mmio.data[0:4] = [1, 2, 3, 4]
    assert decode_exit(run) == MmioExit(True, 0xD0000050, 4, b"\x01\x02\x03\x04")


def test_mmio_read_and_its_completion(run):
    run.exit_reason = lib.KVM_EXIT_MMIO
    run.mmio.phys_addr = 0xFEE00030
    run.mmio.len = 2
    run.mmio.is_write = 0
    exit = decode_exit(run)
    assert exit == MmioExit(False, 0xFEE00030, 2, b"")
    exits.complete_mmio_read(run, b"\xaa\xbb")
    assert bytes(run.mmio.data[0:2]) == b"\xaa\xbb"


def test_mmio_length_from_the_guest_is_capped_at_8(run):
    run.exit_reason = lib.KVM_EXIT_MMIO
    run.mmio.len = 0xFFFFFFFF  # hostile/bogus: must not read past data[8]
    run.mmio.is_write = 1
    exit = decode_exit(run)
    assert exit.size == 8 and len(exit.data) == 8


# --- the rest ---------------------------------------------------------------------------
def test_hlt_and_shutdown(run):
    run.exit_reason = lib.KVM_EXIT_HLT
    assert decode_exit(run) == HltExit() and decode_exit(run).reason == "hlt"
    run.exit_reason = lib.KVM_EXIT_SHUTDOWN
    assert decode_exit(run) == ShutdownExit() and decode_exit(run).reason == "shutdown"


def test_system_event(run):
    run.exit_reason = lib.KVM_EXIT_SYSTEM_EVENT
    run.system_event.type = lib.KVM_SYSTEM_EVENT_RESET
    assert decode_exit(run) == SystemEventExit(lib.KVM_SYSTEM_EVENT_RESET)


def test_fail_entry(run):
    run.exit_reason = lib.KVM_EXIT_FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason = 0x80000021
    assert decode_exit(run) == FailEntryExit(0x80000021)


def _internal(run, suberror, data):
    run.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = suberror
    run.internal.ndata = len(data)
    for i, word in enumerate(data):
        run.internal.data[i] = word


def test_emulation_failure_with_instruction_bytes(run):
    # As KVM fills struct emulation_failure: data[0] = flags (bit 0: bytes
    # follow), low byte of data[1] = insn_size, then the bytes. xrstor (%rdi).
    insn = bytes.fromhex("0fae2f")
    word1 = int.from_bytes(bytes([len(insn)]) + insn + bytes(4), "little")
    _internal(run, lib.KVM_INTERNAL_ERROR_EMULATION, [1, word1, 0])
    exit = decode_exit(run)
    assert isinstance(exit, InternalErrorExit)
    assert exit.is_emulation_failure
    assert exit.suberror == 1
    assert exit.instruction == insn
    assert exit.data == (1, word1, 0)


def test_emulation_failure_with_15_instruction_bytes_spans_words(run):
    insn = bytes(range(0xA0, 0xAF))  # 15 bytes: data[1] and data[2]
    raw = bytes([15]) + insn
    _internal(run, lib.KVM_INTERNAL_ERROR_EMULATION,
              [1, int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")])
    assert decode_exit(run).instruction == insn


def test_emulation_failure_without_bytes_flag_has_no_instruction(run):
    _internal(run, lib.KVM_INTERNAL_ERROR_EMULATION, [0, 0x0103, 0])
    assert decode_exit(run).instruction == b""


def test_other_internal_error_has_no_instruction(run):
    _internal(run, lib.KVM_INTERNAL_ERROR_DELIVERY_EV, [1, 0x01CC])
    exit = decode_exit(run)
    assert not exit.is_emulation_failure
    assert exit.instruction == b""


def test_internal_error_ndata_from_the_kernel_is_capped(run):
    _internal(run, lib.KVM_INTERNAL_ERROR_EMULATION, [0] * 16)
    run.internal.ndata = 1000
    assert len(decode_exit(run).data) == 16


def test_unknown_exit_reason_is_reported_by_number(run):
    run.exit_reason = 0xDEAD
    exit = decode_exit(run)
    assert exit == OtherExit(0xDEAD)
    assert exit.reason == "reason_57005"


def test_known_but_unmodelled_exit_is_named(run):
    run.exit_reason = lib.KVM_EXIT_NMI
    assert decode_exit(run) == OtherExit(lib.KVM_EXIT_NMI)
    assert decode_exit(run).reason == "nmi"


def test_debug_exit_carries_the_exception_and_debug_registers(run):
    from vmm.kvm.exits import DebugExit

    run.exit_reason = lib.KVM_EXIT_DEBUG
    run.debug.arch.exception, run.debug.arch.pc = 1, 0xFFE38
    run.debug.arch.dr6, run.debug.arch.dr7 = 0x4001, 0x401
    assert decode_exit(run) == DebugExit(1, 0xFFE38, 0x4001, 0x401)
    assert decode_exit(run).reason == "debug"


def test_exit_reason_names():
    assert exits.exit_reason_name(lib.KVM_EXIT_IO) == "io"
    assert exits.exit_reason_name(lib.KVM_EXIT_INTERNAL_ERROR) == "internal_error"
    assert exits.exit_reason_name(999) == "reason_999"


# --- errors ------------------------------------------------------------------------------
def test_kvm_error_names_the_ioctl_and_the_errno():
    error = KvmError("KVM_SET_USER_MEMORY_REGION", errno.EINVAL)
    assert str(error) == "KVM_SET_USER_MEMORY_REGION failed: EINVAL (Invalid argument)"
    assert error.ioctl == "KVM_SET_USER_MEMORY_REGION" and error.errno == errno.EINVAL
    assert isinstance(error, VmmError)


def test_kvm_error_detail_and_unknown_errno():
    assert str(KvmError("KVM_RUN", errno.EFAULT, "at rip 0x10")) == (
        "KVM_RUN failed: EFAULT (Bad address): at rip 0x10")
    assert str(KvmError("KVM_RUN", 9999)).startswith("KVM_RUN failed: errno 9999 (")


def test_ioctl_choke_point_raises_kvm_error_naming_the_call():
    with pytest.raises(KvmError) as info:
        ioctl(-1, "KVM_GET_API_VERSION")
    assert info.value.errno == errno.EBADF
    assert str(info.value) == "KVM_GET_API_VERSION failed: EBADF (Bad file descriptor)"


def test_ioctl_on_a_file_that_is_not_kvm(tmp_path):
    import os

    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        with pytest.raises(KvmError, match=r"^KVM_CREATE_VM failed: ENOTTY \("):
            ioctl(fd, "KVM_CREATE_VM", 0)
    finally:
        os.close(fd)


def test_missing_device_message():
    from vmm.kvm.system import Kvm

    with pytest.raises(KvmUnavailableError) as info:
        Kvm("/nonexistent")
    message = str(info.value)
    assert message.startswith("/nonexistent: not found")
    assert "modprobe" in message


def test_no_permission_message(monkeypatch):
    import vmm.kvm.system as system

    def refuse(path, flags, *args):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(system.os, "open", refuse)
    with pytest.raises(KvmUnavailableError, match=r"^/dev/kvm: permission denied: .*kvm' group"):
        system.Kvm("/dev/kvm")


def test_device_that_is_not_kvm_is_one_vmm_error():
    from vmm.kvm.system import Kvm

    with pytest.raises(VmmError, match="KVM_GET_API_VERSION failed: ENOTTY"):
        Kvm("/dev/null")


# --- flavour -----------------------------------------------------------------------------
@pytest.mark.parametrize("modules, flags, flavour", [
    ([], "fpu", "unknown"),
    (["kvm"], "fpu vmx", "unknown"),
    (["kvm", "kvm_intel"], "fpu vmx", "intel"),
    (["kvm", "kvm_amd"], "fpu svm", "amd"),
    (["kvm", "kvm_pvm"], "fpu", "pvm"),
    # A built-in kvm_intel without VT-x (a cloud VM) failed its init: PVM serves /dev/kvm.
    (["kvm", "kvm_intel", "kvm_pvm"], "fpu hypervisor", "pvm"),
    (["kvm", "kvm_intel"], "fpu hypervisor", "unknown"),
    # Both could be active and /dev/kvm does not say: PVM's settings are safe on either.
    (["kvm", "kvm_intel", "kvm_pvm"], "fpu vmx", "pvm"),
])
def test_detect_flavour(tmp_path, modules, flags, flavour):
    sys_module = tmp_path / "module"
    for module in modules:
        (sys_module / module).mkdir(parents=True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert detect_flavour(sys_module, cpuinfo) == flavour
    assert flavour in DESCRIPTIONS


def test_flavour_evidence_says_what_it_ruled_out(tmp_path):
    from vmm.kvm.flavour import flavour_evidence

    for module in ("kvm_intel", "kvm_pvm"):
        (tmp_path / module).mkdir()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu hypervisor\n")
    evidence = flavour_evidence(tmp_path, cpuinfo)
    assert evidence.modules == ("kvm_pvm", "kvm_intel")
    assert len(evidence.ruled_out) == 1 and "kvm_intel (no 'vmx'" in evidence.ruled_out[0]
    assert "only vendor module" in evidence.why


def test_device_that_is_not_kvm_leaks_no_file_descriptor():
    import os

    from vmm.kvm.system import Kvm

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(VmmError):
            Kvm("/dev/null")
    assert len(os.listdir("/proc/self/fd")) == before
