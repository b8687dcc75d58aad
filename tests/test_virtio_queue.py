"""The split virtqueue on its own: chains, indirect tables, every check, EVENT_IDX."""

from __future__ import annotations

import struct

import pytest

from vmm.devices.virtio import queue as q
from vmm.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Queue,
    vring_need_event,
)
from vmm.memory import GuestMemory

DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
RAM = 1 << 20
N, W, I = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


class Rings:
    """A queue of ``size`` over fresh guest RAM, with raw writers for the driver's side."""

    def __init__(self, size: int = 8, *, event_idx: bool = False, indirect: bool = True,
                 strict_order: bool = True) -> None:
        self.memory = GuestMemory([(0, RAM)])
        self.queue = Queue(256, strict_order=strict_order)
        self.queue.size = size
        self.queue.desc_table, self.queue.avail_ring, self.queue.used_ring = DESC, AVAIL, USED
        assert self.queue.check_areas(self.memory) is None
        self.queue.activate(self.memory, event_idx=event_idx, indirect=indirect)
        self.size = size
        self.avail_idx = 0

    def desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0,
             table: int = DESC) -> None:
        self.memory.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, next))

    def publish(self, *heads: int) -> None:
        for head in heads:
            self.memory.write_u16(AVAIL + 4 + 2 * (self.avail_idx % self.size), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(AVAIL + 2, self.avail_idx)

    def used(self, slot: int) -> tuple[int, int]:
        return struct.unpack("<II", self.memory.read(USED + 4 + 8 * slot, 8))

    def close(self) -> None:
        self.memory.close()


@pytest.fixture
def rings():
    r = Rings()
    yield r
    r.close()


def chain_of(r: Rings):
    chain = r.queue.pop()
    assert chain is not None
    return chain, [(b.addr, b.len, b.is_write) for b in chain.buffers]


# --- normal chains ---------------------------------------------------------------------------
def test_empty_queue_pops_nothing(rings):
    assert rings.queue.pop() is None
    assert list(rings.queue) == []


def test_single_descriptor(rings):
    rings.desc(3, 0x10000, 512, W)
    rings.publish(3)
    chain, buffers = chain_of(rings)
    assert chain.head == 3 and buffers == [(0x10000, 512, True)]
    assert chain.buffers == [(0x10000, 512, True)]  # Buffers are (addr, len, is_write) tuples
    assert chain.buffers[0].len == 512 and chain.buffers[0].is_write
    assert rings.queue.pop() is None


def test_chain_follows_next_in_any_order(rings):
    rings.desc(5, 0x10000, 16, N, 2)
    rings.desc(2, 0x11000, 4096, N, 7)
    rings.desc(7, 0x12000, 1, W)
    rings.publish(5)
    chain, buffers = chain_of(rings)
    assert buffers == [(0x10000, 16, False), (0x11000, 4096, False), (0x12000, 1, True)]
    assert [b.len for b in chain.readable] == [16, 4096] and [b.len for b in chain.writable] == [1]


def test_chain_as_long_as_the_queue_is_allowed(rings):
    for i in range(8):
        rings.desc(i, 0x10000 + i * 0x100, 0x100, N if i < 7 else 0, i + 1)
    rings.publish(0)
    chain, buffers = chain_of(rings)
    assert len(chain) == 8


def test_several_chains_in_order_and_iteration(rings):
    for head in (0, 1, 2):
        rings.desc(head, 0x10000 * (head + 1), 8)
    rings.publish(2, 0, 1)
    assert [c.head for c in rings.queue] == [2, 0, 1]


def test_indirect_table_resolved(rings):
    table = 0x20000
    rings.desc(0, 0x10000, 16, N, 1, table=table)
    rings.desc(1, 0x11000, 512, N | W, 2, table=table)
    rings.desc(2, 0x12000, 1, W, table=table)
    rings.desc(4, table, 48, I)
    rings.publish(4)
    chain, buffers = chain_of(rings)
    assert chain.head == 4
    assert buffers == [(0x10000, 16, False), (0x11000, 512, True), (0x12000, 1, True)]


def test_indirect_table_as_long_as_the_queue(rings):
    for i in range(8):
        rings.desc(i, 0x10000, 8, N if i < 7 else 0, i + 1, table=0x20000)
    rings.desc(0, 0x20000, 16 * 8, I)
    rings.publish(0)
    chain, _ = chain_of(rings)
    assert len(chain) == 8


def test_direct_descriptors_then_an_indirect_table(rings):
    table = 0x20000
    rings.desc(0, 0x10000, 16, N, 1)
    rings.desc(1, table, 16, I)
    rings.desc(0, 0x12000, 1, W, table=table)
    rings.publish(0)
    _, buffers = chain_of(rings)
    assert buffers == [(0x10000, 16, False), (0x12000, 1, True)]


def test_zero_length_buffer_inside_ram_is_an_empty_buffer(rings):
    rings.desc(0, 0x10000, 0, N, 1)
    rings.desc(1, 0x11000, 1, W)
    rings.publish(0)
    _, buffers = chain_of(rings)
    assert buffers == [(0x10000, 0, False), (0x11000, 1, True)]


def test_avail_index_wraps_at_65536():
    r = Rings(4)
    try:
        r.queue.next_avail = r.avail_idx = 0xFFFE
        for head in range(3):
            r.desc(head, 0x10000, 8)
        r.publish(0, 1, 2)
        assert [c.head for c in r.queue] == [0, 1, 2]
        assert r.queue.next_avail == 1
    finally:
        r.close()


# --- hostile chains: each a specific ChainError, the queue goes on ------------------------------
@pytest.mark.parametrize(
    "build, error",
    [
        (lambda r: r.desc(0, RAM - 8, 16), q.BufferAddressError),  # straddles the end of RAM
        (lambda r: r.desc(0, 0x4000_0000, 16), q.BufferAddressError),  # far outside RAM
        (lambda r: r.desc(0, (1 << 64) - 16, 0xFFFF_FFFF), q.BufferAddressError),  # wraps 2**64
        (lambda r: r.desc(0, (1 << 64) - 1, 0), q.BufferAddressError),  # empty, but not in RAM
        (lambda r: r.desc(0, 0x10000, 16, N, 8), q.DescriptorIndexError),  # next == size
        (lambda r: r.desc(0, 0x10000, 16, N, 0xFFFF), q.DescriptorIndexError),
        (lambda r: r.desc(0, 0x10000, 16, N, 0), q.DescriptorLoopError),  # a self-loop
        (lambda r: (r.desc(0, 0x10000, 16, N, 1), r.desc(1, 0x10000, 16, N, 0)), q.DescriptorLoopError),
        (lambda r: (r.desc(0, 0x10000, 1, W | N, 1), r.desc(1, 0x10000, 16)), q.DescriptorOrderError),
        (lambda r: r.desc(0, 0x20000, 16, I | N, 1), q.IndirectError),  # indirect with NEXT
        (lambda r: r.desc(0, 0x20000, 0, I), q.IndirectError),  # empty table
        (lambda r: r.desc(0, 0x20000, 24, I), q.IndirectError),  # not a multiple of 16
        (lambda r: r.desc(0, 0x20000, 16 * 9, I), q.IndirectError),  # more entries than the queue
        (lambda r: r.desc(0, RAM - 16, 32, I), q.BufferAddressError),  # table outside RAM
        (lambda r: r.desc(0, (1 << 64) - 16, 32, I), q.BufferAddressError),  # table wraps 2**64
    ],
)
def test_hostile_chain_raises_its_error_and_the_queue_goes_on(rings, build, error):
    build(rings)
    rings.desc(5, 0x30000, 8)  # a good chain after the bad one
    rings.publish(0, 5)
    with pytest.raises(error) as info:
        rings.queue.pop()
    assert isinstance(info.value, q.ChainError) and info.value.head == 0
    assert rings.queue.pop().head == 5
    assert rings.queue.broken is None


def test_nested_indirect_table_refused(rings):
    rings.desc(0, 0x21000, 16, I, table=0x20000)
    rings.desc(0, 0x20000, 16, I)
    rings.publish(0)
    with pytest.raises(q.IndirectError, match="inside an indirect"):
        rings.queue.pop()


def test_indirect_refused_when_not_negotiated():
    r = Rings(indirect=False)
    try:
        r.desc(0, 0x20000, 16, I)
        r.publish(0)
        with pytest.raises(q.IndirectError, match="not negotiated"):
            r.queue.pop()
    finally:
        r.close()


def test_loop_inside_indirect_table(rings):
    rings.desc(0, 0x10000, 8, N, 1, table=0x20000)
    rings.desc(1, 0x10000, 8, N, 0, table=0x20000)
    rings.desc(0, 0x20000, 32, I)
    rings.publish(0)
    with pytest.raises(q.DescriptorLoopError):
        rings.queue.pop()


def test_next_past_indirect_table(rings):
    rings.desc(0, 0x10000, 8, N, 2, table=0x20000)
    rings.desc(0, 0x20000, 32, I)
    rings.publish(0)
    with pytest.raises(q.DescriptorIndexError, match="indirect table"):
        rings.queue.pop()


def test_chain_capped_at_queue_size_counting_indirect_entries(rings):
    # 3 direct descriptors + a table of 8: 11 descriptors in a queue of 8.
    rings.desc(0, 0x10000, 8, N, 1)
    rings.desc(1, 0x10000, 8, N, 2)
    rings.desc(2, 0x20000, 16 * 8, I)
    for i in range(8):
        rings.desc(i, 0x10000, 8, N if i < 7 else 0, i + 1, table=0x20000)
    rings.publish(0)
    with pytest.raises(q.ChainTooLongError):
        rings.queue.pop()


def test_readable_after_writable_allowed_when_order_not_required():
    r = Rings(strict_order=False)
    try:
        r.desc(0, 0x10000, 1, W | N, 1)
        r.desc(1, 0x10000, 16)
        r.publish(0)
        _, buffers = chain_of(r)
        assert buffers == [(0x10000, 1, True), (0x10000, 16, False)]
    finally:
        r.close()


# --- hostile rings: RingError, the queue stays broken -------------------------------------------
def test_avail_idx_more_than_queue_size_ahead(rings):
    rings.memory.write_u16(AVAIL + 2, 9)
    with pytest.raises(q.AvailIndexError):
        rings.queue.pop()
    assert rings.queue.broken == "avail.idx is 9 ahead of the device, queue size is 8"
    with pytest.raises(q.RingError, match="9 ahead"):  # broken until reset, whatever the ring says now
        rings.queue.pop()
    with pytest.raises(q.RingError):
        rings.queue.pop()


def test_avail_idx_exactly_queue_size_ahead_is_fine(rings):
    for i in range(8):
        rings.desc(i, 0x10000, 8)
    rings.publish(*range(8))
    assert len(list(rings.queue)) == 8


def test_head_index_past_the_table(rings):
    rings.publish(8)
    with pytest.raises(q.HeadIndexError):
        rings.queue.pop()
    assert rings.queue.broken == "avail.ring[0] = 8, queue size is 8"


def test_reset_repairs_a_broken_queue(rings):
    rings.publish(8)
    with pytest.raises(q.RingError):
        rings.queue.pop()
    rings.queue.reset()
    assert rings.queue.broken is None and not rings.queue.ready


def test_every_error_is_a_queue_error():
    for name in dir(q):
        obj = getattr(q, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == q.__name__:
            assert issubclass(obj, q.QueueError)


# --- set-up checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, desc, avail, used, problem",
    [
        (0, DESC, AVAIL, USED, "power of 2"),
        (6, DESC, AVAIL, USED, "power of 2"),
        (512, DESC, AVAIL, USED, "power of 2"),
        (8, DESC + 8, AVAIL, USED, "aligned"),
        (8, DESC, AVAIL + 1, USED, "aligned"),
        (8, DESC, AVAIL, USED + 2, "aligned"),
        (8, RAM - 16, AVAIL, USED, "outside"),
        (8, DESC, (1 << 64) - 2, USED, "outside"),
        (8, DESC, AVAIL, 0x1_0000_0000, "outside"),
    ],
)
def test_check_areas(size, desc, avail, used, problem):
    memory = GuestMemory([(0, RAM)])
    try:
        queue = Queue(256)
        queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = size, desc, avail, used
        assert problem in queue.check_areas(memory)
    finally:
        memory.close()


def test_max_size_must_be_a_power_of_two_up_to_256():
    for bad in (0, 3, 257, 512):
        with pytest.raises(ValueError):
            Queue(bad)


def test_ring_outside_ram_after_activation_is_a_ring_error(rings):
    rings.queue.avail_ring = RAM + 0x1000
    with pytest.raises(q.RingMemoryError):
        rings.queue.pop()


# --- the used ring -------------------------------------------------------------------------------------
def test_add_used_writes_element_then_index(rings):
    rings.queue.add_used(3, 513)
    rings.queue.add_used(1, 0)
    assert rings.used(0) == (3, 513) and rings.used(1) == (1, 0)
    assert rings.memory.read_u16(USED + 2) == 2


def test_used_index_wraps():
    r = Rings(4)
    try:
        r.queue.next_used = 0xFFFF
        r.queue.add_used(2, 1)
        assert r.memory.read_u16(USED + 2) == 0
        assert r.used(0xFFFF % 4) == (2, 1)
    finally:
        r.close()


# --- notification suppression ------------------------------------------------------------------------
def test_vring_need_event():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)  # wants to hear after entry 1 is used: not yet
    assert vring_need_event(1, 2, 0)
    assert vring_need_event(5, 7, 3)
    assert not vring_need_event(9, 7, 3)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # across the wrap
    assert not vring_need_event(3, 3, 3)  # nothing new


