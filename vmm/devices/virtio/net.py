"""virtio-net (virtio 1.x section 5.1): an Ethernet NIC over a frame backend.

Two queues: receive (0), whose chains are empty buffers the driver posts for
frames to come, and transmit (1), whose chains are frames to send. Each frame
in either direction follows a 12-byte ``virtio_net_hdr_v1`` (flags, GSO type,
header length, GSO size, checksum start and offset, number of buffers)::

    transmit chain, readable:  [ virtio_net_hdr_v1 ][ Ethernet frame ]
    receive chain(s), writable: [ virtio_net_hdr_v1 ][ Ethernet frame ...][... ]

Offloads (``offload=True``, the default). The driver may leave a transmitted
frame's TCP/UDP checksum to the device (VIRTIO_NET_F_CSUM: NEEDS_CSUM with
where the sum starts and where it goes) and may be told that a received frame's
checksum needs no checking (GUEST_CSUM: DATA_VALID). On PVM both spare the
guest a loop over every byte in the instruction emulator. A backend that
speaks virtio's own header (a TAP device with IFF_VNET_HDR) takes the header as
it is and the host kernel does the work, so segmentation is offered too: the
guest sends TCP segments of up to 64 KiB (HOST_TSO4/6) and receives them
(GUEST_TSO4/6). A backend of bare frames (passt) gets each NEEDS_CSUM frame
with its checksum completed here, and no segmentation is offered (its
65,520-byte MTU makes segments that big anyway). Not offered: ECN, UFO.

Receive buffers (MRG_RXBUF, ``mergeable=True``, the default): the driver posts
buffers of a page or less, and a frame bigger than one spans as many as it
takes, the first header's ``num_buffers`` saying how many. Without it, a
driver that may receive 64 KiB frames (a big MTU, GUEST_TSO) posts a whole
64 KiB buffer for every frame, a 66-byte acknowledgement's included ("big
packets"), and fills its ring with them at start (the receive queue then
offers 32 entries: 256 were 1.9 s of boot on PVM). Also offered: VERSION_1,
MAC, STATUS (the link is up), EVENT_IDX, INDIRECT_DESC, and MTU when it is not
Ethernet's 1,500.

Transmit is a queue notification like a disk request: the transport's
QueueServer hands each chain to :meth:`VirtioNet.process_chain`. Receive is the
other way round: a frame comes from the backend's thread whenever it comes, and
takes the next posted buffers (``VirtioMmioTransport.receive``); with too few
posted it waits, and the backend's thread with it (the frames behind it stay in
the TAP queue or the socket), until the driver posts more and notifies the
receive queue (:meth:`buffers_posted`).

Everything from the guest is hostile: a chain too short for the header, a
frame longer than its maximum or shorter than an Ethernet header, a header that
asks for an offload not negotiated or whose checksum position is outside the
frame, a receive chain too small for the frame: dropped, counted by reason,
never an exception.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections import Counter
from contextlib import AbstractContextManager
from typing import Callable, Protocol

from vmm.devices.virtio.mmio import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from vmm.devices.virtio.queue import DescriptorChain
from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory

VIRTIO_ID_NET = 1
RX, TX = 0, 1

VIRTIO_NET_F_CSUM = 0  # the device completes checksums (transmit)
VIRTIO_NET_F_GUEST_CSUM = 1  # the driver takes frames whose checksum is known good (receive)
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7  # the driver takes TCP segments of up to 64 KiB (receive)
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11  # the device takes them (transmit)
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15  # a received frame may span several posted buffers
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1


class HeaderFlag(enum.IntFlag):
    NEEDS_CSUM = 1  # checksum from csum_start to the end, stored at csum_start + csum_offset
    DATA_VALID = 2  # receive only: the checksum was checked


class GsoType(enum.IntEnum):
    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4


HEADER = struct.Struct("<BBHHHHH")  # virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size,
#                                     csum_start, csum_offset, num_buffers
ETHERNET_HEADER = 14
DEFAULT_MTU = 1500
MAX_FRAME = DEFAULT_MTU + ETHERNET_HEADER + 4  # with a VLAN tag: the default MTU's largest frame
MAX_GSO_FRAME = 65535 + ETHERNET_HEADER + 4  # a segmented frame: an IP packet of up to 64 KiB
QUEUE_SIZE = 256
BIG_RX_QUEUE_SIZE = 32  # receive buffers of a whole 64 KiB frame each (a big MTU); each is a
#   chain of 19 descriptors (17 pages, header, first page), and a chain must fit the queue


class ReceivePath(Protocol):
    """What the NIC needs of its transport to take frames in (vmm/devices/virtio/mmio.py)."""

    @property
    def lock(self) -> AbstractContextManager: ...

    def receive(self, queue_index: int, fill: Callable) -> bool: ...


class FrameBackend(Protocol):
    """Where frames go and come from (vmm/devices/netbackend.py).

    ``vnet_header``: the backend's frames, both ways, start with a
    virtio_net_hdr_v1 (a TAP device with IFF_VNET_HDR), and it is told which
    offloads the driver takes (``set_offloads``) so that it sends only those.
    """

    vnet_header: bool
    errors: Counter[str]  # host-side failures, by errno name

    @property
    def threads(self) -> tuple[str, ...]: ...

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool) -> None: ...

    def send(self, frame: bytes) -> None:
        """Never blocks: a frame the host side cannot take now is dropped and counted."""

    def start(self, receive: Callable[[bytes, Callable[[], bool]], None]) -> None:
        """Frames from the host side go to ``receive(frame, stopping)``, in a thread of the
        backend's own; ``stopping()`` turns True when the backend closes."""

    def close(self) -> None:
        """Safe twice."""


