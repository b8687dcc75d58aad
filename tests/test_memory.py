"""Guest memory: every access bounds-checked, addresses that cannot wrap (no KVM)."""

from __future__ import annotations

import mmap
import os

import pytest

from vmm.errors import GuestMemoryError, VmmError
from vmm.memory import GuestAddress, GuestMemory

PAGE = mmap.PAGESIZE


@pytest.fixture
def mem():
    memory = GuestMemory([(0, 4 * PAGE), (0x10000, PAGE)])
    yield memory
    memory.close()


# --- GuestAddress ------------------------------------------------------------------
def test_guest_address_is_an_int_in_the_64_bit_space():
    assert GuestAddress(0x1000) == 0x1000
    assert GuestAddress(0x1000) + 0x10 == 0x1010
    assert isinstance(GuestAddress(0x1000) + 1, GuestAddress)
    assert GuestAddress(2**64 - 1) == 2**64 - 1
    assert repr(GuestAddress(0x1000)) == "GuestAddress(0x1000)"


@pytest.mark.parametrize("value", [-1, 2**64, 2**70])
def test_guest_address_out_of_range_names_the_value(value):
    with pytest.raises(GuestMemoryError, match=f"{value:#x}".replace("-", r"\-")):
        GuestAddress(value)


def test_guest_address_addition_overflow_is_an_error_not_a_wrap():
    with pytest.raises(GuestMemoryError, match="0x10000000000000000"):
        GuestAddress(2**64 - 1) + 1
    with pytest.raises(GuestMemoryError):
        GuestAddress(2**64 - 0x10) + 0x20


def test_guest_address_subtraction_below_zero_is_an_error():
    with pytest.raises(GuestMemoryError, match="-0x1"):
        GuestAddress(0) - 1
    assert GuestAddress(0x10) - 0x10 == 0


def test_guest_memory_error_is_a_vmm_error():
    assert issubclass(GuestMemoryError, VmmError)


# --- regions -------------------------------------------------------------------------
def test_regions_are_sorted_and_sized(mem):
    assert [(r.start, r.size) for r in mem] == [(0, 4 * PAGE), (0x10000, PAGE)]
    assert mem.size == 5 * PAGE
    assert all(r.host_address != 0 for r in mem)


def test_regions_given_out_of_order_are_sorted():
    memory = GuestMemory([(0x10000, PAGE), (0, PAGE)])
    try:
        assert [r.start for r in memory] == [0, 0x10000]
    finally:
        memory.close()


@pytest.mark.parametrize("ranges", [
    [(0, 2 * PAGE), (PAGE, PAGE)],  # second starts inside the first
    [(0, 2 * PAGE), (0, PAGE)],  # same start
    [(PAGE, PAGE), (0, 4 * PAGE)],  # one inside the other (given out of order)
])
def test_overlapping_regions_are_refused(ranges):
    with pytest.raises(GuestMemoryError, match="overlaps"):
        GuestMemory(ranges)


def test_adjacent_regions_are_fine_but_an_access_may_not_straddle_them():
    memory = GuestMemory([(0, PAGE), (PAGE, PAGE)])
    try:
        assert [(r.start, r.size) for r in memory] == [(0, PAGE), (PAGE, PAGE)]
        memory.write(PAGE - 4, b"abcd")
        memory.write(PAGE, b"efgh")
        assert memory.read(PAGE - 4, 4) + memory.read(PAGE, 4) == b"abcdefgh"
        with pytest.raises(GuestMemoryError, match=f"{PAGE - 4:#x}\\+0x8 is outside guest RAM"):
            memory.read(PAGE - 4, 8)  # each region is its own mapping: no access spans two
    finally:
        memory.close()


@pytest.mark.parametrize("start, size", [(0, 100), (1, PAGE), (PAGE + 8, PAGE), (0, 0), (0, -PAGE)])
def test_unaligned_or_empty_regions_are_refused(start, size):
    with pytest.raises(GuestMemoryError, match="page aligned"):
        GuestMemory([(start, size)])


# --- accesses ------------------------------------------------------------------------
def test_fresh_memory_reads_zero(mem):
    assert mem.read(0, 16) == bytes(16)


def test_write_then_read_back(mem):
    mem.write(0x123, b"hello")
    assert mem.read(0x123, 5) == b"hello"
    mem.write(0x10000 + PAGE - 2, b"\x01\x02")  # last two bytes of the second region
    assert mem.read(0x10000 + PAGE - 2, 2) == b"\x01\x02"


def test_integers_are_little_endian(mem):
    mem.write_u8(0x10, 0xAB)
    mem.write_u16(0x20, 0x1234)
    mem.write_u32(0x30, 0xDEADBEEF)
    mem.write_u64(0x40, 0x0123456789ABCDEF)
    assert mem.read(0x20, 2) == b"\x34\x12"
    assert (mem.read_u8(0x10), mem.read_u16(0x20), mem.read_u32(0x30), mem.read_u64(0x40)) == (
        0xAB, 0x1234, 0xDEADBEEF, 0x0123456789ABCDEF)


