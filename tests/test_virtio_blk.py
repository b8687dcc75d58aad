"""virtio-blk over virtio-mmio, driven through its registers by a mock Linux driver.

No KVM here: guest RAM is a GuestMemory, the "guest" is tests/virtio_driver.py,
the disk is a temporary image file whose bytes every test checks.
"""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from vmm.config import DiskConfig
from vmm.devices.bus import Bus
from vmm.devices.disk import RawDiskImage
from vmm.devices.virtio import block as blk
from vmm.devices.virtio import mmio
from vmm.devices.virtio.block import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlock,
)
from vmm.devices.virtio.mmio import VirtioMmioTransport
from vmm.devices.virtio.queue import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT as I
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT as N, VIRTQ_DESC_F_WRITE as W
from vmm.errors import DeviceError
from vmm.memory import GuestMemory
from virtio_driver import (
    AVAIL_RING,
    EVENT_IDX,
    RAM_SIZE,
    VERSION_1,
    DriverError,
    FakeInterrupt,
    MockDriver,
)

DISK_SIZE = 1 << 20  # 2048 sectors


class Rig:
    """An image file, its backend, a virtio-blk device, the transport, a driver."""

    def __init__(self, path, *, read_only=False, serial="", queue_size=16, features=None,
                 level_triggered=False, init=True):
        self.path = path
        self.memory = GuestMemory([(0, RAM_SIZE)])
        self.backend = RawDiskImage(str(path), read_only)
        self.device = VirtioBlock(self.backend, serial=serial)
        self.irq = FakeInterrupt()
        self.transport = VirtioMmioTransport(self.device, self.memory, self.irq, name="vda",
                                             level_triggered=level_triggered)
        self.driver = MockDriver(self.transport, self.memory, queue_size=queue_size, features=features)
        if init:
            self.driver.init()

    def image(self) -> bytes:
        return self.path.read_bytes()

    def close(self) -> None:
        self.backend.close()
        self.memory.close()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


@pytest.fixture
def bare(image):
    """A rig whose driver has not initialised the device yet."""
    r = Rig(image, init=False)
    yield r
    r.close()


@pytest.fixture
def rig(image):
    r = Rig(image)
    yield r
    assert r.transport.stats.errors["internal error"] == 0
    r.close()


# --- registers and negotiation ---------------------------------------------------------------
def test_identity_registers(rig):
    d = rig.driver
    assert d.r32(mmio.MAGIC) == 0x74726976
    assert d.r32(mmio.VERSION_REG) == 2
    assert d.r32(mmio.DEVICE_ID) == 2
    assert d.r32(mmio.VENDOR_ID_REG) != 0
    assert d.status == 0xF  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    assert d.r32(mmio.QUEUE_NUM_MAX) == 256
    assert d.r32(mmio.SHM_LEN_LOW) == d.r32(mmio.SHM_LEN_HIGH) == 0xFFFFFFFF  # no shm regions


def test_offered_features(rig):
    offered = rig.driver.offered
    for bit in (32, 29, 28, blk.VIRTIO_BLK_F_FLUSH, blk.VIRTIO_BLK_F_SEG_MAX, blk.VIRTIO_BLK_F_SIZE_MAX,
                blk.VIRTIO_BLK_F_BLK_SIZE, blk.VIRTIO_BLK_F_DISCARD, blk.VIRTIO_BLK_F_WRITE_ZEROES):
        assert offered >> bit & 1, bit
    assert not offered >> blk.VIRTIO_BLK_F_RO & 1
    assert rig.driver.features == offered
    assert rig.transport.negotiated_features == offered


def test_config_space(rig):
    c = rig.driver.config
    assert c(0, 8) == 2048  # capacity
    assert c(8, 4) == blk.SIZE_MAX
    assert c(12, 4) == 256 - 2  # seg_max
    assert c(20, 4) == 512  # blk_size
    assert c(36, 4) == blk.MAX_DISCARD_SECTORS
    assert c(40, 4) == blk.MAX_DISCARD_SEG
    assert c(44, 4) == blk.DISCARD_SECTOR_ALIGNMENT
    assert c(48, 4) == blk.MAX_WRITE_ZEROES_SECTORS
    assert c(52, 4) == blk.MAX_WRITE_ZEROES_SEG
    assert c(56, 1) == 1
    # Any access size, and reads past the end of the structure read zero.
    assert c(0, 1) == 0 and c(1, 2) == 8 and c(0, 4) == 2048
    assert c(0x200, 4) == 0
    assert rig.transport.read(0xFFC, 4) == bytes(4)
    rig.transport.write(mmio.CONFIG, b"\xff" * 8)  # read-only: ignored
    assert c(0, 8) == 2048
    assert rig.driver.r32(mmio.CONFIG_GENERATION) == 0


