"""Read a bzImage: its setup header, validated, and where its parts are.

A bzImage is the real-mode setup code (``setup_sects`` 512-byte sectors after
the boot sector) followed by the protected-mode kernel. The *setup header*,
at 0x1F1 in the file, tells a boot loader everything it needs
(Documentation/x86/boot.rst). This module only reads; writing the zero page
is vmm/loader/bootparams.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from vmm.errors import LoaderError

SETUP_HEADER_OFFSET = 0x1F1
HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags and 64-bit entry (Linux 3.8+)

LOADFLAG_LOADED_HIGH = 0x01  # protected-mode code loaded at 1 MiB or above
LOADFLAG_CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01  # has the 64-bit entry point at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02

# The setup header as it stands in the file at 0x1F1 and in boot_params.hdr.
SetupHeader = Struct(
    "setup_sects" / Int8ul,
    "root_flags" / Int16ul,
    "syssize" / Int32ul,
    "ram_size" / Int16ul,
    "vid_mode" / Int16ul,
    "root_dev" / Int16ul,
    "boot_flag" / Int16ul,
    "jump" / Int16ul,
    "header" / Bytes(4),
    "version" / Int16ul,
    "realmode_swtch" / Int32ul,
    "start_sys_seg" / Int16ul,
    "kernel_version" / Int16ul,
    "type_of_loader" / Int8ul,
    "loadflags" / Int8ul,
    "setup_move_size" / Int16ul,
    "code32_start" / Int32ul,
    "ramdisk_image" / Int32ul,
    "ramdisk_size" / Int32ul,
    "bootsect_kludge" / Int32ul,
    "heap_end_ptr" / Int16ul,
    "ext_loader_ver" / Int8ul,
    "ext_loader_type" / Int8ul,
    "cmd_line_ptr" / Int32ul,
    "initrd_addr_max" / Int32ul,
    "kernel_alignment" / Int32ul,
    "relocatable_kernel" / Int8ul,
    "min_alignment" / Int8ul,
    "xloadflags" / Int16ul,
    "cmdline_size" / Int32ul,
    "hardware_subarch" / Int32ul,
    "hardware_subarch_data" / Int64ul,
    "payload_offset" / Int32ul,
    "payload_length" / Int32ul,
    "setup_data" / Int64ul,
    "pref_address" / Int64ul,
    "init_size" / Int32ul,
    "handover_offset" / Int32ul,
    "kernel_info_offset" / Int32ul,
)
SETUP_HEADER_SIZE = SetupHeader.sizeof()  # 0x7B: up to kernel_info_offset


@dataclass(frozen=True)
class BzImage:
    """A validated bzImage: the header fields vmm uses and the raw parts."""

    header: dict  # every SetupHeader field, by name
    header_bytes: bytes  # the header exactly as in the file (0x1F1 .. its end)
    kernel: bytes  # the protected-mode part, loaded at the load address
    version: int
    cmdline_size: int
    initrd_addr_max: int
    kernel_alignment: int
    pref_address: int
    init_size: int
    relocatable: bool

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x206 and data[0x202:0x206] == HDRS_MAGIC


def parse_bzimage(data: bytes, name: str = "kernel") -> BzImage:
    """Validate the setup header; raise LoaderError naming the file and the problem."""
    if len(data) < SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE:
        raise LoaderError(f"{name}: {len(data)} bytes, too short for a bzImage")
    if not is_bzimage(data):
        raise LoaderError(f"{name}: not a bzImage (no 'HdrS' magic at 0x202)")
    fields = SetupHeader.parse(data[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE])
    if fields.boot_flag != BOOT_FLAG:
        raise LoaderError(f"{name}: bad boot flag {fields.boot_flag:#x} (want 0xaa55)")
    if fields.version < MIN_PROTOCOL:
        raise LoaderError(
            f"{name}: boot protocol {fields.version >> 8}.{fields.version & 0xFF:02d} is too old "
            f"(vmm needs 2.12+, Linux 3.8 or later, for the 64-bit entry)"
        )
    if not fields.loadflags & LOADFLAG_LOADED_HIGH:
        raise LoaderError(f"{name}: a zImage (loaded low); only bzImage is supported")
    if not fields.xloadflags & XLF_KERNEL_64:
        raise LoaderError(f"{name}: no 64-bit entry point (xloadflags bit 0 clear): a 32-bit kernel?")
    setup_sects = fields.setup_sects or 4  # 0 means 4, for historical reasons
    kernel_offset = (setup_sects + 1) * 512
    if kernel_offset >= len(data):
        raise LoaderError(f"{name}: setup_sects {setup_sects} points past the end of the file")
    # The header really ends at 0x202 + the jump's offset byte (boot.rst).
    header_end = min(0x202 + data[0x201], SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE)
    header = {k: v for k, v in fields.items() if not k.startswith("_")}
    return BzImage(
        header=header,
        header_bytes=data[SETUP_HEADER_OFFSET:header_end],
        kernel=data[kernel_offset:],
        version=fields.version,
        cmdline_size=fields.cmdline_size or 255,
        initrd_addr_max=fields.initrd_addr_max or 0x37FFFFFF,
        kernel_alignment=fields.kernel_alignment or 0x200000,
        pref_address=fields.pref_address or 0x100000,
        init_size=fields.init_size,
        relocatable=bool(fields.relocatable_kernel),
    )
