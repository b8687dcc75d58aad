"""Read a vmlinux ELF: its loadable segments and, if present, the PVH entry.

A Linux vmlinux built with CONFIG_PVH has a Xen ELF note
``XEN_ELFNOTE_PHYS32_ENTRY``: the physical address of a 32-bit entry point
that takes an ``hvm_start_info`` in EBX (no zero page, no decompressor).
Without it, vmm enters at the ELF entry with the 64-bit boot protocol.

We read only what booting needs: the ELF header, the program headers
(``PT_LOAD`` segments, ``PT_NOTE``) and the notes, three fixed little-endian
layouts (ELF-64 object file format, sections 3-5). Why not pyelftools here:
importing it costs ~80 ms on every ``vmm run``, a large share of the time
from process start to the first KVM_RUN; tests/test_loader.py checks this
reader against pyelftools on our kernel.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmm.errors import LoaderError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

# e_ident (16 bytes) then e_type .. e_shstrndx
ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes | memoryview
    memsz: int  # memsz > len(data): the rest is zero (.bss)
    vaddr: int = 0  # where the kernel's own page tables map it (its symbols' addresses)


@dataclass(frozen=True)
class ElfKernel:
    entry: int  # ELF entry point (physical for x86 vmlinux)
    pvh_entry: int | None  # 32-bit PVH entry, if the kernel has the note
    segments: tuple[Segment, ...]

    @property
    def lowest(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def highest(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def _check_range(data: bytes, offset: int, size: int, name: str, what: str) -> None:
    if offset < 0 or size < 0 or offset + size > len(data):
        raise LoaderError(f"{name}: malformed ELF: {what} at {offset:#x}+{size:#x} is past the end of the file")


def _slice(data: bytes, offset: int, size: int, name: str, what: str) -> bytes:
    _check_range(data, offset, size, name, what)
    return data[offset : offset + size]


def _pvh_entry(notes: bytes) -> int | None:
    """Walk one PT_NOTE segment's notes (each: header, name, desc, 4-byte aligned)."""
    at = 0
    while at + NOTE_HEADER.size <= len(notes):
        namesz, descsz, kind = NOTE_HEADER.unpack_from(notes, at)
        at += NOTE_HEADER.size
        name = notes[at : at + namesz].rstrip(b"\0")
        at += (namesz + 3) & ~3
        desc = notes[at : at + descsz]
        at += (descsz + 3) & ~3
        if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) >= 4:
            return int.from_bytes(desc[:4], "little")
    return None


def parse_elf(data: bytes, name: str = "kernel") -> ElfKernel:
    header = _slice(data, 0, ELF_HEADER.size, name, "ELF header")
    (ident, _type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     *_rest) = ELF_HEADER.unpack(header)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_X86_64:
        raise LoaderError(f"{name}: an ELF for another machine (class {ident[4]}, machine {machine}), "
                          "not x86-64")
    if phentsize != PROGRAM_HEADER.size:
        raise LoaderError(f"{name}: malformed ELF: program header size {phentsize}")
    segments = []
    pvh_entry = None
    table = _slice(data, phoff, phnum * PROGRAM_HEADER.size, name, "program headers")
    for i in range(phnum):
        kind, _flags, offset, vaddr, paddr, filesz, memsz, _align = PROGRAM_HEADER.unpack_from(
            table, i * PROGRAM_HEADER.size)
        if kind == PT_LOAD and memsz:
            if filesz > memsz:
                raise LoaderError(f"{name}: malformed ELF: a segment's file size exceeds its memory size")
            _check_range(data, offset, filesz, name, "segment")
            # A view, not a copy: the loader copies it once, into guest RAM.
            segments.append(Segment(paddr, memoryview(data)[offset : offset + filesz], memsz, vaddr))
        elif kind == PT_NOTE and pvh_entry is None:
            pvh_entry = _pvh_entry(_slice(data, offset, filesz, name, "note segment"))
    if not segments:
        raise LoaderError(f"{name}: ELF has no loadable segments")
    return ElfKernel(entry, pvh_entry, tuple(segments))
