"""Guest virtual → guest physical addresses, through the guest's own page tables.

vmm reads guest memory by *physical* address (vmm/memory.py), but a guest's
programs and its kernel speak *virtual* addresses. Where vmm must follow one
-- the profiler walking a kernel stack, the snapshot mailbox writing into
/init's buffer -- it walks the 4-level tables from the vCPU's CR3 as the MMU
would, reading each table from guest RAM.
"""

from __future__ import annotations

from typing import Callable

PAGE_FRAME_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 of a page-table entry
PTE_PRESENT = 1 << 0
PTE_PAGE_SIZE = 1 << 7  # in a PDPT entry: 1 GiB page; in a PD entry: 2 MiB page


def page_walk(read_phys_u64: Callable[[int], int | None], cr3: int, va: int) -> int | None:
    """Guest virtual → guest physical through 4-level page tables, as the MMU does.

    ``read_phys_u64(pa)`` reads a guest-physical quadword (None if outside RAM).
    Returns None where the address is not mapped.
    """
    table = cr3 & PAGE_FRAME_MASK
    for shift in (39, 30, 21, 12):  # PML4, PDPT, PD, PT: 9 index bits each
        entry = read_phys_u64(table + ((va >> shift) & 0x1FF) * 8)
        if entry is None or not entry & PTE_PRESENT:
            return None
        if shift in (30, 21) and entry & PTE_PAGE_SIZE:  # a 1 GiB or 2 MiB page
            offset_mask = (1 << shift) - 1
            return (entry & PAGE_FRAME_MASK & ~offset_mask) | (va & offset_mask)
        table = entry & PAGE_FRAME_MASK
    return table | (va & 0xFFF)


def translator(memory, cr3: int) -> Callable[[int], int | None]:
    """``translate(va)`` for the address space whose top table is at ``cr3``."""

    def read_phys_u64(pa: int) -> int | None:
        return memory.read_u64(pa) if memory.is_valid(pa, 8) else None

    return lambda va: page_walk(read_phys_u64, cr3, va)
