"""The small PC devices a guest pokes at: debug exit, POST codes, the benchmark port.

Each is a few lines and knows nothing of its port number.
"""

from __future__ import annotations

from typing import Callable

from vmm.devices.bus import PortRule, ReadAction, WriteAction


class DebugExit:
    """A byte written here ends the VM; vmm exits with that byte as its status.

    Our firmware and the default guest's /init end the VM this way: it is the
    simplest "power off with a result" a guest can do (QEMU's isa-debug-exit
    is the same idea).
    """

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self._on_exit(data[0])


class Sink:
    """Writes vanish, reads return a constant; C may do both without Python.

    Used for the POST port 0x80 (Linux writes it as an I/O delay, thousands of
    times per boot) and the benchmark port (exitbench reads its loop count
    here, then writes N times).
    """

    def __init__(self, read_value: int = 0xFFFFFFFF) -> None:
        self.read_value = read_value
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        return (self.read_value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1

    def fast_path_rules(self) -> list[PortRule]:
        return [PortRule(0, on_write=WriteAction.DISCARD, on_read=ReadAction.CONSTANT,
                         read_value=self.read_value)]


class BootTimer:
    """The guest's "I am here" marks, timestamped by the host (as Firecracker's boot timer).

    Our /init writes 1 the moment it starts (userspace reached) and 2 just
    before it reports the command's exit status. Any guest can use it: one
    byte written to the port, nothing read.
    """

    INIT_REACHED = 1
    COMMAND_DONE = 2

    def __init__(self, clock=None) -> None:
        import time

        self._clock = clock or time.monotonic_ns
        self.marks: dict[int, int] = {}  # value → first time it was written (ns)

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self.marks.setdefault(data[0], self._clock())
