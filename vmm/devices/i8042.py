"""An i8042 keyboard controller that only does what Linux asks of it at boot.

Linux probes the controller (self-test, read the command byte) and, on
``reboot``, pulses the CPU reset line through it (command 0xFE). We answer the
probe at once with "no keyboard, no mouse" and turn the reset into the end of
the VM. Ports: data at offset 0 (0x60), command/status at offset 4 (0x64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

DATA = 0
COMMAND = 4

STATUS_OUTPUT_FULL = 0x01  # a byte waits in the output buffer
STATUS_SYSTEM = 0x04  # self-test passed since power-on

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_SELF_TEST = 0xAA
CMD_INTERFACE_TEST = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_PULSE_RESET = 0xFE

SELF_TEST_OK = 0x55


@dataclass(frozen=True)
class I8042State:
    output: int | None = None  # the byte waiting in the output buffer
    ctr: int = 0x00  # controller configuration byte
    expect_ctr: bool = False  # the next data byte is a new configuration byte


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._output: int | None = None
        self._ctr = 0x00  # controller configuration byte: interrupts off
        self._expect_ctr = False

    def read(self, offset: int, size: int) -> bytes:
        if offset == DATA:
            value = self._output if self._output is not None else 0
            self._output = None
        elif offset == COMMAND:
            value = STATUS_SYSTEM | (STATUS_OUTPUT_FULL if self._output is not None else 0)
        else:
            value = 0xFF
        return bytes([value]) + b"\x00" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        if offset == DATA:
            if self._expect_ctr:
                self._ctr = value
                self._expect_ctr = False
            # Bytes for a keyboard that is not there go nowhere.
            return
        if offset != COMMAND:
            return
        if value == CMD_READ_CTR:
            self._output = self._ctr
        elif value == CMD_WRITE_CTR:
            self._expect_ctr = True
        elif value == CMD_SELF_TEST:
            self._output = SELF_TEST_OK
        elif value in (CMD_INTERFACE_TEST, CMD_TEST_AUX):
            self._output = 0x00  # "no error"
        elif value == CMD_PULSE_RESET or (value & 0xF0 == 0xF0 and not value & 0x01):
            # 0xF0-0xFF pulse output lines; bit 0 low pulses the CPU reset line.
            self._on_reset()

    # --- state (snapshots) -----------------------------------------------------------
    def state(self) -> I8042State:
        return I8042State(self._output, self._ctr, self._expect_ctr)

    def restore(self, state: I8042State) -> None:
        self._output = None if state.output is None else state.output & 0xFF
        self._ctr = state.ctr & 0xFF
        self._expect_ctr = bool(state.expect_ctr)
