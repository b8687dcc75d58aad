"""Hypothesis against the virtqueue and the virtio-blk request parser.

Random descriptor tables, indirect tables, request headers and ring indexes
(biased towards the interesting values: the edges of RAM, 2**64, the queue
size) go through the real transport. Whatever the guest wrote: no exception
escapes, the transport records no internal error, and the image file is
byte-for-byte unchanged unless the device reports a successful write.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vmm.devices.disk import RawDiskImage
from vmm.devices.virtio import mmio
from vmm.devices.virtio import queue as q
from vmm.devices.virtio.block import HEADER, VirtioBlock
from vmm.devices.virtio.mmio import VirtioMmioTransport
from vmm.memory import GuestMemory
from virtio_driver import AVAIL_RING, DESC_TABLE, EVENT_IDX, INDIRECT_DESC, RAM_SIZE, FakeInterrupt, MockDriver

QUEUE_SIZE = 8
HEADER_AT, DATA_AT, STATUS_AT, TABLE_AT = 0x10000, 0x11000, 0x12000, 0x13000
DISK_SIZE = 64 * 1024  # 128 sectors

addresses = st.one_of(
    st.sampled_from([HEADER_AT, DATA_AT, DATA_AT + 512, STATUS_AT, TABLE_AT, DESC_TABLE, AVAIL_RING, 0,
                     RAM_SIZE - 1, RAM_SIZE - 16, RAM_SIZE, 0x4000_0000, (1 << 64) - 1, (1 << 64) - 16]),
    st.integers(0, (1 << 64) - 1),
)
lengths = st.one_of(
    st.sampled_from([0, 1, 8, 15, 16, 17, 32, 48, 100, 512, 1024, 4096, 0x7FFF_FFFF, 0xFFFF_FFFF]),
    st.integers(0, (1 << 32) - 1),
)
flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
nexts = st.one_of(st.integers(0, QUEUE_SIZE + 1), st.integers(0, 0xFFFF))
descriptors = st.tuples(addresses, lengths, flags, nexts)


def plausible(index: int):
    """A descriptor like a driver's, chained to the next index: valid requests, often."""
    return st.tuples(
        st.sampled_from([HEADER_AT, DATA_AT, DATA_AT + 512, STATUS_AT, TABLE_AT]),
        st.sampled_from([16, 512, 1024, 1, 0, 48, 32]),
        st.sampled_from([1, 3, 2, 0, 4]),  # NEXT, NEXT|WRITE, WRITE, none, INDIRECT
        st.just(index + 1),
    )


def table_of(count: int):
    return st.tuples(*[st.one_of(plausible(i), plausible(i), descriptors) for i in range(count)])

request_types = st.one_of(st.sampled_from([0, 1, 1, 4, 8, 11, 13]), st.sampled_from([0, 1]),
                          st.integers(0, (1 << 32) - 1))
sectors = st.one_of(st.sampled_from([0, 1, 120, 127, 128, 129, (1 << 55), (1 << 64) - 1]),
                    st.integers(0, 130), st.integers(0, 127), st.integers(0, (1 << 64) - 1))



@st.composite
def template_tables(draw):
    """A valid request (direct at head 0, indirect at head 3), then a few fields changed."""
    data_flags = draw(st.sampled_from([1, 3]))  # OUT data or IN data
    sectors_len = 512 * draw(st.integers(0, 3))
    chain = [(HEADER_AT, 16, 1, 1), (DATA_AT, sectors_len, data_flags, 2), (STATUS_AT, 1, 2, 0)]
    table = chain + [(TABLE_AT, 48, 4, 0)] + [(DATA_AT, 16, 0, 0)] * (QUEUE_SIZE - 4)
    indirect = list(chain)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        target = draw(st.sampled_from([table, indirect]))
        i = draw(st.integers(0, len(target) - 1))
        field = draw(st.integers(0, 3))
        value = draw([addresses, lengths, flags, nexts][field])
        entry = list(target[i])
        entry[field] = value
        target[i] = tuple(entry)
    return table, indirect


request_cases = st.fixed_dictionaries({
    "tables": st.one_of(template_tables(), template_tables(),
                        st.tuples(table_of(QUEUE_SIZE), table_of(QUEUE_SIZE + 2))),
    "kind": request_types,
    "kind_from_table": st.booleans(),  # IN if the second descriptor is writable, else OUT
    "sector": sectors,
    "segments": st.binary(max_size=64),
    "heads": st.lists(st.one_of(st.sampled_from([0, 3]), st.sampled_from([0, 3]),
                                st.integers(0, QUEUE_SIZE - 1)),
                      min_size=1, max_size=4),
    "wild_head": st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFF)),
    "avail_jump": st.sampled_from([0] * 12 + [1, QUEUE_SIZE, QUEUE_SIZE + 1, 0x8000]),
    "avail_flags": st.integers(0, 0xFFFF),
    "used_event": st.integers(0, 0xFFFF),
    "features": st.sampled_from([None, ~EVENT_IDX, ~INDIRECT_DESC, ~(EVENT_IDX | INDIRECT_DESC)]),
    "read_only": st.booleans(),
})

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base_image():
    return os.urandom(DISK_SIZE)


def pack_desc(addr: int, length: int, flag: int, nxt: int) -> bytes:
    return struct.pack("<QIHH", addr, length, flag, nxt)


