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
from vmm.devices.virtio.net import (HEADER, MAX_FRAME, MAX_GSO_FRAME, RX, TX, GsoType,
                                    HeaderFlag, VirtioNet, complete_checksum, default_mac,
                                    parse_mac)
from vmm.devices.virtio.queue import Buffer, DescriptorChain
from vmm.errors import UsageError
from vmm.memory import GuestMemory

FRAME = bytes(range(6)) * 2 + b"\x08\x00" + b"payload!" * 10  # dst, src, IPv4, data


class Backend:
    """Bare frames (as passt), or with ``vnet_header`` frames after a virtio_net_hdr (as TAP)."""

    def __init__(self, vnet_header: bool = False) -> None:
        self.vnet_header = vnet_header
        self.sent: list[bytes] = []
        self.offloads: list[tuple[bool, bool, bool]] = []

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool) -> None:
        self.offloads.append((csum, tso4, tso6))


class Transport:
    """What the device needs of its transport: a lock and receive(queue, fill)."""

    def __init__(self, memory: GuestMemory, chains: list[DescriptorChain]) -> None:
        self.lock = threading.RLock()
        self.memory, self.chains, self.used = memory, chains, []

    def receive(self, queue_index, fill) -> bool:
        taken = []

        def take():
            if not self.chains:
                return None
            taken.append(self.chains.pop(0))
            return taken[-1]

        used = fill(take, self.memory)
        if used is None:
            self.chains[:0] = taken  # put back
            return False
        self.used += used
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


def bit(n: int) -> int:
    return 1 << n


def test_offers_and_config():
    device = VirtioNet(Backend(), default_mac(0))
    assert device.read_config(0, 6) == bytes.fromhex("525400123456")
    assert device.read_config(6, 2) == b"\x01\x00"  # link up
    assert device.features & (bit(5) | bit(16) | bit(32)) == bit(5) | bit(16) | bit(32)
    assert device.features & (bit(0) | bit(1)) == bit(0) | bit(1)  # CSUM, GUEST_CSUM
    assert not device.features & (bit(7) | bit(8) | bit(11) | bit(12))  # no TSO
    assert device.features & bit(15)  # MRG_RXBUF
    assert device.queue_max_sizes == (256, 256)


def test_a_vnet_header_backend_is_offered_segmentation_and_big_receive_buffers():
    device = VirtioNet(Backend(vnet_header=True), default_mac(0))
    tso = bit(7) | bit(8) | bit(11) | bit(12)
    assert device.features & tso == tso
    assert device.queue_max_sizes == (256, 256)  # mergeable buffers: a frame takes many
    big = VirtioNet(Backend(vnet_header=True), default_mac(0), mergeable=False)
    assert big.queue_max_sizes == (32, 256)  # the driver posts 64 KiB buffers: fewer
    plain = VirtioNet(Backend(vnet_header=True), default_mac(0), offload=False)
    assert not plain.features & (tso | bit(0) | bit(1)) and plain.queue_max_sizes == (256, 256)


def test_the_backend_is_told_what_the_driver_took_and_untold_at_reset():
    backend = Backend(vnet_header=True)
    device = VirtioNet(backend, default_mac(0))
    device.transport = Transport(None, [])
    device.activate(bit(32) | bit(1) | bit(7))  # GUEST_CSUM and GUEST_TSO4, not TSO6
    device.reset()
    assert backend.offloads == [(True, True, False), (False, False, False)]


def test_a_transmitted_frame_reaches_the_backend_without_its_header(memory):
    backend = Backend()
    device = VirtioNet(backend, default_mac(0))
    assert device.process_chain(TX, tx_chain(memory, bytes(HEADER.size) + FRAME), memory) == 0
    assert backend.sent == [FRAME] and device.frames_sent == 1


