"""The image base's key and disk, without KVM: what makes two roots "the same image".

vmm/oci/imagebase.py names an image base by the root's content; a container
restored from the wrong one would see another image's files, so every
difference mkfs.ext4 -d would copy must change the digest, and nothing else
(the bundle's path, the overlay root directory's mtime) may.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.test_oci_spec import CONTAINERD_LIKE
from vmm.devices.disk import copy_image
from vmm.oci import imagebase
from vmm.oci.spec import load_bundle

MiB = 1 << 20


def bundle(directory: Path, mounts: list[dict] | None = None) -> Path:
    rootfs = directory / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    program = rootfs / "bin" / "tool"
    program.write_bytes(b"\x7fELF" + b"x" * 5000)
    program.chmod(0o755)
    os.link(program, rootfs / "bin" / "tool2")  # an applet link, as busybox's
    (rootfs / "etc" / "motd").write_text("hello\n")
    (rootfs / "lib").mkdir()
    (rootfs / "lib" / "libc.so.6").write_bytes(b"\x7fELF" + b"l" * 3000)
    config = json.loads(json.dumps(CONTAINERD_LIKE))
    config["mounts"] += mounts or []
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def content(directory: Path, mem: int = 128 * MiB) -> imagebase.RootContent:
    return imagebase.scan(load_bundle(directory), mem)


def test_the_same_tree_elsewhere_is_the_same_image(tmp_path):
    first = content(bundle(tmp_path / "a"))
    copy = tmp_path / "b"
    shutil.copytree(tmp_path / "a", copy, symlinks=True, copy_function=shutil.copy2)
    os.unlink(copy / "rootfs" / "bin" / "tool2")
    os.link(copy / "rootfs" / "bin" / "tool", copy / "rootfs" / "bin" / "tool2")
    shutil.copystat(tmp_path / "a" / "rootfs" / "bin", copy / "rootfs" / "bin")  # the mtime
    os.utime(copy / "rootfs", ns=(1, 1))  # the overlay's new upper directory
    assert content(copy) == first
    # a program and a library, read ahead once (the link is the same file)
    assert first.preload == ("/bin/tool", "/lib/libc.so.6")


@pytest.mark.parametrize("change", [
    lambda root: (root / "etc" / "motd").write_text("hellO\n"),  # a byte
    lambda root: (root / "etc" / "motd").chmod(0o600),  # a mode
    lambda root: os.utime(root / "etc" / "motd", ns=(5, 5)),  # an mtime, which mkfs copies
    lambda root: os.chown(root / "etc" / "motd", 1000, 1000),  # an owner
    lambda root: (root / "etc" / "new").write_text(""),  # a new empty file
    lambda root: os.symlink("motd", root / "etc" / "link"),  # a link
    lambda root: (os.unlink(root / "bin" / "tool2"),  # a copy where there was a hard link
                  shutil.copy2(root / "bin" / "tool", root / "bin" / "tool2")),
])
def test_what_mkfs_copies_changes_the_image(tmp_path, change):
    before = content(bundle(tmp_path / "a"))
    change(tmp_path / "a" / "rootfs")
    assert content(tmp_path / "a").digest != before.digest


def test_extended_attributes_are_part_of_the_image(tmp_path):
    before = content(bundle(tmp_path / "a"))
    try:
        os.setxattr(tmp_path / "a" / "rootfs" / "etc" / "motd", "user.vmm", b"1")
    except OSError as e:
        pytest.fail(f"{tmp_path}: this file system keeps no user extended attributes "
                    f"({e.strerror}): run the tests with TMPDIR on ext4, xfs or tmpfs >= 6.6",
                    pytrace=False)
    assert content(tmp_path / "a").digest != before.digest


def test_bind_mount_sources_are_part_of_the_image(tmp_path):
    source = tmp_path / "hosts"
    source.write_text("127.0.0.1 localhost\n")
    mount = [{"destination": "/etc/hosts", "type": "bind", "source": str(source),
              "options": ["rbind", "ro"]}]
    before = content(bundle(tmp_path / "a", mount))
    assert before.digest != content(bundle(tmp_path / "b")).digest
    source.write_text("127.0.0.2 localhost\n")
    assert content(tmp_path / "a").digest != before.digest


def test_preload_stays_within_its_budget(tmp_path):
    # 1/8 of the guest's RAM: a 32 KiB guest takes the 3 KiB library, not the 5 KiB program
    assert content(bundle(tmp_path / "a"), mem=32 * 1024).preload == ("/lib/libc.so.6",)


def test_the_key_follows_the_base_and_the_root_settings(tmp_path):
    root = content(bundle(tmp_path / "a"))
    key = imagebase.image_base_key("base1", root, ("root=/dev/vda",))
    assert key.startswith("img-") and key == imagebase.image_base_key("base1", root, ("root=/dev/vda",))
    assert key != imagebase.image_base_key("base2", root, ("root=/dev/vda",))  # another kernel, vmm
    assert key != imagebase.image_base_key("base1", root, ("root=/dev/vda", "root_ro=1"))


def test_copy_image_keeps_holes_and_never_overwrites(tmp_path):
    source, target = tmp_path / "a.img", tmp_path / "b.img"
    with open(source, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(5 * MiB)
        f.write(b"x" * 10000)
        f.seek(40 * MiB + 7)
        f.write(b"tail")
    copied = copy_image(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert copied < 1 * MiB and os.stat(target).st_blocks * 512 < 1 * MiB  # holes stay holes
    with pytest.raises(FileExistsError):
        copy_image(source, target)
    assert target.read_bytes() == source.read_bytes()
