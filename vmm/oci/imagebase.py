"""The image base: a container's VM saved with its root mounted, one per image.

The container base (vmm/oci/monitor.py) is our guest at /init's ready point
with an empty disk: every container restores it, then pays, in guest kernel
code, for the disk's arrival, the ext4 mount, the kernel mounts of
config.json and reading its programs from the fresh disk. On PVM that code
runs in KVM's instruction emulator: ~1 s for busybox's `echo`, where the
`echo` itself takes 0.2 s. None of it depends on the process, only on the
root, so it is done once per root and saved:

1. the first container of a root restores the container base and sends /init
   the root's request only (``REQUEST_PREPARE``): /init mounts the disk and the
   mounts, reads the root's programs ahead into the page cache, and comes back
   to its ready point;
2. the VMM saves the VM there, with a copy of the root disk as it is at that
   instant (``save_snapshot(carry_disks=True)``): the guest's page cache and
   the disk's blocks must agree;
3. a later container of the same root copies that disk (its holes stay holes:
   milliseconds) instead of running ``mkfs.ext4``, restores the image base,
   and sends only its process.

The key is the container base's key (kernel, vmm, host, size) with the root's
*content* (:func:`scan`: every name, type, mode, owner, size, mtime, extended
attribute and byte under ``root.path`` and the bind mounts' sources, as
``mkfs.ext4 -d`` copies them) and the root's settings: the same image run by
containerd again, whatever its bundle path, finds its base.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vmm.digest import hasher, hexdigest
from vmm.oci import inroot
from vmm.oci.spec import BundleError, ContainerSpec, MountKind

PRELOAD_BYTES = 16 << 20  # at most this much of the root read ahead (and at most 1/8 of RAM)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RootContent:
    digest: str  # of everything mkfs.ext4 -d copies into the root image
    preload: tuple[str, ...]  # programs and libraries to read ahead, as paths in the guest


def _loadable(name: str, info: os.stat_result) -> bool:
    """A program or a shared library: what an exec reads first."""
    return bool(info.st_mode & 0o111) or name.endswith(".so") or ".so." in name


class _Scanner:
    """Every entry of a tree, read through descriptors that never follow the image's links."""

    def __init__(self, preload_budget: int) -> None:
        self.hash = hasher(16)
        self.seen: dict[tuple[int, int], str] = {}  # hard links: (device, inode) -> first path
        self.preload: list[str] = []
        self.budget = preload_budget

    def entry(self, guest_path: str, entry: inroot.Entry, *, mtime: bool = True) -> None:
        info = entry.info
        mode = info.st_mode
        record = [guest_path, f"{mode:o}", info.st_uid, info.st_gid,
                  info.st_mtime_ns if mtime else 0]
        try:
            names = sorted(os.listxattr(entry.host_path, follow_symlinks=False))
        except OSError:
            names = []
        for name in names:
            try:
                value = os.getxattr(entry.host_path, name, follow_symlinks=False)
                record.append([name, value.hex()])
            except OSError:
                pass
        identity = (info.st_dev, info.st_ino)
        if stat.S_ISREG(mode) and info.st_nlink > 1 and identity in self.seen:
            record.append(["link", self.seen[identity]])
        elif stat.S_ISREG(mode):
            self.seen[identity] = guest_path
            record.append(self._content(entry))
            if (info.st_size and self.budget >= info.st_size
                    and _loadable(entry.name, info)):
                self.preload.append(guest_path)
                self.budget -= info.st_size
        elif stat.S_ISLNK(mode):
            record.append(os.readlink(entry.name, dir_fd=entry.parent))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            record.append(info.st_rdev)
        self.hash.update(json.dumps(record).encode() + b"\n")

    @staticmethod
    def _content(entry: inroot.Entry) -> str:
        content = hasher(16)
        with os.fdopen(entry.open(), "rb") as f:
            while chunk := f.read(_CHUNK):
                content.update(chunk)
        return f"{entry.info.st_size}:{content.hexdigest()}"

    def tree(self, guest_top: str, host_top: str) -> None:
        """``host_top`` and everything under it, named as the guest will see it.

        ``host_top`` itself is followed (root.path and a bind source are the
        caller's, as runc follows them); nothing beneath it is. Not the root
        directory's own mtime: containerd's rootfs is an overlay whose top
        directory is the container's new upper directory.
        """
        top = os.path.realpath(host_top)
        parent = os.open(os.path.dirname(top), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            name = os.path.basename(top) or "."
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            self.entry(guest_top, inroot.Entry(guest_top, parent, name, info),
                       mtime=guest_top != "/")
            if not stat.S_ISDIR(info.st_mode):
                return
            directory = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=parent)
        finally:
            os.close(parent)
        try:
            for entry in inroot.walk(directory):
                self.entry(guest_top.rstrip("/") + entry.path, entry)
        finally:
            os.close(directory)


def scan(spec: ContainerSpec, mem: int) -> RootContent:
    """The root's content digest, and the programs to read ahead (BundleError if unreadable)."""
    scanner = _Scanner(min(PRELOAD_BYTES, mem // 8))
    top = str(spec.root)
    try:
        scanner.tree("/", top)
        for mount in spec.mounts:
            if mount.kind is MountKind.BIND:  # copied into the image at the destination
                scanner.hash.update(f"bind {mount.destination}\n".encode())
                top = mount.source
                scanner.tree(mount.destination, top)
    except (OSError, inroot.RootPathError) as e:
        raise BundleError(f"{top}: cannot read the container's root: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    return RootContent(scanner.hash.hexdigest(), tuple(scanner.preload))


def image_base_key(base_key: str, content: RootContent, root_settings: tuple[str, ...]) -> str:
    """The image base's name in the snapshot cache, beside its container base's."""
    facts = {"container_base": base_key, "root": content.digest, "settings": list(root_settings)}
    return "img-" + hexdigest(json.dumps(facts, sort_keys=True).encode(), 10)


def carried_disk(directory: Path) -> Path:
    """The root disk an image base carries (save_snapshot's copy)."""
    from vmm.snapshot.save import carried_disk_name

    return Path(directory) / carried_disk_name(0)
