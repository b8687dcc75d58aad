"""Drive a machine's serial console through a pipe: wait for text, type a command, and
note when each line of interest first appeared (a distribution's boot, phase by phase).

Used by benchmarks/bench_distro.py (vmm and QEMU side by side) and tests/test_distro.py.
The process is any VMM whose stdin and stdout are the guest's console: `vmm run` with
the guest's own init, or `qemu-system-x86_64 -serial stdio`.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")

# What a Debian boot prints as it passes each phase (kernel log lines on the console,
# then systemd's and agetty's), in order. The phase ends where the next one's line shows.
DEBIAN_MILESTONES = (
    ("kernel", b"Linux version "),  # the kernel's first line: decompressed, started
    ("initramfs", b"Run /init as init process"),  # the kernel's init done
    ("systemd", b"Welcome to "),  # switch_root done: systemd on the real root (its name in colour)
    ("login", b"login:"),  # agetty on ttyS0 (with --autologin: the prompt follows)
)


class Console:
    """A process's stdout read by a thread (timestamped), its stdin written on demand."""

    def __init__(self, process: subprocess.Popen, started: float | None = None) -> None:
        self.process = process
        self.started = time.monotonic() if started is None else started
        self.data = bytearray()
        self.changed = threading.Condition()
        self._chunks: list[tuple[float, int]] = []  # (when, offset of the chunk's end)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            with self.changed:
                self.data += chunk
                self._chunks.append((time.monotonic() - self.started, len(self.data)))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def finish(self, timeout: float = 2.0) -> bytes:
        """Everything the console printed, once the process has ended."""
        self._reader.join(timeout)
        return bytes(self.data)

    def seen_at(self, pattern: bytes, start: int = 0) -> float | None:
        """Seconds from the start until ``pattern`` had arrived (None: not yet)."""
        with self.changed:
            at = self.data.find(pattern, start)
            if at == -1:
                return None
            end = at + len(pattern)
            return next(when for when, offset in self._chunks if offset >= end)

    def wait_for(self, pattern: bytes, start: int, timeout: float) -> int:
        """Where ``pattern`` ends, at or after ``start``; AssertionError with the console's
        tail if it does not come in ``timeout`` seconds or the process ends first."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while (at := self.data.find(pattern, start)) == -1:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    tail = bytes(self.data[-2000:]).decode(errors="replace")
                    raise AssertionError(f"{pattern!r} not seen in {timeout:.0f} s; console "
                                         f"ends:\n{tail}")
                self.changed.wait(min(left, 1.0))
            return at + len(pattern)

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def run(self, name: str, command: str, timeout: float = 300) -> str:
        """Type ``command`` at a shell prompt; what it printed, between two markers."""
        start = len(self.data)
        begin_mark, end_mark = f"@{name}-begin@", f"@{name}-end@"
        self.type(f"echo {begin_mark}; {command}; echo {end_mark}")
        begin = self.wait_for(begin_mark.encode() + b"\r\n", start, timeout)
        end = self.wait_for(end_mark.encode(), begin, timeout)
        text = ANSI.sub(b"", bytes(self.data[begin:end - len(end_mark)]))
        return text.decode(errors="replace").replace("\r", "").strip()

    def milestones(self, milestones=DEBIAN_MILESTONES) -> dict[str, float | None]:
        """When each milestone's line first appeared (seconds from the start)."""
        return {name: self.seen_at(pattern) for name, pattern in milestones}