def sum16(data: bytes) -> int:
    """The Internet checksum's sum, word by word with end-around carry (RFC 1071)."""
    data += b"\0" * (len(data) % 2)
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_frame(payload: bytes) -> tuple[bytes, int, int]:
    """An IPv4/TCP frame as Linux hands it over with NEEDS_CSUM: the pseudo-header's sum in the
    TCP checksum field. (frame, csum_start, csum_offset)."""
    import struct

    src, dst = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])
    tcp = struct.pack(">HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, src, dst)
    pseudo = sum16(src + dst + struct.pack(">HH", 6, len(tcp)))
    tcp = tcp[:16] + pseudo.to_bytes(2, "big") + tcp[18:]
    return FRAME[:12] + b"\x08\x00" + ip + tcp, 14 + 20, 16


@pytest.mark.parametrize("payload", [b"", b"x", b"hello, world", bytes(range(256)) * 200,
                                     b"\xff" * 999])
def test_a_completed_checksum_verifies(payload):
    frame, start, offset = tcp_frame(payload)
    done = complete_checksum(frame, start, offset)
    assert done[:start + offset] == frame[:start + offset]
    assert done[start + offset + 2:] == frame[start + offset + 2:]
    src_dst = done[14 + 12:14 + 20]
    segment = done[start:]
    import struct

    # What the receiver checks: pseudo-header + segment (checksum included) sums to 0xFFFF.
    assert sum16(src_dst + struct.pack(">HH", 6, len(segment)) + segment) == 0xFFFF


def test_the_checksum_matches_the_word_by_word_sum_on_random_data():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=2, max_size=3000), st.integers(0, 10**9))
    def check(data, seed):
        offset = seed % (len(data) - 1)
        field_cleared = data[:offset] + b"\0\0" + data[offset + 2:]
        done = complete_checksum(field_cleared, 0, offset)
        expected = (~sum16(field_cleared) & 0xFFFF) or 0xFFFF
        assert int.from_bytes(done[offset:offset + 2], "big") == expected

    check()


def header(flags=0, gso=GsoType.NONE, gso_size=0, start=0, offset=0) -> bytes:
    return HEADER.pack(flags, gso, 0, gso_size, start, offset, 0)


def test_a_needs_csum_frame_is_completed_for_a_bare_frame_backend(memory):
    backend = Backend()
    device = VirtioNet(backend, default_mac(0))
    device.activate(device.features)
    frame, start, offset = tcp_frame(b"data" * 100)
    chain = tx_chain(memory, header(HeaderFlag.NEEDS_CSUM, start=start, offset=offset) + frame)
    assert device.process_chain(TX, chain, memory) == 0
    assert backend.sent == [complete_checksum(frame, start, offset)]
    assert device.checksums_completed == 1


def test_a_vnet_header_backend_gets_the_header_as_it_is(memory):
    backend = Backend(vnet_header=True)
    device = VirtioNet(backend, default_mac(0))
    device.activate(device.features)
    segment = FRAME[:14] + bytes(60000)
    data = header(HeaderFlag.NEEDS_CSUM, GsoType.TCPV4, 1448, 34, 16) + segment
    assert device.process_chain(TX, tx_chain(memory, data), memory) == 0
    assert backend.sent == [data] and device.segmented_sent == 1


@pytest.mark.parametrize("vnet, negotiate, data, reason", [
    (False, True, bytes(5), "tx_too_short"),  # shorter than the header
    (False, True, bytes(HEADER.size) + b"\x01" * 10, "tx_too_short"),  # no Ethernet header
    (False, True, bytes(HEADER.size) + b"x" * (MAX_FRAME + 1), "tx_too_long"),
    (True, True, bytes(HEADER.size) + b"x" * (MAX_FRAME + 1), "tx_too_long"),  # no GSO: MTU
    (True, True, header(1, GsoType.TCPV4, 1448) + b"x" * (MAX_GSO_FRAME + 1), "tx_too_long"),
    (False, False, header(HeaderFlag.NEEDS_CSUM) + FRAME, "tx_offload_not_negotiated"),
    (False, True, header(HeaderFlag.NEEDS_CSUM, start=80, offset=16) + FRAME,
     "tx_bad_checksum_position"),
    (False, True, header(HeaderFlag.NEEDS_CSUM, start=0xFFFF, offset=0xFFFF) + FRAME,
     "tx_bad_checksum_position"),
    (False, True, header(HeaderFlag.DATA_VALID) + FRAME, "tx_bad_flags"),
    (False, True, header(0x80) + FRAME, "tx_bad_flags"),
    (False, True, header(1, GsoType.TCPV4, 1448) + FRAME, "tx_offload_not_negotiated"),
    (True, False, header(1, GsoType.TCPV4, 1448) + FRAME, "tx_offload_not_negotiated"),
    (True, True, header(1, GsoType.UDP, 1448) + FRAME, "tx_offload_not_negotiated"),
    (True, True, header(1, GsoType.TCPV4 | 0x80, 1448) + FRAME, "tx_offload_not_negotiated"),
    (True, True, header(1, 9, 1448) + FRAME, "tx_offload_not_negotiated"),
    (True, True, header(0, GsoType.TCPV4, 1448) + FRAME, "tx_bad_segmentation"),
    (True, True, header(1, GsoType.TCPV6, 0) + FRAME, "tx_bad_segmentation"),
])
def test_bad_transmit_frames_are_dropped_and_counted(memory, vnet, negotiate, data, reason):
    backend = Backend(vnet_header=vnet)
    device = VirtioNet(backend, default_mac(0))
    if negotiate:
        device.activate(device.features)
    assert device.process_chain(TX, tx_chain(memory, data), memory) == 0
    assert backend.sent == [] and device.dropped == {reason: 1}


