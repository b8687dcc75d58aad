"""The guest's physical memory map, as both boot paths report it (e820 types).

RAM below the EBDA, the reserved BIOS/VGA hole up to 1 MiB, RAM from 1 MiB to
the 32-bit MMIO gap, and RAM above 4 GiB for the rest when --mem is that large.
"""

from __future__ import annotations

from vmm.arch.x86_64 import layout

E820_RAM = 1
E820_RESERVED = 2


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """(address, size, type) entries describing guest memory to the kernel."""
    entries = [
        (0, layout.EBDA_START, E820_RAM),
        (layout.EBDA_START, layout.HIGH_MEMORY - layout.EBDA_START, E820_RESERVED),
    ]
    for start, size in layout.ram_ranges(mem_size):
        if start == 0:
            if size > layout.HIGH_MEMORY:
                entries.append((layout.HIGH_MEMORY, size - layout.HIGH_MEMORY, E820_RAM))
        else:
            entries.append((start, size, E820_RAM))
    return entries
