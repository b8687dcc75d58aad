"""Write the zero page (struct boot_params) for the Linux 64-bit boot protocol.

The loader reads (bzimage.py), this module writes. The zero page starts
empty; we copy in *only* the setup header from the bzImage (newer kernels
fill the rest of their boot sector with 0xff, which must not leak into
boot_params), then fill in what a boot loader owns: loader type, command
line pointer, initrd, and the e820 memory map.
"""

from __future__ import annotations

from construct import Array, Int32ul, Int64ul, Struct

from vmm.loader.bzimage import LOADFLAG_CAN_USE_HEAP, SETUP_HEADER_OFFSET, SetupHeader

BOOT_PARAMS_SIZE = 4096
E820_ENTRIES_OFFSET = 0x1E8  # u8 e820_entries
EXT_RAMDISK_IMAGE_OFFSET = 0x0C0
EXT_RAMDISK_SIZE_OFFSET = 0x0C4
EXT_CMD_LINE_PTR_OFFSET = 0x0C8
ACPI_RSDP_ADDR_OFFSET = 0x070  # u64 acpi_rsdp_addr
E820_TABLE_OFFSET = 0x2D0
E820_MAX_ENTRIES = 128

TYPE_OF_LOADER_UNDEFINED = 0xFF  # "boot loader not assigned an ID"

E820Entry = Struct("addr" / Int64ul, "size" / Int64ul, "type" / Int32ul)
E820Table = Array(E820_MAX_ENTRIES, E820Entry)


def build_zero_page(
    header_bytes: bytes | None,
    *,
    cmdline_address: int,
    cmdline_size: int,
    e820: list[tuple[int, int, int]],
    initrd: tuple[int, int] | None = None,
    rsdp: int | None = None,
) -> bytes:
    """A 4 KiB boot_params. ``header_bytes``: the bzImage's header, or None (vmlinux)."""
    page = bytearray(BOOT_PARAMS_SIZE)
    if header_bytes:
        page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(header_bytes)] = header_bytes
    else:
        # A vmlinux has no setup header: write a minimal one (magic, boot flag,
        # protocol 2.15) so the kernel believes the fields we fill in.
        minimal = SetupHeader.build(dict(
            setup_sects=0, root_flags=0, syssize=0, ram_size=0, vid_mode=0xFFFF, root_dev=0,
            boot_flag=0xAA55, jump=0, header=b"HdrS", version=0x020F, realmode_swtch=0,
            start_sys_seg=0, kernel_version=0, type_of_loader=0, loadflags=0x01,
            setup_move_size=0, code32_start=0, ramdisk_image=0, ramdisk_size=0,
            bootsect_kludge=0, heap_end_ptr=0, ext_loader_ver=0, ext_loader_type=0,
            cmd_line_ptr=0, initrd_addr_max=0, kernel_alignment=0, relocatable_kernel=0,
            min_alignment=0, xloadflags=0, cmdline_size=0, hardware_subarch=0,
            hardware_subarch_data=0, payload_offset=0, payload_length=0, setup_data=0,
            pref_address=0, init_size=0, handover_offset=0, kernel_info_offset=0,
        ))
        page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(minimal)] = minimal
    header = SetupHeader.parse(bytes(page[SETUP_HEADER_OFFSET:]))
    header.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    header.loadflags |= LOADFLAG_CAN_USE_HEAP
    header.heap_end_ptr = 0xFE00  # the real-mode heap ends here (unused by a 64-bit entry)
    header.cmd_line_ptr = cmdline_address & 0xFFFFFFFF
    if not header_bytes:
        header.cmdline_size = cmdline_size  # a bzImage states its own limit: keep it
    header.vid_mode = 0xFFFF  # "normal"
    if initrd is not None:
        address, size = initrd
        header.ramdisk_image = address & 0xFFFFFFFF
        header.ramdisk_size = size & 0xFFFFFFFF
        page[EXT_RAMDISK_IMAGE_OFFSET : EXT_RAMDISK_IMAGE_OFFSET + 4] = (address >> 32).to_bytes(4, "little")
        page[EXT_RAMDISK_SIZE_OFFSET : EXT_RAMDISK_SIZE_OFFSET + 4] = (size >> 32).to_bytes(4, "little")
    built = SetupHeader.build(header)
    # Write back only as much as was there: a kernel's header may be shorter.
    length = len(header_bytes) if header_bytes else len(built)
    page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + length] = built[:length]
    page[EXT_CMD_LINE_PTR_OFFSET : EXT_CMD_LINE_PTR_OFFSET + 4] = (cmdline_address >> 32).to_bytes(4, "little")
    if rsdp is not None:  # boot protocol 2.14: where the kernel finds the ACPI tables
        page[ACPI_RSDP_ADDR_OFFSET : ACPI_RSDP_ADDR_OFFSET + 8] = rsdp.to_bytes(8, "little")
    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(e820)} e820 entries, the zero page holds {E820_MAX_ENTRIES}")
    page[E820_ENTRIES_OFFSET] = len(e820)
    table = [dict(addr=a, size=s, type=t) for a, s, t in e820]
    table += [dict(addr=0, size=0, type=0)] * (E820_MAX_ENTRIES - len(e820))
    raw = E820Table.build(table)
    page[E820_TABLE_OFFSET : E820_TABLE_OFFSET + len(raw)] = raw
    return bytes(page)
