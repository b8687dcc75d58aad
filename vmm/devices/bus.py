"""An address-range bus: maps port or MMIO ranges to devices, rejects overlaps.

A device never learns its own address. The bus holds ``(base, length, device)``
and hands the device an *offset* inside its range. An access must lie wholly
inside one range (a 4-byte read straddling two devices is refused: no real
bus does that either). Accesses to no device are counted, not fatal: unknown
ports read as all-ones, as on a PC's ISA bus.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Protocol

from vmm.errors import VmmError


class Device(Protocol):
    """What a bus needs of a device: offset-based reads and writes."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusOverlapError(VmmError):
    pass


class WriteAction(StrEnum):
    """What the C run loop does with a write to a port (enum vmm_write_action in runloop.h)."""

    PASS = "pass"  # return to Python
    DISCARD = "discard"  # complete the exit, drop the data
    BUFFER = "buffer"  # append the bytes to the output buffer, for the rule's sink


class ReadAction(StrEnum):
    """What the C run loop does with a read from a port (enum vmm_read_action)."""

    PASS = "pass"  # return to Python
    CONSTANT = "constant"  # answer the rule's read_value


@dataclass(frozen=True)
class PortRule:
    """A device's offer to the C run loop: complete these accesses without Python.

    A rule must mean exactly what the device's Python ``read``/``write`` would
    do, so that both run loops behave the same.
    """

    offset: int
    on_write: WriteAction = WriteAction.PASS
    on_read: ReadAction = ReadAction.PASS
    read_value: int = 0
    sink: Callable[[bytes], None] | None = None  # where WriteAction.BUFFER's bytes go


@dataclass(frozen=True)
class Mapping:
    base: int
    length: int
    device: Device
    name: str
    offset: int = 0  # the device's offset at ``base`` (a device seen through several windows)

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """A sorted set of non-overlapping ranges, each bound to one device."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "pio" or "mmio", for messages and traces
        self._mappings: list[Mapping] = []
        self._bases: list[int] = []
        self._fast_devices: list[Device] = []  # those that offer PortRules
        self.unhandled: Counter[int] = Counter()  # address → accesses to no device
        self.accesses: Counter[int] = Counter()  # address → accesses dispatched here

    def register(self, base: int, length: int, device: Device, name: str = "", *,
                 offset: int = 0) -> None:
        """Map [base, base+length) to ``device``, which sees offsets from ``offset`` up."""
        if length <= 0:
            raise ValueError(f"{self.kind} range at {base:#x} has length {length}")
        new = Mapping(base, length, device, name or type(device).__name__, offset)
        i = bisect.bisect_left(self._bases, base)
        for neighbour in self._mappings[max(i - 1, 0) : i + 1]:
            if neighbour.base < new.end and new.base < neighbour.end:
                raise BusOverlapError(
                    f"{self.kind} range {new.name} {base:#x}-{new.end - 1:#x} overlaps "
                    f"{neighbour.name} {neighbour.base:#x}-{neighbour.end - 1:#x}"
                )
        self._mappings.insert(i, new)
        self._bases.insert(i, base)
        if hasattr(device, "fast_path_rules") and device not in self._fast_devices:
            self._fast_devices.append(device)

    def find(self, address: int, size: int = 1) -> Mapping | None:
        """The mapping holding the whole access [address, address+size), if any."""
        i = bisect.bisect_right(self._bases, address) - 1
        if i < 0:
            return None
        mapping = self._mappings[i]
        if address + size <= mapping.end:
            return mapping
        return None

    def read(self, address: int, size: int) -> bytes:
        self.accesses[address] += 1
        mapping = self.find(address, size)
        if mapping is None:
            self.unhandled[address] += 1
            return b"\xff" * size
        return mapping.device.read(address - mapping.base + mapping.offset, size)

    def write(self, address: int, data: bytes) -> None:
        self.accesses[address] += 1
        mapping = self.find(address, len(data))
        if mapping is None:
            self.unhandled[address] += 1
            return
        mapping.device.write(address - mapping.base + mapping.offset, data)

    def mappings(self) -> list[Mapping]:
        return list(self._mappings)

    def name_of(self, address: int) -> str:
        mapping = self.find(address)
        return mapping.name if mapping else "?"

    def port_rules(self) -> list[tuple[int, PortRule]]:
        """Every (absolute address, rule) the devices offer to the C loop now."""
        rules: list[tuple[int, PortRule]] = []
        for m in self._mappings:
            offer = getattr(m.device, "fast_path_rules", None)
            if offer is not None:
                rules.extend((m.base + rule.offset - m.offset, rule) for rule in offer()
                             if m.offset <= rule.offset < m.offset + m.length)
        return rules

    def fast_path_generation(self) -> int:
        """Changes whenever some device's rules change (devices bump their own counter)."""
        return sum(getattr(d, "fast_path_generation", 0) for d in self._fast_devices)
