"""The files a user names for a Linux guest, checked before anything else is done with them.

A run reaches these files by several paths: the cold boot reads them, the
warm start names them in its snapshot's cache key, ``vmm snapshot create``
boots on them, ``--restore`` attaches the disks. Each path calls
:func:`check_guest_files` first, so a bad file gets the same one line on all
of them (``vmm: PATH: what is wrong``, exit 125) before a progress line, a
cache lookup or KVM. The checks read a few KiB: a kernel is a bzImage or an
ELF, an initrd a cpio archive or one of the compressed formats the kernel
unpacks, a disk a non-empty regular file or block device nobody else holds.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vmm.errors import LoaderError, unreadable

HEADER_BYTES = 4096
# What an initramfs starts with: a cpio archive (newc, newc with CRC, odc, binary in
# either byte order) or a compressed one, in the formats Linux's unpacker knows
# (lib/decompress.c). Debian's initrds start with an uncompressed cpio of microcode.
INITRD_MAGICS = {
    b"070701": "cpio", b"070702": "cpio", b"070707": "cpio", b"\xc7\x71": "cpio",
    b"\x71\xc7": "cpio", b"\x1f\x8b": "gzip", b"\x1f\x9e": "gzip", b"BZh": "bzip2",
    b"\x5d\x00\x00": "lzma", b"\xfd7zXZ\x00": "xz", b"\x89LZO": "lzo",
    b"\x02\x21\x4c\x18": "lz4", b"\x28\xb5\x2f\xfd": "zstd",
}


def read_header(path: str | Path, what: str) -> bytes:
    """The file's first bytes; LoaderError if it is missing, not a file, unreadable or empty.

    ``what`` with its article: "a kernel".
    """
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise LoaderError(f"{path}: not a regular file, not {what}")
            header = f.read(HEADER_BYTES)
    except IsADirectoryError:
        raise LoaderError(f"{path}: is a directory, not {what}") from None
    except OSError as e:
        raise LoaderError(unreadable(path, e)) from None
    if not header:
        raise LoaderError(f"{path}: empty file, not {what}")
    return header


def check_kernel(path: str | Path) -> None:
    header = read_header(path, "a kernel")
    from vmm.loader.elf import is_elf

    if not (is_elf(header) or header[0x202:0x206] == b"HdrS"):
        raise LoaderError(f"{path}: not a kernel: neither a bzImage (no 'HdrS' header) nor an ELF")


def initrd_format(header: bytes) -> str | None:
    """The format an initrd's first bytes name (NUL padding skipped, as the kernel does)."""
    start = header.lstrip(b"\0")
    for magic, name in INITRD_MAGICS.items():
        if start.startswith(magic):
            return name
    return None


def check_initrd(path: str | Path) -> None:
    if initrd_format(read_header(path, "an initrd")) is None:
        names = ", ".join(sorted(set(INITRD_MAGICS.values()) - {"cpio"}))
        raise LoaderError(f"{path}: not an initramfs: neither a cpio archive nor a compressed "
                          f"one ({names})")


def check_disks(disks) -> None:
    """Each disk opened as the VM will open it (locked, checked), then let go again; an
    empty one is refused (vmm's own empty placeholder, the container base's, is not a
    user's disk and does not come through here)."""
    from vmm.devices.disk import RawDiskImage

    for disk in disks:
        image = RawDiskImage(disk.path, disk.read_only)
        size = image.size
        image.close()
        if size == 0:
            raise LoaderError(f"{disk.path}: empty file: a disk image holds at least one "
                              "512-byte sector")


def check_guest_files(config, *, disks: bool = True) -> None:
    """Every file a Linux guest's configuration names, before anything else uses them.

    ``disks``: False where the devices open the disks themselves next (the builder).
    """
    if config.kernel:
        check_kernel(config.kernel)
    if config.initrd and config.initrd != "none":
        check_initrd(config.initrd)
    if disks:
        check_disks(config.disks)
