"""The small PC devices: i8042, CMOS RTC, debug exit, sinks, interrupt lines (no KVM)."""

from __future__ import annotations

import calendar

import pytest

from vmm.devices import i8042 as k
from vmm.devices import rtc as r
from vmm.devices.i8042 import I8042
from vmm.devices.irq import IrqLine, NoInterrupt
from vmm.devices.legacy import DebugExit, Sink
from vmm.devices.rtc import CmosRtc


# --- i8042 ---------------------------------------------------------------------------
@pytest.fixture
def resets():
    return []


@pytest.fixture
def kbc(resets):
    return I8042(lambda: resets.append(True))


def status(kbc):
    return kbc.read(k.COMMAND, 1)[0]


def test_i8042_self_test_answers_0x55(kbc):
    assert status(kbc) & k.STATUS_OUTPUT_FULL == 0
    kbc.write(k.COMMAND, bytes([k.CMD_SELF_TEST]))
    assert status(kbc) & k.STATUS_OUTPUT_FULL
    assert kbc.read(k.DATA, 1) == b"\x55"
    assert status(kbc) & k.STATUS_OUTPUT_FULL == 0
    assert status(kbc) & k.STATUS_SYSTEM


@pytest.mark.parametrize("command", [k.CMD_INTERFACE_TEST, k.CMD_TEST_AUX])
def test_i8042_port_tests_report_no_error(kbc, command):
    kbc.write(k.COMMAND, bytes([command]))
    assert kbc.read(k.DATA, 1) == b"\x00"


def test_i8042_command_byte_round_trip(kbc):
    kbc.write(k.COMMAND, bytes([k.CMD_READ_CTR]))
    assert kbc.read(k.DATA, 1) == b"\x00"
    kbc.write(k.COMMAND, bytes([k.CMD_WRITE_CTR]))
    kbc.write(k.DATA, b"\x47")
    kbc.write(k.COMMAND, bytes([k.CMD_READ_CTR]))
    assert kbc.read(k.DATA, 1) == b"\x47"


def test_i8042_reset_command_calls_back(kbc, resets):
    kbc.write(k.COMMAND, bytes([k.CMD_PULSE_RESET]))
    assert resets == [True]


@pytest.mark.parametrize("command", [0xF0, 0xF2, 0xFC])
def test_i8042_any_pulse_with_reset_line_low_resets(kbc, resets, command):
    kbc.write(k.COMMAND, bytes([command]))
    assert resets == [True]


@pytest.mark.parametrize("command", [0xFF, 0xF1, k.CMD_SELF_TEST, k.CMD_DISABLE_KBD])
def test_i8042_other_commands_do_not_reset(kbc, resets, command):
    kbc.write(k.COMMAND, bytes([command]))
    assert resets == []


def test_i8042_keyboard_bytes_go_nowhere(kbc, resets):
    kbc.write(k.DATA, b"\xfe")  # a keyboard reset, not a CPU reset
    assert resets == [] and status(kbc) & k.STATUS_OUTPUT_FULL == 0


# --- RTC ---------------------------------------------------------------------------------
FIXED = calendar.timegm((2024, 3, 5, 13, 45, 59, 0, 0, 0))  # a Tuesday


@pytest.fixture
def rtc():
    return CmosRtc(clock=lambda: FIXED)


def cmos(rtc, index):
    rtc.write(r.INDEX, bytes([index]))
    return rtc.read(r.DATA, 1)[0]


@pytest.mark.parametrize("index, bcd", [
    (r.REG_SECONDS, 0x59), (r.REG_MINUTES, 0x45), (r.REG_HOURS, 0x13),
    (r.REG_WEEKDAY, 0x03),  # 1 = Sunday, so Tuesday = 3
    (r.REG_DAY, 0x05), (r.REG_MONTH, 0x03), (r.REG_YEAR, 0x24), (r.REG_CENTURY, 0x20),
])
def test_rtc_date_is_bcd(rtc, index, bcd):
    assert cmos(rtc, index) == bcd


def test_rtc_update_in_progress_is_always_clear(rtc):
    for _ in range(100):
        assert cmos(rtc, r.REG_STATUS_A) & 0x80 == 0


def test_rtc_status_registers(rtc):
    b = cmos(rtc, r.REG_STATUS_B)
    assert b & 0x02  # 24-hour mode
    assert not b & 0x04  # BCD, not binary
    assert cmos(rtc, r.REG_STATUS_C) == 0
    assert cmos(rtc, r.REG_STATUS_D) == 0x80  # valid RAM and time


def test_rtc_nmi_mask_bit_is_not_part_of_the_index(rtc):
    assert cmos(rtc, 0x80 | r.REG_SECONDS) == 0x59


def test_rtc_nvram_and_read_only_registers(rtc):
    rtc.write(r.INDEX, b"\x20")
    rtc.write(r.DATA, b"\xab")
    assert cmos(rtc, 0x20) == 0xAB
    rtc.write(r.INDEX, bytes([r.REG_STATUS_D]))
    rtc.write(r.DATA, b"\x00")
    assert cmos(rtc, r.REG_STATUS_D) == 0x80


def test_rtc_index_port_reads_all_ones(rtc):
    assert rtc.read(r.INDEX, 1) == b"\xff"


def test_rtc_follows_the_host_clock():
    now = [FIXED]
    rtc = CmosRtc(clock=lambda: now[0])
    assert cmos(rtc, r.REG_SECONDS) == 0x59
    now[0] += 1
    assert cmos(rtc, r.REG_SECONDS) == 0x00
    assert cmos(rtc, r.REG_MINUTES) == 0x46


# --- debug exit, sinks ------------------------------------------------------------------------
def test_debug_exit_passes_the_byte_on():
    seen = []
    device = DebugExit(seen.append)
    device.write(0, b"\x2a")
    assert seen == [42]
    assert device.read(0, 1) == b"\xff"


def test_sink_reads_its_constant_at_any_width_and_drops_writes():
    sink = Sink(100000)
    assert sink.read(0, 4) == (100000).to_bytes(4, "little")
    assert sink.read(0, 1) == bytes([100000 & 0xFF])
    sink.write(0, b"\0")
    assert sink.writes == 1
    (rule,) = sink.fast_path_rules()
    assert (rule.offset, rule.on_write, rule.on_read, rule.read_value) == (0, "discard", "constant", 100000)


# --- interrupt lines ----------------------------------------------------------------------------
def test_irq_line_only_calls_kvm_on_changes():
    calls = []
    line = IrqLine(lambda irq, level: calls.append((irq, level)), 4)
    line.set_level(False)
    line.set_level(True)
    line.set_level(True)
    line.set_level(False)
    assert calls == [(4, 1), (4, 0)]
    assert line.raised == 1


def test_irq_line_pulse():
    calls = []
    line = IrqLine(lambda irq, level: calls.append((irq, level)), 5)
    line.pulse()
    assert calls == [(5, 1), (5, 0)]
    line.set_level(False)  # already low after a pulse
    assert calls == [(5, 1), (5, 0)]


def test_no_interrupt_accepts_anything():
    line = NoInterrupt()
    assert line.set_level(True) is None and line.set_level(False) is None
