"""A 16550A UART: the guest's console.

Register model after the National Semiconductor PC16550D datasheet. The
device knows nothing of KVM or of its base address (0x3f8 is the bus's
business): it has eight register offsets, an interrupt line it raises and
lowers, an output callable for transmitted bytes, and a bounded receive FIFO
that the host console fills.

Transmission is instantaneous: a byte written to THR goes to the output at
once, so THR is always empty again (LSR.THRE and TEMT stay set) and the
"THR empty" interrupt, when enabled, is re-armed after each write. Linux's
8250 driver is interrupt driven: without that interrupt its tty stalls.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from vmm.devices.bus import PortRule, WriteAction
from vmm.devices.irq import InterruptLine, NoInterrupt

# Register offsets (DLAB is bit 7 of LCR).
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01  # received data available
IER_THRE = 0x02  # transmitter holding register empty
IER_RLS = 0x04  # receiver line status
IER_MS = 0x08  # modem status
IER_MASK = 0x0F

IIR_NONE = 0x01  # bit 0 set: no interrupt pending
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_THRE = 0x02
IIR_MS = 0x00
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

FIFO_SIZE = 64  # receive FIFO; the real 16550A has 16, a bigger one loses less input


@dataclass(frozen=True)
class SerialState:
    """Everything the guest can observe of the UART: its registers and the receive FIFO."""

    ier: int = 0
    lcr: int = 0x03
    mcr: int = MCR_OUT2
    lsr: int = LSR_THRE | LSR_TEMT
    msr: int = MSR_DSR | MSR_CTS | MSR_DCD
    scr: int = 0
    dll: int = 0x0C
    dlm: int = 0
    fcr: int = 0
    thr_interrupt: bool = False
    rx_fifo: bytes = b""


class Serial16550:
    def __init__(
        self,
        output: Callable[[bytes], None],
        interrupt: InterruptLine | None = None,
    ) -> None:
        self._output = output
        self._interrupt = interrupt or NoInterrupt()
        self._lock = threading.RLock()
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = MCR_OUT2  # OUT2 gates the IRQ on a PC; firmware expects it on
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_DSR | MSR_CTS | MSR_DCD  # a modem that is always there
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.fcr = 0
        self._thr_interrupt = False  # THRE interrupt armed
        self.fast_path_generation = 0
        self.bytes_out = 0
        self.interrupts = 0

    # --- state (snapshots) -------------------------------------------------------------
    def state(self) -> SerialState:
        with self._lock:
            return SerialState(
                ier=self.ier, lcr=self.lcr, mcr=self.mcr, lsr=self.lsr, msr=self.msr,
                scr=self.scr, dll=self.dll, dlm=self.dlm, fcr=self.fcr,
                thr_interrupt=self._thr_interrupt, rx_fifo=bytes(self._rx),
            )

    def restore(self, state: SerialState) -> None:
        """Take on a saved state; the interrupt line follows it (the irqchip is restored first)."""
        if len(state.rx_fifo) > FIFO_SIZE:
            raise ValueError(f"serial state: {len(state.rx_fifo)} bytes in a {FIFO_SIZE}-byte FIFO")
        with self._lock:
            self.ier, self.lcr, self.mcr = state.ier & IER_MASK, state.lcr & 0xFF, state.mcr & MCR_MASK
            self.lsr, self.msr, self.scr = state.lsr & 0xFF, state.msr & 0xFF, state.scr & 0xFF
            self.dll, self.dlm, self.fcr = state.dll & 0xFF, state.dlm & 0xFF, state.fcr & 0xFF
            self._thr_interrupt = bool(state.thr_interrupt)
            self._rx = deque(state.rx_fifo)
            self._update_interrupt()
            self._fast_path_changed()

    # --- host side ---------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Host → guest bytes. Returns how many fitted in the FIFO (the rest: retry)."""
        with self._lock:
            accepted = 0
            for byte in data:
                if len(self._rx) >= FIFO_SIZE:
                    break
                self._rx.append(byte)
                accepted += 1
            if accepted:
                self.lsr |= LSR_DR
                self._update_interrupt()
            return accepted

    def rx_room(self) -> int:
        with self._lock:
            return FIFO_SIZE - len(self._rx)

    # --- guest side -----------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read_register(offset)
        return bytes([value]) + b"\x00" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._write_register(offset, data[0])

    def _read_register(self, offset: int) -> int:
        dlab = bool(self.lcr & LCR_DLAB)
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            value = self._rx.popleft() if self._rx else 0
            if not self._rx:
                self.lsr &= ~LSR_DR
            self._update_interrupt()
            return value
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._pending_iir()
            if iir == IIR_THRE:
                # Reading IIR when THRE is the source clears it (datasheet, table 4).
                self._thr_interrupt = False
                self._update_interrupt()
            fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0
            return iir | fifo
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = self.lsr
            self.lsr &= ~LSR_OE  # error bits clear on read
            return value
        if offset == MSR:
            value = self._modem_status()
            self.msr &= ~(MSR_DCTS | MSR_DDSR | MSR_TERI | MSR_DDCD)
            return value
        if offset == SCR:
            return self.scr
        return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        dlab = bool(self.lcr & LCR_DLAB)
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
            else:
                self._transmit(bytes([value]))
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                enabling_thre = not (self.ier & IER_THRE) and value & IER_THRE
                self.ier = value & IER_MASK
                if enabling_thre:
                    # THR is empty, so enabling its interrupt fires it at once.
                    self._thr_interrupt = True
                self._update_interrupt()
                self._fast_path_changed()
        elif offset == IIR_FCR:
            if value & FCR_CLEAR_RX:
                self._rx.clear()
                self.lsr &= ~LSR_DR
            self.fcr = value & 0xC9  # enable, DMA mode, trigger level
            self._update_interrupt()
        elif offset == LCR:
            self.lcr = value
            self._fast_path_changed()
        elif offset == MCR:
            self.mcr = value & MCR_MASK
            self._update_interrupt()
            self._fast_path_changed()
        elif offset == SCR:
            self.scr = value
        # LSR and MSR are read-only; writes are ignored as on the chip.

    def _transmit(self, data: bytes) -> None:
        if self.mcr & MCR_LOOP:
            # Loopback: the transmitter feeds the receiver (Linux's probe uses it).
            for byte in data:
                if len(self._rx) < FIFO_SIZE:
                    self._rx.append(byte)
                else:
                    self.lsr |= LSR_OE
            self.lsr |= LSR_DR
        else:
            self.bytes_out += len(data)
            self._output(data)
        if self.ier & IER_THRE:
            self._thr_interrupt = True
        self._update_interrupt()

    def _modem_status(self) -> int:
        if not self.mcr & MCR_LOOP:
            return self.msr
        # Loopback wiring: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
        status = self.msr & 0x0F
        if self.mcr & MCR_DTR:
            status |= MSR_DSR
        if self.mcr & MCR_RTS:
            status |= MSR_CTS
        if self.mcr & MCR_OUT1:
            status |= MSR_RI
        if self.mcr & MCR_OUT2:
            status |= MSR_DCD
        return status

    def _pending_iir(self) -> int:
        """The highest-priority pending interrupt, as IIR encodes it."""
        if self.ier & IER_RLS and self.lsr & LSR_OE:
            return IIR_RLS
        if self.ier & IER_RDA and self.lsr & LSR_DR:
            return IIR_RDA
        if self.ier & IER_THRE and self._thr_interrupt:
            return IIR_THRE
        if self.ier & IER_MS and self.msr & 0x0F:
            return IIR_MS
        return IIR_NONE

    def _update_interrupt(self) -> None:
        pending = self._pending_iir() != IIR_NONE
        if pending:
            self.interrupts += 1
        self._interrupt.set_level(pending)

    # --- the hot path C may take over ---------------------------------------------------
    def _fast_path_changed(self) -> None:
        self.fast_path_generation += 1

    def fast_path_rules(self) -> list[PortRule]:
        """While a THR write does nothing but emit a byte, C may buffer it.

        That is: DLAB clear (offset 0 is THR, not the divisor), not in
        loopback, and the THR-empty interrupt disabled (else each write must
        re-arm the interrupt, which is Python's job). Firmware and early boot
        consoles write this way; Linux's interrupt-driven tty does not.
        """
        with self._lock:
            if self.lcr & LCR_DLAB or self.mcr & MCR_LOOP or self.ier & IER_THRE:
                return []
            return [PortRule(RBR_THR_DLL, on_write=WriteAction.BUFFER, sink=self._fast_output)]

    def _fast_output(self, data: bytes) -> None:
        with self._lock:
            self.bytes_out += len(data)
            self._output(data)