def offered_features(mtu: int, offload: bool, vnet_header: bool, mergeable: bool = True) -> int:
    """The feature bits a NIC offers, from what the guest will see of it (its spec)."""
    bits = [VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS]
    if mergeable:
        bits.append(VIRTIO_NET_F_MRG_RXBUF)
    if mtu != DEFAULT_MTU:
        bits.append(VIRTIO_NET_F_MTU)
    if offload:
        bits += [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM]
        if vnet_header:
            bits += [VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
                     VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6]
    return sum(1 << bit for bit in bits)


def default_mac(index: int) -> bytes:
    """A stable, locally administered unicast MAC for NIC ``index``: 52:54:00:12:34:5N."""
    return bytes((0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + index))


def complete_checksum(frame: bytes, start: int, offset: int) -> bytes:
    """The frame with the Internet checksum of ``frame[start:]`` stored at ``start + offset``.

    The driver has put the pseudo-header's sum in that field, so the sum over
    the rest completes it (what a NIC does for NEEDS_CSUM). The ones'-complement
    sum of 16-bit words is the value of the bytes, read as one big-endian
    number, modulo 0xFFFF (2**16 = 1 modulo 0xFFFF): one C-speed operation on
    Python's integers, not a loop over words.
    """
    data = frame[start:]
    if len(data) % 2:
        data += b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF
    if total == 0 and any(data):
        total = 0xFFFF  # the ones'-complement sum of non-zero words is never +0
    checksum = ~total & 0xFFFF or 0xFFFF  # 0 is "no checksum" to UDP: send its other form
    at = start + offset
    return frame[:at] + checksum.to_bytes(2, "big") + frame[at + 2:]


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"mac={text}: expected six hex bytes like 52:54:00:12:34:56")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"mac={text}: expected six hex bytes like 52:54:00:12:34:56") from None
    if mac[0] & 1:
        raise ValueError(f"mac={text}: a multicast address cannot name one NIC")
    return mac


