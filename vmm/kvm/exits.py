"""kvm_run decoded into typed exit values, in one place.

After KVM_RUN returns, ``kvm_run.exit_reason`` says why and a union member
says the details. :func:`decode_exit` turns that into one of the small frozen
dataclasses below so the rest of vmm matches on types, never on raw fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from vmm.kvm.ioctl import ffi, lib

# Exit reason numbers → names, for traces and statistics.
EXIT_REASON_NAMES: dict[int, str] = {
    getattr(lib, name): name.removeprefix("KVM_EXIT_").lower()
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}


def exit_reason_name(reason: int) -> str:
    return EXIT_REASON_NAMES.get(reason, f"reason_{reason}")


@dataclass(frozen=True, slots=True)
class IoExit:
    """Port I/O: ``count`` accesses of ``size`` bytes; ``data`` holds OUT bytes.

    For IN, the handler writes ``count * size`` bytes at ``data_offset`` in
    the kvm_run page (see :func:`complete_io_in`).
    """

    is_write: bool
    port: int
    size: int
    count: int
    data_offset: int
    data: bytes  # written bytes for OUT, b"" for IN

    reason = "io"


@dataclass(frozen=True, slots=True)
class MmioExit:
    """Memory-mapped I/O to an address with no RAM behind it."""

    is_write: bool
    address: int
    size: int
    data: bytes  # written bytes, or b"" for a read

    reason = "mmio"


@dataclass(frozen=True, slots=True)
class HltExit:
    reason = "hlt"


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """Triple fault (or a shutdown the CPU could not avoid): the guest is dead."""

    reason = "shutdown"


@dataclass(frozen=True, slots=True)
class SystemEventExit:
    type: int  # KVM_SYSTEM_EVENT_SHUTDOWN / RESET / CRASH

    reason = "system_event"


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    """KVM could not go on: ``suberror`` 1 is an emulation failure.

    For an emulation failure with instruction bytes, ``instruction`` holds
    them (``data[0]`` has bit 0 set, the low byte of ``data[1]`` is the count,
    the bytes follow).
    """

    suberror: int
    data: tuple[int, ...]
    instruction: bytes

    reason = "internal_error"

    @property
    def is_emulation_failure(self) -> bool:
        return self.suberror == lib.KVM_INTERNAL_ERROR_EMULATION


@dataclass(frozen=True, slots=True)
class FailEntryExit:
    hardware_entry_failure_reason: int

    reason = "fail_entry"


@dataclass(frozen=True, slots=True)
class DebugExit:
    """KVM_EXIT_DEBUG: a guest-debug stop (KVM_SET_GUEST_DEBUG): #DB (1: a single-step or a
    debug register hit, ``dr6`` says which) or #BP (3: an int3 breakpoint), at ``pc``."""

    exception: int
    pc: int
    dr6: int
    dr7: int

    reason = "debug"


@dataclass(frozen=True, slots=True)
class OtherExit:
    """Any exit vmm has no model for; reported with its number."""

    number: int

    @property
    def reason(self) -> str:
        return exit_reason_name(self.number)


VcpuExit = Union[IoExit, MmioExit, HltExit, ShutdownExit, SystemEventExit,
                 InternalErrorExit, FailEntryExit, DebugExit, OtherExit]

_SINGLETON_EXITS: dict[int, VcpuExit] = {lib.KVM_EXIT_HLT: HltExit(),
                                          lib.KVM_EXIT_SHUTDOWN: ShutdownExit()}


def decode_exit(run: Any) -> VcpuExit:
    """Read ``struct kvm_run *`` after KVM_RUN and return the typed exit."""
    reason = run.exit_reason
    if reason == lib.KVM_EXIT_IO:
        io = run.io
        is_write = io.direction == lib.KVM_EXIT_IO_OUT
        length = io.size * io.count
        data = (
            bytes(ffi.buffer(ffi.cast("char *", run) + io.data_offset, length))
            if is_write else b""
        )
        return IoExit(is_write, io.port, io.size, io.count, io.data_offset, data)
    if reason == lib.KVM_EXIT_MMIO:
        mmio = run.mmio
        size = min(mmio.len, 8)
        data = bytes(mmio.data[0:size]) if mmio.is_write else b""
        return MmioExit(bool(mmio.is_write), mmio.phys_addr, size, data)
    if reason in _SINGLETON_EXITS:
        return _SINGLETON_EXITS[reason]
    if reason == lib.KVM_EXIT_SYSTEM_EVENT:
        return SystemEventExit(run.system_event.type)
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        internal = run.internal
        ndata = min(internal.ndata, 16)
        words = tuple(internal.data[i] for i in range(ndata))
        return InternalErrorExit(internal.suberror, words,
                                 _instruction_bytes(internal.suberror, words))
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(run.fail_entry.hardware_entry_failure_reason)
    if reason == lib.KVM_EXIT_DEBUG:
        arch = run.debug.arch
        return DebugExit(arch.exception, arch.pc, arch.dr6, arch.dr7)
    return OtherExit(reason)


def _instruction_bytes(suberror: int, data: tuple[int, ...]) -> bytes:
    """The failing instruction's bytes from an emulation-failure exit, if given."""
    if suberror != lib.KVM_INTERNAL_ERROR_EMULATION or len(data) < 2 or not data[0] & 1:
        return b""
    count = min(data[1] & 0xFF, 15)
    raw = b"".join(word.to_bytes(8, "little") for word in data[1:])
    return raw[1 : 1 + count]


def complete_io_in(run: Any, exit: IoExit, value: bytes) -> None:
    """Give the guest the bytes it reads: ``count * size`` of them, at data_offset."""
    length = exit.size * exit.count
    if len(value) != length:
        raise ValueError(f"IN of {length} bytes answered with {len(value)}")
    ffi.memmove(ffi.cast("char *", run) + exit.data_offset, value, length)


def complete_mmio_read(run: Any, value: bytes) -> None:
    ffi.memmove(run.mmio.data, value[:8], min(len(value), 8))
