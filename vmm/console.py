"""The host side of the guest's console: output to stdout, input from the terminal.

Output is written as raw bytes and flushed at once (the guest's line
discipline already did any buffering worth doing). When stdin is a terminal,
:class:`InteractiveConsole` puts it in raw mode so every key reaches the
guest, watches for the escape ``Ctrl-A x`` to quit, and restores the
terminal on every exit path (it is a context manager, and also restores from
``atexit`` in case of a crash).
"""

from __future__ import annotations

import atexit
import os
import select
import sys
import threading
from typing import BinaryIO, Callable

ESCAPE = 0x01  # Ctrl-A
QUIT = b"x"


class ConsoleOutput:
    """Where guest serial output goes: a binary stream, flushed per write."""

    def __init__(self, stream: BinaryIO | None = None, *, watchers: list | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._lock = threading.Lock()
        self.first_byte_ns: int | None = None
        self.watchers: list[Callable[[bytes], None]] = watchers or []
        self.enabled = True  # False: output is only watched, not shown (quiet boots)

    def __call__(self, data: bytes) -> None:
        with self._lock:
            if self.first_byte_ns is None:
                import time

                self.first_byte_ns = time.monotonic_ns()
            for watch in self.watchers:
                watch(data)
            if self.enabled:
                try:
                    self._stream.write(data)
                    self._stream.flush()
                except (BrokenPipeError, ValueError):
                    self.enabled = False  # the reader went away; keep the guest running


class InteractiveConsole:
    """Raw-mode terminal input feeding a UART, with Ctrl-A x to quit."""

    def __init__(self, feed: Callable[[bytes], int], on_quit: Callable[[], None],
                 fd: int | None = None, *, escape: bool = True) -> None:
        self._feed = feed  # returns how many bytes the guest accepted
        self._on_quit = on_quit
        self._escape = escape  # False: every byte is the guest's (a container's pty)
        self._fd = sys.stdin.fileno() if fd is None else fd
        self._saved: list | None = None  # termios attributes to put back
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._pump, name="console-input", daemon=True)

    def __enter__(self) -> "InteractiveConsole":
        import termios
        import tty

        if os.isatty(self._fd):
            self._saved = termios.tcgetattr(self._fd)
            atexit.register(self._restore)
            tty.setraw(self._fd)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(1)
        self._restore()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _restore(self) -> None:
        import termios

        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _pump(self) -> None:
        escape = False
        while True:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                data = os.read(self._fd, 256)
            except OSError:  # EIO: the pty's other end closed
                return
            if not data:
                return
            if not self._escape:
                self._deliver(data)
                continue
            out = bytearray()
            for byte in data:
                if escape:
                    escape = False
                    if bytes([byte]) == QUIT:
                        self._on_quit()
                        return
                    if byte != ESCAPE:
                        out.append(ESCAPE)
                    out.append(byte)
                elif byte == ESCAPE:
                    escape = True
                else:
                    out.append(byte)
            self._deliver(bytes(out))

    def _deliver(self, data: bytes) -> None:
        import time

        while data:
            taken = self._feed(data)
            data = data[taken:]
            if data:
                time.sleep(0.005)  # the guest's FIFO is full: let it read
