"""The split virtqueue (virtio 1.x section 2.7), seen from the device.

Three areas in guest RAM, all written by a driver we do not trust::

    descriptor table   size x {le64 addr, le32 len, le16 flags, le16 next}   (driver writes)
    available ring     le16 flags, le16 idx, le16 ring[size], le16 used_event (driver writes)
    used ring          le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event (device writes)

The driver puts the head index of a descriptor chain into ``avail.ring`` and
bumps ``avail.idx``; the device walks the chain (:meth:`Queue.pop`), does the
work, and puts ``(head, bytes written)`` into the used ring (:meth:`Queue.add_used`).
Indexes are free-running 16-bit counters; ``idx % size`` is the slot.

Every index, address and length read from guest RAM is checked here, and every
failure raises a specific :class:`QueueError` subclass. Two kinds:

* :class:`ChainError` — one chain is bad (a loop, a buffer outside RAM, ...).
  The error carries the chain's head; the device returns that head in the used
  ring with length 0 and goes on with the next chain.
* :class:`RingError` — the rings themselves are bad (``avail.idx`` ran ahead by
  more than the queue size, a head index past the table, rings outside RAM).
  Nothing the driver says can be trusted any more: the transport sets
  DEVICE_NEEDS_RESET and the queue stays broken until the driver resets it.

Python has no data races on guest RAM in the sense C has, but the *order* of
our stores still matters to the guest running on another CPU: the used element
is written before ``used.idx``; after publishing ``avail_event`` we take a full
barrier before re-reading ``avail.idx``, and after publishing ``used.idx`` one
before reading the driver's ``used_event`` or flags (:func:`full_barrier`).
Each method that needs a barrier takes it itself, whatever was called before.

A queue has two steps of set-up, as the spec has: *ready* (the driver wrote
QueueReady = 1: its size and areas were checked and are frozen) and *active*
(the driver wrote DRIVER_OK: the transport hands the queue guest memory and
the negotiated ring features, :meth:`Queue.activate`). Only an active queue
touches guest RAM.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

from vmm.devices.virtio.state import QueueState
from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory

MAX_QUEUE_SIZE = 256

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
USED_ELEM_SIZE = 8
_U64 = 1 << 64

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


# --- errors ------------------------------------------------------------------------
class QueueError(Exception):
    """Something the driver put in the rings is malformed. Never leaves the device."""


class RingError(QueueError):
    """The rings are unusable: the device must ask for a reset."""


class AvailIndexError(RingError):
    """avail.idx moved ahead of the device by more than the queue size."""


class HeadIndexError(RingError):
    """avail.ring named a head descriptor index >= queue size."""


class RingMemoryError(RingError):
    """A ring or the descriptor table is (no longer) inside guest RAM."""


class ChainError(QueueError):
    """One descriptor chain is malformed; ``head`` can be returned to the driver."""

    def __init__(self, head: int, message: str) -> None:
        super().__init__(f"chain {head}: {message}")
        self.head = head


class DescriptorIndexError(ChainError):
    """A ``next`` field points past the table (queue or indirect)."""


class DescriptorLoopError(ChainError):
    """A chain visits a descriptor it has visited already."""


class ChainTooLongError(ChainError):
    """More descriptors (direct plus indirect) than the queue size."""


class BufferAddressError(ChainError):
    """addr+len wraps past 2**64 or leaves guest RAM."""


class IndirectError(ChainError):
    """A bad indirect descriptor: not negotiated, nested, with NEXT, bad length."""


class DescriptorOrderError(ChainError):
    """A device-readable buffer after a device-writable one (spec 2.7.4.2)."""


class ChainLengthError(ChainError):
    """The buffers add up to more than 2**32 - 1 bytes: used.len could not say how much was written."""


# --- a walked chain ------------------------------------------------------------------
class Buffer(NamedTuple):
    """One guest buffer of a chain, already checked to lie inside guest RAM."""

    addr: int
    len: int
    is_write: bool  # device-writable (VIRTQ_DESC_F_WRITE)


@dataclass
class DescriptorChain:
    head: int
    buffers: list[Buffer] = field(default_factory=list)

    @property
    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.is_write]

    @property
    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.is_write]

    @property
    def readable_len(self) -> int:
        return sum(b.len for b in self.buffers if not b.is_write)

    @property
    def writable_len(self) -> int:
        return sum(b.len for b in self.buffers if b.is_write)

    def __len__(self) -> int:
        return len(self.buffers)


_fence_lock = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier (store→load ordering) as seen by another CPU.

    Acquiring a lock is a locked read-modify-write instruction on x86, which
    orders every earlier store before every later load. Python offers no
    barrier of its own; this is the cheapest one it has.
    """
    with _fence_lock:
        pass


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Spec 2.7.10: did the index cross ``event`` when it moved from old to new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


