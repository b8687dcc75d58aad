"""What each VM exit means: the dispatcher both run loops hand their exits to.

An I/O exit goes to the port bus, an MMIO exit to the MMIO bus, each to the
device at that address; HLT, a triple fault, a system event, an emulation
failure or a failed entry end the VM with their own status. Host-specific
fixes (PVM's emulator failures) come in as ``quirks``. The dispatcher knows
nothing of threads: the runner (vmm/runner.py) owns those, and passes the
dispatcher a ``stop`` to call and a ``kick_others`` for when the C loops'
port rules change under them.
"""

from __future__ import annotations

from typing import Callable, Protocol, TextIO

from vmm.devices.bus import Bus
from vmm.kvm import exits as kvm_exits
from vmm.kvm.exits import (
    DebugExit, FailEntryExit, HltExit, InternalErrorExit, IoExit, MmioExit, ShutdownExit,
    SystemEventExit, VcpuExit,
)
from vmm.kvm.vcpu import Vcpu
from vmm.outcome import (
    EXIT_EMULATION_FAILURE, EXIT_NO_STATUS, EXIT_TRIPLE_FAULT, EXIT_VMM_ERROR, StopReason,
)
from vmm.stats import ExitStats


class ExitQuirks(Protocol):
    """Host-specific handling of exits (see vmm/arch/x86_64/pvm.py)."""

    def handle_internal_error(self, vcpu: Vcpu, exit: InternalErrorExit) -> str | None:
        """The instruction completed for the guest ("int3", "ldmxcsr"...), or None."""

    def describe_failure(self, vcpu: Vcpu, exit: InternalErrorExit) -> str: ...


class ExitDispatcher:
    """Handles one exit at a time (from any vCPU thread); True when that vCPU must stop."""

    def __init__(self, pio: Bus, mmio: Bus, stats: ExitStats, stop: Callable[..., None], *,
                 kick_others: Callable[[], None] = lambda: None, quirks: ExitQuirks | None = None,
                 trace: TextIO | None = None, vcpus: int = 1) -> None:
        self.pio = pio
        self.mmio = mmio
        self.stats = stats
        self._stop = stop  # Runner.stop(status, reason, detail)
        self._kick_others = kick_others
        self.quirks = quirks
        self.trace = trace
        self._vcpus = vcpus
        self._trace_count = 0
        # A debugger (vmm/gdb/stub.py): given each KVM_EXIT_DEBUG; True when the vCPU must stop.
        self.on_debug: Callable[[Vcpu, DebugExit], bool] | None = None

    def dispatch(self, vcpu: Vcpu, exit: VcpuExit) -> bool:
        """Handle one exit. True when this vCPU must stop."""
        if self.trace is not None:
            self._trace(vcpu, exit)
        if isinstance(exit, IoExit):
            self.stats.count("io", ("out" if exit.is_write else "in", exit.port))
            generation = self.pio.fast_path_generation()
            self._handle_io(vcpu, exit)
            if self.pio.fast_path_generation() != generation and self._vcpus > 1:
                # A device changed what C may do for it: other vCPUs' C loops
                # hold the old rules, so make them come back and reload.
                self._kick_others()
            return False
        if isinstance(exit, MmioExit):
            self.stats.count("mmio", ("write" if exit.is_write else "read", exit.address))
            if exit.is_write:
                self.mmio.write(exit.address, exit.data)
            else:
                kvm_exits.complete_mmio_read(vcpu.run_struct, self.mmio.read(exit.address, exit.size))
            return False
        self.stats.count(exit.reason)
        if isinstance(exit, DebugExit) and self.on_debug is not None:
            return self.on_debug(vcpu, exit)
        if isinstance(exit, HltExit):
            self._stop(EXIT_NO_STATUS, StopReason.HALTED, "the guest executed HLT with nothing to wake it")
        elif isinstance(exit, ShutdownExit):
            self._stop(EXIT_TRIPLE_FAULT, StopReason.TRIPLE_FAULT,
                       f"KVM_EXIT_SHUTDOWN at rip {vcpu.get_regs().rip:#x}")
        elif isinstance(exit, SystemEventExit):
            self._stop(EXIT_NO_STATUS, StopReason.SYSTEM_EVENT, f"type {exit.type}")
        elif isinstance(exit, InternalErrorExit):
            completed = (self.quirks.handle_internal_error(vcpu, exit)
                         if self.quirks is not None else None)
            if completed is not None:  # counted: --stats shows what the host made vmm finish
                self.stats.complete(completed)
                return False
            detail = (self.quirks.describe_failure(vcpu, exit) if self.quirks
                      else describe_internal_error(vcpu, exit))
            self._stop(EXIT_EMULATION_FAILURE, StopReason.EMULATION_FAILURE, detail)
        elif isinstance(exit, FailEntryExit):
            self._stop(EXIT_VMM_ERROR, StopReason.ENTRY_FAILED,
                       f"hardware entry failure reason {exit.hardware_entry_failure_reason:#x}")
        else:
            self._stop(EXIT_VMM_ERROR, StopReason.UNHANDLED_EXIT,
                       f"{exit.reason} at rip {vcpu.get_regs().rip:#x}")
        return True

    def _handle_io(self, vcpu: Vcpu, exit: IoExit) -> None:
        if exit.is_write:
            for i in range(exit.count):  # `rep outs` arrives as one exit of `count` items
                self.pio.write(exit.port, exit.data[i * exit.size : (i + 1) * exit.size])
        else:
            value = b"".join(self.pio.read(exit.port, exit.size) for _ in range(exit.count))
            kvm_exits.complete_io_in(vcpu.run_struct, exit, value)

    def _trace(self, vcpu: Vcpu, exit: VcpuExit) -> None:
        self._trace_count += 1
        rip = vcpu.get_regs().rip
        if isinstance(exit, IoExit):
            what = (f"io {'out' if exit.is_write else 'in '} port={exit.port:#06x} "
                    f"size={exit.size}" + (f" count={exit.count}" if exit.count > 1 else "")
                    + (f" data={exit.data.hex()}" if exit.is_write else "")
                    + f" ({self.pio.name_of(exit.port)})")
        elif isinstance(exit, MmioExit):
            what = (f"mmio {'write' if exit.is_write else 'read '} addr={exit.address:#x} "
                    f"size={exit.size}" + (f" data={exit.data.hex()}" if exit.is_write else "")
                    + f" ({self.mmio.name_of(exit.address)})")
        else:
            what = exit.reason
        print(f"[{self._trace_count:>6}] vcpu{vcpu.id} {what} rip={rip:#x}", file=self.trace)


def describe_internal_error(vcpu: Vcpu, exit: InternalErrorExit) -> str:
    rip = vcpu.get_regs().rip
    text = f"KVM_EXIT_INTERNAL_ERROR suberror {exit.suberror} at rip {rip:#x}"
    if exit.instruction:
        text += f", instruction bytes {exit.instruction.hex(' ')}"
    return text
