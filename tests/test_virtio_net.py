"""virtio-net without KVM: frames out of transmit chains, into receive chains, and bad ones.

The device against guest memory of our own and hand-made descriptor chains
(the ring and chain rules themselves, loops included, are tests/test_virtio_queue.py's):
every malformed frame or chain is dropped and counted, never raised.
"""

from __future__ import annotations

import re
import threading

import pytest

from vmm.config import NetConfig
from vmm.devices.virtio.net import (HEADER, MAX_FRAME, RX, TX, VirtioNet, default_mac,
                                    parse_mac)
from vmm.devices.virtio.queue import Buffer, DescriptorChain
from vmm.errors import UsageError
from vmm.memory import GuestMemory

FRAME = bytes(range(6)) * 2 + b"\x08\x00" + b"payload!" * 10  # dst, src, IPv4, data


class Backend:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)


class Transport:
    """What the device needs of its transport: a lock and receive(queue, fill)."""

    def __init__(self, memory: GuestMemory, chains: list[DescriptorChain]) -> None:
        self.lock = threading.RLock()
        self.memory, self.chains, self.used = memory, chains, []

    def receive(self, queue_index, fill) -> bool:
        if not self.chains:
            return False
        chain = self.chains.pop(0)
        self.used.append((chain.head, fill(chain, self.memory)))
        return True


@pytest.fixture
def memory():
    memory = GuestMemory([(0, 1 << 20)])
    yield memory
    memory.close()


def tx_chain(memory, data: bytes, *, split: int = HEADER.size) -> DescriptorChain:
    """A transmit chain: the header and the frame in two readable buffers, as Linux lays them."""
    memory.write(0x1000, data)
    first = min(split, len(data))
    return DescriptorChain(0, [Buffer(0x1000, first, False), Buffer(0x1000 + first, len(data) - first, False)])


def test_offers_and_config():
    device = VirtioNet(Backend(), default_mac(0))
    assert device.read_config(0, 6) == bytes.fromhex("525400123456")
    assert device.read_config(6, 2) == b"\x01\x00"  # link up
    assert device.features >> 5 & 1 and device.features >> 16 & 1 and device.features >> 32 & 1
    assert not device.features & (1 << 15 | 1 << 0)  # no MRG_RXBUF, no CSUM: none offered


def test_a_transmitted_frame_reaches_the_backend_without_its_header(memory):
    backend = Backend()
    device = VirtioNet(backend, default_mac(0))
    assert device.process_chain(TX, tx_chain(memory, bytes(HEADER.size) + FRAME), memory) == 0
    assert backend.sent == [FRAME] and device.frames_sent == 1


@pytest.mark.parametrize("data, reason", [
    (bytes(5), "tx_too_short"),  # shorter than the header
    (bytes(HEADER.size) + b"\x01" * 10, "tx_too_short"),  # no Ethernet header
    (bytes(HEADER.size) + b"x" * (MAX_FRAME + 1), "tx_too_long"),
    (b"\x01" + bytes(HEADER.size - 1) + FRAME, "tx_offload_not_offered"),  # NEEDS_CSUM
    (b"\x00\x01" + bytes(HEADER.size - 2) + FRAME, "tx_offload_not_offered"),  # GSO TCPv4
])
def test_bad_transmit_frames_are_dropped_and_counted(memory, data, reason):
    backend = Backend()
    device = VirtioNet(backend, default_mac(0))
    assert device.process_chain(TX, tx_chain(memory, data), memory) == 0
    assert backend.sent == [] and device.dropped[reason] == 1


def test_a_transmit_chain_with_a_writable_buffer_is_dropped(memory):
    device = VirtioNet(Backend(), default_mac(0))
    chain = tx_chain(memory, bytes(HEADER.size) + FRAME)
    chain.buffers.append(Buffer(0x8000, 16, True))
    assert device.process_chain(TX, chain, memory) == 0 and device.dropped["tx_writable_buffer"] == 1


def test_a_received_frame_fills_a_posted_buffer_with_header_and_frame(memory):
    device = VirtioNet(Backend(), default_mac(0))
    posted = DescriptorChain(3, [Buffer(0x4000, 10, True), Buffer(0x5000, 2048, True)])
    device.transport = Transport(memory, [posted])
    device.receive(FRAME)
    assert device.transport.used == [(3, HEADER.size + len(FRAME))]
    written = memory.read(0x4000, 10) + memory.read(0x5000, HEADER.size + len(FRAME) - 10)
    assert HEADER.unpack(written[:HEADER.size])[-1] == 1  # num_buffers
    assert written[HEADER.size:] == FRAME


