"""A kernel's symbols from its own kallsyms tables, for a kernel shipped without them.

A distribution ships its kernel stripped: Debian's ``/boot/System.map`` is one
line ("The real System.map is in the linux-image-<version>-dbg package"), and
the decompressed vmlinux has no symbol table. But every kernel built with
``CONFIG_KALLSYMS`` carries the names of its functions for ``/proc/kallsyms``
and its oops messages, in ``.rodata``, in a compressed form
(scripts/kallsyms.c writes it; kernel/kallsyms.c reads it). vmm reads the same
tables on the host, so that ``--profile`` and emulation failures name
functions of Debian's kernel too.

The tables, in this order, each aligned to 8 bytes (Linux 5.x - 6.1)::

    kallsyms_offsets       int32 x N   (addresses, relative to the base below)
    kallsyms_relative_base uint64
    kallsyms_num_syms      uint32 N
    kallsyms_names         N x (length, token indexes): the first token's first
                                       character is the type (T, t, D, ...)
    kallsyms_markers       uint32 per 256 symbols: where each 256th name begins
    (kallsyms_seqs_of_names: 6.2, and 6.1's later stable releases)
    kallsyms_token_table   256 NUL-terminated strings
    kallsyms_token_index   uint16 x 256: where each string begins

Nothing labels them in a stripped image, so they are found by their shape:
the token table holds every character used in symbol names as a one-character
token at its own index, so "0\\0" "1\\0" ... "9\\0" appear in a row; the index
after it must point at the table's strings; the markers end just before the
table; the symbol count is the uint32 from which N names decode to exactly
where the markers begin. A table that does not check out is not used
(:func:`kallsyms_of` returns None): a wrong name is worse than none.
"""

from __future__ import annotations

import struct
from pathlib import Path

TOKENS = 256
DIGITS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
MAX_NAMES_BYTES = 32 << 20  # how far back from the markers the names may begin
TEXT_TYPES = "TtWw"
KERNEL_SPACE = 0xFFFF_8000_0000_0000
MIN_SYMBOLS, MAX_SYMBOLS = 1000, 4_000_000


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _token_table(data: bytes) -> tuple[int, list[bytes], int] | None:
    """(table start, the 256 tokens, index start) where the digits run is one."""
    at = data.find(DIGITS)
    while at != -1:
        found = _table_around(data, at)
        if found is not None:
            return found
        at = data.find(DIGITS, at + 1)
    return None


def _table_around(data: bytes, digit0: int) -> tuple[int, list[bytes], int] | None:
    # Walk back over the 48 tokens before "0" (index ord("0")): each ends with NUL.
    start = digit0
    for _ in range(ord("0")):
        start = data.rfind(b"\0", 0, start - 1) + 1
        if start <= 0:
            return None
    if start & 7:
        return None  # the table is aligned
    tokens, offsets, position = [], [], start
    for _ in range(TOKENS):
        end = data.find(b"\0", position)
        if end == -1 or end - position > 64:
            return None
        offsets.append(position - start)
        tokens.append(data[position:end])
        position = end + 1
    index = _align8(position)
    if index + 2 * TOKENS > len(data):
        return None
    if list(struct.unpack_from(f"<{TOKENS}H", data, index)) != offsets:
        return None
    return start, tokens, index


def _decode_names(data: bytes, start: int, count: int, tokens: list[bytes], limit: int
                  ) -> tuple[list[str], list[int], int] | None:
    """N names from ``start``: (names, where each 256th one begins, where they end)."""
    names, marks, position = [], [], start
    for i in range(count):
        if i % 256 == 0:
            marks.append(position - start)
        if position >= limit:
            return None
        length = data[position]
        position += 1
        if length & 0x80:  # a long name (6.1+): 7 bits here, the rest in the next byte
            length = (length & 0x7F) | (data[position] << 7)
            position += 1
        if length == 0 or position + length > limit:
            return None
        names.append(b"".join(tokens[b] for b in data[position:position + length])
                     .decode("ascii", "replace"))
        position += length
    return names, marks, position


def parse_kallsyms(data: bytes) -> list[tuple[int, str, str]] | None:
    """[(address, type, name)] from a kernel image's bytes, or None if not found.

    Backwards from the token table, each 8-byte-aligned uint32 that could be the
    symbol count, with a kernel address just before it (the base), is tried: the
    names must decode from right after it, and the markers that follow them must
    say where every 256th name begins. (Newer kernels put kallsyms_seqs_of_names
    between the markers and the token table: nothing here depends on what does.)
    """
    table = _token_table(data)
    if table is None:
        return None
    table_start, tokens, _index = table
    for count_at in range(table_start - 8, max(8, table_start - MAX_NAMES_BYTES), -8):
        (base,) = struct.unpack_from("<Q", data, count_at - 8)
        if base < KERNEL_SPACE:
            continue
        (count,) = struct.unpack_from("<I", data, count_at)
        if not MIN_SYMBOLS <= count <= MAX_SYMBOLS or count_at - 8 - 4 * count < 0:
            continue
        decoded = _decode_names(data, count_at + 8, count, tokens, table_start)
        if decoded is None:
            continue
        names, marks, end = decoded
        markers_at = _align8(end)
        if markers_at + 4 * len(marks) > table_start or \
                list(struct.unpack_from(f"<{len(marks)}I", data, markers_at)) != marks:
            continue
        offsets_at = (count_at - 8 - 4 * count) & ~7
        offsets = struct.unpack_from(f"<{count}i", data, offsets_at)
        symbols = []
        for offset, name in zip(offsets, names):
            # CONFIG_KALLSYMS_ABSOLUTE_PERCPU: non-negative offsets are absolute (per-CPU
            # symbols near 0), negative ones count down from the base
            address = offset if offset >= 0 else base - 1 - offset
            symbols.append((address, name[0], name[1:]))
        return symbols
    return None


def kallsyms_of(vmlinux: Path) -> list[tuple[int, str, str]] | None:
    """The symbols of an ELF vmlinux (or None): its loadable segments searched in turn."""
    from elftools.elf.elffile import ELFFile

    with open(vmlinux, "rb") as f:
        elf = ELFFile(f)
        for segment in elf.iter_segments():
            if segment["p_type"] != "PT_LOAD":
                continue
            symbols = parse_kallsyms(segment.data())
            if symbols:
                return symbols
    return None


def write_system_map(symbols: list[tuple[int, str, str]], path: Path) -> None:
    """System.map's format (address type name, sorted), written by rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as out:
        for address, kind, name in sorted(symbols):
            out.write(f"{address:016x} {kind} {name}\n")
    partial.replace(path)


def system_map_for(vmlinux: Path) -> Path | None:
    """A System.map made from the kernel's own kallsyms, cached by the file's identity
    (~/.cache/vmm/decompressed/symbols/); None for a kernel without them."""
    import hashlib

    from vmm.cache import cache_dir

    info = vmlinux.stat()
    identity = f"{vmlinux.resolve()}:{info.st_size}:{info.st_mtime_ns}"
    directory = cache_dir() / "decompressed" / "symbols"
    name = hashlib.sha256(identity.encode()).hexdigest()[:24]
    path, absent = directory / f"{name}.map", directory / f"{name}.none"
    if path.is_file():
        return path
    if absent.is_file():
        return None
    try:
        symbols = kallsyms_of(vmlinux)
    except Exception:  # noqa: BLE001 (not an ELF pyelftools reads: no symbols, no harm)
        symbols = None
    if not symbols:
        directory.mkdir(parents=True, exist_ok=True)
        absent.touch()
        return None
    write_system_map(symbols, path)
    return path