class VirtioNet:
    device_id = VIRTIO_ID_NET
    deferred_queues = frozenset({RX})  # its chains wait for frames: not served on a notify

    def __init__(self, backend: FrameBackend, mac: bytes, queue_size: int = QUEUE_SIZE, *,
                 mtu: int = DEFAULT_MTU, offload: bool = True, mergeable: bool = True) -> None:
        """``mtu`` above 1500 is offered (VIRTIO_NET_F_MTU): the guest's stack then handles a
        64 KiB segment where it would handle 44 of 1,500 bytes.
        ``offload``: offer checksum offloads, and segmentation with a vnet-header backend.
        ``mergeable``: offer MRG_RXBUF, the driver posts small buffers (a page or less) and a
        big frame spans several; without it a big MTU or receive segmentation makes the
        driver post a whole 64 KiB buffer for every frame, an acknowledgement's included
        ("big packets")."""
        self.backend = backend
        self.mac = mac
        self.mtu = mtu
        self.max_frame = mtu + ETHERNET_HEADER + 4
        self.offered = offered_features(mtu, offload, backend.vnet_header, mergeable)
        # Without mergeable buffers, "big packets" fill the ring with 64 KiB buffers: 256 of
        # them are 16 MiB of pages to zero, 1.5 s of boot in PVM's emulator (measured); 32 are
        # plenty for a guest that slow. (Not 16: each is a chain of 19 descriptors.)
        big_packets = mtu != DEFAULT_MTU or self.offered >> VIRTIO_NET_F_GUEST_TSO4 & 1
        rx_size = queue_size
        if big_packets and not mergeable:
            rx_size = min(rx_size, BIG_RX_QUEUE_SIZE)
        self.queue_max_sizes = (rx_size, queue_size)
        self.negotiated = 0
        # Set when attached: received frames go through it (and its lock).
        self.transport: ReceivePath | None = None
        self._waiting: bytes | None = None  # a received frame with no buffer posted for it
        self._room = threading.Event()  # set: the waiting frame went (the backend may go on)
        # Statistics.
        self.frames_sent = self.frames_received = 0
        self.bytes_sent = self.bytes_received = 0
        self.checksums_completed = 0  # NEEDS_CSUM frames summed here for a bare-frame backend
        self.segmented_sent = self.segmented_received = 0  # GSO frames (up to 64 KiB) each way
        self.dropped: Counter[str] = Counter()

    def _attached(self) -> ReceivePath:
        if self.transport is None:
            raise RuntimeError("a NIC receives through its transport: attach it first")
        return self.transport

    def _has(self, bit: int) -> bool:
        return bool(self.negotiated >> bit & 1)

    # --- what the transport asks ------------------------------------------------------
    @property
    def features(self) -> int:
        return self.offered

    def read_config(self, offset: int, size: int) -> bytes:
        # mac, status, max_virtqueue_pairs, mtu (spec 5.1.4)
        config = self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, 1, self.mtu)
        return config[offset:offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        pass  # the MAC is read-only in virtio 1.x (VIRTIO_NET_F_CTRL_MAC_ADDR not offered)

    def activate(self, features: int) -> None:
        self.negotiated = features
        if self.backend.vnet_header:  # the host kernel sends only what the driver takes
            self.backend.set_offloads(self._has(VIRTIO_NET_F_GUEST_CSUM),
                                      self._has(VIRTIO_NET_F_GUEST_TSO4),
                                      self._has(VIRTIO_NET_F_GUEST_TSO6))

    def reset(self) -> None:
        """Transport lock held: a reset driver has no buffers; a waiting frame is dropped."""
        self.negotiated = 0
        if self.backend.vnet_header:
            self.backend.set_offloads(False, False, False)
        if self._waiting is not None:
            self.dropped["rx_reset"] += 1
        self._waiting = None
        self._room.set()

    @property
    def requests(self) -> int:
        return self.frames_sent + self.frames_received

    def counters(self) -> dict[str, int | str]:
        """The NIC's own statistics, beside its transport's (--metrics, benchmarks)."""
        names = {VIRTIO_NET_F_MRG_RXBUF: "mrg_rxbuf", VIRTIO_NET_F_CSUM: "csum", VIRTIO_NET_F_GUEST_CSUM: "guest_csum",
                 VIRTIO_NET_F_HOST_TSO4: "host_tso4", VIRTIO_NET_F_HOST_TSO6: "host_tso6",
                 VIRTIO_NET_F_GUEST_TSO4: "guest_tso4", VIRTIO_NET_F_GUEST_TSO6: "guest_tso6"}
        return {
            "frames_sent": self.frames_sent, "frames_received": self.frames_received,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "checksums_completed": self.checksums_completed,
            "segmented_sent": self.segmented_sent, "segmented_received": self.segmented_received,
            "frames_dropped": sum(self.dropped.values()),
            "dropped_by_reason": ",".join(f"{k}={v}" for k, v in sorted(self.dropped.items())),
            # Frames the backend could not pass on (a stalled peer), and its errors by errno.
            "backend_dropped": getattr(self.backend, "dropped", 0),
            "backend_errors": ",".join(f"{k}={v}" for k, v in
                                       sorted(getattr(self.backend, "errors", {}).items())),
            "offloads": ",".join(name for bit, name in names.items() if self._has(bit)) or "none",
        }

    def process_chain(self, queue_index: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        """A transmit chain: its frame to the backend. Nothing is written back."""
        if queue_index != TX:
            return 0
        readable = chain.readable
        total = chain.readable_len
        if chain.writable:
            self.dropped["tx_writable_buffer"] += 1
            return 0
        if total < HEADER.size + ETHERNET_HEADER:
            self.dropped["tx_too_short"] += 1
            return 0
        if total - HEADER.size > MAX_GSO_FRAME:
            self.dropped["tx_too_long"] += 1
            return 0
        try:
            data = b"".join(memory.read(b.addr, b.len) for b in readable)
        except GuestMemoryError:
            self.dropped["tx_bad_buffer"] += 1
            return 0
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = HEADER.unpack_from(data)
        frame = data[HEADER.size:]
        problem = self._check_transmit_header(flags, gso_type, gso_size, csum_start, csum_offset,
                                              len(frame))
        if problem:
            self.dropped[problem] += 1
            return 0
        if self.backend.vnet_header:  # the host kernel sums and segments: the header as it is
            frame = HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
                                0) + frame
        elif flags & HeaderFlag.NEEDS_CSUM:
            frame = complete_checksum(frame, csum_start, csum_offset)
            self.checksums_completed += 1
        self.backend.send(frame)
        self.frames_sent += 1
        self.segmented_sent += gso_type != GsoType.NONE
        self.bytes_sent += len(data) - HEADER.size
        return 0

    def _check_transmit_header(self, flags: int, gso_type: int, gso_size: int, csum_start: int,
                               csum_offset: int, length: int) -> str | None:
        """Why a transmit header cannot be honoured (a drop reason), or None (spec 5.1.6.2)."""
        if flags & ~int(HeaderFlag.NEEDS_CSUM):  # (int: ~ of an IntFlag keeps only its members)
            return "tx_bad_flags"  # DATA_VALID and the rest are the device's to set
        if flags & HeaderFlag.NEEDS_CSUM:
            if not self._has(VIRTIO_NET_F_CSUM):
                return "tx_offload_not_negotiated"
            if csum_start + csum_offset + 2 > length:
                return "tx_bad_checksum_position"
        if gso_type == GsoType.NONE:
            return "tx_too_long" if length > self.max_frame else None
        allowed: dict[int, int] = {GsoType.TCPV4: VIRTIO_NET_F_HOST_TSO4,
                                   GsoType.TCPV6: VIRTIO_NET_F_HOST_TSO6}
        if gso_type not in allowed or not self._has(allowed[gso_type]):
            return "tx_offload_not_negotiated"
        if not flags & HeaderFlag.NEEDS_CSUM or gso_size == 0:
            return "tx_bad_segmentation"  # a segmented frame's checksums are the device's
        return None

    # --- receiving -----------------------------------------------------------------------------
    def receive(self, frame: bytes, stopping: Callable[[], bool] = lambda: False) -> None:
        """A frame from the backend (its thread): into the next posted buffer.

        With no buffer posted the frame waits here, and so does the backend's
        thread (its socket or TAP queue holds the frames behind it), until the
        driver posts buffers (:meth:`buffers_posted`) or ``stopping()``.
        """
        data = self._receive_header(frame)
        if data is None:
            return
        with self._attached().lock:
            self._waiting = data
            if self._deliver_waiting():
                return
            self._room.clear()
        while not self._room.wait(0.2):
            if stopping():
                return

    def _receive_header(self, frame: bytes) -> bytes | None:
        """Header and frame as the driver will read them, or None (dropped, counted).

        A vnet-header backend's header is checked against what was negotiated
        (the host kernel was told, but a backend is not trusted); a bare frame
        from passt, whose checksums passt computed, is DATA_VALID when the
        driver takes that (the guest's kernel need not sum it again).
        """
        flags = gso_type = hdr_len = gso_size = csum_start = csum_offset = 0
        if self.backend.vnet_header:
            if len(frame) < HEADER.size:
                self.dropped["rx_bad_length"] += 1
                return None
            flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = HEADER.unpack_from(frame)
            frame = frame[HEADER.size:]
            if not self._has(VIRTIO_NET_F_GUEST_CSUM):
                flags &= ~int(HeaderFlag.DATA_VALID)  # the device must not say it (spec 5.1.6.3.1)
            allowed: dict[int, int | None] = {GsoType.NONE: None, GsoType.TCPV4: VIRTIO_NET_F_GUEST_TSO4,
                                              GsoType.TCPV6: VIRTIO_NET_F_GUEST_TSO6}
            needs = allowed.get(gso_type)
            if (flags & ~int(HeaderFlag.NEEDS_CSUM | HeaderFlag.DATA_VALID)
                    or flags & HeaderFlag.NEEDS_CSUM and not self._has(VIRTIO_NET_F_GUEST_CSUM)
                    or gso_type not in allowed
                    or needs is not None and not self._has(needs)):
                self.dropped["rx_offload_not_negotiated"] += 1
                return None
        elif self._has(VIRTIO_NET_F_GUEST_CSUM):
            flags = HeaderFlag.DATA_VALID
        limit = self.max_frame if gso_type == GsoType.NONE else MAX_GSO_FRAME
        if not ETHERNET_HEADER <= len(frame) <= limit:
            self.dropped["rx_bad_length"] += 1
            return None
        self.segmented_received += gso_type != GsoType.NONE
        return HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 1) + frame

    def buffers_posted(self, queue_index: int) -> None:
        """The driver notified the receive queue (transport lock held): the waiting frame goes."""
        if self._deliver_waiting():
            self._room.set()

    def _deliver_waiting(self) -> bool:
        data = self._waiting
        if data is None:
            return True
        fill = self._fill_merged if self._has(VIRTIO_NET_F_MRG_RXBUF) else self._fill_one
        if not self._attached().receive(RX, lambda take, memory: fill(take, memory, data)):
            return False
        self._waiting = None
        return True

    def _fill_one(self, take, memory: GuestMemory, data: bytes) -> list[tuple[int, int]] | None:
        """Header and frame (``data``) into one receive chain: [(its head, bytes written)]
        (0 written: dropped), or None when none is posted."""
        chain = take()
        if chain is None:
            return None
        if chain.readable or chain.writable_len < len(data):
            self.dropped["rx_buffer_too_small"] += 1
            return [(chain.head, 0)]
        if not self._write(chain, memory, data):
            return [(chain.head, 0)]
        self._received(data)
        return [(chain.head, len(data))]

    def _fill_merged(self, take, memory: GuestMemory, data: bytes) -> list[tuple[int, int]] | None:
        """MRG_RXBUF: header and frame across as many receive chains as it takes, the header's
        num_buffers saying how many (spec 5.1.6.4.2); None when too few are posted."""
        chains: list[tuple[DescriptorChain, int]] = []  # and the bytes each can take
        room = 0
        while room < len(data):
            chain = take()
            if chain is None:
                return None
            capacity = chain.writable_len
            chains.append((chain, capacity))
            if chain.readable or capacity == 0:  # the device cannot write it: the frame is lost
                self.dropped["rx_bad_buffer"] += 1
                return [(c.head, 0) for c, _ in chains]
            room += capacity
        data = data[:HEADER.size - 2] + struct.pack("<H", len(chains)) + data[HEADER.size:]
        used, offset = [], 0
        for chain, capacity in chains:
            size = min(capacity, len(data) - offset)
            if not self._write(chain, memory, data[offset:offset + size]):
                return [(c.head, 0) for c, _ in chains]
            used.append((chain.head, size))
            offset += size
        self._received(data)
        return used

    def _write(self, chain: DescriptorChain, memory: GuestMemory, data: bytes) -> bool:
        """``data`` into the chain's writable buffers, in order (it fits); False: dropped."""
        offset = 0
        try:
            for buffer in chain.writable:
                if offset >= len(data):
                    break
                piece = data[offset:offset + buffer.len]
                memory.write(buffer.addr, piece)
                offset += len(piece)
        except GuestMemoryError:
            self.dropped["rx_bad_buffer"] += 1
            return False
        return True

    def _received(self, data: bytes) -> None:
        self.frames_received += 1
        self.bytes_received += len(data) - HEADER.size
