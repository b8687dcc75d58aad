"""The mailbox: how a command reaches a guest that was not booted for it.

A cold boot passes the command on the kernel command line (``vmm.argv=``).
A VM restored from a snapshot has long finished reading its command line, so
the default guest's /init (with ``vmm.mailbox`` on its command line) stops
instead at a *ready point* and waits for a request:

1. /init fills a 64 KiB buffer with zeros (so every page of it is present)
   and writes a 16-byte descriptor of it -- its virtual address, its length,
   a magic number -- to the 16 ports of this device, one byte per port (that
   is what a write to /dev/port does);
2. the write of the last byte is the ready point: this device calls
   ``on_ready(address, length)``, in the vCPU thread, with the guest stopped
   in that ``out``. The VMM saves the VM there (``vmm snapshot create``), or
   writes a request into the buffer and lets the guest go on;
3. /init returns from its write, finds the request in its buffer: argv, the
   host's wall-clock time, fresh entropy (:func:`encode_request`).

The device knows nothing of page tables: the VMM turns the virtual address
into guest-physical pages while the guest is stopped (:func:`buffer_extents`),
and keeps those pages, not the address, in a snapshot.

Everything the guest writes is hostile: a descriptor with a bad magic, a
zero or oversized length is ignored and counted; reads return all-ones.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from typing import Callable

DESCRIPTOR = struct.Struct("<QII")  # address, length, magic (written last)
DESCRIPTOR_MAGIC = 0x524D4D56  # "VMMR"
MAX_BUFFER = 1 << 20  # /init offers 64 KiB; anything over 1 MiB is nonsense

SEED_BYTES = 64
# What /init (vmm/images/init.c) has room for, passed to its build with -D.
MAILBOX_SIZE = 64 * 1024  # its request buffer
MAX_ARGS = 256  # argv entries, the terminating NULL included
# A container's settings (vmm/oci/guest.py): entries of each repeated kind.
MAX_ENV, MAX_MOUNTS, MAX_RLIMITS, MAX_GROUPS, MAX_PRELOAD = 256, 32, 16, 32, 64
# struct request in vmm/images/init.c: magic, version, flags, argc, argv bytes,
# realtime seconds and nanoseconds, seed bytes, seed, settings bytes, reserved.
REQUEST_HEADER = struct.Struct(f"<IHHIIqII{SEED_BYTES}sII")
REQUEST_MAGIC = 0x51524D56  # "VMRQ"
REQUEST_VERSION = 2  # 2: container settings after the arguments
REQUEST_INTERACTIVE = 1
# Only a container's root settings: /init prepares the root and goes back to its
# ready point for the next request (vmm/oci/monitor.py saves the VM there).
REQUEST_PREPARE = 2


@dataclass(frozen=True)
class MailboxState:
    """The descriptor bytes received so far (empty but for a VM stopped mid-descriptor)."""

    received: bytes = b""


class Mailbox:
    """16 write-only ports that collect /init's descriptor in order; the last byte signals."""

    PORTS = DESCRIPTOR.size

    def __init__(self, on_ready: Callable[[int, int], None]) -> None:
        self._on_ready = on_ready
        self._received = bytearray()
        self.errors = 0  # descriptors ignored: out of order, bad magic, bad length

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset != len(self._received):  # /dev/port writes port after port
            self._received.clear()
            if offset != 0:
                self.errors += 1
                return
        self._received += data
        if len(self._received) < self.PORTS:
            return
        address, length, magic = DESCRIPTOR.unpack(self._received[: self.PORTS])
        self._received.clear()
        if magic != DESCRIPTOR_MAGIC or not 0 < length <= MAX_BUFFER:
            self.errors += 1
            return
        self._on_ready(address, length)

    # --- state -------------------------------------------------------------------------
    def state(self) -> MailboxState:
        return MailboxState(bytes(self._received))

    def restore(self, state: MailboxState) -> None:
        if len(state.received) >= self.PORTS:
            raise ValueError(f"mailbox state: {len(state.received)} descriptor bytes, "
                             f"at most {self.PORTS - 1}")
        self._received = bytearray(state.received)


# --- the request, and where it goes -----------------------------------------------------
def encode_request(argv: tuple[str, ...], *, interactive: bool = False,
                   now_ns: int | None = None, seed: bytes | None = None,
                   settings: tuple[str, ...] = (), prepare: bool = False) -> bytes:
    """The request /init reads: header, each argument NUL-terminated, then the settings.

    ``settings``: "key=value" strings for a container (vmm/oci/guest.py makes
    them; init.c's parse_settings reads them). ``prepare``: they are only the
    root's, and /init comes back to its ready point once the root is ready.
    """
    from vmm.config import check_argv

    check_argv(argv)
    for setting in settings:
        if "\0" in setting or "=" not in setting:
            raise ValueError(f"container setting {setting!r}: not key=value without NUL")
    strings = b"".join(os.fsencode(arg) + b"\0" for arg in argv)
    extra = b"".join(os.fsencode(setting) + b"\0" for setting in settings)
    now_ns = time.time_ns() if now_ns is None else now_ns
    seed = os.urandom(SEED_BYTES) if seed is None else seed
    header = REQUEST_HEADER.pack(
        REQUEST_MAGIC, REQUEST_VERSION,
        (REQUEST_INTERACTIVE if interactive else 0) | (REQUEST_PREPARE if prepare else 0),
        len(argv), len(strings), now_ns // 1_000_000_000, now_ns % 1_000_000_000,
        len(seed), seed, len(extra), 0,
    )
    return header + strings + extra


def buffer_extents(translate: Callable[[int], int | None], address: int, length: int
                   ) -> list[tuple[int, int]]:
    """The buffer's guest-physical pieces, page by page: [(physical address, length)].

    ``translate(virtual)`` walks the guest's page tables (None: not mapped).
    Raises ValueError when a page of the buffer is not mapped: /init touches
    every page first, so that means something else wrote the descriptor.
    """
    extents: list[tuple[int, int]] = []
    position, end = address, address + length
    while position < end:
        chunk = min(end, (position | 0xFFF) + 1) - position
        physical = translate(position)
        if physical is None:
            raise ValueError(f"mailbox buffer page at {position:#x} is not mapped")
        if extents and extents[-1][0] + extents[-1][1] == physical:
            extents[-1] = (extents[-1][0], extents[-1][1] + chunk)
        else:
            extents.append((physical, chunk))
        position += chunk
    return extents


def deliver(memory, extents: list[tuple[int, int]], request: bytes) -> None:
    """Write the request into the buffer's pages (guest memory is bounds-checked)."""
    capacity = sum(length for _, length in extents)
    if len(request) > capacity:
        from vmm.errors import UsageError

        raise UsageError(f"the command is {len(request)} bytes with its header; "
                         f"the guest's mailbox holds {capacity}")
    for physical, length in extents:
        if not request:
            break
        memory.write(physical, request[:length])
        request = request[length:]
