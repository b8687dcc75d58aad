"""Interrupt lines as devices see them: a level they raise and lower.

A device does not know whether its line ends in the in-kernel irqchip
(KVM_IRQ_LINE), an irqfd, or nowhere (firmware runs have no irqchip).
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol


class InterruptLine(Protocol):
    def set_level(self, high: bool) -> None: ...


class NoInterrupt:
    """A line connected to nothing: firmware guests poll, they take no IRQs."""

    def set_level(self, high: bool) -> None:
        pass


class IrqLine:
    """A level-triggered line into the in-kernel irqchip (KVM_IRQ_LINE).

    Only level *changes* make an ioctl: the 16550 re-evaluates its line after
    every register access, and most accesses change nothing.
    """

    def __init__(self, irq_line: Callable[[int, int], None], irq: int) -> None:
        self._irq_line = irq_line
        self.irq = irq
        self._level = False
        self._lock = threading.Lock()
        self.raised = 0  # low→high transitions, for statistics

    def set_level(self, high: bool) -> None:
        with self._lock:
            if high == self._level:
                return
            self._level = high
            if high:
                self.raised += 1
            self._irq_line(self.irq, 1 if high else 0)

    def pulse(self) -> None:
        """An edge: for edge-triggered consumers (virtio-mmio interrupts)."""
        with self._lock:
            self.raised += 1
            self._irq_line(self.irq, 1)
            self._irq_line(self.irq, 0)
            self._level = False