def test_a_transmit_chain_with_a_writable_buffer_is_dropped(memory):
    device = VirtioNet(Backend(), default_mac(0))
    chain = tx_chain(memory, bytes(HEADER.size) + FRAME)
    chain.buffers.append(Buffer(0x8000, 16, True))
    assert device.process_chain(TX, chain, memory) == 0 and device.dropped["tx_writable_buffer"] == 1


def test_a_received_frame_fills_a_posted_buffer_with_header_and_frame(memory):
    device = VirtioNet(Backend(), default_mac(0))  # MRG_RXBUF not negotiated: one buffer
    posted = DescriptorChain(3, [Buffer(0x4000, 10, True), Buffer(0x5000, 2048, True)])
    device.transport = Transport(memory, [posted])
    device.receive(FRAME)
    assert device.transport.used == [(3, HEADER.size + len(FRAME))]
    written = memory.read(0x4000, 10) + memory.read(0x5000, HEADER.size + len(FRAME) - 10)
    assert HEADER.unpack(written[:HEADER.size]) == (0, 0, 0, 0, 0, 0, 1)  # num_buffers 1
    assert written[HEADER.size:] == FRAME


def received_header(device, memory, frame: bytes) -> tuple:
    device.transport = Transport(memory, [DescriptorChain(1, [Buffer(0x4000, 70000, True)])])
    device.receive(frame)
    assert device.transport.used, device.dropped
    return HEADER.unpack(memory.read(0x4000, HEADER.size))


def test_a_bare_frame_is_data_valid_when_the_driver_takes_that(memory):
    device = VirtioNet(Backend(), default_mac(0))
    assert received_header(device, memory, FRAME)[0] == 0  # GUEST_CSUM not negotiated
    device.activate(device.features)
    assert received_header(device, memory, FRAME)[0] == HeaderFlag.DATA_VALID


def test_a_vnet_header_backends_header_reaches_the_driver(memory):
    device = VirtioNet(Backend(vnet_header=True), default_mac(0))
    device.activate(device.features)
    segment = FRAME[:14] + bytes(50000)
    sent = HEADER.pack(HeaderFlag.NEEDS_CSUM, GsoType.TCPV4, 66, 1448, 34, 16, 0)
    assert received_header(device, memory, sent + segment) == (1, 1, 66, 1448, 34, 16, 1)
    assert memory.read(0x4000 + HEADER.size, len(segment)) == segment
    assert device.segmented_received == 1


@pytest.mark.parametrize("features, data, reason", [
    (-1, b"short", "rx_bad_length"),  # not even a header
    (-1, header() + b"short", "rx_bad_length"),
    (-1, header() + FRAME[:14] + bytes(MAX_FRAME), "rx_bad_length"),  # no GSO: the MTU's limit
    (-1, header(1, GsoType.TCPV4, 1448) + FRAME[:14] + bytes(MAX_GSO_FRAME), "rx_bad_length"),
    (0, header(HeaderFlag.NEEDS_CSUM) + FRAME, "rx_offload_not_negotiated"),
    (bit(1), header(1, GsoType.TCPV4, 1448) + FRAME, "rx_offload_not_negotiated"),
    (-1, header(1, GsoType.UDP, 1448) + FRAME, "rx_offload_not_negotiated"),
    (-1, header(0x10) + FRAME, "rx_offload_not_negotiated"),
])
def test_a_vnet_header_backends_bad_frames_are_dropped(memory, features, data, reason):
    device = VirtioNet(Backend(vnet_header=True), default_mac(0))
    device.activate(device.features if features == -1 else features)
    device.transport = Transport(memory, [DescriptorChain(1, [Buffer(0x4000, 70000, True)])])
    device.receive(data)
    assert device.transport.used == [] and device.dropped == {reason: 1}