# --- the queue -------------------------------------------------------------------------
class Queue:
    """One split virtqueue: its registers (set by the transport) and the device's view."""

    def __init__(self, max_size: int = MAX_QUEUE_SIZE, *, strict_order: bool = True) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size}: a power of 2 up to {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.strict_order = strict_order  # a readable buffer after a writable one is an error
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        # Negotiated features, set by the transport at DRIVER_OK.
        self.event_idx = False
        self.indirect = False
        self.broken: str | None = None  # why the rings are unusable, until reset
        self.next_avail = 0  # free-running: the next avail.idx value we will consume
        self.next_used = 0  # free-running: the used.idx we will publish next
        self.signalled_used: int | None = None  # next_used when we last decided on an interrupt
        self.memory: GuestMemory | None = None

    # --- state (snapshots) -------------------------------------------------------------
    def state(self) -> QueueState:
        return QueueState(
            size=self.size, ready=self.ready, desc_table=self.desc_table,
            avail_ring=self.avail_ring, used_ring=self.used_ring,
            next_avail=self.next_avail, next_used=self.next_used,
            signalled_used=self.signalled_used, broken=self.broken,
        )

    def restore(self, state: QueueState, memory: GuestMemory) -> None:
        """Take on a saved state; a ready queue's rings must lie in ``memory``.

        The queue comes back ready, not active: the transport activates it if
        its saved status says DRIVER_OK, with the features it negotiated.
        """
        self.reset()
        self.size = state.size
        self.desc_table, self.avail_ring, self.used_ring = (
            state.desc_table, state.avail_ring, state.used_ring)
        self.next_avail, self.next_used = state.next_avail & 0xFFFF, state.next_used & 0xFFFF
        self.signalled_used = None if state.signalled_used is None else state.signalled_used & 0xFFFF
        self.broken = state.broken
        if state.ready:
            problem = self.check_areas(memory)
            if problem:
                raise ValueError(f"queue state: {problem}")
            self.ready = True

    # --- set-up, by the transport ------------------------------------------------------
    @staticmethod
    def valid_size(size: int, max_size: int) -> bool:
        return 0 < size <= max_size and size & (size - 1) == 0

    def areas(self) -> list[tuple[str, int, int, int]]:
        """(name, address, length, alignment) of the three areas, spec 2.7."""
        extra = 2  # used_event / avail_event, whether or not EVENT_IDX is negotiated
        return [
            ("descriptor table", self.desc_table, DESC_SIZE * self.size, 16),
            ("available ring", self.avail_ring, 4 + 2 * self.size + extra, 2),
            ("used ring", self.used_ring, 4 + USED_ELEM_SIZE * self.size + extra, 4),
        ]

    def check_areas(self, memory: GuestMemory) -> str | None:
        """None if the rings can be used, else why not (for a log and a counter)."""
        if not self.valid_size(self.size, self.max_size):
            return f"queue size {self.size} is not a power of 2 up to {self.max_size}"
        for name, address, length, align in self.areas():
            if address % align:
                return f"{name} at {address:#x} is not {align}-byte aligned"
            if address + length > _U64 or not memory.is_valid(address, length):
                return f"{name} {address:#x}+{length:#x} is outside guest RAM"
        return None

    @property
    def active(self) -> bool:
        return self.memory is not None

    def activate(self, memory: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        """DRIVER_OK: the rings may be used, with these negotiated features."""
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect

    # --- guest-RAM accesses: GuestMemoryError becomes a RingError -------------------------
    def _mem(self) -> GuestMemory:
        if self.memory is None:
            raise RingMemoryError("queue used before DRIVER_OK")
        return self.memory

    def _read_u16(self, address: int) -> int:
        try:
            return self._mem().read_u16(address)
        except GuestMemoryError as e:
            raise RingMemoryError(str(e)) from None

    def _write(self, address: int, data: bytes) -> None:
        try:
            self._mem().write(address, data)
        except GuestMemoryError as e:
            raise RingMemoryError(str(e)) from None

    def avail_idx(self) -> int:
        return self._read_u16(self.avail_ring + 2)

    def avail_flags(self) -> int:
        return self._read_u16(self.avail_ring)

    def used_event(self) -> int:
        return self._read_u16(self.avail_ring + 4 + 2 * self.size)

    def used_idx(self) -> int:
        return self._read_u16(self.used_ring + 2)

    def _set_avail_event(self, value: int) -> None:
        self._write(self.used_ring + 4 + USED_ELEM_SIZE * self.size, struct.pack("<H", value & 0xFFFF))

    def _set_used_flags(self, flags: int) -> None:
        self._write(self.used_ring, struct.pack("<H", flags))

    # --- consuming the available ring -------------------------------------------------
    def pending(self) -> int:
        """How many chains the driver has made available that we have not taken.

        Raises AvailIndexError if avail.idx claims more than ``size`` of them:
        a driver cannot have more outstanding chains than descriptors.
        """
        if self.broken:
            raise RingError(self.broken)
        count = (self.avail_idx() - self.next_avail) & 0xFFFF
        if count > self.size:
            raise AvailIndexError(
                f"avail.idx is {count} ahead of the device, queue size is {self.size}"
            )
        return count

    def pop(self) -> DescriptorChain | None:
        """The next available chain, walked and checked; None if there is none.

        A ChainError consumes the chain (its head is in the error, for
        add_used(head, 0)); a RingError leaves the queue broken.
        """
        try:
            if not self.pending():
                return None
            slot = self.next_avail % self.size
            head = self._read_u16(self.avail_ring + 4 + 2 * slot)
            if head >= self.size:
                raise HeadIndexError(f"avail.ring[{slot}] = {head}, queue size is {self.size}")
        except RingError as e:
            self.broken = str(e)
            raise
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self._walk(head)

    def put_back(self, count: int) -> None:
        """The last ``count`` chains popped go back, untouched, to be popped again.

        For a device that needs several chains for one thing (virtio-net's
        mergeable receive buffers) and found too few posted: nothing of them
        was written, and none has a used entry.
        """
        if not 0 <= count <= self.size:
            raise ValueError(f"cannot put back {count} chains of a queue of {self.size}")
        self.next_avail = (self.next_avail - count) & 0xFFFF

    def __iter__(self) -> Iterator[DescriptorChain]:
        """Available chains until none is left (errors propagate, see pop)."""
        while (chain := self.pop()) is not None:
            yield chain

    def _read_desc(self, head: int, table: int, index: int) -> tuple[int, int, int, int]:
        try:
            return _DESC.unpack(self._mem().read(table + DESC_SIZE * index, DESC_SIZE))
        except GuestMemoryError as e:
            raise BufferAddressError(head, f"descriptor table entry {index}: {e}") from None

    def _walk(self, head: int) -> DescriptorChain:
        """Follow ``next`` from ``head``, through at most one indirect table."""
        memory = self._mem()
        chain = DescriptorChain(head)
        # Buffers we may still take, direct and indirect together. The indirect
        # descriptor itself is only a pointer and does not count (as in Linux
        # and QEMU: a table may hold as many entries as the queue has).
        budget = self.size
        table, table_len = self.desc_table, self.size
        index, seen, in_indirect = head, set(), False
        saw_write = False
        total = 0  # bytes in the chain's buffers
        while True:
            if index >= table_len:
                where = "indirect table" if in_indirect else "queue"
                raise DescriptorIndexError(head, f"next index {index} past the {where} of {table_len}")
            if index in seen:
                raise DescriptorLoopError(head, f"descriptor {index} visited twice")
            seen.add(index)
            addr, length, flags, nxt = self._read_desc(head, table, index)

            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise IndirectError(head, "indirect descriptor, VIRTIO_F_INDIRECT_DESC not negotiated")
                if in_indirect:
                    raise IndirectError(head, "indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise IndirectError(head, "indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE:
                    raise IndirectError(head, f"indirect table length {length} is not a multiple of 16")
                if length // DESC_SIZE > self.size:
                    raise IndirectError(head, f"indirect table of {length // DESC_SIZE} entries > queue size")
                if addr + length > _U64 or not memory.is_valid(addr, length):
                    raise BufferAddressError(head, f"indirect table {addr:#x}+{length:#x} outside guest RAM")
                table, table_len = addr, length // DESC_SIZE
                index, seen, in_indirect = 0, set(), True
                continue

            if budget == 0:
                raise ChainTooLongError(head, f"more than {self.size} buffers")
            budget -= 1
            if addr + length > _U64:
                raise BufferAddressError(head, f"buffer {addr:#x}+{length:#x} wraps past 2**64")
            if not memory.is_valid(addr, length):
                raise BufferAddressError(head, f"buffer {addr:#x}+{length:#x} outside guest RAM")
            total += length
            if total > 0xFFFF_FFFF:
                raise ChainLengthError(head, f"buffers of {total} bytes and more, past 2**32 - 1")
            is_write = bool(flags & VIRTQ_DESC_F_WRITE)
            if self.strict_order and saw_write and not is_write:
                raise DescriptorOrderError(head, f"readable descriptor {index} after a writable one")
            saw_write |= is_write
            chain.buffers.append(Buffer(addr, length, is_write))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = nxt

    # --- producing the used ring ----------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver; ``written`` bytes went into its buffers."""
        slot = self.next_used % self.size
        if not 0 <= written <= 0xFFFF_FFFF:  # the device's number: a bug, not the guest's doing
            raise ValueError(f"used length {written} does not fit le32")
        element = _USED_ELEM.pack(head, written)
        self._write(self.used_ring + 4 + USED_ELEM_SIZE * slot, element)  # element first,
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._write(self.used_ring + 2, struct.pack("<H", self.next_used))  # then the index

    def needs_notification(self) -> bool:
        """Should the device interrupt the driver for what it added since the last call?

        Without EVENT_IDX the driver asks for silence with VIRTQ_AVAIL_F_NO_INTERRUPT;
        with it, the driver names the used index it wants to hear about
        (used_event) and we interrupt only when next_used crossed it.
        """
        old, new = self.signalled_used, self.next_used
        self.signalled_used = new
        if old == new:
            return False  # nothing added since the last decision
        # used.idx is published; the driver's flags/used_event must be read after
        # it (spec 2.7.7.2, Linux's virtqueue_kick_prepare pairs with this).
        full_barrier()
        if not self.event_idx:
            return not self.avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT
        if old is None:
            return True
        return vring_need_event(self.used_event(), new, old)

    # --- suppressing the driver's notifications -----------------------------------------------
    def disable_notification(self) -> None:
        """While we are busy with the ring, the driver need not kick us (a hint only)."""
        if not self.event_idx:
            self._set_used_flags(VIRTQ_USED_F_NO_NOTIFY)
        # With EVENT_IDX, avail_event stays where it is: the driver kicks only
        # when it passes that index, which we have already passed.

    def enable_notification(self, seen: int = 0) -> bool:
        """Ask for a kick on the next new chain; True if chains arrived meanwhile.

        The re-check after the barrier closes the race where the driver added a
        chain after our last look but read the old avail_event/flags and so did
        not kick: the caller must process again when this returns True.
        ``seen``: chains available that the caller looked at and left there
        (too few for its frame, :meth:`put_back`): only chains after them count.
        """
        if self.event_idx:
            self._set_avail_event(self.next_avail + seen)
        else:
            self._set_used_flags(0)
        full_barrier()
        return self.pending() > seen
