"""The guest-physical layout (vmm/arch/x86_64/layout.py) at every --mem size vmm accepts."""

from __future__ import annotations

import pytest

from vmm.arch.x86_64 import layout
from vmm.config import MAX_MEM, parse_size
from vmm.loader.e820 import E820_RAM, e820_map

MiB, GiB = 1 << 20, 1 << 30
# Every power of two from 2M to 64G, and the sizes around the gap's edges.
SIZES = sorted({1 << n for n in range(21, 37)} | {
    3 * GiB - 4096, 3 * GiB, 3 * GiB + 4096, 3 * GiB + 2 * MiB, 4 * GiB - 4096, 4 * GiB + 4096,
    5 * GiB, 8 * GiB, 48 * GiB, MAX_MEM,
})


def overlaps(a_start: int, a_size: int, b_start: int, b_size: int) -> bool:
    return a_start < b_start + b_size and b_start < a_start + a_size


@pytest.mark.parametrize("mem", SIZES, ids=lambda m: f"{m // MiB}M" if m % MiB == 0 else hex(m))
def test_nothing_overlaps_at_any_memory_size(mem):
    ram = layout.ram_ranges(mem)
    assert sum(size for _start, size in ram) == mem  # all the RAM asked for
    assert all(start % 4096 == 0 and size % 4096 == 0 for start, size in ram)
    for i, (start, size) in enumerate(ram):
        assert not overlaps(start, size, layout.MMIO_GAP_START,
                            layout.MMIO_GAP_END - layout.MMIO_GAP_START), "RAM in the gap"
        for other_start, other_size in ram[i + 1:]:
            assert not overlaps(start, size, other_start, other_size)
    # What lives in the gap stays in it, apart, and off RAM; KVM's pages are placed.
    windows = layout.gap_windows()
    for n, (name, start, size) in enumerate(windows):
        assert layout.MMIO_GAP_START <= start and start + size <= layout.MMIO_GAP_END, name
        for other, other_start, other_size in windows[n + 1:]:
            assert not overlaps(start, size, other_start, other_size), (name, other)
    assert layout.kvm_private_pages(ram) == (layout.KVM_TSS_ADDRESS, layout.KVM_IDENTITY_MAP_ADDRESS)
    # The boot structures are in RAM (the first range) and apart.
    structures = sorted(layout.BOOT_STRUCTURES, key=lambda s: s[1])
    for (name, start, size), (next_name, next_start, _size) in zip(structures, structures[1:]):
        assert start + size <= next_start, (name, next_name)
    low_start, low_size = ram[0]
    assert all(low_start <= start and start + size <= min(low_size, layout.HIGH_MEMORY)
               for _name, start, size in structures)
    # The e820 map reports exactly the RAM (less the BIOS hole) to the kernel.
    reported = sum(size for _a, size, kind in e820_map(mem) if kind == E820_RAM)
    assert reported == mem - (min(mem, layout.HIGH_MEMORY) - layout.EBDA_START)


def test_kvm_private_pages_refuse_ram_over_them():
    with pytest.raises(ValueError, match="overlaps the virtio-mmio windows"):
        layout.kvm_private_pages([(0, 8 * GiB)])  # the firmware VM's RAM before the split
    with pytest.raises(ValueError, match="overlaps the KVM TSS at 0xfffbd000"):
        layout.kvm_private_pages([(0, 3 * GiB), (layout.KVM_TSS_ADDRESS + 8192, 4096)])


def test_the_sizes_tested_are_the_sizes_accepted():
    assert parse_size("2M") == SIZES[0] and parse_size("64G") == SIZES[-1] == MAX_MEM
