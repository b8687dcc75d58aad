"""Host-side decompression (vmm/loader/decompress.py): a bzImage's vmlinux, an initrd's cpio.

Without KVM: bzImages made here around a small ELF, their payload in each format
the kernel knows (gzip, bzip2, lzma, xz by Python; lz4, zstd, lzo by Debian's
tools, as the kernel's own build frames them, the decompressed size appended),
Debian's initrd layout (a plain cpio, then a compressed one), and the bad
inputs: one line naming the file, nothing left in the cache. With KVM: our own
bzImage booted both ways (the guest's decompressor is emulated on PVM).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import subprocess

import pytest

from tests.guest import guest_kernel, vmm_run
from tests.packages import require
from vmm.errors import LoaderError
from vmm.loader.bzimage import SETUP_HEADER_OFFSET, SetupHeader
from vmm.loader.decompress import plain_initrd, vmlinux_of

ELF = b"\x7fELF\x02\x01\x01" + bytes(57) + b"the kernel itself " * 2000


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache of the test's own for what it decompresses (not for the boot test: it needs
    the session's kernel build)."""
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "decompressed"


def compress(name: str, data: bytes) -> bytes:
    """As the kernel's build does: each format, the decompressed size after all but gzip."""
    size = len(data).to_bytes(4, "little")
    if name == "gzip":
        return gzip.compress(data)
    if name == "bzip2":
        return bz2.compress(data) + size
    if name in ("xz", "lzma"):
        form = lzma.FORMAT_XZ if name == "xz" else lzma.FORMAT_ALONE
        return lzma.compress(data, format=form, check=lzma.CHECK_CRC32 if name == "xz" else -1) + size
    tool = {"lz4": [require("lz4"), "-l", "-c"], "zstd": [require("zstd"), "-c", "-q"],
            "lzo": [require("lzop"), "-c"]}[name]
    return subprocess.run(tool, input=data, capture_output=True, check=True).stdout + size


def bzimage(path, payload: bytes):
    """A bzImage whose protected-mode part starts 1 KiB in and holds ``payload`` at 0x100."""
    image = bytearray(1024) + bytearray(0x100) + payload
    header = SetupHeader.build(dict(
        setup_sects=1, root_flags=0, syssize=0, ram_size=0, vid_mode=0xFFFF, root_dev=0,
        boot_flag=0xAA55, jump=0x80EB, header=b"HdrS", version=0x020F, realmode_swtch=0,
        start_sys_seg=0, kernel_version=0, type_of_loader=0, loadflags=0x01, setup_move_size=0,
        code32_start=0x100000, ramdisk_image=0, ramdisk_size=0, bootsect_kludge=0,
        heap_end_ptr=0, ext_loader_ver=0, ext_loader_type=0, cmd_line_ptr=0,
        initrd_addr_max=0x7FFFFFFF, kernel_alignment=0x200000, relocatable_kernel=1,
        min_alignment=21, xloadflags=0x03, cmdline_size=2048, hardware_subarch=0,
        hardware_subarch_data=0, payload_offset=0x100, payload_length=len(payload),
        setup_data=0, pref_address=0x1000000, init_size=0x2000000, handover_offset=0,
        kernel_info_offset=0))
    image[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(header)] = header
    path.write_bytes(bytes(image))
    return path


@pytest.mark.parametrize("name", ["gzip", "bzip2", "lzma", "xz", "lz4", "zstd", "lzo"])
def test_every_kernel_compression_decompresses_to_the_elf(tmp_path, private_cache, name):
    lines = []
    image = bzimage(tmp_path / "bzImage", compress(name, ELF))
    vmlinux = vmlinux_of(image, lines.append)
    assert vmlinux.read_bytes() == ELF and vmlinux.is_relative_to(private_cache)
    assert len(lines) == 1 and f"its {name} payload decompressed on the host" in lines[0]
    assert vmlinux_of(image, lines.append) == vmlinux and len(lines) == 1  # cached: said once


def cpio(*names: str) -> bytes:
    """A newc archive of empty files, with its trailer, 4-byte aligned."""
    out = b""
    for name in (*names, "TRAILER!!!"):
        encoded = name.encode() + b"\0"
        header = (b"070701" + b"%08X" % 1 + b"%08X" % 0o100644 + b"%08X" % 0 * 4 + b"%08X" % 0
                  + b"%08X" % 0 * 4 + b"%08X" % len(encoded) + b"%08X" % 0)
        entry = header + encoded
        out += entry + bytes(-len(entry) % 4)
    return out


def test_debians_initrd_a_plain_cpio_then_a_zstd_one_becomes_plain_cpio(tmp_path, private_cache):
    microcode, main = cpio("kernel/x86/microcode/AuthenticAMD.bin"), cpio("init", "bin/sh")
    zstd = subprocess.run([require("zstd"), "-c", "-q"], input=main, capture_output=True,
                          check=True).stdout
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(microcode + bytes(8) + zstd)  # NUL padding between, as the kernel allows
    plain = plain_initrd(initrd, lambda line: None)
    assert plain.read_bytes() == microcode + main
    already = tmp_path / "plain.cpio"
    already.write_bytes(main)
    assert plain_initrd(already, lambda line: None) == already  # nothing to do: itself


@pytest.mark.parametrize("mangle, message", [
    (lambda p: p[: len(p) // 2], "cut short"),
    (lambda p: p[:10] + bytes(len(p) - 10), "does not decompress"),
    (lambda p: b"\x42\x42" + p[2:], "compressed in a way vmm does not know"),
])
def test_a_damaged_payload_is_one_line_and_leaves_nothing_cached(tmp_path, private_cache,
                                                                  mangle, message):
    image = bzimage(tmp_path / "bzImage", mangle(compress("xz", ELF)))
    with pytest.raises(LoaderError, match=message) as refused:
        vmlinux_of(image, lambda line: None)
    assert str(image) in str(refused.value) and "\n" not in str(refused.value)
    assert not [p for p in private_cache.rglob("*") if p.is_file()]


def test_a_payload_that_is_not_an_elf_or_an_initrd_that_is_not_cpio_is_refused(tmp_path,
                                                                                 private_cache):
    with pytest.raises(LoaderError, match="not an ELF vmlinux"):
        vmlinux_of(bzimage(tmp_path / "bzImage", compress("gzip", b"no kernel here" * 100)),
                   lambda line: None)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(gzip.compress(b"not an archive"))
    with pytest.raises(LoaderError, match="neither a cpio archive nor a compressed one"):
        plain_initrd(initrd, lambda line: None)
    assert not [p for p in private_cache.rglob("*") if p.is_file()]


@pytest.mark.boot
@pytest.mark.kvm
def test_our_bzimage_boots_decompressed_by_vmm_and_as_it_is():
    """Decompressed on the host (the default) or by its own LZ4 decompressor in the guest."""
    bz = str(guest_kernel().bzimage)
    decompressed = vmm_run("--cold", "--kernel", bz, "--", "echo", "decompressed by vmm")
    assert decompressed.returncode == 0, decompressed.stderr.decode()
    assert decompressed.stdout == b"decompressed by vmm\n"
    as_is = vmm_run("--cold", "--kernel", bz, "--no-decompress", "--", "echo", "by itself")
    assert as_is.returncode == 0 and as_is.stdout == b"by itself\n", as_is.stderr.decode()
