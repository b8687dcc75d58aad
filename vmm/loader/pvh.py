"""Write the PVH boot structures: hvm_start_info and its memory map.

The PVH entry (xen/include/public/arch-x86/hvm/start_info.h) is the simplest
way into Linux: 32-bit protected mode, paging off, EBX pointing at a
``hvm_start_info`` that gives the command line, the initrd as a module, and an
e820-style memory map. No zero page, no real-mode setup, no decompressor.
"""

from __future__ import annotations

from vmm.packed import Packed

HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_VERSION = 1  # version 1 has the memory map fields

StartInfo = Packed(
    ("magic", "I"),
    ("version", "I"),
    ("flags", "I"),
    ("nr_modules", "I"),
    ("modlist_paddr", "Q"),
    ("cmdline_paddr", "Q"),
    ("rsdp_paddr", "Q"),
    ("memmap_paddr", "Q"),
    ("memmap_entries", "I"),
    ("reserved", "I"),
)
ModlistEntry = Packed(("paddr", "Q"), ("size", "Q"), ("cmdline_paddr", "Q"), ("reserved", "Q"))
MemmapEntry = Packed(("addr", "Q"), ("size", "Q"), ("type", "I"), ("reserved", "I"))


def build_start_info(
    *,
    cmdline_address: int,
    memmap_address: int,
    memmap_entries: int,
    modlist_address: int = 0,
    nr_modules: int = 0,
    rsdp_address: int = 0,
) -> bytes:
    return StartInfo.build(
        magic=HVM_START_MAGIC, version=HVM_START_INFO_VERSION, flags=0, nr_modules=nr_modules,
        modlist_paddr=modlist_address, cmdline_paddr=cmdline_address, rsdp_paddr=rsdp_address,
        memmap_paddr=memmap_address, memmap_entries=memmap_entries, reserved=0,
    )


def build_memmap(e820: list[tuple[int, int, int]]) -> bytes:
    return b"".join(MemmapEntry.build(addr=a, size=s, type=t, reserved=0) for a, s, t in e820)


def build_modlist(modules: list[tuple[int, int]]) -> bytes:
    return b"".join(ModlistEntry.build(paddr=a, size=s, cmdline_paddr=0, reserved=0)
                    for a, s in modules)