def test_interrupts_without_event_idx_follow_no_interrupt_flag(rings):
    rings.queue.add_used(0, 1)
    assert rings.queue.needs_notification()
    assert not rings.queue.needs_notification()  # nothing new since
    rings.memory.write_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
    rings.queue.add_used(1, 1)
    assert not rings.queue.needs_notification()


def test_interrupts_with_event_idx_follow_used_event():
    r = Rings(8, event_idx=True)
    try:
        r.queue.add_used(0, 1)
        assert r.queue.needs_notification()  # the first one always
        used_event = AVAIL + 4 + 2 * 8
        r.memory.write_u16(used_event, 3)  # "interrupt me when entry 3 is used"
        decisions = []
        for head in range(1, 5):
            r.queue.add_used(head, 1)
            decisions.append(r.queue.needs_notification())
        assert decisions == [False, False, True, False]
    finally:
        r.close()


def test_notification_suppression_without_event_idx(rings):
    rings.queue.disable_notification()
    assert rings.memory.read_u16(USED) == VIRTQ_USED_F_NO_NOTIFY
    assert rings.queue.enable_notification() is False
    assert rings.memory.read_u16(USED) == 0


def test_enable_notification_writes_avail_event_and_rechecks():
    r = Rings(8, event_idx=True)
    try:
        r.desc(0, 0x10000, 8)
        r.publish(0)
        assert r.queue.pop().head == 0
        assert r.queue.enable_notification() is False
        assert r.memory.read_u16(USED + 4 + 8 * 8) == 1  # avail_event: notify me at idx 1
        r.publish(0)  # the driver adds one just after our last look
        assert r.queue.enable_notification() is True  # so process again, not sleep
    finally:
        r.close()


