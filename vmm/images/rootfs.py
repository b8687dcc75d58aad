"""`vmm image rootfs`: an ext4 root file system image with the default guest userspace.

``mkfs.ext4 -d DIR`` copies a directory tree into a new file system without
mounting anything, so no root privileges are needed beyond writing the
staging directory. Device nodes are left out: our /init mounts devtmpfs.
Files are owned by root in the image (``-E root_owner=0:0``), whoever built it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vmm.errors import GuestBuildError, UsageError
from vmm.images.host import ensure_packages
from vmm.images.initramfs import default_busybox, userspace_tree

MIN_SIZE = 16 << 20


def build_rootfs(output: Path, size: int, progress=None) -> None:
    if size < MIN_SIZE:
        raise UsageError(f"--size: at least {MIN_SIZE >> 20}M for the default userspace")
    if output.exists() and output.is_dir():
        raise UsageError(f"{output}: is a directory")
    if not shutil.which("mkfs.ext4"):
        ensure_packages(["e2fsprogs"], progress)
    if not shutil.which("mkfs.ext4") and not Path("/sbin/mkfs.ext4").exists():
        raise GuestBuildError("mkfs.ext4 not found: install e2fsprogs")
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    with tempfile.TemporaryDirectory() as staging:
        root = Path(staging)
        for kind, path, *rest in userspace_tree(default_busybox(progress)):
            target = root / path
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
            elif kind == "file":
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(rest[0])
                target.chmod(rest[1])
            elif kind == "symlink":
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.is_symlink():
                    os.symlink(rest[0], target)
        partial = output.with_name(output.name + ".partial")
        with open(partial, "wb") as image:
            image.truncate(size)
        result = subprocess.run(
            [mkfs, "-q", "-F", "-L", "vmm-root", "-E", "root_owner=0:0", "-d", str(root),
             str(partial)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            first = (result.stderr.strip().splitlines() or ["?"])[0]
            raise GuestBuildError(f"mkfs.ext4 failed: {first}")
        os.replace(partial, output)
