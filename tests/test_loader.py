"""Loaders and boot structures, checked byte by byte (no KVM needed)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.guest import decode_argv, guest_kernel
from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.mptable import build_mptable
from vmm.builder import encode_argv
from vmm.errors import LoaderError
from vmm.memory import GuestMemory
from vmm.images.cpio import CpioWriter
from vmm.loader.bootparams import build_zero_page
from vmm.loader.bzimage import SETUP_HEADER_OFFSET, parse_bzimage
from vmm.loader.cmdline import Cmdline
from vmm.arch.x86_64.layout import ram_ranges
from vmm.loader.e820 import E820_RAM, E820_RESERVED, e820_map
from vmm.loader.elf import parse_elf
from vmm.loader.pvh import HVM_START_MAGIC, build_start_info


@pytest.fixture(scope="module")
def bzimage() -> bytes:
    return guest_kernel().bzimage.read_bytes()


def test_our_bzimage_header(bzimage: bytes) -> None:
    image = parse_bzimage(bzimage)
    assert image.version >= 0x020C
    assert image.header["header"] == b"HdrS"
    assert image.header["xloadflags"] & 1  # 64-bit entry
    assert image.pref_address == 0x1000000
    assert image.cmdline_size >= 255
    assert image.init_size > len(image.kernel)
    # The header we copy ends where the jump says (0x202 + byte at 0x201).
    assert len(image.header_bytes) == 0x202 + bzimage[0x201] - SETUP_HEADER_OFFSET


def test_our_vmlinux_has_the_pvh_note() -> None:
    elf = parse_elf(guest_kernel().vmlinux.read_bytes())
    assert elf.pvh_entry is not None and 0x1000000 <= elf.pvh_entry < elf.highest
    assert elf.lowest == 0x1000000


def test_elf_reader_agrees_with_pyelftools() -> None:
    """Our small program-header reader against a well-kept ELF library."""
    import io

    from elftools.elf.elffile import ELFFile

    data = guest_kernel().vmlinux.read_bytes()
    ours = parse_elf(data)
    theirs = ELFFile(io.BytesIO(data))
    loads = [s for s in theirs.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_memsz"]]
    assert ours.entry == theirs["e_entry"]
    assert [(s.paddr, s.data, s.memsz) for s in ours.segments] == [
        (s["p_paddr"], s.data(), s["p_memsz"]) for s in loads]
    notes = [n for s in theirs.iter_segments() if s["p_type"] == "PT_NOTE" for n in s.iter_notes()]
    pvh = [n for n in notes if n["n_name"] == "Xen" and n["n_type"] == 18]
    assert len(pvh) == 1
    desc = pvh[0]["n_desc"]
    raw = desc if isinstance(desc, bytes) else bytes.fromhex(desc)
    assert ours.pvh_entry == int.from_bytes(raw[:4], "little")


@pytest.mark.parametrize("cut", [10, 64, 64 + 56 * 2, 5000])
def test_truncated_elf_is_refused(cut: int) -> None:
    data = guest_kernel().vmlinux.read_bytes()[:cut]
    with pytest.raises(LoaderError, match="malformed ELF|past the end|no loadable"):
        parse_elf(data, "k")


@pytest.mark.parametrize("offset,value,message", [
    (0x202, b"XXXX", "not a bzImage"),
    (0x1FE, b"\x00\x00", "bad boot flag"),
    (0x206, struct.pack("<H", 0x0200), "too old"),
    (0x236, struct.pack("<H", 0), "no 64-bit entry"),
    (0x211, b"\x00", "zImage"),
])
def test_bad_bzimage_headers(bzimage: bytes, offset: int, value: bytes, message: str) -> None:
    broken = bytearray(bzimage[:0x4000])
    broken[offset : offset + len(value)] = value
    with pytest.raises(LoaderError, match=message):
        parse_bzimage(bytes(broken), "k")


def test_truncated_files_are_refused() -> None:
    with pytest.raises(LoaderError, match="too short"):
        parse_bzimage(b"\0" * 100, "k")
    with pytest.raises(LoaderError, match="malformed ELF|no loadable"):
        parse_elf(b"\x7fELF" + b"\x02\x01\x01" + b"\0" * 40, "k")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_headers_never_crash_the_parser(bzimage: bytes, data) -> None:
    image = bytearray(bzimage[:0x10000])  # the header and some kernel after it
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(SETUP_HEADER_OFFSET, 0x26C))
        image[at] = data.draw(st.integers(0, 255))
    try:
        parsed = parse_bzimage(bytes(image), "fuzzed")
    except LoaderError as e:
        assert str(e).startswith("fuzzed: ")  # one line naming the file
        return
    # Whatever it accepted holds together: what vmm relies on is true of it.
    assert image[0x1FE:0x200] == b"\x55\xaa" and image[0x202:0x206] == b"HdrS"
    assert parsed.version >= 0x20C and parsed.header["loadflags"] & 1 and parsed.header["xloadflags"] & 1
    setup_sects = image[0x1F1] or 4
    assert parsed.kernel == bytes(image[(setup_sects + 1) * 512:]) and parsed.kernel
    assert parsed.header_bytes == bytes(image[0x1F1:0x1F1 + len(parsed.header_bytes)])
    assert parsed.cmdline_size > 0 and parsed.initrd_addr_max > 0 and parsed.pref_address > 0


def test_e820_layout() -> None:
    small = e820_map(512 << 20)
    assert small[0] == (0, layout.EBDA_START, E820_RAM)
    assert small[1] == (layout.EBDA_START, 0x100000 - layout.EBDA_START, E820_RESERVED)
    assert small[2] == (0x100000, (512 << 20) - 0x100000, E820_RAM)
    big = e820_map(5 << 30)
    assert big[-2] == (0x100000, layout.MMIO_GAP_START - 0x100000, E820_RAM)
    assert big[-1] == (1 << 32, (5 << 30) - layout.MMIO_GAP_START, E820_RAM)
    assert ram_ranges(5 << 30) == [(0, layout.MMIO_GAP_START), (1 << 32, (5 << 30) - layout.MMIO_GAP_START)]


def test_zero_page_fields(bzimage: bytes) -> None:
    image = parse_bzimage(bzimage)
    e820 = e820_map(256 << 20)
    page = build_zero_page(image.header_bytes, cmdline_address=layout.CMDLINE, cmdline_size=2047,
                           e820=e820, initrd=(0x0F000000, 0x123456))
    assert len(page) == 4096
    u8 = lambda off: page[off]
    u16 = lambda off: struct.unpack_from("<H", page, off)[0]
    u32 = lambda off: struct.unpack_from("<I", page, off)[0]
    assert page[0x202:0x206] == b"HdrS"
    assert u16(0x1FE) == 0xAA55
    assert u8(0x210) == 0xFF  # type_of_loader: undefined
    assert u8(0x211) & 0x80  # CAN_USE_HEAP
    assert u32(0x228) == layout.CMDLINE  # cmd_line_ptr
    assert u32(0x218) == 0x0F000000 and u32(0x21C) == 0x123456  # ramdisk
    assert u8(0x1E8) == len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        assert struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) == (addr, size, kind)
    # Nothing of the boot sector beyond the header leaks in (kernels pad it with 0xff).
    assert page[:0x1E8] == bytes(0x1E8)
    assert u32(0x238) == image.cmdline_size  # the kernel's own limit is kept


def test_pvh_start_info() -> None:
    info = build_start_info(cmdline_address=0x20000, memmap_address=0x6100, memmap_entries=3,
                            modlist_address=0x6200, nr_modules=1)
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries = struct.unpack_from(
        "<IIIIQQQQI", info)
    assert (magic, version, nr_modules, modlist, cmdline, rsdp, memmap, entries) == (
        HVM_START_MAGIC, 1, 1, 0x6200, 0x20000, 0, 0x6100, 3)
    assert len(info) == 56


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_mptable(cpus: int) -> None:
    table = build_mptable(cpus, layout.MPTABLE)
    assert table[:4] == b"_MP_"
    assert sum(table[:16]) % 256 == 0  # floating pointer checksum
    physptr = struct.unpack_from("<I", table, 4)[0]
    assert physptr == layout.MPTABLE + 16
    config = table[16:]
    assert config[:4] == b"PCMP"
    length, spec, _, = struct.unpack_from("<HBB", config, 4)
    assert length == len(config) and spec == 4
    assert sum(config) % 256 == 0
    entries = struct.unpack_from("<H", config, 34)[0]
    assert struct.unpack_from("<I", config, 36)[0] == layout.LAPIC_BASE
    at = 44
    processors = []
    for _ in range(entries):
        kind = config[at]
        if kind == 0:
            processors.append((config[at + 1], config[at + 3]))
            at += 20
        else:
            at += 8
    assert at == len(config)
    assert processors == [(i, 1 | (2 if i == 0 else 0)) for i in range(cpus)]
    assert len(table) <= 0xA0000 - layout.MPTABLE  # fits in the EBDA


def test_nul_in_argv_is_refused() -> None:
    from vmm.errors import UsageError

    with pytest.raises(UsageError, match="NUL"):
        encode_argv(("a\0b",))


def test_cmdline_limit() -> None:
    line = Cmdline(limit=20).add("console=ttyS0", "quiet")
    assert line.encode() == b"console=ttyS0 quiet\0"
    with pytest.raises(LoaderError, match="longer than the kernel accepts"):
        line.add("x" * 10).encode()


# Real argv strings: no NUL, no lone surrogates except surrogateescape'd bytes (added below).
_ARG = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20)


@given(st.lists(_ARG | st.just("raw\udcff-byte"), min_size=1, max_size=6))
def test_argv_encoding_round_trips(argv: list[str]) -> None:
    encoded = encode_argv(tuple(argv))
    assert encoded.startswith("vmm.argv=")
    value = encoded.removeprefix("vmm.argv=")
    assert " " not in value and "\n" not in value and '"' not in value
    assert decode_argv(value) == argv


def test_cpio_newc_layout() -> None:
    archive = CpioWriter()
    archive.directory("bin")
    archive.file("init", b"#!/bin/sh\n", 0o755)
    archive.symlink("bin/sh", "/bin/busybox")
    archive.char_device("dev/console", 5, 1)
    data = archive.finish()
    assert data.startswith(b"070701")
    assert len(data) % 512 == 0
    assert b"TRAILER!!!\0" in data
    # Each header: 6-byte magic + 13 eight-digit hex fields; the name follows.
    names = []
    at = 0
    while True:
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[at + 110 : at + 110 + namesize - 1].decode()
        names.append(name)
        if name == "TRAILER!!!":
            break
        at += 110 + namesize
        at += -at % 4
        at += filesize + (-filesize % 4)
    assert names == ["bin", "init", "bin/sh", "dev/console", "TRAILER!!!"]


# --- where a kernel may go ----------------------------------------------------------------------
def tiny_elf(*segments: tuple[int, int]) -> bytes:
    """An x86-64 ELF with one PT_LOAD per (paddr, size), 16 bytes of code each."""
    from vmm.loader.elf import ELF_HEADER, PROGRAM_HEADER

    phoff = ELF_HEADER.size
    data_at = phoff + PROGRAM_HEADER.size * len(segments)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ELF_HEADER.pack(ident, 2, 62, 1, segments[0][0], phoff, 0, 0, ELF_HEADER.size,
                             PROGRAM_HEADER.size, len(segments), 0, 0, 0)
    table = b"".join(PROGRAM_HEADER.pack(1, 5, data_at, 0xFFFF_FFFF_8000_0000 + paddr, paddr, 16,
                                         size, 0x1000) for paddr, size in segments)
    return header + table + b"\x90" * 16


@pytest.mark.parametrize("paddr, size, message", [
    (0x7000, 0x1000, r"segment 1 at 0x7000\+0x1000 overlaps the zero page vmm writes at 0x7000"),
    (0x6800, 0x2000, r"overlaps the PVH memory map and module list"),
    (0x20000, 0x10, r"overlaps the kernel command line"),
    (0x50000, 0x1000, r"segment 1 at 0x50000\+0x1000 is below 1 MiB"),
    (0x9F000, 0x2000, r"overlaps the MP table"),
])
def test_kernel_segments_may_not_land_on_vmms_boot_structures(paddr, size, message) -> None:
    from vmm.loader.linux import load_kernel

    memory = GuestMemory([(0, 64 << 20)])
    try:
        with pytest.raises(LoaderError, match=message):
            load_kernel(memory, tiny_elf((0x100_0000, 0x1000), (paddr, size)), "k")
    finally:
        memory.close()


def test_a_kernel_at_1_mib_loads_with_a_typed_result() -> None:
    from vmm.loader.linux import EntryProtocol, KernelFormat, load_kernel

    memory = GuestMemory([(0, 64 << 20)])
    try:
        loaded = load_kernel(memory, tiny_elf((0x10_0000, 0x2000), (0x100_0000, 0x1000)), "k")
        assert loaded.format is KernelFormat.VMLINUX and loaded.protocol is EntryProtocol.LINUX64
        assert loaded.entry == 0x10_0000 and loaded.end == 0x100_1000
        assert memory.read(0x10_0000, 16) == b"\x90" * 16 and loaded.cmdline_limit == 2047
    finally:
        memory.close()


def test_boot_structures_do_not_overlap_and_stay_below_1_mib() -> None:
    structures = sorted(layout.BOOT_STRUCTURES, key=lambda s: s[1])
    for (name, start, size), (next_name, next_start, _) in zip(structures, structures[1:]):
        assert start + size <= next_start, f"{name} overlaps {next_name}"
    assert structures[-1][1] + structures[-1][2] <= layout.HIGH_MEMORY
    from vmm.arch.x86_64.cpu import GDT_ENTRIES

    assert len(GDT_ENTRIES) * 8 == layout.BOOT_GDT_SIZE  # the GDT the IDT used to overwrite
