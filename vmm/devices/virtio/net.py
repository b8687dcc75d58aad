"""virtio-net (virtio 1.x section 5.1): an Ethernet NIC over a frame backend.

Two queues: receive (0), whose chains are empty buffers the driver posts for
frames to come, and transmit (1), whose chains are frames to send. Each frame
in either direction follows a 12-byte ``virtio_net_hdr_v1`` (flags, GSO type,
header length, GSO size, checksum start and offset, number of buffers)::

    transmit chain, readable:  [ virtio_net_hdr_v1 ][ Ethernet frame ]
    receive chain, writable:   [ virtio_net_hdr_v1 ][ Ethernet frame ]

This first device offers no offloads (no CSUM, no GSO, no MRG_RXBUF): the
driver checksums in software and posts buffers of a whole frame each, so every
header it sends must be all zeros but for its length, and every header we
write is zeros with ``num_buffers`` = 1. Offered: VERSION_1, MAC, STATUS (the
link is up), EVENT_IDX, INDIRECT_DESC, and MTU when it is not Ethernet's 1,500
(passt's 65,520: the driver then posts receive chains of a whole 64 KiB frame).

Transmit is a queue notification like a disk request: the transport's
QueueServer hands each chain to :meth:`VirtioNet.process_chain`. Receive is the
other way round: a frame comes from the backend's thread whenever it comes, and
takes the next posted buffer (``VirtioMmioTransport.receive``); with none
posted it waits, and the backend's thread with it (the frames behind it stay in
the TAP queue or the socket), until the driver posts more and notifies the
receive queue (:meth:`buffers_posted`).

Everything from the guest is hostile: a chain too short for the header, a
frame longer than MAX_FRAME or shorter than an Ethernet header, a receive chain
too small for the frame: dropped, counted by reason, never an exception.
"""

from __future__ import annotations

import struct
import threading
from collections import Counter
from typing import Callable, Protocol

from vmm.devices.virtio.mmio import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from vmm.devices.virtio.queue import DescriptorChain
from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory

VIRTIO_ID_NET = 1
RX, TX = 0, 1

VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

HEADER = struct.Struct("<BBHHHHH")  # virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size,
#                                     csum_start, csum_offset, num_buffers
ETHERNET_HEADER = 14
DEFAULT_MTU = 1500
MAX_FRAME = DEFAULT_MTU + ETHERNET_HEADER + 4  # with a VLAN tag: the default MTU's largest frame
QUEUE_SIZE = 256
BIG_RX_QUEUE_SIZE = 32  # receive buffers of a whole 64 KiB frame each (a big MTU); each is a
#   chain of 19 descriptors (17 pages, header, first page), and a chain must fit the queue


class FrameBackend(Protocol):
    """Where frames go and come from (vmm/devices/netbackend.py)."""

    def send(self, frame: bytes) -> None: ...

    def start(self, receive: Callable[[bytes], bool]) -> None: ...

    def close(self) -> None: ...


