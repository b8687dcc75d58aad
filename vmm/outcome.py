"""How a VM ended: the reason, and the exit status `vmm run` reports for it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# vmm's own exit statuses (the guest's status passes through as 0-255).
# Docker-like: 125 is the tool's own failure, 124 a timeout as in timeout(1).
EXIT_NO_STATUS = 120  # the guest stopped (reset, power off, HLT) without reporting one
EXIT_EMULATION_FAILURE = 121  # KVM could not emulate a guest instruction
EXIT_TRIPLE_FAULT = 122  # KVM_EXIT_SHUTDOWN: the guest's CPU reset itself
EXIT_GUEST_PANIC = 123  # the guest kernel panicked
EXIT_TIMEOUT = 124  # --timeout expired
EXIT_VMM_ERROR = 125  # vmm itself failed (bad input, KVM error)


class StopReason(StrEnum):
    """Why a VM ended (what `vmm: guest stopped: ...` says). A str: prints and compares as its value."""

    GUEST_EXIT = "guest exit"  # the guest wrote its status to the exit port
    GUEST_PANIC = "guest kernel panic"
    GUEST_RESET = "guest reset"  # rebooted without a status
    GUEST_POWEROFF = "guest powered off"  # ACPI S5: the sleep control register
    GUEST_REBOOT = "guest rebooted"  # a guest whose own init runs: restarted unless --no-reboot
    HALTED = "halted"  # HLT with nothing to wake it (no irqchip)
    TRIPLE_FAULT = "triple fault"
    SYSTEM_EVENT = "system event"
    EMULATION_FAILURE = "emulation failure"
    ENTRY_FAILED = "entry failed"
    UNHANDLED_EXIT = "unhandled exit"
    ALL_STOPPED = "all vCPUs stopped"
    TIMEOUT = "timeout"
    VMM_ERROR = "vmm error"
    CONSOLE_ESCAPE = "console escape"  # Ctrl-A x
    SNAPSHOT_SAVED = "snapshot saved"  # vmm snapshot create: done at the ready point
    DEBUGGER_KILL = "killed by the debugger"  # GDB's k packet (vmm run --gdb)
    SIGINT = "SIGINT"
    SIGTERM = "SIGTERM"


@dataclass(frozen=True)
class Outcome:
    status: int  # what `vmm run` exits with
    reason: StopReason
    detail: str = ""
