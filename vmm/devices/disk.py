"""Disk backends: where a virtio-blk device's sectors live on the host.

A backend is a byte-addressed store with vectored I/O into caller buffers
(guest RAM views, so no copy), flush, discard and write-zeroes. The device
checks every offset against :attr:`size` before it calls here; the backend
still refuses what is out of range, because it is cheap and the file is the
thing we must never damage.

:class:`RawDiskImage` is a raw image file (or a block device). Opening one is
where the user's mistakes show up, so every refusal is a one-line
:class:`DeviceError` that names the path, and nothing is opened for writing
until every check has passed: the existence and type checks, then a read-only
open that takes the advisory lock (``flock``: exclusive for a read-write disk,
shared for read-only ones, so several VMs can share a read-only image but never
one that someone writes), and only then the read-write open.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from typing import Protocol, Sequence

from vmm.errors import DeviceError

IOV_MAX = 1024  # Linux's limit on the buffers of one preadv/pwritev

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = 1 << 20


class DiskBackend(Protocol):
    """What a block device needs of its storage."""

    size: int  # bytes
    read_only: bool

    def read_into(self, offset: int, views: Sequence[memoryview]) -> None: ...

    def write_from(self, offset: int, views: Sequence[memoryview]) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None: ...

    def close(self) -> None: ...


def _libc_fallocate():
    libc = ctypes.CDLL(None, use_errno=True)
    function = libc.fallocate
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode flags (os.posix_fallocate has none)."""
    global _fallocate
    if _fallocate is None:
        _fallocate = _libc_fallocate()
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class RawDiskImage:
    """A raw disk image: byte N of the disk is byte N of the file."""

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = str(path)
        self.read_only = read_only
        self._lock_fd = -1
        self.fd = -1
        self.block_device = False
        self._open()
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def _fail(self, why: str) -> DeviceError:
        return DeviceError(f"{self.path}: {why}")

    def _open(self) -> None:
        path = self.path
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise self._fail("no such file") from None
        except PermissionError:
            raise self._fail("permission denied") from None
        except OSError as e:
            raise self._fail(e.strerror or str(e)) from None
        self._check_type(info.st_mode)
        need = os.R_OK if self.read_only else os.R_OK | os.W_OK
        if not os.access(path, need):
            hint = "" if self.read_only else " (not writable: add ,ro for a read-only disk)"
            raise self._fail(f"permission denied{hint}")

        # The lock goes on a read-only descriptor: a conflict is found before
        # anything is opened for writing.
        try:
            self._lock_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise self._fail(e.strerror or str(e)) from None
        try:
            locked = os.fstat(self._lock_fd)
            self._check_type(locked.st_mode)
            mode = fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX
            try:
                fcntl.flock(self._lock_fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._fail("in use by another vmm") from None
            except OSError as e:
                raise self._fail(f"cannot lock: {e.strerror}") from None
            if self.read_only:
                self.fd = self._lock_fd
                return
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise self._fail(e.strerror or str(e)) from None
            opened = os.fstat(self.fd)
            if (opened.st_dev, opened.st_ino) != (locked.st_dev, locked.st_ino):
                raise self._fail("replaced while it was being opened")
        except BaseException:
            self.close()
            raise

    def _check_type(self, mode: int) -> None:
        if stat.S_ISDIR(mode):
            raise self._fail("is a directory")
        if stat.S_ISBLK(mode):
            self.block_device = True
        elif not stat.S_ISREG(mode):
            raise self._fail("not a regular file or block device")

    # --- I/O --------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"{offset:#x}+{length:#x} is past the end of {self.path}")

    def read_into(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill every view from the image, starting at ``offset``."""
        self._check(offset, sum(len(v) for v in views))
        self._vectored(os.preadv, offset, views)

    def write_from(self, offset: int, views: Sequence[memoryview]) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is read-only")
        self._check(offset, sum(len(v) for v in views))
        self._vectored(os.pwritev, offset, views)

    def _vectored(self, call, offset: int, views: Sequence[memoryview]) -> None:
        """preadv/pwritev until every byte is done (they may do less than asked)."""
        pending = [v for v in views if len(v)]
        while pending:
            done = call(self.fd, pending[:IOV_MAX], offset)
            if done == 0:
                raise OSError(errno.EIO, f"{self.path}: unexpected end of file at {offset:#x}")
            offset += done
            while pending and done >= len(pending[0]):
                done -= len(pending[0])
                pending.pop(0)
            if done:
                pending[0] = pending[0][done:]

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Forget these bytes if the file system can (a hint: never fails for lack of support)."""
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is read-only")
        self._check(offset, length)
        if self.block_device or not length:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make these bytes read as zero: punch a hole if allowed, else zero-range, else write."""
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is read-only")
        self._check(offset, length)
        if not length:
            return
        if not self.block_device:
            modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
            if unmap:
                modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            for mode in modes:
                try:
                    fallocate(self.fd, mode, offset, length)
                    return
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
        zeroes = bytes(min(length, _ZERO_CHUNK))
        while length:
            n = min(length, len(zeroes))
            self._vectored(os.pwritev, offset, [memoryview(zeroes)[:n]])
            offset += n
            length -= n

    def close(self) -> None:
        """Close the image (and so drop the lock). Safe to call twice."""
        for fd in {self.fd, self._lock_fd} - {-1}:
            os.close(fd)
        self.fd = self._lock_fd = -1

    def __enter__(self) -> "RawDiskImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"RawDiskImage({self.path!r}, {mode}, {self.size} bytes)"


def copy_image(source: str | os.PathLike, target: str | os.PathLike) -> int:
    """Copy a disk image, its holes kept holes; returns the bytes of data copied.

    A container's root image is mostly empty space (room for its writes):
    only the extents with data are copied (SEEK_DATA/SEEK_HOLE, then
    copy_file_range, which a file system may do without reading), and the
    target is truncated to the source's size. ``target`` is created anew
    (an existing file is refused: an image is never copied over another one).
    """
    copied = 0
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(dst, size)
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(src, offset, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # nothing but a hole up to the end
                        break
                    raise
                end = os.lseek(src, start, os.SEEK_HOLE)
                position = start
                while position < end:
                    done = os.copy_file_range(src, dst, end - position, position, position)
                    if done == 0:
                        raise OSError(errno.EIO, f"{source}: shorter than it was")
                    position += done
                copied += end - start
                offset = end
        except BaseException:
            os.close(dst)
            os.unlink(target)
            raise
        os.close(dst)
    finally:
        os.close(src)
    return copied