def default_mac(index: int) -> bytes:
    """A stable, locally administered unicast MAC for NIC ``index``: 52:54:00:12:34:5N."""
    return bytes((0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + index))


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
                 mtu: int = DEFAULT_MTU) -> None:
        """``mtu`` above 1500 is offered (VIRTIO_NET_F_MTU): the driver then posts receive
        chains of a whole 64 KiB frame ("big packets") and sends frames up to it, so the
        guest's stack handles a 64 KiB segment where it would handle 44 of 1,500 bytes."""
        self.backend = backend
        self.mac = mac
        self.mtu = mtu
        self.max_frame = mtu + ETHERNET_HEADER + 4
        # The driver fills the whole receive ring at start, each entry (an indirect chain) a
        # 64 KiB buffer with a big MTU: 256 of them are 16 MiB of pages to zero, 1.5 s of boot
        # in PVM's emulator (measured); 32 are plenty for a guest that slow.
        rx_size = queue_size if mtu == DEFAULT_MTU else min(queue_size, BIG_RX_QUEUE_SIZE)
        self.queue_max_sizes = (rx_size, queue_size)
        self.negotiated = 0
        self.transport = None  # set when attached: received frames go through it (and its lock)
        self._waiting: bytes | None = None  # a received frame with no buffer posted for it
        self._room = threading.Event()  # set: the waiting frame went (the backend may go on)
        # Statistics.
        self.frames_sent = self.frames_received = 0
        self.bytes_sent = self.bytes_received = 0
        self.dropped: Counter[str] = Counter()

    # --- what the transport asks ------------------------------------------------------
    @property
    def features(self) -> int:
        bits = [VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
                VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS]
        if self.mtu != DEFAULT_MTU:
            bits.append(VIRTIO_NET_F_MTU)
        return sum(1 << bit for bit in bits)

    def read_config(self, offset: int, size: int) -> bytes:
        # mac, status, max_virtqueue_pairs, mtu (spec 5.1.4)
        config = self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, 1, self.mtu)
        return config[offset:offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        pass  # the MAC is read-only in virtio 1.x (VIRTIO_NET_F_CTRL_MAC_ADDR not offered)

    def activate(self, features: int) -> None:
        self.negotiated = features

    def reset(self) -> None:
        """Transport lock held: a reset driver has no buffers; a waiting frame is dropped."""
        self.negotiated = 0
        if self._waiting is not None:
            self.dropped["rx_reset"] += 1
        self._waiting = None
        self._room.set()

    @property
    def requests(self) -> int:
        return self.frames_sent + self.frames_received

    def process_chain(self, queue_index: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        """A transmit chain: its frame to the backend. Nothing is written back."""
        if queue_index != TX:
            return 0
        readable = chain.readable
        total = sum(b.len for b in readable)
        if chain.writable:
            self.dropped["tx_writable_buffer"] += 1
            return 0
        if total < HEADER.size + ETHERNET_HEADER:
            self.dropped["tx_too_short"] += 1
            return 0
        if total - HEADER.size > self.max_frame:
            self.dropped["tx_too_long"] += 1
            return 0
        try:
            data = b"".join(memory.read(b.addr, b.len) for b in readable)
        except GuestMemoryError:
            self.dropped["tx_bad_buffer"] += 1
            return 0
        flags, gso_type = data[0], data[1]
        if flags or gso_type:  # no offload was offered: the driver may not ask for one
            self.dropped["tx_offload_not_offered"] += 1
            return 0
        frame = data[HEADER.size:]
        self.backend.send(frame)
        self.frames_sent += 1
        self.bytes_sent += len(frame)
        return 0

    # --- receiving -----------------------------------------------------------------------------
    def receive(self, frame: bytes, stopping: Callable[[], bool] = lambda: False) -> None:
        """A frame from the backend (its thread): into the next posted buffer.

        With no buffer posted the frame waits here, and so does the backend's
        thread (its socket or TAP queue holds the frames behind it), until the
        driver posts buffers (:meth:`buffers_posted`) or ``stopping()``.
        """
        if not ETHERNET_HEADER <= len(frame) <= self.max_frame:
            self.dropped["rx_bad_length"] += 1
            return
        with self.transport.lock:
            self._waiting = frame
            if self._deliver_waiting():
                return
            self._room.clear()
        while not self._room.wait(0.2):
            if stopping():
                return

    def buffers_posted(self, queue_index: int) -> None:
        """The driver notified the receive queue (transport lock held): the waiting frame goes."""
        if self._deliver_waiting():
            self._room.set()

    def _deliver_waiting(self) -> bool:
        frame = self._waiting
        if frame is None:
            return True
        if not self.transport.receive(RX, lambda chain, memory: self._fill(chain, memory, frame)):
            return False
        self._waiting = None
        return True

    def _fill(self, chain: DescriptorChain, memory: GuestMemory, frame: bytes) -> int:
        """Header and frame into a receive chain; the bytes written (0: dropped)."""
        data = HEADER.pack(0, 0, 0, 0, 0, 0, 1) + frame
        if chain.readable or sum(b.len for b in chain.writable) < len(data):
            self.dropped["rx_buffer_too_small"] += 1
            return 0
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
            return 0
        self.frames_received += 1
        self.bytes_received += len(frame)
        return len(data)
