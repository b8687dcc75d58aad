"""Put a Linux kernel, its initrd and command line into guest memory.

The loader decides the boot path from the kernel file itself:

* an ELF with the PVH note → PVH entry (32-bit, hvm_start_info in EBX);
* any other x86-64 ELF → 64-bit boot protocol at the ELF entry, with a
  minimal zero page;
* a bzImage → 64-bit boot protocol at load address + 0x200, zero page with
  the image's own setup header.

It returns where to start and how; the builder sets up the vCPU accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from vmm.arch.x86_64 import layout
from vmm.errors import LoaderError
from vmm.loader import pvh
from vmm.loader.cmdline import DEFAULT_LIMIT, Cmdline
from vmm.loader.e820 import e820_map
from vmm.loader.elf import is_elf, parse_elf
from vmm.memory import GuestMemory

if TYPE_CHECKING:
    from vmm.loader.bzimage import BzImage

PAGE = 4096
BZIMAGE_64BIT_ENTRY_OFFSET = 0x200  # startup_64 is 512 bytes into the protected-mode part


class KernelFormat(StrEnum):
    """What the kernel file is (its value is what tables and metrics print)."""

    VMLINUX_PVH = "vmlinux (PVH)"  # an ELF with the Xen PVH entry note
    VMLINUX = "vmlinux"  # any other x86-64 ELF
    BZIMAGE = "bzImage"


class EntryProtocol(StrEnum):
    """How the first instruction is entered, and where the boot information goes."""

    PVH = "pvh"  # 32-bit protected mode, paging off; EBX = hvm_start_info
    LINUX64 = "linux64"  # 64-bit boot protocol: long mode, identity map; RSI = zero page


@dataclass(frozen=True)
class LoadedKernel:
    """A kernel copied into guest RAM: what the rest of the boot recipe needs of it."""

    format: KernelFormat
    entry: int  # guest-physical address of the first instruction
    end: int  # first byte above the kernel's memory footprint
    bzimage: BzImage | None = None  # its setup header's values, for a bzImage
    segments: tuple = ()  # an ELF's loaded segments (vmm/loader/elf.py Segment)

    @property
    def protocol(self) -> EntryProtocol:
        return EntryProtocol.PVH if self.format is KernelFormat.VMLINUX_PVH else EntryProtocol.LINUX64

    @property
    def cmdline_limit(self) -> int:
        """The longest command line the kernel accepts (a bzImage says; ELF: x86's default)."""
        return self.bzimage.cmdline_size if self.bzimage is not None else DEFAULT_LIMIT

    @property
    def initrd_max_address(self) -> int:
        """The highest byte the initrd may occupy (a bzImage says; ELF: below the MMIO gap)."""
        if self.bzimage is not None:
            return self.bzimage.initrd_addr_max
        return layout.MMIO_GAP_START - 1


@dataclass(frozen=True)
class BootEntry:
    protocol: EntryProtocol
    entry: int  # guest-physical address of the first instruction
    boot_info: int  # EBX for PVH (hvm_start_info), RSI for linux64 (zero page)
    kernel_format: KernelFormat
    kernel_end: int  # first byte above the kernel's memory footprint


def load_kernel(memory: GuestMemory, kernel: bytes, name: str) -> LoadedKernel:
    """Copy the kernel into RAM, each part checked to fit and to leave vmm's own structures alone."""
    if is_elf(kernel):
        elf = parse_elf(kernel, name)
        for number, segment in enumerate(elf.segments):  # every one checked before any is copied
            what = f"segment {number} at {segment.paddr:#x}+{segment.memsz:#x}"
            _check_place(memory, segment.paddr, segment.memsz, name, what)
        for segment in elf.segments:
            memory.write(segment.paddr, segment.data)
            if segment.memsz > len(segment.data):  # .bss: RAM is zero already, but be explicit
                memory.fill(segment.paddr + len(segment.data), segment.memsz - len(segment.data))
        if elf.pvh_entry is not None:
            return LoadedKernel(KernelFormat.VMLINUX_PVH, elf.pvh_entry, elf.highest,
                                segments=elf.segments)
        return LoadedKernel(KernelFormat.VMLINUX, elf.entry, elf.highest, segments=elf.segments)
    # The bzImage and zero-page modules use construct (~25 ms to import): only
    # when a bzImage or a plain ELF is booted, not on the default PVH path.
    from vmm.loader.bzimage import is_bzimage, parse_bzimage

    if is_bzimage(kernel):
        image = parse_bzimage(kernel, name)
        # A non-relocatable kernel must run where it was linked: pref_address.
        load = image.pref_address if image.pref_address >= layout.HIGH_MEMORY else layout.KERNEL_LOAD
        footprint = max(image.init_size, len(image.kernel))
        _check_place(memory, load, footprint, name, f"kernel at {load:#x} (with its init_size)")
        memory.write(load, image.kernel)
        return LoadedKernel(KernelFormat.BZIMAGE, load + BZIMAGE_64BIT_ENTRY_OFFSET, load + footprint,
                            bzimage=image)
    raise LoaderError(f"{name}: not a kernel: neither a bzImage (no 'HdrS' header) nor an ELF")


def _check_place(memory: GuestMemory, address: int, size: int, name: str, what: str) -> None:
    """Refuse a part of the kernel that would not fit in RAM or would land on vmm's own structures."""
    for structure, start, length in layout.BOOT_STRUCTURES:
        if address < start + length and start < address + size:
            raise LoaderError(f"{name}: {what} overlaps the {structure} vmm writes at "
                              f"{start:#x}+{length:#x}")
    if address < layout.HIGH_MEMORY:
        raise LoaderError(f"{name}: {what} is below 1 MiB, where vmm puts its boot structures "
                          "and a PC its BIOS: a Linux kernel loads at 1 MiB or above")
    if not memory.is_valid(address, size):
        raise LoaderError(
            f"{name}: the {what} needs guest RAM {address:#x}-{address + size:#x}, "
            f"more than --mem {memory.size >> 20}M gives"
        )


def place_initrd(memory: GuestMemory, initrd: bytes, kernel_end: int, max_address: int,
                 name: str) -> tuple[int, int]:
    """Put the initrd at the top of low RAM, page-aligned, below ``max_address``."""
    low_ram_end = min(memory.regions[0].end, max_address + 1)
    address = (low_ram_end - len(initrd)) & ~(PAGE - 1)
    if address < kernel_end:
        raise LoaderError(
            f"{name}: the initrd ({len(initrd) >> 10} KiB) does not fit in guest RAM above the "
            f"kernel; give the guest more --mem"
        )
    memory.write(address, initrd)
    return address, len(initrd)


def write_boot_info(memory: GuestMemory, kernel: LoadedKernel, cmdline: Cmdline, mem_size: int,
                    initrd: tuple[int, int] | None, rsdp: int | None = None) -> int:
    """Command line, memory map and zero page or start info (with the ACPI RSDP's address,
    when there are tables). Returns its address."""
    encoded = cmdline.encode()
    memory.write(layout.CMDLINE, encoded)
    e820 = e820_map(mem_size)
    if kernel.protocol is EntryProtocol.PVH:
        modules = [initrd] if initrd else []
        modlist = layout.PVH_MEMMAP + 24 * len(e820)
        memory.write(layout.PVH_MEMMAP, pvh.build_memmap(e820))
        if modules:
            memory.write(modlist, pvh.build_modlist(modules))
        memory.write(layout.PVH_START_INFO, pvh.build_start_info(
            cmdline_address=layout.CMDLINE, memmap_address=layout.PVH_MEMMAP,
            memmap_entries=len(e820), modlist_address=modlist if modules else 0,
            nr_modules=len(modules), rsdp_address=rsdp or 0,
        ))
        return layout.PVH_START_INFO
    from vmm.loader import bootparams

    header = kernel.bzimage.header_bytes if kernel.bzimage is not None else None
    memory.write(layout.ZERO_PAGE, bootparams.build_zero_page(
        header, cmdline_address=layout.CMDLINE, cmdline_size=cmdline.limit, e820=e820,
        initrd=initrd, rsdp=rsdp,
    ))
    return layout.ZERO_PAGE
