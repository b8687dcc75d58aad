"""The state file (``vm.state``): a versioned, checksummed list of named sections.

Layout, all little-endian::

    header   magic "VMMSNAP\\0" | format u32 | sections u32 | body length u64 | body CRC-32 u32 | 0 u32
    body     section*
    section  name (24 bytes, NUL-padded ASCII) | length u64 | payload

The header says which format wrote the file (an older or newer vmm refuses
it with the two numbers) and how long the body is (a truncated file is told
apart from a corrupted one); the CRC-32 over the body catches corruption.
Sections are JSON (``meta``, ``devices``) or the raw bytes of a KVM structure
(``vcpu0.regs``...): see vmm/snapshot/state.py for what each holds.

Why not construct, which vmm uses for the bzImage header: importing it costs
~20 ms, a third of a restore's start-up budget; these two fixed headers are
plain ``struct`` (vmm/packed.py).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from vmm.errors import SnapshotError, unreadable
from vmm.packed import Packed

MAGIC = b"VMMSNAP\0"
FORMAT_VERSION = 4  # 2: devices.stderr_serial (the second UART); 3: meta.nics;
# 4: the device table (meta.devices) and states by device id
HEADER = Packed(("magic", "8s"), ("format", "I"), ("sections", "I"), ("body_length", "Q"),
                ("body_crc32", "I"), ("reserved", "I"))
SECTION = Packed(("name", "24s"), ("length", "Q"))
MAX_SECTIONS = 4096  # far more than 8 vCPUs and every device need
MAX_BODY = 64 << 20  # a state file is tens of KiB; guest RAM is in its own file


def encode_sections(sections: dict[str, bytes]) -> bytes:
    body = bytearray()
    for name, payload in sections.items():
        raw = name.encode("ascii")
        if not 0 < len(raw) <= 24:
            raise ValueError(f"section name {name!r}: 1 to 24 ASCII characters")
        body += SECTION.build(name=raw, length=len(payload)) + payload
    header = HEADER.build(magic=MAGIC, format=FORMAT_VERSION, sections=len(sections),
                          body_length=len(body), body_crc32=zlib.crc32(body), reserved=0)
    return header + bytes(body)


def write_state_file(path: Path, sections: dict[str, bytes]) -> int:
    """Write the file (fsync'ed); returns its size."""
    data = encode_sections(sections)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data)


def decode_sections(data: bytes, name: str) -> dict[str, bytes]:
    """The sections of a state file's bytes; SnapshotError naming ``name`` if anything is off."""
    if len(data) < HEADER.sizeof():
        if not data:
            raise SnapshotError(f"{name}: empty file, not a vmm snapshot")
        if not MAGIC.startswith(data[: len(MAGIC)]):
            raise SnapshotError(f"{name}: not a vmm snapshot (no VMMSNAP header)")
        raise SnapshotError(f"{name}: truncated ({len(data)} bytes, shorter than its header)")
    header = HEADER.parse(data)
    if header["magic"] != MAGIC:
        raise SnapshotError(f"{name}: not a vmm snapshot (no VMMSNAP header)")
    if header["format"] != FORMAT_VERSION:
        raise SnapshotError(f"{name}: snapshot format {header['format']}, this vmm reads format "
                            f"{FORMAT_VERSION}: make the snapshot again with this vmm")
    body = data[HEADER.sizeof():]
    expected = header["body_length"]
    if expected > MAX_BODY or header["sections"] > MAX_SECTIONS or header["reserved"]:
        raise SnapshotError(f"{name}: corrupted (header claims {expected} bytes in "
                            f"{header['sections']} sections)")
    if len(body) < expected:
        raise SnapshotError(f"{name}: truncated ({HEADER.sizeof() + len(body)} of "
                            f"{HEADER.sizeof() + expected} bytes)")
    if len(body) > expected:
        raise SnapshotError(f"{name}: corrupted ({len(body) - expected} bytes after the end)")
    if zlib.crc32(body) != header["body_crc32"]:
        raise SnapshotError(f"{name}: corrupted (checksum mismatch)")
    sections: dict[str, bytes] = {}
    offset = 0
    for _ in range(header["sections"]):
        if offset + SECTION.sizeof() > len(body):
            raise SnapshotError(f"{name}: corrupted (section table runs past the end)")
        entry = SECTION.parse(body, offset)
        offset += SECTION.sizeof()
        section = entry["name"].rstrip(b"\0")
        if entry["length"] > len(body) - offset or not section.isascii():
            raise SnapshotError(f"{name}: corrupted (section {section!r} runs past the end)")
        if section.decode() in sections:
            raise SnapshotError(f"{name}: corrupted (section {section.decode()!r} twice)")
        sections[section.decode()] = body[offset : offset + entry["length"]]
        offset += entry["length"]
    if offset != len(body):
        raise SnapshotError(f"{name}: corrupted ({len(body) - offset} bytes after the sections)")
    return sections


def read_state_file(path: Path) -> dict[str, bytes]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        hint = " (not a snapshot directory?)" if isinstance(e, FileNotFoundError) else ""
        raise SnapshotError(unreadable(path, e) + hint) from None
    return decode_sections(data, str(path))
