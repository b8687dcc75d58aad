"""A small MC146818 CMOS real-time clock: enough for Linux to read the time once.

Linux's rtc/cmos code polls "update in progress" and reads the date registers;
a half-answered RTC made it spin for 40,000 exits on our PVM host (see
docs/). We answer every register it reads, from the host's clock, in BCD and
24-hour mode, with "update in progress" always clear. Index port at offset 0
(0x70; bit 7 is the NMI mask), data at offset 1 (0x71).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

INDEX = 0
DATA = 1

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_STATUS_A = 0x0A
REG_STATUS_B = 0x0B
REG_STATUS_C = 0x0C
REG_STATUS_D = 0x0D
REG_CENTURY = 0x32

STATUS_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) clear
STATUS_B_24H = 0x02  # 24-hour mode, BCD, no interrupts enabled
STATUS_D_VALID = 0x80  # "RAM and time valid": battery good


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


@dataclass(frozen=True)
class RtcState:
    """The selected register and the 128 bytes of CMOS RAM (the clock itself is the host's)."""

    index: int = 0
    ram: bytes = bytes(128)


class CmosRtc:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._index = 0
        self._ram = bytearray(128)
        self._ram[REG_STATUS_A] = STATUS_A_DEFAULT
        self._ram[REG_STATUS_B] = STATUS_B_24H
        self._ram[REG_STATUS_D] = STATUS_D_VALID

    def read(self, offset: int, size: int) -> bytes:
        value = self._read_register(self._index) if offset == DATA else 0xFF
        return bytes([value]) + b"\x00" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if offset == INDEX:
            self._index = data[0] & 0x7F
        elif offset == DATA and self._index not in (REG_STATUS_C, REG_STATUS_D):
            self._ram[self._index] = data[0]

    def _read_register(self, index: int) -> int:
        now = time.gmtime(self._clock())
        clock = {
            REG_SECONDS: now.tm_sec,
            REG_MINUTES: now.tm_min,
            REG_HOURS: now.tm_hour,
            REG_WEEKDAY: (now.tm_wday + 1) % 7 + 1,  # 1 = Sunday
            REG_DAY: now.tm_mday,
            REG_MONTH: now.tm_mon,
            REG_YEAR: now.tm_year % 100,
            REG_CENTURY: now.tm_year // 100,
        }
        if index in clock:
            return _bcd(clock[index])
        if index == REG_STATUS_C:
            return 0  # no interrupt flags
        return self._ram[index]

    # --- state (snapshots) -----------------------------------------------------------
    def state(self) -> RtcState:
        return RtcState(self._index, bytes(self._ram))

    def restore(self, state: RtcState) -> None:
        if len(state.ram) != len(self._ram):
            raise ValueError(f"rtc state: {len(state.ram)} bytes of CMOS RAM, expected {len(self._ram)}")
        self._index = state.index & 0x7F
        self._ram = bytearray(state.ram)
