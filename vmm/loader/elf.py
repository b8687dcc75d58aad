"""Read a vmlinux ELF: its loadable segments and, if present, the PVH entry.

pyelftools does the ELF parsing. A Linux vmlinux built with CONFIG_PVH has a
Xen ELF note ``XEN_ELFNOTE_PHYS32_ENTRY``: the physical address of a 32-bit
entry point that takes an ``hvm_start_info`` in EBX (no zero page, no
decompressor). Without it, vmm enters at the ELF entry with the 64-bit boot
protocol.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from vmm.errors import LoaderError

ELF_MAGIC = b"\x7fELF"
XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes
    memsz: int  # memsz > len(data): the rest is zero (.bss)


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


def parse_elf(data: bytes, name: str = "kernel") -> ElfKernel:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise LoaderError(f"{name}: an ELF for {elf['e_machine']}/{elf.elfclass}-bit, not x86-64")
        segments = []
        pvh_entry = None
        for segment in elf.iter_segments():
            if segment["p_type"] == "PT_LOAD" and segment["p_memsz"]:
                if segment["p_filesz"] > segment["p_memsz"]:
                    raise LoaderError(f"{name}: a segment's file size exceeds its memory size")
                segments.append(Segment(segment["p_paddr"], segment.data(), segment["p_memsz"]))
            elif segment["p_type"] == "PT_NOTE":
                for note in segment.iter_notes():
                    if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                        desc = note["n_desc"]
                        raw = desc if isinstance(desc, bytes) else bytes.fromhex(desc) if isinstance(desc, str) else bytes(desc)
                        pvh_entry = int.from_bytes(raw[:4] if len(raw) >= 4 else raw, "little")
    except ELFError as e:
        raise LoaderError(f"{name}: malformed ELF: {e}") from None
    except (ValueError, KeyError, IndexError) as e:
        raise LoaderError(f"{name}: malformed ELF: {e}") from None
    if not segments:
        raise LoaderError(f"{name}: ELF has no loadable segments")
    return ElfKernel(elf["e_entry"], pvh_entry, tuple(segments))