def test_data_valid_from_the_backend_is_cleared_when_the_driver_did_not_take_it(memory):
    device = VirtioNet(Backend(vnet_header=True), default_mac(0))
    device.activate(0)
    assert received_header(device, memory, header(HeaderFlag.DATA_VALID) + FRAME)[0] == 0


def test_receive_waits_for_a_buffer_then_delivers_when_one_is_posted(memory):
    device = VirtioNet(Backend(), default_mac(0))
    device.transport = Transport(memory, [])
    stop = threading.Event()
    waiting = threading.Thread(target=device.receive, args=(FRAME, stop.is_set), daemon=True)
    waiting.start()
    try:
        waiting.join(0.3)
        assert waiting.is_alive()  # the backend's thread is held: no buffer
        device.transport.chains.append(DescriptorChain(7, [Buffer(0x6000, 2048, True)]))
        with device.transport.lock:
            device.buffers_posted(RX)
        waiting.join(5)
        assert not waiting.is_alive() and device.transport.used == [(7, HEADER.size + len(FRAME))]
    finally:
        stop.set()  # a failed assertion must not leave the thread waiting


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
    ("user", NetConfig("user", "", "10.0.2.15/24", "10.0.2.2", dns="10.0.2.3")),
    ("tap", NetConfig("tap", "")),
    ("tap,ip=10.0.0.2/24,offload=off", NetConfig("tap", "", "10.0.0.2/24", offload=False)),
    ("user,offload=off", NetConfig("user", "", "10.0.2.15/24", "10.0.2.2", offload=False,
                                   dns="10.0.2.3")),
    ("tap=t,ip=10.0.0.2/24,dns=10.0.0.53", NetConfig("tap", "t", "10.0.0.2/24", dns="10.0.0.53")),
    ("user,hostfwd=tcp:8080:80,hostfwd=tcp:2222:22",
     NetConfig("user", "", "10.0.2.15/24", "10.0.2.2", None, ((8080, 80), (2222, 22)),
               dns="10.0.2.3")),
])
def test_net_option(text, parsed):
    assert NetConfig.parse(text) == parsed


@pytest.mark.parametrize("text, message", [
    ("slirp", "expected none, user"),
    ("user,hostfwd=udp:53:53", "hostfwd=tcp:HOSTPORT:GUESTPORT"),
    ("user,hostfwd=tcp:0:80", "hostfwd=tcp:HOSTPORT:GUESTPORT"),
    ("user,ip=10.0.0.2/24", "unknown option 'ip' (hostfwd, mac, offload)"),
    ("tap=", "name the TAP interface"),
    ("tap,offload=no", "offload=no: on or off"),
    ("user,offload=", "offload=: on or off"),
    ("tap=t,ip=10.0.0.2", "ADDR/PREFIX"),
    ("tap=t,ip=10.0.0.300/24", "10.0.0.300"),
    ("tap=t,gw=10.0.0.1", "gw= without ip="),
    ("tap=t,dns=10.0.0.53", "dns= without ip="),
    ("tap=t,ip=10.0.0.2/24,dns=resolver", "resolver"),
    ("tap=t,mac=01:00:00:00:00:01", "multicast"),
    ("tap=t,speed=10", "unknown option 'speed' (ip, gw, dns, mac, offload)"),
])
def test_bad_net_options_get_one_line(text, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        NetConfig.parse(text)


def test_the_kernel_configures_eth0_from_ip():
    net = NetConfig.parse("tap=t,ip=10.99.0.2/24,gw=10.99.0.1")
    assert net.kernel_ip_option(0) == "ip=10.99.0.2::10.99.0.1:255.255.255.0::eth0:off"
    assert NetConfig.parse("user").kernel_ip_option(0) == \
        "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off:10.0.2.3"  # and the nameserver
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
        "vmm: --net with --restore: a VM with a NIC starts from the snapshot that the same "
        "`vmm run --net ...` saved (its warm start), not from --restore"]


# --- mergeable receive buffers, through the real transport and a mock driver ----------------------
from tests.virtio_driver import FakeInterrupt, MockDriver  # noqa: E402