def test_receive_waits_for_a_buffer_then_delivers_when_one_is_posted(memory):
    device = VirtioNet(Backend(), default_mac(0))
    device.transport = Transport(memory, [])
    stop = threading.Event()
    waiting = threading.Thread(target=device.receive, args=(FRAME, stop.is_set))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # the backend's thread is held: no buffer
    device.transport.chains.append(DescriptorChain(7, [Buffer(0x6000, 2048, True)]))
    with device.transport.lock:
        device.buffers_posted(RX)
    waiting.join(5)
    assert not waiting.is_alive() and device.transport.used == [(7, HEADER.size + len(FRAME))]


def test_bad_received_frames_and_small_buffers_are_dropped(memory):
    device = VirtioNet(Backend(), default_mac(0))
    device.transport = Transport(memory, [DescriptorChain(1, [Buffer(0x4000, 20, True)]),
                                          DescriptorChain(2, [Buffer(0x4000, 20, False)])])
    device.receive(b"short")
    device.receive(b"x" * (MAX_FRAME + 1))
    assert device.dropped["rx_bad_length"] == 2 and device.transport.used == []
    device.receive(FRAME)  # a 20-byte buffer: too small, returned empty
    device.receive(FRAME)  # a readable buffer where the device must write
    assert device.transport.used == [(1, 0), (2, 0)]
    assert device.dropped["rx_buffer_too_small"] == 2


@pytest.mark.parametrize("text, parsed", [
    ("none", None),
    ("tap=tap0", NetConfig("tap", "tap0")),
    ("tap=vt,ip=10.0.0.2/24,gw=10.0.0.1,mac=52:54:00:00:00:09",
     NetConfig("tap", "vt", "10.0.0.2/24", "10.0.0.1", "52:54:00:00:00:09")),
    ("user", NetConfig("user", "", "10.0.2.15/24", "10.0.2.2")),
    ("user,hostfwd=tcp:8080:80,hostfwd=tcp:2222:22",
     NetConfig("user", "", "10.0.2.15/24", "10.0.2.2", None, ((8080, 80), (2222, 22)))),
])
def test_net_option(text, parsed):
    assert NetConfig.parse(text) == parsed


@pytest.mark.parametrize("text, message", [
    ("slirp", "expected none, user"),
    ("user,hostfwd=udp:53:53", "hostfwd=tcp:HOSTPORT:GUESTPORT"),
    ("user,hostfwd=tcp:0:80", "hostfwd=tcp:HOSTPORT:GUESTPORT"),
    ("user,ip=10.0.0.2/24", "unknown option 'ip' (hostfwd, mac)"),
    ("tap=", "name the TAP interface"),
    ("tap=t,ip=10.0.0.2", "ADDR/PREFIX"),
    ("tap=t,ip=10.0.0.300/24", "10.0.0.300"),
    ("tap=t,gw=10.0.0.1", "gw= without ip="),
    ("tap=t,mac=01:00:00:00:00:01", "multicast"),
    ("tap=t,speed=10", "unknown option 'speed'"),
])
def test_bad_net_options_get_one_line(text, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        NetConfig.parse(text)


def test_the_kernel_configures_eth0_from_ip():
    net = NetConfig.parse("tap=t,ip=10.99.0.2/24,gw=10.99.0.1")
    assert net.kernel_ip_option(0) == "ip=10.99.0.2::10.99.0.1:255.255.255.0::eth0:off"
    assert NetConfig.parse("tap=t").kernel_ip_option(0) is None
    assert parse_mac("52:54:00:ab:cd:ef") == bytes.fromhex("525400abcdef")


def test_a_large_mtu_is_offered_and_frames_up_to_it_pass(memory):
    backend = Backend()
    device = VirtioNet(backend, default_mac(0), mtu=65520)
    assert device.features >> 3 & 1  # VIRTIO_NET_F_MTU
    assert device.read_config(10, 2) == (65520).to_bytes(2, "little")
    big = FRAME[:14] + bytes(65000)
    assert device.process_chain(TX, tx_chain(memory, bytes(HEADER.size) + big), memory) == 0
    assert backend.sent == [big]
    assert not VirtioNet(Backend(), default_mac(0)).features >> 3 & 1  # 1500: not offered


def test_net_with_restore_is_refused_before_anything_starts(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "vmm", "run", "--restore", str(tmp_path),
                             "--net", "user", "--", "true"], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "vmm: --net with --restore: a snapshot has no NIC, and one cannot be added to a "
        "restored VM yet (a run with --net boots cold)"]
