"""virtio-blk (virtio 1.x section 5.2): a disk made of 512-byte sectors.

Each request is one descriptor chain. Read as a byte stream, its
device-readable part starts with a 16-byte header and its device-writable
part ends with one status byte; data sits between::

    readable:  [ type le32 | reserved le32 | sector le64 ][ OUT data / discard segments ]
    writable:  [ IN data / GET_ID string ][ status u8 ]

Linux puts header, data and status in separate descriptors, but virtio 1.x
lets a driver frame them as it likes (VIRTIO_F_ANY_LAYOUT is implied by
VERSION_1), so this device never assumes one descriptor per part: it slices
the two streams by byte offset.

A request that makes no sense fails with a status byte, never an exception:
IOERR for a bad request (too short, wrong direction, past the end of the
disk, a write to a read-only disk), UNSUPP for a type we do not know. A
request with no writable byte has nowhere to put a status and is returned
with length 0. Data moves with preadv/pwritev straight into guest RAM views.
"""

from __future__ import annotations

import struct
from collections import Counter

from vmm.devices.disk import DiskBackend
from vmm.devices.virtio.mmio import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from vmm.devices.virtio.queue import MAX_QUEUE_SIZE, Buffer, DescriptorChain
from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
SECTOR_SHIFT = 9

# Feature bits (spec 5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types and status values (spec 5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags: discard / write-zeroes ranges

SIZE_MAX = 1 << 20  # largest single data buffer we advertise
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB: the granularity a file system can punch holes at
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 32

_TYPE_NAMES = {
    VIRTIO_BLK_T_IN: "in",
    VIRTIO_BLK_T_OUT: "out",
    VIRTIO_BLK_T_FLUSH: "flush",
    VIRTIO_BLK_T_GET_ID: "get_id",
    VIRTIO_BLK_T_DISCARD: "discard",
    VIRTIO_BLK_T_WRITE_ZEROES: "write_zeroes",
}


class RequestError(Exception):
    """This request fails with ``status``.

    ``reason`` is one of a few fixed strings (the key of a counter, so a guest
    cannot grow it without bound); ``detail`` has the numbers.
    """

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.status = status
        self.reason = reason
        self.detail = detail


def _ioerr(reason: str, detail: str = "") -> RequestError:
    return RequestError(VIRTIO_BLK_S_IOERR, reason, detail)


def _views(memory: GuestMemory, buffers: list[Buffer], start: int, length: int) -> list[memoryview]:
    """Views of bytes [start, start+length) of the stream the buffers make up."""
    views = []
    for buffer in buffers:
        if length <= 0:
            break
        if start >= buffer.len:
            start -= buffer.len
            continue
        n = min(buffer.len - start, length)
        views.append(memory.view(buffer.addr + start, n))
        start, length = 0, length - n
    return views


def _gather(memory: GuestMemory, buffers: list[Buffer], start: int, length: int) -> bytes:
    return b"".join(bytes(v) for v in _views(memory, buffers, start, length))


