"""A mock virtio driver: what Linux's virtio_mmio + virtio_ring + virtio_blk do, in Python.

It lays out a split virtqueue in a small GuestMemory and drives a
VirtioMmioTransport only through its registers, in the order a Linux guest
uses them: reset, ACKNOWLEDGE, DRIVER, features (sel 0 and 1), FEATURES_OK
(read back), queue set-up, DRIVER_OK, then requests and QueueNotify writes,
interrupts acknowledged through InterruptStatus/InterruptACK. Tests use its
high-level block requests for the normal paths and its raw ring writers
(:meth:`write_desc`, :meth:`publish`) to build hostile chains by hand.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmm.devices.virtio import mmio
from vmm.devices.virtio.block import HEADER, SEGMENT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH
from vmm.devices.virtio.block import VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vmm.devices.virtio.block import VIRTIO_BLK_T_WRITE_ZEROES
from vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    vring_need_event,
)
from vmm.memory import GuestMemory

RAM_SIZE = 1 << 20
DESC_TABLE = 0x1000
AVAIL_RING = 0x2000
USED_RING = 0x3000
HEAP_START = 0x10000
HEAP_END = RAM_SIZE

EVENT_IDX = 1 << mmio.VIRTIO_RING_F_EVENT_IDX
INDIRECT_DESC = 1 << mmio.VIRTIO_RING_F_INDIRECT_DESC
VERSION_1 = 1 << mmio.VIRTIO_F_VERSION_1


class FakeInterrupt:
    """An interrupt line that counts edges and remembers levels."""

    def __init__(self) -> None:
        self.pulses = 0
        self.level = False
        self.levels: list[bool] = []

    def pulse(self) -> None:
        self.pulses += 1

    def set_level(self, high: bool) -> None:
        self.level = high
        self.levels.append(high)


class DriverError(Exception):
    pass


@dataclass
class Completion:
    head: int
    length: int  # used.len: bytes the device wrote


@dataclass
class Request:
    """One block request laid out in guest RAM, waiting for its used entry."""

    head: int
    status_addr: int
    in_addr: int = 0
    in_len: int = 0
    status: int | None = None
    used_len: int | None = None
    data: bytes = b""
    extra: dict = field(default_factory=dict)


class MockDriver:
    def __init__(
        self,
        transport: mmio.VirtioMmioTransport,
        memory: GuestMemory,
        *,
        queue_size: int = 16,
        features: int | None = None,  # the bits we accept; None: every bit offered
    ) -> None:
        self.transport = transport
        self.memory = memory
        self.wanted_size = queue_size
        self.wanted_features = features
        self.heap = HEAP_START
        self.size = 0
        self.features = 0

    # --- registers --------------------------------------------------------------------------
    def r32(self, offset: int) -> int:
        return struct.unpack("<I", self.transport.read(offset, 4))[0]

    def w32(self, offset: int, value: int) -> None:
        self.transport.write(offset, struct.pack("<I", value))

    def set_status(self, bits: int) -> None:
        self.w32(mmio.STATUS, self.r32(mmio.STATUS) | bits)

    @property
    def status(self) -> int:
        return self.r32(mmio.STATUS)

    # --- initialisation (spec 3.1.1, the order Linux uses) ------------------------------------
    def init(self) -> "MockDriver":
        if self.r32(mmio.MAGIC) != mmio.MAGIC_VALUE or self.r32(mmio.VERSION_REG) != 2:
            raise DriverError("not a virtio-mmio version 2 device")
        self.w32(mmio.STATUS, 0)
        self.set_status(mmio.STATUS_ACKNOWLEDGE)
        self.set_status(mmio.STATUS_DRIVER)
        offered = 0
        for sel in (0, 1):
            self.w32(mmio.DEVICE_FEATURES_SEL, sel)
            offered |= self.r32(mmio.DEVICE_FEATURES) << (32 * sel)
        self.offered = offered
        accept = offered if self.wanted_features is None else offered & self.wanted_features
        for sel in (0, 1):
            self.w32(mmio.DRIVER_FEATURES_SEL, sel)
            self.w32(mmio.DRIVER_FEATURES, (accept >> (32 * sel)) & 0xFFFFFFFF)
        self.set_status(mmio.STATUS_FEATURES_OK)
        if not self.status & mmio.STATUS_FEATURES_OK:
            raise DriverError("device refused the features")
        self.features = accept
        self.setup_queue()
        self.set_status(mmio.STATUS_DRIVER_OK)
        return self

    def setup_queue(self) -> None:
        self.w32(mmio.QUEUE_SEL, 0)
        if self.r32(mmio.QUEUE_READY):
            raise DriverError("queue already ready")
        maximum = self.r32(mmio.QUEUE_NUM_MAX)
        self.size = min(maximum, self.wanted_size)
        self.memory.fill(DESC_TABLE, USED_RING + 0x1000 - DESC_TABLE)
        self.w32(mmio.QUEUE_NUM, self.size)
        for low, address in ((mmio.QUEUE_DESC_LOW, DESC_TABLE), (mmio.QUEUE_DRIVER_LOW, AVAIL_RING),
                             (mmio.QUEUE_DEVICE_LOW, USED_RING)):
            self.w32(low, address & 0xFFFFFFFF)
            self.w32(low + 4, address >> 32)
        self.w32(mmio.QUEUE_READY, 1)
        if not self.r32(mmio.QUEUE_READY):
            raise DriverError("queue set-up refused")
        self.free = list(range(self.size))
        self.chains: dict[int, list[int]] = {}  # head → descriptors to free
        self.avail_idx = 0
        self.kicked_idx = 0  # avail_idx at the last notification decision
        self.last_used = 0

    @property
    def event_idx(self) -> bool:
        return bool(self.features & EVENT_IDX)

    # --- raw ring access (for hostile tests) -----------------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   table: int = DESC_TABLE) -> None:
        self.memory.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, next))

    def publish(self, head: int) -> None:
        """Put ``head`` in the available ring and bump avail.idx."""
        self.memory.write_u16(AVAIL_RING + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(AVAIL_RING + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(AVAIL_RING + 2, self.avail_idx)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(AVAIL_RING + 4 + 2 * self.size, value & 0xFFFF)

    def avail_event(self) -> int:
        return self.memory.read_u16(USED_RING + 4 + 8 * self.size)

    def used_idx(self) -> int:
        return self.memory.read_u16(USED_RING + 2)

    # --- buffers -----------------------------------------------------------------------------------
    def alloc(self, length: int, align: int = 16) -> int:
        address = (self.heap + align - 1) // align * align
        if address + length > HEAP_END:
            raise DriverError("mock driver heap exhausted")
        self.heap = address + length
        return address

    def reset_heap(self) -> None:
        self.heap = HEAP_START

    def add(self, buffers: list[tuple[int, int, bool]], *, indirect: bool = False) -> int:
        """virtqueue_add: a chain of (addr, len, device_writable) buffers; returns its head."""
        if indirect:
            table = self.alloc(16 * len(buffers))
            for i, (addr, length, write) in enumerate(buffers):
                flags = (VIRTQ_DESC_F_WRITE if write else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0)
                self.write_desc(i, addr, length, flags, i + 1, table=table)
            buffers = [(table, 16 * len(buffers), False)]
            flag_extra = VIRTQ_DESC_F_INDIRECT
        else:
            flag_extra = 0
        if len(buffers) > len(self.free):
            raise DriverError("no free descriptors")
        indexes = [self.free.pop(0) for _ in buffers]
        for i, (addr, length, write) in enumerate(buffers):
            last = i + 1 == len(buffers)
            flags = (VIRTQ_DESC_F_WRITE if write else 0) | (0 if last else VIRTQ_DESC_F_NEXT) | flag_extra
            self.write_desc(indexes[i], addr, length, flags, 0 if last else indexes[i + 1])
        self.chains[indexes[0]] = indexes
        self.publish(indexes[0])
        return indexes[0]

    def kick(self) -> bool:
        """virtqueue_kick: notify the device if it asked to be (EVENT_IDX or NO_NOTIFY)."""
        old, new = self.kicked_idx, self.avail_idx
        self.kicked_idx = new
        if self.event_idx:
            needed = vring_need_event(self.avail_event(), new, old)
        else:
            needed = not self.memory.read_u16(USED_RING) & VIRTQ_USED_F_NO_NOTIFY
        if needed:
            self.notify()
        return needed

    def notify(self, queue: int = 0) -> None:
        self.w32(mmio.QUEUE_NOTIFY, queue)

    def ack_interrupt(self) -> int:
        """vm_interrupt: read InterruptStatus, acknowledge it."""
        status = self.r32(mmio.INTERRUPT_STATUS)
        if status:
            self.w32(mmio.INTERRUPT_ACK, status)
        return status

    def collect(self, *, enable_cb: bool = True) -> list[Completion]:
        """virtqueue_get_buf until empty; then re-arm the interrupt (virtqueue_enable_cb)."""
        done = []
        while self.last_used != self.used_idx():
            slot = self.last_used % self.size
            head, length = struct.unpack("<II", self.memory.read(USED_RING + 4 + 8 * slot, 8))
            done.append(Completion(head, length))
            self.free.extend(self.chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if enable_cb and self.event_idx:
            self.set_used_event(self.last_used)
        return done

    # --- virtio-blk requests -------------------------------------------------------------------------
    def prepare(
        self,
        kind: int,
        sector: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        *,
        segment: int | None = None,  # split data into descriptors of this many bytes
        indirect: bool = False,
    ) -> Request:
        header = self.alloc(HEADER.size)
        self.memory.write(header, HEADER.pack(kind, 0, sector))
        buffers = [(header, HEADER.size, False)]
        step = segment or max(len(out), in_len, 1)
        if out:
            address = self.alloc(len(out))
            self.memory.write(address, out)
            buffers += [(address + i, min(step, len(out) - i), False) for i in range(0, len(out), step)]
        in_addr = 0
        if in_len:
            in_addr = self.alloc(in_len)
            self.memory.fill(in_addr, in_len, 0xAA)
            buffers += [(in_addr + i, min(step, in_len - i), True) for i in range(0, in_len, step)]
        status = self.alloc(1)
        self.memory.write_u8(status, 0xFF)
        buffers.append((status, 1, True))
        head = self.add(buffers, indirect=indirect)
        return Request(head, status, in_addr, in_len)

    def finish(self, requests: list[Request]) -> None:
        """Fill in status, used length and read data from the used ring."""
        by_head = {r.head: r for r in requests if r.used_len is None}
        for completion in self.collect():
            request = by_head.get(completion.head)
            if request is None:
                continue
            request.used_len = completion.length
            request.status = self.memory.read_u8(request.status_addr)
            if request.in_len:
                request.data = self.memory.read(request.in_addr, request.in_len)

    def request(self, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0, **options) -> Request:
        """One synchronous request: prepare, kick, take the interrupt, collect."""
        self.reset_heap()
        request = self.prepare(kind, sector, out, in_len, **options)
        self.kick()
        self.ack_interrupt()
        self.finish([request])
        if request.used_len is None:
            raise DriverError(f"request {request.head} did not complete")
        return request

    def read(self, sector: int, count: int, **options) -> Request:
        return self.request(VIRTIO_BLK_T_IN, sector, in_len=512 * count, **options)

    def write(self, sector: int, data: bytes, **options) -> Request:
        return self.request(VIRTIO_BLK_T_OUT, sector, out=data, **options)

    def flush(self) -> Request:
        return self.request(VIRTIO_BLK_T_FLUSH)

    def get_id(self) -> Request:
        return self.request(VIRTIO_BLK_T_GET_ID, in_len=20)

    def discard(self, ranges: list[tuple[int, int]], flags: int = 0) -> Request:
        return self.request(VIRTIO_BLK_T_DISCARD, out=_segments(ranges, flags))

    def write_zeroes(self, ranges: list[tuple[int, int]], flags: int = 0) -> Request:
        return self.request(VIRTIO_BLK_T_WRITE_ZEROES, out=_segments(ranges, flags))

    def config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.transport.read(mmio.CONFIG + offset, size), "little")


def _segments(ranges: list[tuple[int, int]], flags: int) -> bytes:
    return b"".join(SEGMENT.pack(sector, count, flags) for sector, count in ranges)