def test_fill(mem):
    mem.fill(0x100, 8, 0xCC)
    assert mem.read(0x100, 8) == b"\xcc" * 8


def test_last_byte_of_a_region_is_reachable(mem):
    mem.write(4 * PAGE - 1, b"x")
    assert mem.read(4 * PAGE - 1, 1) == b"x"


@pytest.mark.parametrize("address, length", [
    (4 * PAGE - 1, 2),  # runs off the end of the first region
    (4 * PAGE, 1),  # in the hole between the regions
    (4 * PAGE - 4, 0x10000),  # spans the hole into the second region
    (0x10000 + PAGE, 1),  # just past the last region
    (2**64 - 1, 2),  # would wrap past 2**64 in C
    (0, 5 * PAGE),  # longer than any region
])
def test_out_of_bounds_access_names_the_address(mem, address, length):
    with pytest.raises(GuestMemoryError, match=f"{address:#x}"):
        mem.read(address, length)
    with pytest.raises(GuestMemoryError, match=f"{address:#x}"):
        mem.write(address, b"\0" * length)
    assert not mem.is_valid(address, length)


def test_access_straddling_two_adjacent_regions_is_refused():
    memory = GuestMemory([(0, PAGE), (PAGE, PAGE)])
    try:
        with pytest.raises(GuestMemoryError, match=f"{PAGE - 2:#x}"):
            memory.read(PAGE - 2, 4)
    finally:
        memory.close()


def test_negative_address_or_length_is_refused(mem):
    with pytest.raises(GuestMemoryError):
        mem.read(-1, 1)
    with pytest.raises(GuestMemoryError, match="negative length"):
        mem.read(0x10, -1)


def test_integer_access_straddling_the_end_is_refused(mem):
    with pytest.raises(GuestMemoryError):
        mem.read_u64(4 * PAGE - 4)
    with pytest.raises(GuestMemoryError):
        mem.write_u32(4 * PAGE - 2, 0)


def test_view_is_bounds_checked_and_writable(mem):
    view = mem.view(0x200, 4)
    view[:] = b"abcd"
    assert mem.read(0x200, 4) == b"abcd"
    assert len(view) == 4
    view.release()
    with pytest.raises(GuestMemoryError):
        mem.view(4 * PAGE - 2, 4)


def test_guest_addresses_are_accepted(mem):
    mem.write(GuestAddress(0x300), b"z")
    assert mem.read(GuestAddress(0x300), 1) == b"z"


def test_resident_bytes_counts_touched_pages():
    memory = GuestMemory([(0, 16 * PAGE)])
    try:
        before = memory.resident_bytes()
        memory.write(5 * PAGE, b"x")
        assert memory.resident_bytes() >= before + PAGE
        assert memory.resident_bytes() <= 16 * PAGE
    finally:
        memory.close()


def test_mapped_bytes_counts_what_this_process_faulted_in_of_a_file_mapping(tmp_path):
    """A memory file in the page cache (read by someone else) is not this VM's memory."""
    path = tmp_path / "memory"
    path.write_bytes(b"\x01" * (16 * PAGE))
    path.read_bytes()  # in the page cache now: mincore says resident
    with open(path, "rb") as f:
        memory = GuestMemory([(0, 16 * PAGE)], backing_fd=f.fileno())
    try:
        assert memory.resident_bytes() == 16 * PAGE  # the page cache's view
        assert memory.mapped_bytes() == 0  # nothing faulted in by this process yet
        memory.read(3 * PAGE, 1)  # the kernel maps up to 64 KiB around it (fault-around)
        memory.write(9 * PAGE, b"x")
        assert 2 * PAGE <= memory.mapped_bytes() <= 16 * PAGE
    finally:
        memory.close()


def test_save_of_a_restored_guest_keeps_pages_the_page_cache_dropped(tmp_path, monkeypatch):
    """A restored guest's RAM is its memory file, mapped: a page the host evicted from the
    page cache (or never read since it booted) is not resident for mincore, yet holds data.
    The image base is saved from a restored VM: such pages must not become zeros."""
    path = tmp_path / "memory"
    with open(path, "wb") as f:
        f.write(b"\x07" * (8 * PAGE))  # data in the first 8 pages, a hole after
        f.truncate(16 * PAGE)
    with open(path, "rb") as f:
        memory = GuestMemory([(0, 16 * PAGE)], backing_fd=f.fileno())
    monkeypatch.setattr(GuestMemory, "_resident_pages",  # what mincore says once evicted,
                        lambda self, region: bytes(1 if i == 12 else 0  # but for the guest's
                                                   for i in range(region.size // PAGE)))  # write
    try:
        memory.write(12 * PAGE, b"guest")  # a private copy, in the file's hole
        saved = tmp_path / "saved"
        fd = os.open(saved, os.O_WRONLY | os.O_CREAT)
        try:
            assert memory.save(fd) == 9 * PAGE
        finally:
            os.close(fd)
        data = saved.read_bytes()
        assert data[:8 * PAGE] == b"\x07" * (8 * PAGE) and data[12 * PAGE:12 * PAGE + 5] == b"guest"
        assert len(data) == 16 * PAGE
    finally:
        memory.close()
