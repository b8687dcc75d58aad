"""Decompress on the host what a guest would decompress in its own, emulated, kernel code.

A bzImage carries its kernel compressed: its first code, the decompressor,
runs in the guest, and on PVM every one of its instructions goes through
KVM's emulator (our LZ4 bzImage: 28 s to /init against 11 s for its vmlinux;
a gzip one spent 118 s before its first exit). The same payload decompresses
on the host in a fraction of a second into the ELF vmlinux, which vmm starts
by its PVH entry (a distribution's kernel has one: ``CONFIG_PVH``).

* :func:`vmlinux_of`: the payload of a bzImage (the setup header's
  ``payload_offset``/``payload_length``), by its magic: gzip, bzip2, lzma, xz
  (Python's own modules), lz4, zstd, lzo (Debian's ``lz4``, ``zstd``,
  ``lzop``: installed as root on Debian when missing).
* :func:`plain_initrd`: an initramfs as the kernel's unpacker reads it: a
  series of cpio archives, each plain or compressed (Debian's: an early
  microcode cpio, then a zstd one), with NUL padding between; the result is
  the same archives, all plain.

Both are cached by the input's content in ``~/.cache/vmm/decompressed``,
written to a temporary name and renamed: an error leaves nothing behind.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

from vmm.errors import LoaderError

MAGICS = (  # what a compressed stream starts with (the kernel's lib/decompress.c)
    (b"\x1f\x8b", "gzip"), (b"\x1f\x9e", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"), (b"\x89LZO", "lzo"), (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
TOOLS = {"lz4": ("lz4", "lz4"), "zstd": ("zstd", "zstd"), "lzo": ("lzop", "lzop")}  # format: (tool, package)
CPIO_MAGICS = (b"070701", b"070702")  # newc, and newc with checksums: what Linux unpacks
CPIO_TRAILER = b"TRAILER!!!"
_CHUNK = 1 << 20


def compression(data: bytes) -> str | None:
    for magic, name in MAGICS:
        if data.startswith(magic):
            return name
    return None


def _cache_dir() -> Path:
    from vmm.cache import cache_dir

    return cache_dir() / "decompressed"


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def _with_tool(name: str, data: bytes, what: str, progress) -> bytes:
    """lz4, zstd, lzop: the host's tool, given the whole stream (trailing bytes tolerated)."""
    tool, package = TOOLS[name]
    found = shutil.which(tool)
    if found is None:
        from vmm.images.host import ensure_packages

        ensure_packages([package], progress)
        found = shutil.which(tool)
    if found is None:
        raise LoaderError(f"{what} is {name}-compressed: decompressing it needs {tool} "
                          f"(apt-get install {package})")
    result = subprocess.run([found, "-d", "-c", "-q"], input=data, capture_output=True)
    if result.returncode != 0:
        last = (result.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        raise LoaderError(f"{what}: its {name} stream does not decompress: {last}")
    return result.stdout


def _decompress_stream(name: str, data: bytes, what: str, progress) -> tuple[bytes, bytes]:
    """(the decompressed stream, the bytes after it). Python's own decompressors know where
    their stream ends; a tool's does not, so it gets everything and leaves nothing."""
    try:
        if name == "gzip":
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = decompressor.decompress(data)
            if not decompressor.eof:
                raise LoaderError(f"{what}: its gzip stream is cut short")
            return out, decompressor.unused_data
        if name in ("xz", "lzma", "bzip2"):
            stream = (bz2.BZ2Decompressor() if name == "bzip2" else lzma.LZMADecompressor(
                lzma.FORMAT_XZ if name == "xz" else lzma.FORMAT_ALONE))
            out = stream.decompress(data)
            if not stream.eof:
                raise LoaderError(f"{what}: its {name} stream is cut short")
            return out, stream.unused_data
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as e:
        raise LoaderError(f"{what}: its {name} stream does not decompress: {e}") from None
    return _with_tool(name, data, what, progress), b""


def _cached(target: Path, make: Callable[[], bytes], check: Callable[[bytes], None]) -> bool:
    """``target`` made (and checked) if missing; True if it was made now. Written under a
    temporary name and renamed: an error leaves nothing in the cache."""
    if target.is_file():
        return False
    data = make()
    check(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


def vmlinux_of(bzimage: Path, progress: Callable[[str], None]) -> Path | None:
    """The ELF vmlinux inside a bzImage (cached), or None if its payload is not compressed
    in a way vmm knows to be a kernel (then it boots as a bzImage). LoaderError for a
    payload that claims a format and does not decompress to an ELF."""
    from vmm.loader.bzimage import parse_bzimage

    data = bzimage.read_bytes()
    image = parse_bzimage(data, str(bzimage))
    offset, length = image.header["payload_offset"], image.header["payload_length"]
    if not offset or not length or offset + length > len(image.kernel):
        return None  # a protocol < 2.08 or an odd image: the bzImage path
    payload = image.kernel[offset:offset + length]
    name = compression(payload)
    if name is None:
        raise LoaderError(f"{bzimage}: its kernel payload is compressed in a way vmm does not "
                          f"know (starts {payload[:6].hex(' ')})")
    what = f"{bzimage}: its kernel payload"
    started = time.monotonic()
    # Every format but gzip (which has its own) is followed by the decompressed size, 32
    # bits (the kernel's size_append): the stream is the rest, and the size checks it.
    sized = name != "gzip" and len(payload) > 4
    stream = payload[:-4] if sized else payload
    expected = int.from_bytes(payload[-4:], "little") if sized else None

    def make() -> bytes:
        elf = _decompress_stream(name, stream, what, progress)[0]
        if expected is not None and len(elf) != expected:
            raise LoaderError(f"{what} ({name}) decompresses to {len(elf)} bytes, its "
                              f"header says {expected}: damaged")
        return elf

    def check(elf: bytes) -> None:
        if not elf.startswith(b"\x7fELF"):
            raise LoaderError(f"{what} ({name}) decompresses to something that is not an "
                              "ELF vmlinux")

    path = _cache_dir() / "vmlinux" / _digest(bzimage)
    if _cached(path, make, check):
        progress(f"{bzimage}: its {name} payload decompressed on the host into {path} "
                 f"({path.stat().st_size >> 20} MiB) in {time.monotonic() - started:.2f} s")
    return path


def plain_initrd(initrd: Path, progress: Callable[[str], None]) -> Path:
    """The initramfs as plain cpio archives (the same path if it is one already)."""
    head = initrd.read_bytes()[:8].lstrip(b"\0")
    if head.startswith(CPIO_MAGICS) and not _has_compressed_part(initrd):
        return initrd
    started = time.monotonic()

    def make() -> bytes:
        return b"".join(_archives(initrd.read_bytes(), str(initrd), progress))

    def check(data: bytes) -> None:
        if not data.startswith(CPIO_MAGICS):
            raise LoaderError(f"{initrd}: not a cpio archive after decompression")

    path = _cache_dir() / "initrd" / (_digest(initrd) + ".cpio")
    if _cached(path, make, check):
        progress(f"{initrd}: decompressed on the host into {path} "
                 f"({path.stat().st_size >> 20} MiB of cpio) in {time.monotonic() - started:.2f} s")
    return path


def _has_compressed_part(initrd: Path) -> bool:
    """A plain cpio start followed by a compressed archive (Debian's microcode prefix)."""
    data = initrd.read_bytes()
    end = _cpio_end(data, 0)
    rest = data[end:].lstrip(b"\0") if end is not None else b""
    return bool(rest) and compression(rest) is not None


def _cpio_end(data: bytes, start: int) -> int | None:
    """Where the newc archive starting at ``start`` ends (after its trailer, 4-aligned)."""
    position = start
    while data[position:position + 6] in CPIO_MAGICS:
        header = data[position:position + 110]
        if len(header) < 110:
            return None
        try:
            size, name_size = int(header[54:62], 16), int(header[94:102], 16)
        except ValueError:
            return None
        name_start = position + 110
        name = data[name_start:name_start + name_size - 1]
        body = (name_start + name_size + 3) & ~3
        position = (body + size + 3) & ~3
        if name == CPIO_TRAILER:
            return position
    return None


def _archives(data: bytes, name: str, progress) -> list[bytes]:
    """Each archive of the initramfs, plain: what the kernel's unpacker would see."""
    out, position = [], 0
    while position < len(data):
        if data[position] == 0:  # padding between archives
            position += 1
            continue
        if data[position:position + 6] in CPIO_MAGICS:
            end = _cpio_end(data, position)
            if end is None:
                raise LoaderError(f"{name}: a cpio archive at offset {position} is cut short")
            out.append(data[position:end])
            position = end
            continue
        kind = compression(data[position:])
        if kind is None:
            raise LoaderError(f"{name}: at offset {position}, neither a cpio archive nor a "
                              "compressed one")
        plain, rest = _decompress_stream(kind, data[position:],
                                         f"{name}: the archive at offset {position}", progress)
        out += _archives(plain, name, progress)
        position = len(data) - len(rest)
    return out