def mergeable_nic(queue_size: int = 16):
    from vmm.devices.virtio.mmio import VirtioMmioTransport

    memory = GuestMemory([(0, 1 << 20)])
    device = VirtioNet(Backend(), default_mac(0), mtu=65520)  # passt's: frames up to 64 KiB
    transport = VirtioMmioTransport(device, memory, FakeInterrupt(), name="net")
    device.transport = transport
    driver = MockDriver(transport, memory, queue_size=queue_size).init()  # queue 0: receive
    assert driver.features & bit(15)
    return device, transport, driver, memory


def post(driver, *sizes: int) -> list[tuple[int, int]]:
    """Receive buffers as Linux posts mergeable ones: one writable buffer per chain."""
    buffers = []
    for size in sizes:
        address = driver.alloc(size)
        buffers.append((driver.add([(address, size, True)]), address))
    driver.kick()
    return buffers


def test_a_big_frame_spans_mergeable_buffers_and_says_how_many():
    device, transport, driver, memory = mergeable_nic()
    buffers = post(driver, 1024, 1024, 1024, 1024)
    frame = FRAME[:14] + bytes(range(256)) * 10  # 2,574 bytes: header + frame in three
    device.receive(frame)
    done = driver.collect()
    assert [(c.head, c.length) for c in done] == [(buffers[0][0], 1024), (buffers[1][0], 1024),
                                                  (buffers[2][0], HEADER.size + len(frame) - 2048)]
    written = b"".join(memory.read(address, c.length) for c, (_, address) in zip(done, buffers))
    assert HEADER.unpack(written[:HEADER.size])[-1] == 3  # num_buffers
    assert written[HEADER.size:] == frame
    device.receive(FRAME)  # the fourth buffer, alone
    assert [(c.head, c.length) for c in driver.collect()] == [(buffers[3][0], HEADER.size + len(FRAME))]


def test_too_few_mergeable_buffers_go_back_and_the_frame_waits_for_more():
    device, transport, driver, memory = mergeable_nic()
    first = post(driver, 1024)
    frame = FRAME[:14] + bytes(3000)
    waiting = threading.Thread(target=device.receive, args=(frame,), daemon=True)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and driver.used_idx() == 0  # nothing used: the buffer went back
    assert transport.lock.acquire(timeout=1)  # and it waits: not spinning on the ring, locked
    transport.lock.release()
    assert driver.avail_event() == 1  # a kick is asked for the chain after the one put back
    more = post(driver, 1024, 1024, 1024)  # the kick hands the waiting frame over
    waiting.join(5)
    assert not waiting.is_alive()
    heads = [c.head for c in driver.collect()]
    assert heads == [first[0][0], more[0][0], more[1][0]]  # in the order posted


def test_a_malformed_chain_among_mergeable_buffers_loses_the_frame_not_the_ring():
    device, transport, driver, memory = mergeable_nic()
    good = post(driver, 1024)
    bad = driver.free.pop(0)
    driver.write_desc(bad, (1 << 20) - 16, 4096, 2)  # writable, past the end of RAM
    driver.publish(bad)
    driver.kick()
    device.receive(FRAME[:14] + bytes(3000))
    assert [(c.head, c.length) for c in driver.collect()] == [(good[0][0], 0), (bad, 0)]
    assert transport.stats.chain_errors == 1
    after = post(driver, 2048)
    device.receive(FRAME)  # the ring goes on
    assert [(c.head, c.length) for c in driver.collect()] == [(after[0][0], HEADER.size + len(FRAME))]


def test_a_frame_bigger_than_the_whole_ring_is_dropped_not_waited_for():
    device, transport, driver, memory = mergeable_nic(queue_size=4)
    post(driver, 16, 16, 16, 16)
    done = threading.Thread(target=device.receive, args=(FRAME[:14] + bytes(1000),), daemon=True)
    done.start()
    done.join(5)
    assert not done.is_alive()
    assert [c.length for c in driver.collect()] == [0, 0, 0, 0]
    assert transport.stats.errors == {"frame larger than every posted buffer": 1}  # counted


def test_a_mergeable_buffer_the_device_cannot_write_drops_the_frame(memory):
    device = VirtioNet(Backend(), default_mac(0))
    device.activate(device.features)
    device.transport = Transport(memory, [DescriptorChain(1, [Buffer(0x4000, 64, True)]),
                                          DescriptorChain(2, [Buffer(0x5000, 64, False)])])
    device.receive(FRAME)
    assert device.transport.used == [(1, 0), (2, 0)] and device.dropped == {"rx_bad_buffer": 1}
