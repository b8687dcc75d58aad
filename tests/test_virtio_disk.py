"""The raw disk backend: one-line refusals, advisory locks, nothing opened for writing too early."""

from __future__ import annotations

import os

import pytest

from vmm.devices import disk as disk_module
from vmm.devices.disk import RawDiskImage
from vmm.errors import DeviceError


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(64 * 1024))
    return path


def open_flags(monkeypatch):
    """Record the flags of every os.open the backend makes."""
    calls = []
    real = os.open

    def recording_open(path, flags, *args, **kwargs):
        calls.append((str(path), flags))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(disk_module.os, "open", recording_open)
    return calls


def writable(flags: int) -> bool:
    return flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)


def test_read_write_round_trip(image):
    with RawDiskImage(str(image)) as disk:
        assert disk.size == 64 * 1024
        data = bytearray(os.urandom(1024))
        disk.write_from(512, [memoryview(data)[:100], memoryview(data)[100:]])
        out = [bytearray(512), bytearray(512)]
        disk.read_into(512, [memoryview(b) for b in out])
        assert bytes(out[0] + out[1]) == bytes(data)
        disk.flush()
    assert image.read_bytes()[512:1536] == bytes(data)


def test_refuses_past_the_end(image):
    with RawDiskImage(str(image)) as disk:
        with pytest.raises(OSError):
            disk.read_into(64 * 1024 - 10, [memoryview(bytearray(20))])
        with pytest.raises(OSError):
            disk.write_from(-1, [memoryview(bytearray(1))])
        with pytest.raises(OSError):
            disk.write_zeroes(64 * 1024, 1)
    assert image.stat().st_size == 64 * 1024


def test_write_zeroes_and_discard_keep_the_size(image):
    with RawDiskImage(str(image)) as disk:
        disk.write_zeroes(4096, 8192)
        disk.write_zeroes(0, 100, unmap=True)
        disk.discard(32768, 4096)
    data = image.read_bytes()
    assert len(data) == 64 * 1024
    assert data[4096:12288] == bytes(8192) and data[:100] == bytes(100)


def test_write_zeroes_falls_back_to_writing(image, monkeypatch):
    def unsupported(*args):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(disk_module, "fallocate", unsupported)
    with RawDiskImage(str(image)) as disk:
        disk.write_zeroes(1000, 3000, unmap=True)
        disk.discard(0, 4096)  # a hint: no support is no error
    assert image.read_bytes()[1000:4000] == bytes(3000)


def test_read_only_image_refuses_writes_and_opens_nothing_writable(image, monkeypatch):
    calls = open_flags(monkeypatch)
    before = image.read_bytes()
    with RawDiskImage(str(image), read_only=True) as disk:
        for call in (lambda: disk.write_from(0, [memoryview(bytearray(512))]),
                     lambda: disk.write_zeroes(0, 512), lambda: disk.discard(0, 512)):
            with pytest.raises(OSError):
                call()
        disk.flush()
    assert calls and not any(writable(flags) for _, flags in calls)
    assert image.read_bytes() == before


def test_missing_file(tmp_path):
    with pytest.raises(DeviceError, match=r"nope\.img: no such file$"):
        RawDiskImage(str(tmp_path / "nope.img"))


def test_directory(tmp_path):
    with pytest.raises(DeviceError, match="is a directory"):
        RawDiskImage(str(tmp_path))


def test_fifo_is_not_a_disk(tmp_path, monkeypatch):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    calls = open_flags(monkeypatch)
    with pytest.raises(DeviceError, match="not a regular file or block device"):
        RawDiskImage(str(fifo))
    assert calls == []  # refused before opening (opening a FIFO would block)


def test_no_permission(image, monkeypatch):
    # Tests may run as root, for whom every file is writable: simulate the check.
    monkeypatch.setattr(disk_module.os, "access", lambda path, mode: not mode & os.W_OK)
    calls = open_flags(monkeypatch)
    with pytest.raises(DeviceError, match=r"permission denied \(not writable: add ,ro"):
        RawDiskImage(str(image))
    assert calls == []
    RawDiskImage(str(image), read_only=True).close()  # read-only is fine


def test_error_is_one_line_naming_the_path(tmp_path):
    with pytest.raises(DeviceError) as info:
        RawDiskImage(str(tmp_path / "missing"))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "missing") + ": ")


def test_lock_conflicts(image, monkeypatch):
    first = RawDiskImage(str(image))
    try:
        calls = open_flags(monkeypatch)
        for read_only in (False, True):
            with pytest.raises(DeviceError, match="in use by another vmm"):
                RawDiskImage(str(image), read_only=read_only)
        assert not any(writable(flags) for _, flags in calls)  # nothing opened for writing
    finally:
        first.close()
    RawDiskImage(str(image)).close()  # the lock went with the close


def test_read_only_images_can_be_shared_but_not_written(image):
    a = RawDiskImage(str(image), read_only=True)
    b = RawDiskImage(str(image), read_only=True)
    try:
        with pytest.raises(DeviceError, match="in use"):
            RawDiskImage(str(image))
    finally:
        a.close()
        b.close()


def test_failed_open_leaks_no_descriptor(image):
    held = RawDiskImage(str(image))
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            with pytest.raises(DeviceError):
                RawDiskImage(str(image))
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        held.close()


def test_close_twice(image):
    disk = RawDiskImage(str(image))
    disk.close()
    disk.close()
    assert disk.fd == -1
    # The lock went with it: another read-write open succeeds.
    RawDiskImage(str(image)).close()
