"""virtio-blk end to end: a real guest reads, writes and flushes real image files.

Two boots: one with two disks at once (a read-only random disk whose checksum
the guest computes and cannot change, and a writable one the guest writes at
several offsets, first and last sector included), and one with its root file
system on an ext4 image built by `vmm image rootfs`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guest import vmm_run
from tests.packages import require

pytestmark = [pytest.mark.boot, pytest.mark.kvm]

SECTOR = 512


def test_two_disks_read_write_and_read_only(tmp_path: Path) -> None:
    ro_image = tmp_path / "random.img"
    ro_image.write_bytes(os.urandom(2 << 20))
    ro_before = ro_image.read_bytes()
    rw_image = tmp_path / "scratch.img"
    sectors = 4096
    rw_image.write_bytes(b"\0" * (sectors * SECTOR))
    offsets = [0, 1, 777, sectors - 1]  # first and last sector included
    writes = "; ".join(
        f"printf 'vmm-sector-{n:05d}' | dd of=/dev/vdb bs=512 seek={n} conv=notrunc,fsync 2>/dev/null"
        for n in offsets
    )
    script = (
        "sha256sum /dev/vda; cat /sys/block/vda/ro /sys/block/vdb/ro /sys/block/vdb/size; "
        "if dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; "
        "then echo ro-write-succeeded; else echo ro-write-refused; fi; "
        f"{writes}; sync; echo done"
    )
    result = vmm_run("--disk", f"{ro_image},ro,serial=random-disk", "--disk", str(rw_image),
                     "--", "sh", "-c", script)
    out = result.stdout.decode().split()
    assert result.returncode == 0, result.stderr.decode()
    assert out[0] == hashlib.sha256(ro_before).hexdigest()
    assert out[2:5] == ["1", "0", str(sectors)]
    assert out[5] == "ro-write-refused"
    assert out[-1] == "done"
    assert ro_image.read_bytes() == ro_before  # byte-identical
    data = rw_image.read_bytes()
    expected = bytearray(sectors * SECTOR)
    for n in offsets:
        marker = f"vmm-sector-{n:05d}".encode()
        expected[n * SECTOR : n * SECTOR + len(marker)] = marker
    assert data == bytes(expected)  # exactly those bytes, nothing else


def test_root_on_an_ext4_image_built_by_vmm(tmp_path: Path) -> None:
    image = tmp_path / "root.ext4"
    built = subprocess.run([sys.executable, "-m", "vmm", "image", "rootfs", str(image),
                            "--size", "32M"], capture_output=True)
    assert built.returncode == 0, built.stderr.decode()
    result = vmm_run("--disk", str(image), "--root", "/dev/vda", "--", "sh", "-c",
                     "grep ' / ' /proc/mounts | cut -d' ' -f1,3; echo persisted > /root/note; sync")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split() == ["/dev/vda", "ext4"]
    dump = subprocess.run([require("debugfs"), "-R", "cat /root/note", str(image)],
                          capture_output=True)
    assert dump.stdout == b"persisted\n"

    # The same image attached read-only: mounted read-only (a read-write mount of a
    # read-only disk fails), writes refused, the image byte for byte as it was.
    before = image.read_bytes()
    result = vmm_run("--disk", f"{image},ro", "--root", "/dev/vda", "--", "sh", "-c",
                     "grep ' / ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1; cat /root/note; "
                     "echo changed > /root/note && echo written")
    out = result.stdout.decode()  # the guest's stdout and stderr share the serial console
    assert result.returncode != 0, out
    assert out.splitlines()[:2] == ["ro", "persisted"]  # also: the first boot left it clean
    assert "can't create /root/note: Read-only file system" in out
    assert "written" not in out
    assert image.read_bytes() == before