def test_a_replaced_backend_shows_its_size_after_a_config_change(rig, tmp_path):
    """A container's root put behind a disk the guest saw empty (vmm/oci/monitor.py)."""
    bigger = tmp_path / "root.img"
    bigger.write_bytes(b"\x42" * (4 * DISK_SIZE))
    backend = RawDiskImage(str(bigger), False)
    pulses = rig.irq.pulses
    old = rig.device.replace_backend(backend)
    assert old is rig.backend
    rig.transport.config_changed()
    assert rig.driver.config(0, 8) == 4 * 2048  # the new capacity
    assert rig.driver.r32(mmio.CONFIG_GENERATION) == 1  # the driver knows to read it again
    assert rig.driver.r32(mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG
    assert rig.irq.pulses > pulses
    request = rig.driver.read(3 * 2048, 1)  # beyond the old capacity: the new image answers
    assert request.status == VIRTIO_BLK_S_OK and request.data == b"\x42" * 512
    backend.close()
    with pytest.raises(ValueError, match="as read-only"):
        rig.device.replace_backend(RawDiskImage(str(bigger), True))


def test_features_without_version_1_are_refused(image):
    r = Rig(image, features=~VERSION_1 & ((1 << 64) - 1), init=False)
    try:
        with pytest.raises(DriverError, match="refused the features"):
            r.driver.init()
        assert not r.driver.status & mmio.STATUS_FEATURES_OK
        assert r.transport.stats.errors == {mmio.NO_VERSION_1: 1}
    finally:
        r.close()


def test_features_never_offered_are_refused(image):
    r = Rig(image, init=False)
    try:
        d = r.driver
        _to_driver(d)
        d.w32(mmio.DRIVER_FEATURES_SEL, 1)
        d.w32(mmio.DRIVER_FEATURES, 0xFFFFFFFF)
        d.set_status(mmio.STATUS_FEATURES_OK)
        assert not d.status & mmio.STATUS_FEATURES_OK
        assert r.transport.stats.errors["driver accepted features never offered"] == 1
    finally:
        r.close()


def test_status_out_of_order_is_ignored(image):
    r = Rig(image, init=False)
    try:
        d = r.driver
        d.w32(mmio.STATUS, mmio.STATUS_DRIVER_OK)  # straight to DRIVER_OK
        assert d.status == 0
        d.w32(mmio.STATUS, mmio.STATUS_ACKNOWLEDGE)
        d.w32(mmio.STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_FEATURES_OK)  # skips DRIVER
        assert d.status == mmio.STATUS_ACKNOWLEDGE
        d.w32(mmio.STATUS, mmio.STATUS_DRIVER)  # clears ACKNOWLEDGE without a reset
        assert d.status == mmio.STATUS_ACKNOWLEDGE
        d.w32(mmio.STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_FAILED)
        assert d.status & mmio.STATUS_FAILED
        assert r.transport.stats.errors["status bit set out of order"] == 2
    finally:
        r.close()


def test_driver_features_written_outside_negotiation_are_ignored(rig):
    rig.driver.w32(mmio.DRIVER_FEATURES_SEL, 0)
    rig.driver.w32(mmio.DRIVER_FEATURES, 0)
    assert rig.transport.negotiated_features == rig.driver.features


def test_reset_returns_to_power_on_state(rig):
    rig.driver.read(0, 1)
    d = rig.driver
    d.w32(mmio.STATUS, 0)
    assert d.status == 0
    assert d.r32(mmio.INTERRUPT_STATUS) == 0
    assert d.r32(mmio.QUEUE_READY) == 0
    assert rig.transport.negotiated_features == 0
    d.init()  # and it comes back up
    assert d.read(0, 1).data == rig.image()[:512]


def test_wrong_size_and_unaligned_register_accesses(rig):
    t = rig.transport
    assert t.read(mmio.MAGIC, 1) == b"\0"
    assert t.read(mmio.MAGIC, 2) == b"\0\0"
    assert t.read(mmio.MAGIC, 8) == bytes(8)
    assert t.read(mmio.MAGIC + 1, 4) == bytes(4)
    t.write(mmio.STATUS, b"\0")  # a 1-byte reset would be a reset... but it is the wrong size
    t.write(mmio.STATUS, b"\0\0")
    t.write(mmio.STATUS + 2, b"\0\0\0\0")
    assert rig.driver.status == 0xF
    assert t.stats.errors["bad register access"] == 7
    t.write(mmio.MAGIC, struct.pack("<I", 1))  # read-only register
    assert rig.driver.r32(mmio.MAGIC) == mmio.MAGIC_VALUE


def _to_driver(d):
    """Reset, ACKNOWLEDGE, DRIVER: the feature negotiation phase."""
    d.w32(mmio.STATUS, 0)
    d.set_status(mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)


def _negotiate(d, features=None):
    """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK: the queue set-up phase."""
    _to_driver(d)
    accept = VERSION_1 if features is None else features
    for sel in (0, 1):
        d.w32(mmio.DRIVER_FEATURES_SEL, sel)
        d.w32(mmio.DRIVER_FEATURES, (accept >> (32 * sel)) & 0xFFFFFFFF)
    d.set_status(mmio.STATUS_FEATURES_OK)


def _lay_out_queue(d, size=16):
    d.w32(mmio.QUEUE_SEL, 0)
    d.w32(mmio.QUEUE_NUM, size)
    d.w32(mmio.QUEUE_DESC_LOW, 0x1000)
    d.w32(mmio.QUEUE_DRIVER_LOW, 0x2000)
    d.w32(mmio.QUEUE_DEVICE_LOW, 0x3000)


def test_queue_registers_of_a_missing_queue(bare):
    d = bare.driver
    _negotiate(d)
    d.w32(mmio.QUEUE_SEL, 7)
    assert d.r32(mmio.QUEUE_NUM_MAX) == 0 and d.r32(mmio.QUEUE_READY) == 0
    d.w32(mmio.QUEUE_NUM, 8)
    assert bare.transport.stats.errors[mmio.NO_SUCH_QUEUE] == 1


def test_queue_registers_before_features_ok_are_ignored(bare):
    """Spec 4.2.3.2: a driver that sets up a queue before FEATURES_OK."""
    d = bare.driver
    _to_driver(d)
    _lay_out_queue(d)  # before FEATURES_OK: every write ignored
    d.w32(mmio.QUEUE_READY, 1)
    assert d.r32(mmio.QUEUE_READY) == 0 and d.r32(mmio.QUEUE_DESC_LOW) == 0
    assert bare.transport.stats.errors[mmio.QUEUE_OUTSIDE_SETUP] == 6


def test_queue_registers_of_a_running_device_are_ignored(rig):
    d = rig.driver
    before = rig.transport.stats.errors[mmio.QUEUE_OUTSIDE_SETUP]
    d.w32(mmio.QUEUE_SEL, 0)
    d.w32(mmio.QUEUE_DESC_LOW, 0x8000)
    d.w32(mmio.QUEUE_READY, 0)
    assert rig.transport.stats.errors[mmio.QUEUE_OUTSIDE_SETUP] == before + 3
    assert d.r32(mmio.QUEUE_DESC_LOW) == 0x1000 and d.r32(mmio.QUEUE_READY) == 1
    assert d.read(0, 1).status == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("event_idx", [False, True])
def test_queues_start_at_driver_ok_with_the_negotiated_features(bare, event_idx):
    d = bare.driver
    _negotiate(d, VERSION_1 | (EVENT_IDX if event_idx else 0))
    _lay_out_queue(d)
    d.w32(mmio.QUEUE_READY, 1)
    queue = bare.transport.queues[0]
    assert d.r32(mmio.QUEUE_READY) == 1 and queue.ready and not queue.active
    d.notify(0)  # ready is not running
    assert bare.transport.stats.errors[mmio.NOT_RUNNING] == 1
    d.set_status(mmio.STATUS_DRIVER_OK)
    assert queue.active and queue.event_idx is event_idx and queue.indirect is False


def test_configuration_writes_wait_for_features_ok(bare):
    written = []
    bare.device.write_config = lambda offset, data: written.append((offset, data))
    _to_driver(bare.driver)
    bare.transport.write(mmio.CONFIG + 0x20, b"\x01")
    assert written == [] and bare.transport.stats.errors[mmio.CONFIG_BEFORE_FEATURES] == 1
    _negotiate(bare.driver)
    bare.transport.write(mmio.CONFIG + 0x20, b"\x01")
    assert written == [(0x20, b"\x01")]


@pytest.mark.parametrize(
    "register, value",
    [
        (mmio.QUEUE_NUM, 12),  # not a power of 2
        (mmio.QUEUE_NUM, 512),  # above QueueNumMax
        (mmio.QUEUE_DESC_LOW, RAM_SIZE - 16),  # table outside RAM
        (mmio.QUEUE_DRIVER_HIGH, 1),  # ring above 4 GiB: not RAM
        (mmio.QUEUE_DEVICE_LOW, 0x3002),  # misaligned used ring
    ],
)
def test_bad_queue_setup_is_refused(image, register, value):
    r = Rig(image, init=False)
    try:
        d = r.driver
        _negotiate(d)
        _lay_out_queue(d)
        d.w32(register, value)
        d.w32(mmio.QUEUE_READY, 1)
        assert d.r32(mmio.QUEUE_READY) == 0
        assert r.transport.stats.errors["queue set-up refused"] == 1
        d.set_status(mmio.STATUS_DRIVER_OK)
        d.notify(0)  # a notify for a queue that is not ready: ignored
        assert r.transport.stats.errors["notify of a queue that is not ready"] == 1
    finally:
        r.close()


def test_notify_before_driver_ok_and_for_missing_queue(image):
    r = Rig(image, init=False)
    try:
        r.driver.notify(0)
        assert r.transport.stats.errors["notify while the device is not running"] == 1
        r.driver.init()
        r.driver.notify(3)
        assert r.transport.stats.errors["notify of a queue that is not ready"] == 1
        assert r.transport.stats.notifications == 2
    finally:
        r.close()


# --- reads and writes --------------------------------------------------------------------------
def test_read_sectors(rig):
    data = rig.image()
    for sector, count in ((0, 1), (5, 8), (2040, 8), (2047, 1)):
        request = rig.driver.read(sector, count)
        assert request.status == VIRTIO_BLK_S_OK
        assert request.used_len == 512 * count + 1
        assert request.data == data[512 * sector : 512 * (sector + count)]
    assert rig.device.completed["in"] == 4
    assert rig.device.bytes_read == 512 * 18


def test_write_sectors_reach_the_file(rig):
    before = rig.image()
    first, last = os.urandom(512), os.urandom(4096)
    assert rig.driver.write(0, first).status == VIRTIO_BLK_S_OK
    assert rig.driver.write(2040, last).status == VIRTIO_BLK_S_OK
    after = rig.image()
    assert after == first + before[512 : 2040 * 512] + last
    assert rig.driver.read(2040, 8).data == last
    assert rig.device.bytes_written == 512 + 4096


def test_chains_across_many_descriptors(rig):
    data = os.urandom(14 * 512)  # header + 14 data descriptors + status = the whole queue of 16
    r = rig.driver.write(100, data, segment=512)
    assert r.status == VIRTIO_BLK_S_OK
    assert rig.image()[100 * 512 : 114 * 512] == data
    # Odd descriptor sizes: the device slices the byte stream, not descriptors.
    r = rig.driver.read(100, 3, segment=300)
    assert r.status == VIRTIO_BLK_S_OK and r.data == data[: 3 * 512]


def test_indirect_tables(rig):
    data = os.urandom(64 * 512)
    assert rig.driver.write(300, data, segment=4096, indirect=True).status == VIRTIO_BLK_S_OK
    assert rig.image()[300 * 512 : 364 * 512] == data
    r = rig.driver.read(300, 14, segment=512, indirect=True)  # 16 entries in one table
    assert r.status == VIRTIO_BLK_S_OK and r.data == data[: 14 * 512]


def test_indirect_chain_longer_than_the_queue_is_refused(rig):
    before = rig.image()
    r = rig.driver.write(0, bytes(15 * 512), segment=512, indirect=True)  # 17 entries, queue of 16
    assert r.used_len == 0 and r.status == 0xFF  # untouched: no status written
    assert rig.image() == before
    assert rig.transport.stats.chain_errors == 1


def test_many_requests_in_one_notification(rig):
    d = rig.driver
    d.reset_heap()
    requests = [d.prepare(VIRTIO_BLK_T_IN, sector, in_len=512) for sector in range(5)]
    assert d.kick()
    d.ack_interrupt()
    d.finish(requests)
    image = rig.image()
    assert [r.data for r in requests] == [image[512 * s : 512 * (s + 1)] for s in range(5)]
    assert rig.transport.stats.notifications == 1 and rig.transport.stats.interrupts == 1
    assert rig.device.requests == 5


def test_flush_calls_fdatasync(rig, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    assert rig.driver.flush().status == VIRTIO_BLK_S_OK
    assert calls == [rig.backend.fd]


def test_get_id(image):
    r = Rig(image, serial="disk-0001")
    try:
        request = r.driver.get_id()
        assert request.status == VIRTIO_BLK_S_OK and request.used_len == 21
        assert request.data == b"disk-0001".ljust(20, b"\0")
    finally:
        r.close()


def test_get_id_without_serial_is_all_zero(rig):
    assert rig.driver.get_id().data == bytes(20)


def test_get_id_into_a_short_buffer(image):
    r = Rig(image, serial="0123456789abcdefghij")
    try:
        request = r.driver.request(blk.VIRTIO_BLK_T_GET_ID, in_len=8)
        assert request.status == VIRTIO_BLK_S_OK and request.data == b"01234567"
    finally:
        r.close()


def test_discard_needs_the_feature_negotiated_not_only_offered(image):
    r = Rig(image, features=~(1 << blk.VIRTIO_BLK_F_DISCARD) & ((1 << 64) - 1))
    try:
        assert r.device.features >> blk.VIRTIO_BLK_F_DISCARD & 1  # offered
        before = r.image()
        assert r.driver.discard([(8, 8)]).status == blk.VIRTIO_BLK_S_UNSUPP
        assert r.device.failed["request type not negotiated"] == 1 and r.image() == before
    finally:
        r.close()


def test_discard(rig):
    before = rig.image()
    assert rig.driver.discard([(8, 8), (64, 16)]).status == VIRTIO_BLK_S_OK
    after = rig.image()
    assert len(after) == DISK_SIZE
    # Discarded sectors may read as anything; the rest is untouched.
    assert after[: 8 * 512] == before[: 8 * 512] and after[80 * 512 :] == before[80 * 512 :]
    assert rig.device.completed["discard"] == 1


@pytest.mark.parametrize("flags", [0, blk.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP])
def test_write_zeroes(rig, flags):
    before = rig.image()
    assert rig.driver.write_zeroes([(1, 3), (2047, 1)], flags).status == VIRTIO_BLK_S_OK
    after = rig.image()
    assert after == before[:512] + bytes(3 * 512) + before[4 * 512 : 2047 * 512] + bytes(512)


@pytest.mark.parametrize(
    "ranges, flags, status",
    [
        ([(2047, 2)], 0, VIRTIO_BLK_S_IOERR),  # past the end
        ([(0, 1), (5000, 1)], 0, VIRTIO_BLK_S_IOERR),  # the second segment is bad: none is done
        ([(0, 1)] * 33, 0, VIRTIO_BLK_S_IOERR),  # too many segments
        ([(0, blk.MAX_DISCARD_SECTORS + 1)], 0, VIRTIO_BLK_S_IOERR),
        ([(0, 1)], 1, VIRTIO_BLK_S_UNSUPP),  # discard with the unmap flag
        ([(0, 1)], 0x80, VIRTIO_BLK_S_UNSUPP),  # unknown flag
        ([], 0, VIRTIO_BLK_S_IOERR),  # no segment at all
    ],
)
def test_bad_discards_change_nothing(rig, ranges, flags, status):
    before = rig.image()
    assert rig.driver.discard(ranges, flags).status == status
    if flags != blk.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:  # a valid flag for write-zeroes
        assert rig.driver.write_zeroes(ranges, flags).status == status
    assert rig.image() == before


def test_segment_list_not_multiple_of_16(rig):
    before = rig.image()
    assert rig.driver.request(blk.VIRTIO_BLK_T_DISCARD, out=bytes(20)).status == VIRTIO_BLK_S_IOERR
    assert rig.image() == before


# --- read-only disks, capacity, errors ------------------------------------------------------------
def test_read_only_disk(image):
    before = image.read_bytes()
    r = Rig(image, read_only=True)
    try:
        assert r.driver.offered >> blk.VIRTIO_BLK_F_RO & 1
        assert not r.driver.offered >> blk.VIRTIO_BLK_F_DISCARD & 1
        assert r.driver.read(0, 8).data == before[:4096]
        assert r.driver.write(0, bytes(512)).status == VIRTIO_BLK_S_IOERR
        assert r.driver.write_zeroes([(0, 8)]).status == VIRTIO_BLK_S_IOERR
        assert r.driver.discard([(0, 8)]).status == VIRTIO_BLK_S_IOERR
        assert r.driver.flush().status == VIRTIO_BLK_S_OK
        assert r.device.failed["write to a read-only disk"] == 3
        assert image.read_bytes() == before
    finally:
        r.close()


def test_capacity_rounds_down_and_warns(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(os.urandom(DISK_SIZE + 100))
    r = Rig(path)
    try:
        assert r.device.capacity == 2048
        assert r.driver.config(0, 8) == 2048
        assert len(r.device.warnings) == 1
        assert str(path) in r.device.warnings[0] and "100 bytes" in r.device.warnings[0]
        assert r.driver.read(2047, 1).status == VIRTIO_BLK_S_OK
        assert r.driver.read(2048, 1).status == VIRTIO_BLK_S_IOERR
    finally:
        r.close()


def test_exact_size_gives_no_warning(rig):
    assert rig.device.warnings == []


@pytest.mark.parametrize(
    "kind, sector, count",
    [
        (VIRTIO_BLK_T_IN, 2048, 1),
        (VIRTIO_BLK_T_IN, 2047, 2),
        (VIRTIO_BLK_T_OUT, 2047, 2),
        (VIRTIO_BLK_T_OUT, 2049, 1),
        (VIRTIO_BLK_T_OUT, (1 << 64) - 1, 1),  # sector*512 far past 2**64
        (VIRTIO_BLK_T_IN, 1 << 55, 1),  # sector*512 == 2**64
    ],
)
def test_beyond_capacity_is_ioerr(rig, kind, sector, count):
    before = rig.image()
    if kind == VIRTIO_BLK_T_IN:
        request = rig.driver.read(sector, count)
    else:
        request = rig.driver.write(sector, os.urandom(512 * count))
    assert request.status == VIRTIO_BLK_S_IOERR
    assert rig.image() == before
    assert rig.device.failed["beyond capacity"] == 1


def test_data_not_a_multiple_of_512(rig):
    before = rig.image()
    assert rig.driver.write(0, bytes(100)).status == VIRTIO_BLK_S_IOERR
    assert rig.driver.request(VIRTIO_BLK_T_IN, in_len=100).status == VIRTIO_BLK_S_IOERR
    assert rig.image() == before


@pytest.mark.parametrize("kind", [2, 3, 10, 14, 0xFFFFFFFF])
def test_unknown_request_type_is_unsupp(rig, kind):
    before = rig.image()
    request = rig.driver.request(kind, out=bytes(512))
    assert request.status == VIRTIO_BLK_S_UNSUPP and request.used_len == 1
    assert rig.image() == before


# --- interrupts and EVENT_IDX ---------------------------------------------------------------------------
def test_interrupt_status_and_ack(rig):
    d = rig.driver
    d.reset_heap()
    request = d.prepare(VIRTIO_BLK_T_IN, 0, in_len=512)
    d.kick()
    assert d.r32(mmio.INTERRUPT_STATUS) == mmio.INT_USED_RING
    assert rig.irq.pulses == 1
    d.w32(mmio.INTERRUPT_ACK, 1)
    assert d.r32(mmio.INTERRUPT_STATUS) == 0
    d.finish([request])
    assert request.status == VIRTIO_BLK_S_OK


def test_level_triggered_interrupt_follows_interrupt_status(image):
    r = Rig(image, level_triggered=True)
    try:
        r.driver.reset_heap()
        r.driver.prepare(VIRTIO_BLK_T_IN, 0, in_len=512)
        r.driver.kick()
        assert r.irq.level is True and r.irq.pulses == 0
        r.driver.ack_interrupt()
        assert r.irq.level is False
    finally:
        r.close()


def test_event_idx_delays_interrupts_until_used_event(rig):
    d = rig.driver
    d.read(0, 1)  # the first interrupt is always sent
    assert rig.irq.pulses == 1
    d.reset_heap()
    d.set_used_event(d.last_used + 2)  # like virtqueue_enable_cb_delayed: wake me after 3 more
    for sector in range(3):
        d.prepare(VIRTIO_BLK_T_IN, sector, in_len=512)
        d.kick()
    assert rig.transport.stats.notifications == 4
    assert rig.irq.pulses == 2  # one interrupt for three requests
    assert len(d.collect()) == 3


def test_no_interrupt_flag_without_event_idx(image):
    r = Rig(image, features=~EVENT_IDX & ((1 << 64) - 1))
    try:
        d = r.driver
        assert not d.event_idx
        d.read(0, 1)
        assert r.irq.pulses == 1
        r.memory.write_u16(AVAIL_RING, VIRTQ_AVAIL_F_NO_INTERRUPT)  # a polling driver
        d.reset_heap()
        for sector in range(3):
            d.prepare(VIRTIO_BLK_T_IN, sector, in_len=512)
            d.kick()
        assert r.irq.pulses == 1 and len(d.collect()) == 3
    finally:
        r.close()


@pytest.mark.parametrize("features", [None, ~EVENT_IDX & ((1 << 64) - 1)])
def test_notifications_suppressed_while_the_device_works(image, features):
    """A request added while the device is busy needs no notification, and is still served."""
    r = Rig(image, features=features)
    try:
        d = r.driver
        d.reset_heap()
        sent = []
        real = r.device.process_chain
        late = []

        def process_and_add_one(queue_index, chain, memory):
            if not late:  # another vCPU adds a request while we work on the first
                late.append(d.prepare(VIRTIO_BLK_T_IN, 1, in_len=512))
                saved, d.notify = d.notify, lambda queue=0: sent.append(queue)
                try:
                    d.kick()
                finally:
                    d.notify = saved
            return real(queue_index, chain, memory)

        r.device.process_chain = process_and_add_one
        first = d.prepare(VIRTIO_BLK_T_IN, 0, in_len=512)
        assert d.kick()
        assert sent == []  # the kick during processing was suppressed
        d.finish([first, late[0]])
        assert first.status == late[0].status == VIRTIO_BLK_S_OK
        assert r.transport.stats.notifications == 1 and r.irq.pulses == 1
    finally:
        r.close()


def test_counters_for_benchmarks(rig):
    for sector in range(4):
        rig.driver.read(sector, 1)
    assert (rig.transport.stats.notifications, rig.transport.stats.interrupts, rig.transport.requests) == (4, 4, 4)


# --- hostile chains: answered, never raised, the image untouched -------------------------------------------
HEADER_AT, DATA_AT, STATUS_AT, TABLE_AT = 0x10000, 0x11000, 0x12000, 0x13000


def out_header(rig, kind=VIRTIO_BLK_T_OUT, sector=0):
    rig.memory.write(HEADER_AT, blk.HEADER.pack(kind, 0, sector))
    rig.memory.write(DATA_AT, b"\x5a" * 4096)
    rig.memory.write_u8(STATUS_AT, 0xFF)


def hostile(rig, descriptors, head=0, *, table=None):
    """Write descriptors [(index, addr, len, flags, next)], publish ``head``, notify."""
    out_header(rig)
    for index, addr, length, flags, nxt in descriptors:
        rig.driver.write_desc(index, addr, length, flags, nxt)
    for index, addr, length, flags, nxt in table or ():
        rig.driver.write_desc(index, addr, length, flags, nxt, table=TABLE_AT)
    rig.driver.publish(head)
    rig.driver.notify()
    rig.driver.ack_interrupt()
    return rig.driver.collect()


HOSTILE = {
    "data outside RAM": [(0, HEADER_AT, 16, N, 1), (1, 0x4000_0000, 512, N, 2), (2, STATUS_AT, 1, W, 0)],
    "data straddles the end of RAM": [(0, HEADER_AT, 16, N, 1), (1, RAM_SIZE - 256, 512, N, 2),
                                      (2, STATUS_AT, 1, W, 0)],
    "addr+len overflows 2**64": [(0, HEADER_AT, 16, N, 1), (1, (1 << 64) - 256, 512, N, 2),
                                 (2, STATUS_AT, 1, W, 0)],
    "header outside RAM": [(0, (1 << 64) - 1, 16, N, 1), (1, STATUS_AT, 1, W, 0)],
    "loop": [(0, HEADER_AT, 16, N, 1), (1, DATA_AT, 512, N, 2), (2, DATA_AT, 512, N, 1)],
    "self loop": [(0, HEADER_AT, 16, N, 0)],
    "next past the queue": [(0, HEADER_AT, 16, N, 1), (1, DATA_AT, 512, N, 16)],
    "next far past the queue": [(0, HEADER_AT, 16, N, 0xFFFF)],
    "readable after writable": [(0, HEADER_AT, 16, N, 1), (1, STATUS_AT, 1, W | N, 2), (2, DATA_AT, 512, 0, 0)],
    "indirect with next": [(0, TABLE_AT, 32, I | N, 1), (1, STATUS_AT, 1, W, 0)],
    "indirect table outside RAM": [(0, RAM_SIZE - 16, 32, I, 0)],
    "indirect table of 17 entries": [(0, TABLE_AT, 16 * 17, I, 0)],
    "indirect length 0": [(0, TABLE_AT, 0, I, 0)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_chain_is_returned_unprocessed(rig, case):
    before = rig.image()
    completions = hostile(rig, HOSTILE[case])
    assert [(c.head, c.length) for c in completions] == [(0, 0)]
    assert rig.memory.read_u8(STATUS_AT) == 0xFF  # no status: the chain was never trusted
    assert rig.image() == before
    assert rig.transport.stats.chain_errors == 1
    assert not rig.driver.status & mmio.STATUS_NEEDS_RESET
    assert rig.driver.read(0, 1).data == before[:512]  # and the device goes on


def test_nested_indirect_table(rig):
    before = rig.image()
    completions = hostile(rig, [(0, TABLE_AT, 16, I, 0)], table=[(0, TABLE_AT, 16, I, 0)])
    assert [(c.head, c.length) for c in completions] == [(0, 0)]
    assert rig.image() == before


def test_zero_length_buffers(rig):
    before = rig.image()
    # An OUT whose data descriptors are all empty writes nothing and succeeds.
    completions = hostile(rig, [(0, HEADER_AT, 16, N, 1), (1, DATA_AT, 0, N, 2), (2, DATA_AT, 0, N, 3),
                                (3, STATUS_AT, 1, W, 0)])
    assert [(c.head, c.length) for c in completions] == [(0, 1)]
    assert rig.memory.read_u8(STATUS_AT) == VIRTIO_BLK_S_OK
    # An empty status descriptor: nowhere to put a status.
    completions = hostile(rig, [(0, HEADER_AT, 16, N, 1), (1, STATUS_AT, 0, W, 0)])
    assert [(c.head, c.length) for c in completions] == [(0, 0)]
    assert rig.image() == before


def test_writing_into_a_device_readable_buffer_is_refused(rig):
    """An IN whose data buffer the device may only read: IOERR, the buffer untouched."""
    before = rig.image()
    rig.memory.write(HEADER_AT, blk.HEADER.pack(VIRTIO_BLK_T_IN, 0, 0))
    rig.driver.write_desc(0, HEADER_AT, 16, N, 1)
    rig.driver.write_desc(1, DATA_AT, 512, N, 2)  # no WRITE flag
    rig.driver.write_desc(2, STATUS_AT, 1, W, 0)
    rig.memory.write(DATA_AT, b"\x5a" * 512)
    rig.driver.publish(0)
    rig.driver.notify()
    assert [(c.head, c.length) for c in rig.driver.collect()] == [(0, 1)]
    assert rig.memory.read_u8(STATUS_AT) == VIRTIO_BLK_S_IOERR
    assert rig.memory.read(DATA_AT, 512) == b"\x5a" * 512
    assert rig.image() == before
    assert rig.device.failed["data buffer in the wrong direction"] == 1


def test_out_with_a_device_writable_data_buffer_is_refused(rig):
    before = rig.image()
    completions = hostile(rig, [(0, HEADER_AT, 16, N, 1), (1, DATA_AT, 512, W | N, 2), (2, STATUS_AT, 1, W, 0)])
    assert [(c.head, c.length) for c in completions] == [(0, 1)]
    assert rig.memory.read_u8(STATUS_AT) == VIRTIO_BLK_S_IOERR
    assert rig.image() == before


def test_status_byte_not_writable(rig):
    before = rig.image()
    completions = hostile(rig, [(0, HEADER_AT, 16, N, 1), (1, DATA_AT, 512, N, 2), (2, STATUS_AT, 1, 0, 0)])
    assert [(c.head, c.length) for c in completions] == [(0, 0)]
    assert rig.memory.read_u8(STATUS_AT) == 0xFF
    assert rig.image() == before
    assert rig.device.failed["no status byte"] == 1


def test_header_too_short(rig):
    before = rig.image()
    completions = hostile(rig, [(0, HEADER_AT, 8, N, 1), (1, STATUS_AT, 1, W, 0)])
    assert [(c.head, c.length) for c in completions] == [(0, 1)]
    assert rig.memory.read_u8(STATUS_AT) == VIRTIO_BLK_S_IOERR
    assert rig.image() == before


def test_header_split_across_descriptors_is_fine(rig):
    data = os.urandom(512)
    rig.memory.write(HEADER_AT, blk.HEADER.pack(VIRTIO_BLK_T_OUT, 0, 7))
    rig.memory.write(DATA_AT, data)
    rig.driver.write_desc(0, HEADER_AT, 5, N, 1)
    rig.driver.write_desc(1, HEADER_AT + 5, 11, N, 2)
    rig.driver.write_desc(2, DATA_AT, 512, N, 3)
    rig.driver.write_desc(3, STATUS_AT, 1, W, 0)
    rig.driver.publish(0)
    rig.driver.notify()
    assert rig.driver.collect()[0].length == 1
    assert rig.image()[7 * 512 : 8 * 512] == data


def test_avail_idx_jumping_ahead_needs_reset(rig):
    before = rig.image()
    out_header(rig)
    rig.driver.write_desc(0, HEADER_AT, 16, N, 1)
    rig.driver.write_desc(1, DATA_AT, 512, N, 2)
    rig.driver.write_desc(2, STATUS_AT, 1, W, 0)
    rig.driver.set_avail_idx(rig.driver.avail_idx + 17)  # 17 new chains in a queue of 16?
    rig.driver.notify()
    assert rig.driver.status & mmio.STATUS_NEEDS_RESET
    assert rig.driver.r32(mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG
    assert rig.driver.used_idx() == 0  # nothing was taken from the ring
    assert rig.image() == before
    rig.driver.notify()  # ignored until reset
    assert rig.transport.stats.errors["notify while the device is not running"] == 1
    rig.driver.init()  # the driver resets the device: it works again
    assert rig.driver.status == 0xF
    assert rig.driver.read(0, 1).data == before[:512]


def test_requests_before_a_broken_entry_still_complete(rig):
    d = rig.driver
    d.reset_heap()
    good = d.prepare(VIRTIO_BLK_T_IN, 0, in_len=512)
    d.publish(16)  # then a head past the table
    d.notify()
    assert d.status & mmio.STATUS_NEEDS_RESET
    assert d.r32(mmio.INTERRUPT_STATUS) == mmio.INT_USED_RING | mmio.INT_CONFIG
    d.finish([good])
    assert good.status == VIRTIO_BLK_S_OK and good.data == rig.image()[:512]


def test_head_index_past_queue_needs_reset(rig):
    before = rig.image()
    rig.driver.publish(16)
    rig.driver.notify()
    assert rig.driver.status & mmio.STATUS_NEEDS_RESET
    assert rig.driver.used_idx() == 0
    assert rig.image() == before


def test_needs_reset_bit_cannot_be_cleared_by_the_driver(rig):
    rig.driver.publish(16)
    rig.driver.notify()
    rig.driver.w32(mmio.STATUS, 0xF)
    assert rig.driver.status & mmio.STATUS_NEEDS_RESET


# --- attach: virtio-blk through the device model ------------------------------------------------
class FakeMachine:
    def __init__(self):
        self.memory = GuestMemory([(0, RAM_SIZE)])
        self.mmio = Bus("mmio")
        self.closers = []


def attach_disks(machine, disks, irq_line, warn=None, notify="exit"):
    """The virtio-blk device type alone, as the builder makes it (vmm/devices/model.py)."""
    from vmm.config import VmConfig
    from vmm.devices.model import DeviceManager, Wiring
    from vmm.devices.virtio.attach import VIRTIO_BLK

    wiring = Wiring(machine, VmConfig(disks=tuple(disks), virtio_notify=notify), lambda data: None,
                    events=None, irq_lines=irq_line, warn=warn or (lambda message: None))
    return DeviceManager.build((VIRTIO_BLK,), wiring)


def test_attach_block_devices(tmp_path):
    paths = []
    for i, size in enumerate((DISK_SIZE, DISK_SIZE + 7)):
        path = tmp_path / f"d{i}.img"
        path.write_bytes(bytes(size))
        paths.append(path)
    machine = FakeMachine()
    warnings, irqs = [], []

    def irq_line(irq):
        irqs.append(irq)
        return FakeInterrupt()

    disks = (DiskConfig(str(paths[0])), DiskConfig(str(paths[1]), read_only=True, serial="B"))
    devices = attach_disks(machine, disks, irq_line, warn=warnings.append)
    assert devices.cmdline(acpi=False) == ["virtio_mmio.device=4K@0xd0000000:5",
                                           "virtio_mmio.device=4K@0xd0001000:6"]
    assert devices.cmdline(acpi=True) == []  # an ACPI guest finds them in the DSDT
    assert irqs == [5, 6]
    assert len(warnings) == 1 and str(paths[1]) in warnings[0]
    mappings = machine.mmio.mappings()
    assert [(m.base, m.length, m.name) for m in mappings] == [
        (0xD000_0000, 0x1000, "blk0"), (0xD000_1000, 0x1000, "blk1")]
    assert machine.mmio.read(0xD000_1000, 4) == struct.pack("<I", mmio.MAGIC_VALUE)
    assert machine.mmio.read(0xD000_1008, 4) == struct.pack("<I", 2)
    assert mappings[1].device.device.read_only
    assert [r.guest for r in devices.records()] == [{"read_only": False, "serial": ""},
                                                    {"read_only": True, "serial": "B"}]
    assert len(machine.closers) == 2
    for close in machine.closers:
        close()
    machine.memory.close()


def test_attach_fails_cleanly_on_a_missing_disk(tmp_path):
    good = tmp_path / "good.img"
    good.write_bytes(bytes(4096))
    machine = FakeMachine()
    with pytest.raises(DeviceError, match="no such file"):
        attach_disks(machine, (DiskConfig(str(good)), DiskConfig(str(tmp_path / "nope"))),
                     lambda irq: FakeInterrupt())
    assert len(machine.closers) == 1  # the first disk is closed by the machine
    for close in machine.closers:
        close()
    machine.memory.close()


def test_attach_refuses_too_many_disks(tmp_path):
    machine = FakeMachine()
    with pytest.raises(DeviceError, match="at most"):
        attach_disks(machine, (DiskConfig("x"),) * 9, lambda irq: FakeInterrupt())
    machine.memory.close()


def test_image_checksum_round_trip(rig):
    """A guest-style whole-disk read equals the host's checksum."""
    digest = hashlib.sha256()
    for sector in range(0, 2048, 64):
        digest.update(rig.driver.read(sector, 64, segment=4096, indirect=True).data)
    assert digest.hexdigest() == hashlib.sha256(rig.image()).hexdigest()