def test_a_chain_over_4_gib_is_a_bad_chain() -> None:
    """Five descriptors of ~1 GiB (the same RAM each time): used.len could not say how much was written."""
    memory = GuestMemory([(0, 1 << 30)])  # MAP_NORESERVE: nothing touched, nothing spent
    try:
        queue = Queue(8)
        queue.size = 8
        queue.desc_table, queue.avail_ring, queue.used_ring = DESC, AVAIL, USED
        queue.activate(memory, event_idx=False, indirect=False)
        for i in range(5):
            memory.write(DESC + 16 * i, struct.pack("<QIHH", 0x1_0000, 0x3FFF_0000, (N if i < 4 else 0) | W, i + 1))
        memory.write_u16(AVAIL + 4, 0)
        memory.write_u16(AVAIL + 2, 1)
        with pytest.raises(q.ChainLengthError, match="past 2\\*\\*32") as error:
            queue.pop()
        assert error.value.head == 0 and isinstance(error.value, q.ChainError)
        with pytest.raises(ValueError):
            queue.add_used(0, 1 << 32)  # and the device can never report one
    finally:
        memory.close()


def test_needs_notification_fences_by_itself(rings, monkeypatch):
    """The used index is published before the driver's used_event is read, whoever called before."""
    calls = []
    monkeypatch.setattr(q, "full_barrier", lambda: calls.append("fence"))
    original = rings.queue.avail_flags
    monkeypatch.setattr(rings.queue, "avail_flags", lambda: calls.append("read flags") or original())
    rings.queue.add_used(0, 0)
    assert rings.queue.needs_notification() is True
    assert calls == ["fence", "read flags"]
