"""Guest memory: mmap-backed RAM regions, reached only through one checked object.

The guest sees *guest-physical* addresses; vmm backs each RAM region with an
anonymous mmap and tells KVM where it lives. Nothing else in vmm touches those
mmaps: loaders, boot structures and devices call :class:`GuestMemory`, which
checks that every access lies wholly inside one region and names the address
when it does not. Everything the guest writes is hostile input, and an address
it gives us is the first thing to check.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Iterator

from vmm.errors import GuestMemoryError

_U64_LIMIT = 1 << 64
# Python's mmap module gained MAP_NORESERVE only in 3.13; 0x4000 is Linux's value.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class GuestAddress(int):
    """A guest-physical address: an int that refuses to leave [0, 2**64).

    Arithmetic that would overflow or go negative raises GuestMemoryError
    instead of silently wrapping, the classic bug of address maths on guest
    input (``addr + len`` wrapping past 2**64 to a small, valid address).
    """

    __slots__ = ()

    def __new__(cls, value: int) -> "GuestAddress":
        if not 0 <= value < _U64_LIMIT:
            raise GuestMemoryError(f"guest address {value:#x} is outside the 64-bit space")
        return super().__new__(cls, value)

    def __add__(self, offset: int) -> "GuestAddress":
        return GuestAddress(int(self) + int(offset))

    def __sub__(self, offset: int) -> "GuestAddress":
        return GuestAddress(int(self) - int(offset))

    def __repr__(self) -> str:
        return f"GuestAddress({int(self):#x})"


@dataclass
class MemoryRegion:
    """One contiguous range of guest RAM and the host mapping behind it."""

    start: int
    size: int
    _map: mmap.mmap
    host_address: int  # where KVM should look: the mmap's address in our process
    # A region mapped from a snapshot's memory file: 1 for each page the file holds data
    # for (its data extents, SEEK_DATA), which the guest may not have read yet.
    file_pages: bytearray | None = None

    @property
    def end(self) -> int:
        return self.start + self.size

    def contains(self, address: int, length: int) -> bool:
        return self.start <= address and address + length <= self.end


class GuestMemory:
    """All of a VM's RAM: bounds-checked reads and writes by guest address."""

    def __init__(self, ranges: list[tuple[int, int]], *, backing_fd: int | None = None) -> None:
        """Map one region per (start, size); ranges must not overlap.

        Anonymous memory by default (zero-filled, a page costs nothing until
        the guest touches it). With ``backing_fd``, a file holding the regions
        one after the other (a snapshot's memory file): mapped ``MAP_PRIVATE``,
        so the guest reads the file's pages through the page cache and its
        writes go to private copies. Nothing is read up front, and the file is
        never written: several VMs can start from one file at once.
        """
        from vmm.kvm.ioctl import ffi  # the mmap's host address, for KVM

        self.regions: list[MemoryRegion] = []
        file_offset = 0
        try:
            for start, size in sorted(ranges):
                if size <= 0 or size % mmap.PAGESIZE or start % mmap.PAGESIZE:
                    raise GuestMemoryError(f"memory region {start:#x}+{size:#x} is not page aligned")
                if self.regions and start < self.regions[-1].end:
                    raise GuestMemoryError(f"memory region at {start:#x} overlaps the one before")
                if backing_fd is None:
                    # MAP_NORESERVE: pages cost nothing until the guest touches them.
                    backing = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
                else:
                    backing = mmap.mmap(backing_fd, size, mmap.MAP_PRIVATE | _MAP_NORESERVE,
                                        offset=file_offset)
                host = int(ffi.cast("uintptr_t", ffi.from_buffer(backing)))
                pages = None if backing_fd is None else _data_pages(backing_fd, file_offset, size)
                self.regions.append(MemoryRegion(start, size, backing, host, pages))
                file_offset += size
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def close(self) -> None:
        for region in self.regions:
            region._map.close()
        self.regions = []

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self.regions)

    # --- the one place where guest addresses become host memory -----------------
    def _locate(self, address: int, length: int) -> tuple[mmap.mmap, int]:
        if length < 0:
            raise GuestMemoryError(f"negative length {length} at guest address {address:#x}")
        for region in self.regions:
            if region.contains(address, length):
                return region._map, address - region.start
        raise GuestMemoryError(
            f"guest address {address:#x}+{length:#x} is outside guest RAM"
        )

    def is_valid(self, address: int, length: int) -> bool:
        return any(r.contains(address, length) for r in self.regions)

    def read(self, address: int, length: int) -> bytes:
        backing, offset = self._locate(address, length)
        return backing[offset : offset + length]

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        backing, offset = self._locate(address, len(data))
        backing[offset : offset + len(data)] = data

    def fill(self, address: int, length: int, byte: int = 0) -> None:
        self.write(address, bytes([byte]) * length)

    def view(self, address: int, length: int) -> memoryview:
        """A writable view of guest RAM for zero-copy I/O (preadv into guest pages).

        The view is bounds-checked once, here; callers must not keep it past
        the VM's life.
        """
        backing, offset = self._locate(address, length)
        return memoryview(backing)[offset : offset + length]

    # Fixed-size little-endian integers: what boot structures and virtqueues use.
    def read_u8(self, address: int) -> int:
        return self.read(address, 1)[0]

    def read_u16(self, address: int) -> int:
        return int.from_bytes(self.read(address, 2), "little")

    def read_u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def write_u8(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<B", value))

    def write_u16(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<H", value))

    def write_u32(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<I", value))

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<Q", value))

    def _resident_pages(self, region: MemoryRegion) -> bytes | None:
        """mincore(2) of the region: byte i odd when page i is backed; None if unknown."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        vec = (ctypes.c_ubyte * (region.size // mmap.PAGESIZE))()
        if libc.mincore(ctypes.c_void_p(region.host_address), ctypes.c_size_t(region.size), vec) != 0:
            return None
        return bytes(vec)

    def mapped_bytes(self) -> int:
        """Guest RAM this process holds: the Rss of its mappings in /proc/self/smaps.

        Unlike mincore (resident_bytes), which for a restored guest's file mapping
        reports the page cache (the memory file cached by an earlier run, mapped
        or not), this counts only the pages this VM has faulted in.
        """
        ranges = [(r.host_address, r.host_address + r.size) for r in self.regions]
        total, inside = 0, False
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                if not line[:1].isupper():  # a mapping's header: "7f00...-7f00... rw-p ..."
                    start, end = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                    inside = any(low <= start and end <= high for low, high in ranges)
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
        return total

    def resident_bytes(self) -> int:
        """How much of guest RAM the host has backed: pages touched, or a file's cached pages."""
        total = 0
        for region in self.regions:
            resident = self._resident_pages(region)
            if resident is not None:
                total += sum(v & 1 for v in resident) * mmap.PAGESIZE
        return total

    def save(self, fd: int) -> int:
        """Write all of RAM into ``fd``, regions one after the other, as a sparse file.

        Only pages the guest has touched and that hold something other than
        zeros are written; the rest stay holes, which read back as zeros (a
        128 MiB guest that touched 40 MiB makes a 40 MiB file). Returns the
        bytes written. The VM must be paused.
        """
        page = mmap.PAGESIZE
        zero = bytes(page)
        written = file_offset = 0
        for region in self.regions:
            # A page can hold something if the guest touched it (mincore) or, restored from
            # a file, if the file has data there: mincore sees only the file's pages in the
            # page cache, and one evicted (or never read since the host booted) is data too.
            resident = self._resident_pages(region) or b"\x01" * (region.size // page)
            if region.file_pages is not None:
                resident = bytes(a | b for a, b in zip(resident, region.file_pages))
            backing = region._map
            run_start = None  # first page of a run of pages to write
            for index in range(len(resident) + 1):
                keep = (index < len(resident) and resident[index] & 1
                        and backing[index * page : (index + 1) * page] != zero)
                if keep and run_start is None:
                    run_start = index
                elif not keep and run_start is not None:
                    # Released on every path: an export left alive by an error (a full
                    # disk) would make closing the mapping fail in its place.
                    with memoryview(backing)[run_start * page : index * page] as data:
                        written += _pwrite_all(fd, data, file_offset + run_start * page)
                    run_start = None
            file_offset += region.size
        os.ftruncate(fd, file_offset)  # holes up to the full size
        return written


def _data_pages(fd: int, offset: int, size: int) -> bytearray:
    """1 for each page of ``fd[offset:offset+size]`` inside a data extent (not a hole)."""
    page = mmap.PAGESIZE
    pages = bytearray(size // page)
    end, position = offset + size, offset
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after position
            break
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        first, last = (data - offset) // page, -(-(hole - offset) // page)
        pages[first:last] = b"\x01" * (last - first)
        position = hole
    return pages


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
    return done
