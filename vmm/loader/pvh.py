"""Write the PVH boot structures: hvm_start_info and its memory map.

The PVH entry (xen/include/public/arch-x86/hvm/start_info.h) is the simplest
way into Linux: 32-bit protected mode, paging off, EBX pointing at a
``hvm_start_info`` that gives the command line, the initrd as a module, and an
e820-style memory map. No zero page, no real-mode setup, no decompressor.
"""

from __future__ import annotations

from construct import Const, Int32ul, Int64ul, Struct

HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_VERSION = 1  # version 1 has the memory map fields

StartInfo = Struct(
    "magic" / Const(HVM_START_MAGIC, Int32ul),
    "version" / Int32ul,
    "flags" / Int32ul,
    "nr_modules" / Int32ul,
    "modlist_paddr" / Int64ul,
    "cmdline_paddr" / Int64ul,
    "rsdp_paddr" / Int64ul,
    "memmap_paddr" / Int64ul,
    "memmap_entries" / Int32ul,
    "reserved" / Int32ul,
)
ModlistEntry = Struct("paddr" / Int64ul, "size" / Int64ul, "cmdline_paddr" / Int64ul,
                      "reserved" / Int64ul)
MemmapEntry = Struct("addr" / Int64ul, "size" / Int64ul, "type" / Int32ul, "reserved" / Int32ul)


def build_start_info(
    *,
    cmdline_address: int,
    memmap_address: int,
    memmap_entries: int,
    modlist_address: int = 0,
    nr_modules: int = 0,
) -> bytes:
    return StartInfo.build(dict(
        version=HVM_START_INFO_VERSION, flags=0, nr_modules=nr_modules,
        modlist_paddr=modlist_address, cmdline_paddr=cmdline_address, rsdp_paddr=0,
        memmap_paddr=memmap_address, memmap_entries=memmap_entries, reserved=0,
    ))


def build_memmap(e820: list[tuple[int, int, int]]) -> bytes:
    return b"".join(MemmapEntry.build(dict(addr=a, size=s, type=t, reserved=0)) for a, s, t in e820)


def build_modlist(modules: list[tuple[int, int]]) -> bytes:
    return b"".join(ModlistEntry.build(dict(paddr=a, size=s, cmdline_paddr=0, reserved=0))
                    for a, s in modules)
