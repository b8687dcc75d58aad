"""Power for an ACPI guest: the sleep control and status registers, and the power button.

A hardware-reduced ACPI machine (vmm/acpi/tables.py) has no PM1 block: the
FADT names two byte registers instead. The guest powers off by writing to the
control register the sleep type ``\\_S5`` gives (5) with SLP_EN; this device
then reports it, and vmm ends the VM with status 0, as a power supply would.

The power button has no register: vmm presses it by an edge on the Generic
Event Device's interrupt, whose ``_EVT`` method notifies the ``PNP0C0C``
button; the guest's button driver tells systemd-logind, which shuts the
system down (what SIGTERM to a vmm running a distribution does).

Knows nothing of KVM or its ports: offset 0 is the control register, 1 the
status register; the interrupt is a line it is given.
"""

from __future__ import annotations

from typing import Callable

from vmm.devices.irq import InterruptLine

CONTROL, STATUS = 0, 1
SLP_TYP_MASK, SLP_TYP_SHIFT, SLP_EN = 0x1C, 2, 0x20
WAKE_STATUS = 0x80
S5 = 5  # soft off: the sleep type \_S5 names


class AcpiPower:
    def __init__(self, on_poweroff: Callable[[], None], button: InterruptLine) -> None:
        self._on_poweroff = on_poweroff
        self._button = button
        self.presses = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)  # nothing is ever asleep, nothing woke

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        if offset == CONTROL and value & SLP_EN and (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5:
            self._on_poweroff()
        # other sleep states are refused by not sleeping: the guest reads on

    def press_button(self) -> None:
        """A press of the power button: one edge on the Generic Event Device's line."""
        self.presses += 1
        self._button.set_level(True)
        self._button.set_level(False)