@SETTINGS
@given(case=request_cases)
def test_random_descriptor_tables_never_raise_nor_write_unless_asked(case, base_image, tmp_path):
    path = tmp_path / "fuzz.img"
    path.write_bytes(base_image)
    memory = GuestMemory([(0, RAM_SIZE)])
    backend = RawDiskImage(str(path), case["read_only"])
    try:
        device = VirtioBlock(backend)
        transport = VirtioMmioTransport(device, memory, FakeInterrupt())
        features = None if case["features"] is None else case["features"] & ((1 << 64) - 1)
        driver = MockDriver(transport, memory, queue_size=QUEUE_SIZE, features=features).init()

        table, indirect = case["tables"]
        kind = case["kind"]
        if case["kind_from_table"]:
            kind = 0 if table[1][2] & q.VIRTQ_DESC_F_WRITE else 1
        memory.write(HEADER_AT, HEADER.pack(kind, 0, case["sector"]))
        memory.write(DATA_AT, case["segments"].ljust(4096, b"\x5a"))
        for i, d in enumerate(table):
            memory.write(DESC_TABLE + 16 * i, pack_desc(*d))
        for i, d in enumerate(indirect):
            memory.write(TABLE_AT + 16 * i, pack_desc(*d))
        memory.write_u16(AVAIL_RING, case["avail_flags"])
        for head in case["heads"]:
            driver.publish(head)
        if case["wild_head"] is not None:
            driver.publish(case["wild_head"])
        driver.set_avail_idx(driver.avail_idx + case["avail_jump"])
        driver.set_used_event(case["used_event"])
        driver.notify()
        driver.notify()  # a second kick: a broken queue must stay quiet
        driver.ack_interrupt()

        for name in device.completed:
            event(f"completed {name}")
        event("chain error" if transport.stats.chain_errors else "no chain error")
        for reason in device.failed:
            event(f"failed: {reason}")
        if transport.status & mmio.STATUS_NEEDS_RESET:
            event("needs reset")
        assert transport.stats.errors["internal error"] == 0
        assert transport.stats.chain_errors + device.requests <= 2 * QUEUE_SIZE
        wrote = sum(device.completed[k] for k in ("out", "discard", "write_zeroes"))
        if not wrote:
            assert path.read_bytes() == base_image
        if case["read_only"]:
            assert path.read_bytes() == base_image
        assert path.stat().st_size == DISK_SIZE
    finally:
        backend.close()
        memory.close()


# --- the register file: any access, any value ----------------------------------------------------------
register_accesses = st.lists(
    st.tuples(
        st.booleans(),  # write?
        st.one_of(st.sampled_from(sorted({v for k, v in vars(mmio).items()
                                           if k.isupper() and isinstance(v, int) and v < 0x1000})),
                  st.integers(0, 0xFFF)),
        st.sampled_from([1, 2, 4, 8]),
        st.one_of(st.sampled_from([0, 1, 2, 3, 0xB, 0xF, 0x40, 0x80, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF)),
    ),
    max_size=60,
)


@SETTINGS
@given(accesses=register_accesses)
def test_random_register_accesses_never_raise(accesses, base_image, tmp_path):
    path = tmp_path / "regs.img"
    path.write_bytes(base_image)
    memory = GuestMemory([(0, RAM_SIZE)])
    backend = RawDiskImage(str(path))
    try:
        device = VirtioBlock(backend)
        transport = VirtioMmioTransport(device, memory, FakeInterrupt())
        for write, offset, size, value in accesses:
            if offset + size > 0x1000:
                continue
            if write:
                transport.write(offset, value.to_bytes(8, "little")[:size])
            else:
                assert len(transport.read(offset, size)) == size
        assert transport.stats.errors["internal error"] == 0
        if not device.completed["out"]:
            assert path.read_bytes() == base_image
    finally:
        backend.close()
        memory.close()


# --- the queue alone over random RAM: only QueueErrors ---------------------------------------------------
@SETTINGS
@given(
    table=table_of(QUEUE_SIZE),
    indirect=table_of(12),
    ring=st.lists(st.integers(0, 0xFFFF), min_size=QUEUE_SIZE, max_size=QUEUE_SIZE),
    avail_idx=st.integers(0, 0xFFFF),
    event_idx=st.booleans(),
)
def test_queue_raises_only_queue_errors(table, indirect, ring, avail_idx, event_idx):
    memory = GuestMemory([(0, RAM_SIZE)])
    try:
        queue = q.Queue(QUEUE_SIZE)
        queue.desc_table, queue.avail_ring, queue.used_ring = DESC_TABLE, AVAIL_RING, 0x3000
        queue.activate(memory, event_idx=event_idx, indirect=True)
        for i, d in enumerate(table):
            memory.write(DESC_TABLE + 16 * i, pack_desc(*d))
        for i, d in enumerate(indirect):
            memory.write(TABLE_AT + 16 * i, pack_desc(*d))
        memory.write(AVAIL_RING + 4, struct.pack(f"<{QUEUE_SIZE}H", *ring))
        memory.write_u16(AVAIL_RING + 2, avail_idx)
        taken = 0
        for _ in range(2 * QUEUE_SIZE):
            try:
                chain = queue.pop()
            except q.ChainError as e:
                assert 0 <= e.head < QUEUE_SIZE
                queue.add_used(e.head, 0)
                taken += 1
                continue
            except q.RingError as e:
                assert queue.broken == str(e)
                break
            if chain is None:
                break
            taken += 1
            assert 0 <= chain.head < QUEUE_SIZE
            assert 1 <= len(chain) <= QUEUE_SIZE
            for b in chain.buffers:
                assert memory.is_valid(b.addr, b.len)
            queue.add_used(chain.head, 0)
        assert taken <= QUEUE_SIZE
        queue.needs_notification()
        try:
            queue.enable_notification()
        except q.RingError:
            pass
    finally:
        memory.close()