class VirtioBlock:
    """A virtio-blk device over a :class:`DiskBackend`. One request queue."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(self, backend: DiskBackend, serial: str = "", queue_size: int = MAX_QUEUE_SIZE) -> None:
        self.backend = backend
        self.read_only = backend.read_only
        self.queue_max_sizes = (queue_size,)
        self.capacity = backend.size >> SECTOR_SHIFT  # in sectors
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self.warnings: list[str] = []  # for the caller to show the user; never silent
        extra = backend.size % SECTOR_SIZE
        if extra:
            path = getattr(backend, "path", "disk")
            self.warnings.append(
                f"{path}: size {backend.size} is not a multiple of {SECTOR_SIZE}; "
                f"the guest sees {self.capacity} sectors and not the last {extra} bytes"
            )
        self.seg_max = queue_size - 2  # header and status take two descriptors
        self.negotiated = 0
        # Statistics.
        self.requests = 0
        self.completed: Counter[str] = Counter()  # successful requests by type
        self.failed: Counter[str] = Counter()  # failed requests by reason
        self.bytes_read = 0
        self.bytes_written = 0
        self.last_error = ""
        self._config = self._build_config()

    def replace_backend(self, backend: DiskBackend) -> DiskBackend:
        """Put another image behind the device; return the old backend (the caller closes it).

        What a container's VM does after a restore (vmm/oci/monitor.py), as
        Firecracker's drive update: the capacity follows the new image, and the
        transport's ``config_changed`` tells the driver to read it again. The
        read-only bit was negotiated at boot and cannot change.
        """
        if backend.read_only != self.read_only:
            raise ValueError("a replacement disk must be as read-only as the one negotiated")
        old, self.backend = self.backend, backend
        self.capacity = backend.size >> SECTOR_SHIFT
        self._config = self._build_config()
        return old

    # --- what the transport asks ------------------------------------------------------------
    @property
    def features(self) -> int:
        bits = [
            VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH,
        ]
        if self.read_only:
            bits.append(VIRTIO_BLK_F_RO)
        else:
            bits += [VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]
        return sum(1 << bit for bit in bits)

    def _build_config(self) -> bytes:
        """struct virtio_blk_config, up to write_zeroes_may_unmap (spec 5.2.4)."""
        return struct.pack(
            "<QII4sI8sBBHIIIIIB3x",
            self.capacity,
            SIZE_MAX,
            self.seg_max,
            b"",  # geometry: not offered
            SECTOR_SIZE,  # blk_size
            b"",  # topology: not offered
            0,  # writeback (CONFIG_WCE not offered: the driver assumes write-back with FLUSH)
            0,
            1,  # num_queues (MQ not offered)
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            1,  # write_zeroes_may_unmap
        )

    def read_config(self, offset: int, size: int) -> bytes:
        return self._config[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        pass  # nothing in our config space is writable (writeback needs CONFIG_WCE)

    def activate(self, features: int) -> None:
        self.negotiated = features

    def reset(self) -> None:
        self.negotiated = 0

    # --- requests ------------------------------------------------------------------------------
    def process_chain(self, queue_index: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        """Do one request; returns the bytes written into the chain (used.len)."""
        self.requests += 1
        readable, writable = chain.readable, chain.writable
        writable_len = chain.writable_len
        if writable_len == 0:
            self._fail("no status byte")
            return 0  # nowhere to say it failed: the used entry with length 0 says it
        last = next(b for b in reversed(writable) if b.len)
        status_address = last.addr + last.len - 1
        try:
            status, written = self._execute(memory, readable, writable, writable_len - 1)
        except RequestError as e:
            self._fail(e.reason, e.detail)
            status, written = e.status, 0
        except (OSError, GuestMemoryError) as e:
            self._fail("host I/O error", str(e))
            status, written = VIRTIO_BLK_S_IOERR, 0
        try:
            memory.write(status_address, bytes([status]))
        except GuestMemoryError:  # checked by the queue; cannot happen, but never raise
            self._fail("status byte outside guest RAM")
            return 0
        return written + 1

    def _fail(self, reason: str, detail: str = "") -> None:
        self.failed[reason] += 1
        self.last_error = f"{reason}: {detail}" if detail else reason

    def _execute(
        self, memory: GuestMemory, readable: list[Buffer], writable: list[Buffer], data_in_len: int
    ) -> tuple[int, int]:
        """(status, bytes of data written into the chain) for a request, or RequestError."""
        readable_len = sum(b.len for b in readable)
        if readable_len < HEADER.size:
            raise _ioerr("header shorter than 16 bytes", f"{readable_len} bytes")
        kind, _reserved, sector = HEADER.unpack(_gather(memory, readable, 0, HEADER.size))
        data_out_len = readable_len - HEADER.size
        name = _TYPE_NAMES.get(kind)
        if name is None:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, "unsupported request type", str(kind))

        # Direction: reads put data only in writable buffers, writes only in readable ones.
        if kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID) and data_out_len:
            raise _ioerr("data buffer in the wrong direction", f"{name} with {data_out_len} readable bytes")
        if kind in (VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and data_in_len:
            raise _ioerr("data buffer in the wrong direction", f"{name} with {data_in_len} writable bytes")
        if kind in (VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and self.read_only:
            raise _ioerr("write to a read-only disk", name)

        written = 0
        if kind == VIRTIO_BLK_T_IN:
            offset = self._range(sector, data_in_len, name)
            self.backend.read_into(offset, _views(memory, writable, 0, data_in_len))
            self.bytes_read += data_in_len
            written = data_in_len
        elif kind == VIRTIO_BLK_T_OUT:
            offset = self._range(sector, data_out_len, name)
            self.backend.write_from(offset, _views(memory, readable, HEADER.size, data_out_len))
            self.bytes_written += data_out_len
        elif kind == VIRTIO_BLK_T_FLUSH:
            self.backend.flush()
        elif kind == VIRTIO_BLK_T_GET_ID:
            written = min(data_in_len, VIRTIO_BLK_ID_BYTES)
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:written]
            for view in _views(memory, writable, 0, written):
                view[:] = ident[: len(view)]
                ident = ident[len(view) :]
        else:
            self._ranges(memory, readable, kind, name, data_out_len)
        self.completed[name] += 1
        return VIRTIO_BLK_S_OK, written

    def _range(self, sector: int, length: int, name: str) -> int:
        """The byte offset of a data transfer, checked against the capacity."""
        if length % SECTOR_SIZE:
            raise _ioerr("data length not a multiple of 512", f"{name} of {length} bytes")
        if sector > self.capacity or (length >> SECTOR_SHIFT) > self.capacity - sector:
            raise _ioerr("beyond capacity", f"{name} of sectors {sector}+{length >> SECTOR_SHIFT}, capacity {self.capacity}")
        return sector << SECTOR_SHIFT

    def _ranges(self, memory: GuestMemory, readable: list[Buffer], kind: int, name: str, length: int) -> None:
        """DISCARD and WRITE_ZEROES: every segment checked before any is done."""
        discard = kind == VIRTIO_BLK_T_DISCARD
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.negotiated >> feature & 1:  # offered is not enough: the driver must have accepted it
            raise RequestError(VIRTIO_BLK_S_UNSUPP, "request type not negotiated", name)
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        if length == 0 or length % SEGMENT.size:
            raise _ioerr("bad segment list", f"{name}: {length} bytes, not a multiple of {SEGMENT.size}")
        if length // SEGMENT.size > max_seg:
            raise _ioerr("bad segment list", f"{name}: {length // SEGMENT.size} segments, at most {max_seg}")
        data = _gather(memory, readable, HEADER.size, length)
        segments = [SEGMENT.unpack_from(data, i) for i in range(0, length, SEGMENT.size)]
        for sector, count, flags in segments:
            allowed = 0 if discard else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            if flags & ~allowed:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, "unknown segment flags", f"{name}: {flags:#x}")
            if count > max_sectors:
                raise _ioerr("bad segment list", f"{name}: {count} sectors in one segment, at most {max_sectors}")
            self._range(sector, count << SECTOR_SHIFT, name)
        for sector, count, flags in segments:
            if discard:
                self.backend.discard(sector << SECTOR_SHIFT, count << SECTOR_SHIFT)
            else:
                unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
                self.backend.write_zeroes(sector << SECTOR_SHIFT, count << SECTOR_SHIFT, unmap)
