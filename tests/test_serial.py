"""The 16550A UART as Linux's 8250 driver and our firmware see it (no KVM)."""

from __future__ import annotations

import pytest

from vmm.devices import serial as s
from vmm.devices.serial import Serial16550


class FakeLine:
    """An interrupt line that records every level it is set to."""

    def __init__(self):
        self.levels: list[bool] = []

    def set_level(self, high):
        self.levels.append(bool(high))

    @property
    def high(self):
        return bool(self.levels) and self.levels[-1]


@pytest.fixture
def line():
    return FakeLine()


@pytest.fixture
def out():
    return []


@pytest.fixture
def uart(out, line):
    return Serial16550(out.append, line)


def rd(uart, offset):
    return uart.read(offset, 1)[0]


def wr(uart, offset, value):
    uart.write(offset, bytes([value]))


def test_thr_write_is_output(uart, out):
    wr(uart, s.RBR_THR_DLL, ord("A"))
    assert out == [b"A"]
    assert uart.bytes_out == 1
    assert rd(uart, s.LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT


def test_wider_reads_pad_with_zeros(uart):
    assert uart.read(s.LSR, 2) == bytes([s.LSR_THRE | s.LSR_TEMT, 0])


def test_dlab_switches_offsets_0_and_1_to_the_divisor_latch(uart, out):
    wr(uart, s.LCR, 0x80 | 0x03)
    wr(uart, s.RBR_THR_DLL, 0x01)  # 115200 baud
    wr(uart, s.IER_DLM, 0x00)
    assert (rd(uart, s.RBR_THR_DLL), rd(uart, s.IER_DLM)) == (0x01, 0x00)
    assert out == []  # a divisor write is not a character
    wr(uart, s.IER_DLM, 0x02)
    assert rd(uart, s.IER_DLM) == 0x02
    wr(uart, s.LCR, 0x03)
    assert rd(uart, s.IER_DLM) == 0x00  # IER again, untouched by the DLM write
    wr(uart, s.RBR_THR_DLL, ord("x"))
    assert out == [b"x"]
    wr(uart, s.LCR, 0x83)
    assert rd(uart, s.RBR_THR_DLL) == 0x01  # the latch kept its value


def test_scratch_register(uart):
    for value in (0x00, 0x5A, 0xA5, 0xFF):
        wr(uart, s.SCR, value)
        assert rd(uart, s.SCR) == value


def test_lcr_and_mcr_read_back(uart):
    wr(uart, s.LCR, 0x1B)
    assert rd(uart, s.LCR) == 0x1B
    wr(uart, s.MCR, 0xFF)
    assert rd(uart, s.MCR) == 0x1F  # bits 5-7 do not exist on a 16550A


def test_ier_probe_as_linux_does_it(uart):
    # autoconfig(): IER=0 must read 0, IER=0x0F must read 0x0F (low nibble).
    wr(uart, s.IER_DLM, 0x00)
    assert rd(uart, s.IER_DLM) & 0x0F == 0x00
    wr(uart, s.IER_DLM, 0xFF)
    assert rd(uart, s.IER_DLM) == 0x0F


def test_loopback_msr_wiring_as_linux_probes_it(uart):
    # autoconfig(): MCR = LOOP | 0x0A (OUT2 | RTS): MSR & 0xF0 must be 0x90 (DCD | CTS).
    wr(uart, s.MCR, s.MCR_LOOP | 0x0A)
    assert rd(uart, s.MCR) == 0x1A
    assert rd(uart, s.MSR) & 0xF0 == 0x90
    wr(uart, s.MCR, s.MCR_LOOP | s.MCR_DTR | s.MCR_OUT1)
    assert rd(uart, s.MSR) & 0xF0 == s.MSR_DSR | s.MSR_RI
    wr(uart, s.MCR, s.MCR_LOOP)
    assert rd(uart, s.MSR) & 0xF0 == 0x00
    wr(uart, s.MCR, s.MCR_OUT2)  # out of loopback: the always-there modem again
    assert rd(uart, s.MSR) & 0xF0 == s.MSR_DCD | s.MSR_DSR | s.MSR_CTS


def test_loopback_sends_bytes_to_the_receiver_not_the_host(uart, out):
    wr(uart, s.MCR, s.MCR_LOOP)
    wr(uart, s.RBR_THR_DLL, 0x55)
    assert out == []
    assert rd(uart, s.LSR) & s.LSR_DR
    assert rd(uart, s.RBR_THR_DLL) == 0x55
    assert not rd(uart, s.LSR) & s.LSR_DR


def test_iir_with_nothing_pending(uart):
    assert rd(uart, s.IIR_FCR) == s.IIR_NONE
    wr(uart, s.IIR_FCR, s.FCR_ENABLE)
    assert rd(uart, s.IIR_FCR) == s.IIR_NONE | s.IIR_FIFO_ENABLED


def test_thre_interrupt_armed_by_ier_write_cleared_by_reading_iir(uart, line):
    assert not line.high
    wr(uart, s.IER_DLM, s.IER_THRE)
    assert line.high  # THR is empty: enabling its interrupt fires it at once
    assert rd(uart, s.IIR_FCR) == s.IIR_THRE
    assert not line.high  # reading IIR with THRE as the source clears it
    assert rd(uart, s.IIR_FCR) == s.IIR_NONE


def test_thre_interrupt_rearmed_by_each_write(uart, line, out):
    wr(uart, s.IER_DLM, s.IER_THRE)
    rd(uart, s.IIR_FCR)
    assert not line.high
    wr(uart, s.RBR_THR_DLL, ord("a"))
    assert line.high and out == [b"a"]
    assert rd(uart, s.IIR_FCR) == s.IIR_THRE
    assert not line.high


def test_disabling_ier_lowers_the_line(uart, line):
    wr(uart, s.IER_DLM, s.IER_THRE)
    assert line.high
    wr(uart, s.IER_DLM, 0)
    assert not line.high


def test_rda_interrupt_with_input(uart, line):
    wr(uart, s.IER_DLM, s.IER_RDA)
    assert not line.high
    assert uart.enqueue_input(b"ab") == 2
    assert line.high
    assert rd(uart, s.LSR) & s.LSR_DR
    assert rd(uart, s.IIR_FCR) == s.IIR_RDA
    assert rd(uart, s.RBR_THR_DLL) == ord("a")
    assert line.high  # still one byte waiting
    assert rd(uart, s.RBR_THR_DLL) == ord("b")
    assert not line.high
    assert not rd(uart, s.LSR) & s.LSR_DR
    assert rd(uart, s.RBR_THR_DLL) == 0  # empty FIFO reads 0


def test_input_without_rda_enabled_raises_nothing(uart, line):
    uart.enqueue_input(b"x")
    assert not line.high
    assert rd(uart, s.LSR) & s.LSR_DR


def test_iir_priorities(uart, line):
    # RDA outranks THRE; THRE shows once the data is read.
    wr(uart, s.IER_DLM, s.IER_RDA | s.IER_THRE | s.IER_RLS)
    uart.enqueue_input(b"z")
    assert rd(uart, s.IIR_FCR) == s.IIR_RDA
    rd(uart, s.RBR_THR_DLL)
    assert rd(uart, s.IIR_FCR) == s.IIR_THRE
    assert rd(uart, s.IIR_FCR) == s.IIR_NONE
    # Receiver line status (overrun) outranks RDA: overflow the FIFO in loopback.
    wr(uart, s.MCR, s.MCR_LOOP)
    for _ in range(s.FIFO_SIZE + 1):
        wr(uart, s.RBR_THR_DLL, 0x41)
    assert rd(uart, s.IIR_FCR) == s.IIR_RLS
    lsr = rd(uart, s.LSR)
    assert lsr & s.LSR_OE and lsr & s.LSR_DR
    assert not rd(uart, s.LSR) & s.LSR_OE  # overrun clears on read
    assert rd(uart, s.IIR_FCR) == s.IIR_RDA
    assert line.high


def test_receive_fifo_is_bounded(uart):
    assert uart.rx_room() == s.FIFO_SIZE
    assert uart.enqueue_input(b"x" * (s.FIFO_SIZE + 36)) == s.FIFO_SIZE
    assert uart.rx_room() == 0
    assert uart.enqueue_input(b"y") == 0
    rd(uart, s.RBR_THR_DLL)
    assert uart.rx_room() == 1


def test_fcr_clears_the_receive_fifo(uart):
    uart.enqueue_input(b"abc")
    wr(uart, s.IIR_FCR, s.FCR_ENABLE | s.FCR_CLEAR_RX)
    assert not rd(uart, s.LSR) & s.LSR_DR
    assert uart.rx_room() == s.FIFO_SIZE


def test_lsr_and_msr_writes_are_ignored(uart):
    lsr, msr = rd(uart, s.LSR), rd(uart, s.MSR)
    wr(uart, s.LSR, 0x00)
    wr(uart, s.MSR, 0x00)
    assert (rd(uart, s.LSR), rd(uart, s.MSR)) == (lsr, msr)


def test_no_interrupt_line_is_fine(out):
    uart = Serial16550(out.append)
    wr(uart, s.IER_DLM, s.IER_THRE)
    wr(uart, s.RBR_THR_DLL, ord("q"))
    assert out == [b"q"]


# --- the fast path offered to the C run loop ------------------------------------------------
def _rules(uart):
    return [(r.offset, r.on_write, r.on_read) for r in uart.fast_path_rules()]


def test_fast_path_at_reset_buffers_thr(uart, out):
    assert _rules(uart) == [(0, "buffer", "pass")]
    sink = uart.fast_path_rules()[0].sink
    sink(b"hi\n")
    assert out == [b"hi\n"] and uart.bytes_out == 3


@pytest.mark.parametrize("offset, value", [
    (s.LCR, 0x83),  # DLAB: offset 0 is the divisor latch
    (s.IER_DLM, s.IER_THRE),  # each THR write must re-arm the interrupt in Python
    (s.MCR, s.MCR_LOOP),  # loopback: bytes go to the receiver
])
def test_fast_path_disappears_and_comes_back(uart, offset, value):
    initial = rd(uart, offset)
    generation = uart.fast_path_generation
    wr(uart, offset, value)
    assert uart.fast_path_generation != generation
    assert _rules(uart) == []
    generation = uart.fast_path_generation
    wr(uart, offset, initial)
    assert uart.fast_path_generation != generation
    assert _rules(uart) == [(0, "buffer", "pass")]


def test_rda_only_keeps_the_fast_path(uart):
    wr(uart, s.IER_DLM, s.IER_RDA)
    assert _rules(uart) == [(0, "buffer", "pass")]


def test_scratch_writes_do_not_change_the_fast_path(uart):
    generation = uart.fast_path_generation
    wr(uart, s.SCR, 1)
    wr(uart, s.RBR_THR_DLL, 0x41)
    assert uart.fast_path_generation == generation
