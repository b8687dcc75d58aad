"""The address-range bus: overlaps refused, accesses wholly inside one range (no KVM)."""

from __future__ import annotations

import pytest

from vmm.devices.bus import Bus, BusOverlapError, PortRule, ReadAction, WriteAction
from vmm.errors import VmmError


class Recorder:
    """A device that records what it was asked and answers its offset."""

    def __init__(self):
        self.calls = []

    def read(self, offset, size):
        self.calls.append(("read", offset, size))
        return bytes([offset]) * size

    def write(self, offset, data):
        self.calls.append(("write", offset, bytes(data)))


@pytest.fixture
def bus():
    return Bus("pio")


def test_dispatch_gives_the_device_an_offset(bus):
    uart = Recorder()
    bus.register(0x3F8, 8, uart, "serial")
    assert bus.read(0x3FD, 1) == b"\x05"
    bus.write(0x3F8, b"A")
    assert uart.calls == [("read", 5, 1), ("write", 0, b"A")]
    assert bus.accesses[0x3FD] == 1 and bus.accesses[0x3F8] == 1
    assert not bus.unhandled


@pytest.mark.parametrize("base, length", [
    (0x3F8, 8),  # identical
    (0x3FF, 2),  # starts on the last port
    (0x3F0, 9),  # ends on the first port
    (0x3FA, 1),  # inside
    (0x300, 0x200),  # covers it
])
def test_overlap_is_rejected_with_both_names(bus, base, length):
    bus.register(0x3F8, 8, Recorder(), "serial")
    with pytest.raises(BusOverlapError, match=r"new.*overlaps serial 0x3f8-0x3ff"):
        bus.register(base, length, Recorder(), "new")
    assert [m.name for m in bus.mappings()] == ["serial"]
    assert issubclass(BusOverlapError, VmmError)


def test_overlap_with_a_range_further_away_in_sorted_order(bus):
    bus.register(0x10, 1, Recorder(), "a")
    bus.register(0x20, 1, Recorder(), "b")
    bus.register(0x30, 1, Recorder(), "c")
    with pytest.raises(BusOverlapError, match="overlaps a"):
        bus.register(0x00, 0x40, Recorder(), "big")


def test_adjacent_ranges_are_fine(bus):
    bus.register(0x60, 1, Recorder(), "data")
    bus.register(0x61, 3, Recorder(), "mid")
    bus.register(0x5F, 1, Recorder(), "before")
    assert [(m.base, m.name) for m in bus.mappings()] == [(0x5F, "before"), (0x60, "data"), (0x61, "mid")]


def test_zero_length_is_refused(bus):
    with pytest.raises(ValueError):
        bus.register(0x80, 0, Recorder())


def test_access_straddling_two_ranges_is_refused(bus):
    a, b = Recorder(), Recorder()
    bus.register(0x60, 2, a, "a")
    bus.register(0x62, 2, b, "b")
    assert bus.read(0x61, 2) == b"\xff\xff"
    bus.write(0x61, b"\x01\x02")
    assert a.calls == [] and b.calls == []
    assert bus.unhandled[0x61] == 2
    assert bus.find(0x61, 2) is None
    assert bus.find(0x61, 1).name == "a"


def test_access_running_off_the_end_is_refused(bus):
    device = Recorder()
    bus.register(0x502, 4, device, "bench")
    assert bus.read(0x502, 4) == b"\x00" * 4  # whole range: fine
    assert bus.read(0x504, 4) == b"\xff" * 4  # half outside
    assert device.calls == [("read", 0, 4)]


def test_unknown_ports_read_all_ones_and_are_counted(bus):
    bus.register(0x3F8, 8, Recorder())
    assert bus.read(0x2F8, 1) == b"\xff"
    assert bus.read(0x2F8, 2) == b"\xff\xff"
    assert bus.read(0x0, 4) == b"\xff" * 4  # below every range
    bus.write(0xCF8, b"\0\0\0\x80")  # writes to nothing vanish
    assert bus.unhandled == {0x2F8: 2, 0x0: 1, 0xCF8: 1}
    assert bus.name_of(0x2F8) == "?"


def test_names_default_to_the_device_class(bus):
    bus.register(0x70, 2, Recorder())
    assert bus.name_of(0x71) == "Recorder"


class FastDevice(Recorder):
    def __init__(self, rules):
        super().__init__()
        self.rules = rules
        self.fast_path_generation = 0

    def fast_path_rules(self):
        return self.rules


def test_port_rules_are_made_absolute(bus):
    rule = PortRule(0, on_write=WriteAction.DISCARD, on_read=ReadAction.CONSTANT, read_value=7)
    bus.register(0x80, 1, FastDevice([rule]), "post")
    bus.register(0x3F8, 8, FastDevice([PortRule(0, on_write=WriteAction.BUFFER)]), "serial")
    bus.register(0x501, 1, Recorder(), "plain")
    assert [(port, r.on_write) for port, r in bus.port_rules()] == [(0x80, WriteAction.DISCARD), (0x3F8, WriteAction.BUFFER)]


def test_fast_path_generation_sums_the_devices(bus):
    a, b = FastDevice([]), FastDevice([])
    bus.register(0x80, 1, a)
    bus.register(0x90, 1, b)
    before = bus.fast_path_generation()
    b.fast_path_generation += 1
    assert bus.fast_path_generation() == before + 1
