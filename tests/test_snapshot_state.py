"""Snapshot parts without KVM: device states, the state file, the codec, the mailbox, the cache key.

Every device state must survive save → restore into a fresh device with the
same behaviour afterwards; every malformed state file must give one
SnapshotError naming the file, never another exception.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.config import DiskConfig, VmConfig
from vmm.devices.i8042 import CMD_READ_CTR, CMD_WRITE_CTR, COMMAND, DATA, I8042, I8042State
from vmm.devices.mailbox import (
    DESCRIPTOR, DESCRIPTOR_MAGIC, REQUEST_HEADER, REQUEST_MAGIC, SEED_BYTES, Mailbox, MailboxState,
    buffer_extents, deliver, encode_request,
)
from vmm.devices.rtc import CmosRtc, RtcState
from vmm.devices.serial import IER_RDA, LSR, LSR_DR, RBR_THR_DLL, IER_DLM, Serial16550, SerialState
from vmm.devices.virtio.block import VirtioBlock
from vmm.devices.disk import RawDiskImage
from vmm.devices.virtio.mmio import VirtioMmioTransport
from vmm.errors import SnapshotError, UsageError
from vmm.memory import GuestMemory
from vmm.snapshot import codec
from vmm.snapshot.cache import cache_key, warm_start_possible
from vmm.snapshot.state import FileIdentity, HostIdentity, SnapshotMeta, _device_states
from vmm.snapshot.statefile import FORMAT_VERSION, HEADER, decode_sections, encode_sections
from virtio_driver import RAM_SIZE, FakeInterrupt, MockDriver

PAGE = 4096


# --- device states -------------------------------------------------------------------------
def test_serial_state_round_trip_keeps_fifo_registers_and_interrupt() -> None:
    levels: list[bool] = []

    class Line:
        def set_level(self, high: bool) -> None:
            levels.append(high)

    uart = Serial16550(lambda data: None)
    uart.write(IER_DLM, bytes([IER_RDA]))
    uart.enqueue_input(b"hi")
    state = uart.state()
    assert state.rx_fifo == b"hi" and state.ier == IER_RDA and state.lsr & LSR_DR
    fresh = Serial16550(lambda data: None, Line())
    fresh.restore(state)
    assert fresh.state() == state
    assert levels[-1] is True  # data waiting + RDA enabled: the restored line is raised
    assert fresh.read(RBR_THR_DLL, 1) == b"h" and fresh.read(RBR_THR_DLL, 1) == b"i"
    assert not fresh.read(LSR, 1)[0] & LSR_DR


def test_serial_refuses_an_oversized_fifo() -> None:
    with pytest.raises(ValueError, match="FIFO"):
        Serial16550(lambda data: None).restore(SerialState(rx_fifo=bytes(65)))


def test_rtc_and_i8042_states_round_trip() -> None:
    rtc = CmosRtc()
    rtc.write(0, b"\x20")
    rtc.write(1, b"\x5a")
    fresh_rtc = CmosRtc()
    fresh_rtc.restore(rtc.state())
    assert fresh_rtc.state() == rtc.state() and fresh_rtc.state().ram[0x20] == 0x5A
    with pytest.raises(ValueError):
        fresh_rtc.restore(RtcState(0, bytes(3)))

    kbc = I8042(lambda: None)
    kbc.write(COMMAND, bytes([CMD_WRITE_CTR]))
    kbc.write(DATA, b"\x47")
    kbc.write(COMMAND, bytes([CMD_READ_CTR]))
    fresh = I8042(lambda: None)
    fresh.restore(kbc.state())
    assert fresh.state() == I8042State(output=0x47, ctr=0x47, expect_ctr=False)
    assert fresh.read(DATA, 1) == b"\x47"


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


class Disk:
    """Guest RAM and a disk backend, for transports that come and go over them (as a restore does)."""

    def __init__(self, path) -> None:
        self.path = path
        self.memory = GuestMemory([(0, RAM_SIZE)])
        self.backend = RawDiskImage(str(path))

    def transport(self) -> VirtioMmioTransport:
        return VirtioMmioTransport(VirtioBlock(self.backend), self.memory, FakeInterrupt(), name="vda")

    def running_driver(self) -> MockDriver:
        return MockDriver(self.transport(), self.memory).init()


@pytest.fixture
def rig(disk):
    r = Disk(disk)
    yield r
    r.backend.close()
    r.memory.close()


def test_virtio_transport_state_restored_into_a_new_transport_goes_on(rig) -> None:
    """Requests before and after: the restored transport knows its place in the rings."""
    driver = rig.running_driver()
    assert driver.read(0, 1).data == rig.path.read_bytes()[:512]
    state = driver.transport.state()
    assert state.queues[0].ready and state.queues[0].next_avail == 1
    # JSON and back, as the state file does.
    state = codec.decode(type(state), json.loads(json.dumps(codec.encode(state))), "t")
    driver.transport = restored = rig.transport()
    restored.restore(state)
    assert restored.state() == state
    assert driver.read(8, 2).data == rig.path.read_bytes()[4096:5120]
    assert sum(restored.stats.errors.values()) == 0


def test_virtio_restore_serves_a_request_whose_kick_was_lost(rig) -> None:
    """Published before the snapshot, kicked into an ioeventfd that died with the old VM."""
    driver = rig.running_driver()
    driver.reset_heap()
    pending = driver.prepare(0, sector=2, in_len=512)  # VIRTIO_BLK_T_IN, not kicked
    state = driver.transport.state()
    driver.transport = rig.transport()
    driver.transport.restore(state)
    driver.finish([pending])
    assert pending.status == 0 and pending.data == rig.path.read_bytes()[1024:1536]


def test_virtio_restore_refuses_rings_outside_memory(rig) -> None:
    state = rig.running_driver().transport.state()
    queue = dataclasses.replace(state.queues[0], used_ring=RAM_SIZE + PAGE)
    with pytest.raises(ValueError, match="outside guest RAM"):
        rig.transport().restore(dataclasses.replace(state, queues=(queue,)))


# --- the mailbox -----------------------------------------------------------------------------
def test_mailbox_signals_once_the_whole_descriptor_arrived() -> None:
    seen = []
    box = Mailbox(lambda address, length: seen.append((address, length)))
    descriptor = DESCRIPTOR.pack(0x7F00_1000, 65536, DESCRIPTOR_MAGIC)
    for offset, byte in enumerate(descriptor[:-1]):
        box.write(offset, bytes([byte]))
    assert seen == [] and box.state() == MailboxState(descriptor[:-1])
    restored = Mailbox(lambda address, length: seen.append((address, length)))
    restored.restore(box.state())  # a VM stopped mid-descriptor goes on after a restore
    restored.write(15, descriptor[-1:])
    assert seen == [(0x7F00_1000, 65536)] and restored.state() == MailboxState()


@pytest.mark.parametrize("descriptor, offsets", [
    (DESCRIPTOR.pack(0x1000, 4096, 0xDEADBEEF), range(16)),  # bad magic
    (DESCRIPTOR.pack(0x1000, 0, DESCRIPTOR_MAGIC), range(16)),  # empty buffer
    (DESCRIPTOR.pack(0x1000, 1 << 30, DESCRIPTOR_MAGIC), range(16)),  # absurd buffer
    (DESCRIPTOR.pack(0x1000, 4096, DESCRIPTOR_MAGIC), [0, 1, 2, 5, *range(4, 16)]),  # out of order
])
def test_mailbox_ignores_hostile_descriptors(descriptor, offsets) -> None:
    box = Mailbox(lambda address, length: pytest.fail("signalled"))
    for offset in offsets:
        box.write(offset, descriptor[offset:offset + 1])
    assert box.errors >= 1
    assert box.read(0, 1) == b"\xff"


def test_request_layout_is_what_init_reads() -> None:
    request = encode_request(("echo", "a b", "ü"), now_ns=1_700_000_000_123_456_789, seed=b"\x01" * 64)
    assert REQUEST_HEADER.size == 104  # init.c static-asserts sizeof(struct request) against this
    (magic, version, flags, argc, argv_bytes, sec, nsec, seed_bytes, seed, settings_bytes,
     _reserved) = REQUEST_HEADER.unpack_from(request)
    assert (magic, version, flags, argc, settings_bytes) == (REQUEST_MAGIC, 2, 0, 3, 0)
    assert (sec, nsec, seed_bytes, seed) == (1_700_000_000, 123_456_789, 64, b"\x01" * 64)
    assert request[REQUEST_HEADER.size:] == "echo\0a b\0ü\0".encode() and argv_bytes == len("echo\0a b\0ü\0".encode())
    assert REQUEST_HEADER.unpack_from(encode_request((), interactive=True))[2] == 1
    seed_at = REQUEST_HEADER.size - 8 - SEED_BYTES  # the seed, then settings bytes and reserved
    assert encode_request(("x",))[seed_at:seed_at + SEED_BYTES] != \
        encode_request(("x",))[seed_at:seed_at + SEED_BYTES]
    with pytest.raises(UsageError, match="NUL"):
        encode_request(("a\0b",))


def test_buffer_extents_follow_the_page_tables_and_merge_neighbours() -> None:
    pages = {0x7000_0000: 0x20_0000, 0x7000_1000: 0x20_1000, 0x7000_2000: 0x55_0000}
    translate = lambda va: pages.get(va & ~0xFFF, None) and pages[va & ~0xFFF] | (va & 0xFFF)  # noqa: E731
    assert buffer_extents(translate, 0x7000_0800, 0x2000) == [(0x20_0800, 0x1800), (0x55_0000, 0x800)]
    with pytest.raises(ValueError, match="not mapped"):
        buffer_extents(translate, 0x7000_2000, 0x2000)


def test_deliver_writes_across_pieces_and_refuses_what_does_not_fit() -> None:
    memory = GuestMemory([(0, 16 * PAGE)])
    try:
        extents = [(3 * PAGE, PAGE), (9 * PAGE, PAGE)]
        request = bytes(range(256)) * 24  # 6 KiB
        deliver(memory, extents, request)
        assert memory.read(3 * PAGE, PAGE) + memory.read(9 * PAGE, 2048) == request
        with pytest.raises(UsageError, match="mailbox holds 8192"):
            deliver(memory, extents, bytes(8193))
    finally:
        memory.close()


# --- the state file ------------------------------------------------------------------------------
SECTIONS = {"meta": b'{"a":1}', "vcpu0": b"x" * 100, "devices": b""}


def test_state_file_round_trip() -> None:
    data = encode_sections(SECTIONS)
    assert decode_sections(data, "vm.state") == SECTIONS
    assert HEADER.parse(data)["format"] == FORMAT_VERSION


@pytest.mark.parametrize("mangle, why", [
    (lambda d: b"", "empty file"),
    (lambda d: d[:20], "truncated"),
    (lambda d: d[:-7], r"truncated \(\d+ of \d+ bytes\)"),
    (lambda d: d + b"junk", "after the end"),
    (lambda d: b"NOTASNAP" + d[8:], "not a vmm snapshot"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum mismatch"),
    (lambda d: d[:8] + struct.pack("<I", FORMAT_VERSION + 1) + d[12:],
         f"format {FORMAT_VERSION + 1}, this vmm reads format {FORMAT_VERSION}"),
])
def test_bad_state_files_are_one_clear_error(mangle, why) -> None:
    with pytest.raises(SnapshotError, match=why) as error:
        decode_sections(mangle(encode_sections(SECTIONS)), "/snap/vm.state")
    assert str(error.value).startswith("/snap/vm.state: ")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_corruption_is_a_snapshot_error(data) -> None:
    good = bytearray(encode_sections(SECTIONS))
    position = data.draw(st.integers(0, len(good) - 1))
    good[position] ^= data.draw(st.integers(1, 255))
    try:
        decode_sections(bytes(good), "vm.state")
    except SnapshotError:
        return
    raise AssertionError(f"a flipped byte at {position} went unnoticed")


def test_sections_that_lie_about_their_length_are_refused() -> None:
    body = b"meta".ljust(24, b"\0") + struct.pack("<Q", 1 << 40)
    header = HEADER.build(magic=b"VMMSNAP\0", format=FORMAT_VERSION, sections=1, body_length=len(body),
                          body_crc32=zlib.crc32(body), reserved=0)
    with pytest.raises(SnapshotError, match="runs past the end"):
        decode_sections(header + body, "vm.state")


# --- the codec: types checked field by field -------------------------------------------------------
def _table(*ids_kinds: tuple[str, str]):
    """meta as _device_states reads it: the device table."""
    from types import SimpleNamespace

    from vmm.devices.model import DeviceRecord, Resources

    return SimpleNamespace(devices=tuple(DeviceRecord(i, k, Resources(), {}) for i, k in ids_kinds))


def test_device_states_round_trip_by_id_each_as_its_kinds_type() -> None:
    states = {"com1": SerialState(rx_fifo=b"ab"), "rtc": RtcState(), "i8042": I8042State(output=3),
              "mailbox": MailboxState(), "com2": SerialState(ier=1)}
    meta = _table(("com1", "serial"), ("com2", "serial"), ("i8042", "i8042"), ("rtc", "rtc"),
                  ("post", "post"), ("mailbox", "mailbox"))
    data = json.loads(json.dumps(codec.encode(states)))
    assert _device_states(meta, data, "vm.state") == states


@pytest.mark.parametrize("table, data, why", [
    ((("com1", "serial"),), {}, "devices: no state for com1"),
    ((("com1", "serial"),), {"com1": codec.encode(SerialState()), "rtc": {}},
     "'rtc' is not a device of meta.devices"),
    ((("post", "post"),), {"post": {}}, "'post' is not a device of meta.devices"),  # keeps none
    ((("x", "floppy"),), {}, "x is a 'floppy', a kind of device this vmm does not have"),
    ((("com1", "serial"), ("com1", "serial")), {"com1": codec.encode(SerialState())},
     "com1 twice"),
    ((("com1", "rtc"),), {"com1": codec.encode(SerialState())}, "devices.com1: unknown field"),
])
def test_device_states_refuse_what_the_table_does_not_say(table, data, why) -> None:
    with pytest.raises(SnapshotError, match=why):
        _device_states(_table(*table), data, "vm.state")


def test_a_restore_into_other_devices_names_the_device_and_the_field() -> None:
    from vmm.config import NetConfig, VmConfig
    from vmm.devices.model import check_same_devices, plan_devices
    from vmm.devices.platform import LINUX_DEVICES

    def table(config: VmConfig):
        return tuple(spec.record() for spec in plan_devices(LINUX_DEVICES, config))

    saved = table(VmConfig(nets=(NetConfig.parse("user"),)))
    check_same_devices(saved, table(VmConfig(nets=(NetConfig.parse("user"),))), "snap")
    for other, why in [
        (VmConfig(nets=(NetConfig.parse("user,offload=off"),)),
         "snap: device net0: features is .* in the snapshot, .* in this VM"),
        (VmConfig(nets=(NetConfig.parse("tap=x,mac=52:54:00:00:00:09"),)),
         "snap: device net0: backend is 'user' in the snapshot, 'tap' in this VM"),
        (VmConfig(), "snap: the snapshot's VM has device net0 .virtio-net., this one does not"),
        (VmConfig(nets=(NetConfig.parse("user"),), stderr_uart=True),
         "snap: this VM has device com2 .serial., the snapshot's does not"),
    ]:
        with pytest.raises(SnapshotError, match=why):
            check_same_devices(saved, table(other), "snap")


@pytest.mark.parametrize("change, why", [
    ({"ier": True}, "serial.ier: expected an integer"),
    ({"ier": "5"}, "serial.ier: expected an integer"),
    ({"rx_fifo": "zz"}, "serial.rx_fifo: not hex bytes"),
    ({"thr_interrupt": 1}, "serial.thr_interrupt: expected true or false"),
    ({"extra": 1}, "unknown field 'extra'"),
])
def test_codec_refuses_wrong_types(change, why) -> None:
    data = codec.encode(SerialState()) | change
    with pytest.raises(SnapshotError, match=why):
        codec.decode(SerialState, data, "serial")


def test_codec_refuses_missing_fields() -> None:
    data = codec.encode(SerialState())
    del data["lcr"]
    with pytest.raises(SnapshotError, match="missing field 'lcr'"):
        codec.decode(SerialState, data, "serial")


# --- the warm start's cache key ------------------------------------------------------------------------
HOST = HostIdentity("pvm", "AMD EPYC", "0" * 32)


@pytest.fixture
def guest_files(tmp_path):
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    return kernel, initrd


def test_cache_key_changes_with_what_shapes_the_guest(guest_files) -> None:
    kernel, initrd = guest_files
    base = VmConfig(command=("true",))
    key = cache_key(base, kernel, initrd, HOST)
    # The same guest, another command or run option: the same snapshot.
    same = dataclasses.replace(base, command=("echo", "x"), timeout=5.0, trace=True, stats=True,
                               runloop="python")
    assert cache_key(same, kernel, initrd, HOST) == key
    # Anything that shapes the guest: a new snapshot.
    for changed in (dataclasses.replace(base, mem=256 << 20), dataclasses.replace(base, cpus=2),
                    dataclasses.replace(base, cmdline="quiet"), dataclasses.replace(base, console_log=True),
                    dataclasses.replace(base, virtio_notify="exit")):
        assert cache_key(changed, kernel, initrd, HOST) != key, changed
    assert cache_key(base, kernel, None, HOST) != key
    assert cache_key(base, kernel, initrd, dataclasses.replace(HOST, cpuid_digest="1" * 32)) != key
    assert cache_key(base, kernel, initrd, dataclasses.replace(HOST, flavour="intel")) != key
    # A rebuilt kernel at the same path, same size: its ctime moved.
    kernel.write_bytes(b"kerneL")
    assert cache_key(base, kernel, initrd, HOST) != key


def test_cache_key_changes_with_vmm_itself(guest_files, monkeypatch) -> None:
    from vmm.snapshot import cache

    kernel, initrd = guest_files
    key = cache_key(VmConfig(), kernel, initrd, HOST)
    code = cache.vmm_code_identity()
    assert any(name == "snapshot/cache.py" for name, _, _ in code)
    monkeypatch.setattr(cache, "vmm_code_identity", lambda: code[:-1])
    assert cache_key(VmConfig(), kernel, initrd, HOST) != key


def test_writable_disks_boot_cold_read_only_ones_may_be_warm(tmp_path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    assert warm_start_possible(VmConfig()) is None
    assert warm_start_possible(VmConfig(disks=(DiskConfig(str(image), read_only=True),))) is None
    assert "writable" in warm_start_possible(VmConfig(disks=(DiskConfig(str(image)),)))


def test_file_identity_sees_writes_and_replacement(tmp_path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"a" * 4096)
    identity = FileIdentity.of(path)
    assert identity.changed() is None
    with open(path, "r+b") as f:
        f.write(b"b")
    assert identity.changed() == "it was written since"
    path.unlink()
    assert identity.changed() == "it no longer exists"
    path.write_bytes(b"a" * 4096)
    assert FileIdentity.of(path).changed() is None


def test_snapshot_meta_refuses_nonsense_types() -> None:
    data = {f.name: None for f in dataclasses.fields(SnapshotMeta)}
    data |= {"vmm_version": "0", "created_ns": 0, "host": codec.encode(HOST), "mem": "128M"}
    with pytest.raises(SnapshotError, match="meta.mem: expected an integer"):
        codec.decode(SnapshotMeta, data, "meta")


def test_guest_memory_saved_sparse_and_mapped_back(tmp_path) -> None:
    memory = GuestMemory([(0, 64 * PAGE), (1 << 32, 16 * PAGE)])
    path = tmp_path / "memory"
    try:
        memory.write(5 * PAGE + 3, b"hello")
        memory.write((1 << 32) + 2 * PAGE, b"high")
        memory.write(9 * PAGE, bytes(PAGE))  # touched, but zeros: stays a hole
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            written = memory.save(fd)
        finally:
            os.close(fd)
        assert written == 2 * PAGE and path.stat().st_size == 80 * PAGE
        assert path.stat().st_blocks * 512 <= 4 * PAGE
        fd = os.open(path, os.O_RDONLY)
        try:
            copy = GuestMemory([(0, 64 * PAGE), (1 << 32, 16 * PAGE)], backing_fd=fd)
        finally:
            os.close(fd)
        assert copy.read(5 * PAGE + 3, 5) == b"hello" and copy.read((1 << 32) + 2 * PAGE, 4) == b"high"
        copy.write(5 * PAGE, b"private")  # MAP_PRIVATE: the file never changes
        assert Path(path).read_bytes()[5 * PAGE:5 * PAGE + 7] == bytes(3) + b"hell"
        copy.close()
    finally:
        memory.close()
