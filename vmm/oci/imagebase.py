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
from vmm.oci.spec import ContainerSpec, MountKind

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
    def __init__(self, preload_budget: int) -> None:
        self.hash = hasher(16)
        self.seen: dict[tuple[int, int], str] = {}  # hard links: (device, inode) -> first path
        self.preload: list[str] = []
        self.budget = preload_budget

    def entry(self, guest_path: str, host_path: str, *, mtime: bool = True) -> None:
        info = os.lstat(host_path)
        mode = info.st_mode
        record = [guest_path, f"{mode:o}", info.st_uid, info.st_gid,
                  info.st_mtime_ns if mtime else 0]
        try:
            names = sorted(os.listxattr(host_path, follow_symlinks=False))
        except OSError:
            names = []
        for name in names:
            try:
                record.append([name, os.getxattr(host_path, name, follow_symlinks=False).hex()])
            except OSError:
                pass
        identity = (info.st_dev, info.st_ino)
        if stat.S_ISREG(mode) and info.st_nlink > 1 and identity in self.seen:
            record.append(["link", self.seen[identity]])
        elif stat.S_ISREG(mode):
            self.seen[identity] = guest_path
            record.append(self._content(host_path, info.st_size))
            if (info.st_size and self.budget >= info.st_size
                    and _loadable(os.path.basename(guest_path), info)):
                self.preload.append(guest_path)
                self.budget -= info.st_size
        elif stat.S_ISLNK(mode):
            record.append(os.readlink(host_path))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            record.append(info.st_rdev)
        self.hash.update(json.dumps(record).encode() + b"\n")

    @staticmethod
    def _content(path: str, size: int) -> str:
        content = hasher(16)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                content.update(chunk)
        return f"{size}:{content.hexdigest()}"

    def tree(self, guest_top: str, host_top: str) -> None:
        """``host_top`` and everything under it, named as the guest will see it.

        Not the root directory's own mtime: containerd's rootfs is an overlay
        whose top directory is the container's new upper directory.
        """
        self.entry(guest_top, host_top, mtime=guest_top != "/")
        if not os.path.isdir(host_top) or os.path.islink(host_top):
            return
        for directory, dirs, files in os.walk(host_top):
            dirs.sort()
            relative = os.path.relpath(directory, host_top)
            base = guest_top.rstrip("/") + ("" if relative == "." else "/" + relative)
            for name in sorted(dirs + files):
                self.entry(f"{base}/{name}", os.path.join(directory, name))


def scan(spec: ContainerSpec, mem: int) -> RootContent:
    """The root's content digest, and the programs to read ahead (OSError if unreadable)."""
    scanner = _Scanner(min(PRELOAD_BYTES, mem // 8))
    scanner.tree("/", str(spec.root))
    for mount in spec.mounts:
        if mount.kind is MountKind.BIND:  # copied into the image at the destination
            scanner.hash.update(f"bind {mount.destination}\n".encode())
            scanner.tree(mount.destination, mount.source)
    return RootContent(scanner.hash.hexdigest(), tuple(scanner.preload))


def image_base_key(base_key: str, content: RootContent, root_settings: tuple[str, ...]) -> str:
    """The image base's name in the snapshot cache, beside its container base's."""
    facts = {"container_base": base_key, "root": content.digest, "settings": list(root_settings)}
    return "img-" + hexdigest(json.dumps(facts, sort_keys=True).encode(), 10)


def carried_disk(directory: Path) -> Path:
    """The root disk an image base carries (save_snapshot's copy)."""
    from vmm.snapshot.save import carried_disk_name

    return Path(directory) / carried_disk_name(0)
