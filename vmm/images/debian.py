"""A Debian system as it ships: its own kernel, its own initramfs, systemd, on an ext4 disk.

What `vmm image debian` makes and the distribution tests boot. ``mmdebstrap``
(Debian's own bootstrapper: the packages are Debian's, unmodified) writes the
root as a tarball; the kernel package's postinst runs ``update-initramfs``
inside it, so ``/boot`` holds Debian's vmlinuz (a bzImage with an LZ4
payload), Debian's initramfs (initramfs-tools, a zstd cpio behind an early
microcode one) and System.map. The tarball and those three files are cached by
what went into them (suite, variant, packages) under
``~/.cache/vmm/debian/KEY/``: the bootstrap downloads ~100 MB and takes a
minute, each disk made from it a few seconds.

A disk is the tarball unpacked into a staging directory, plus the few files
any installer writes (``/etc/fstab`` naming the root, a host name) and what
the caller adds (an autologin drop-in, a unit), copied into a fresh ext4 image
by ``mkfs.ext4 -d``. Unpacking keeps owners and device nodes, so it needs
root, as mmdebstrap's own root mode does.

Boot it (``vmm image debian`` prints this line)::

    vmm run --kernel K --initrd I --disk root.img --cmdline 'root=/dev/vda ro' --mem 512M
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vmm.cache import cache_dir
from vmm.errors import GuestBuildError, UsageError
from vmm.images.host import ensure_packages

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DebianRecipe:
    """What the root is made of: the cache key is its JSON."""

    suite: str = "bookworm"
    variant: str = "minbase"  # essential packages + apt: the smallest bootable base
    # systemd as init, udev (devices, module loading by modalias: virtio_mmio for the
    # ACPI LNRO0005 devices vmm describes), the cloud kernel (virtio drivers, no
    # hardware ones) and initramfs-tools (the initramfs Debian makes for it).
    packages: tuple[str, ...] = ("systemd-sysv", "udev", "linux-image-cloud-amd64",
                                 "initramfs-tools")

    @property
    def key(self) -> str:
        text = json.dumps([self.suite, self.variant, sorted(self.packages)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DebianSystem:
    """A bootstrapped root in the cache: the tarball and its kernel, initramfs, symbols."""

    directory: Path

    @property
    def root_tar(self) -> Path:
        return self.directory / "root.tar"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def system_map(self) -> Path:
        return self.directory / "System.map"

    def files(self) -> tuple[Path, ...]:
        return (self.root_tar, self.kernel, self.initrd, self.system_map)


def debian_system(progress: Progress, recipe: DebianRecipe = DebianRecipe()) -> DebianSystem:
    """The cached system for ``recipe``, bootstrapped on first use (one builder at a time)."""
    base = cache_dir() / "debian"
    system = DebianSystem(base / recipe.key)
    if all(path.is_file() for path in system.files()):
        return system
    _require_root("bootstrapping a Debian root (mmdebstrap's root mode)")
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{recipe.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another vmm may be building the same one
        if all(path.is_file() for path in system.files()):
            return system
        ensure_packages(["mmdebstrap"], progress)
        staging = Path(tempfile.mkdtemp(prefix=f"{recipe.key}.", dir=base))
        try:
            _bootstrap(recipe, staging, progress)
            shutil.rmtree(system.directory, ignore_errors=True)  # a stale partial one
            os.rename(staging, system.directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return system


def _bootstrap(recipe: DebianRecipe, staging: Path, progress: Progress) -> None:
    import time

    started = time.monotonic()
    progress(f"bootstrapping Debian {recipe.suite} ({recipe.variant} + "
             f"{', '.join(recipe.packages)}) with mmdebstrap: about a minute, once")
    tar = staging / "root.tar"
    result = subprocess.run(
        ["mmdebstrap", "--mode=root", f"--variant={recipe.variant}",
         f"--include={','.join(recipe.packages)}", recipe.suite, str(tar)],
        capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise GuestBuildError(f"mmdebstrap failed (status {result.returncode}): {tail}")
    with tarfile.open(tar) as archive:
        boot = {Path(m.name).name: m for m in archive.getmembers()
                if m.isfile() and m.name.startswith("./boot/")}
        for prefix, target in (("vmlinuz-", "vmlinuz"), ("initrd.img-", "initrd.img"),
                               ("System.map-", "System.map")):
            found = sorted(name for name in boot if name.startswith(prefix))
            if len(found) != 1:
                raise GuestBuildError(f"mmdebstrap's root has {len(found)} /boot/{prefix}* "
                                      "files, expected one (the kernel package's)")
            source = archive.extractfile(boot[found[0]])
            assert source is not None  # a regular file
            with source, open(staging / target, "wb") as out:
                shutil.copyfileobj(source, out)
    progress(f"Debian {recipe.suite} bootstrapped in {time.monotonic() - started:.0f} s: "
             f"{staging.name.split('.')[0]}")


# What an installer writes that a bootstrap does not: the root in fstab (systemd remounts
# it read-write from there after the initramfs mounted it read-only) and a host name.
INSTALLER_FILES = {
    "etc/fstab": (b"/dev/vda / ext4 errors=remount-ro 0 1\n", 0o644),
    "etc/hostname": (b"debian\n", 0o644),
}

# systemd's serial getty on the console logs root in without a password (the root
# account of a bootstrap has none that works): what `vmm image debian --autologin` adds.
AUTOLOGIN = {
    "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": (
        b"[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear %I $TERM\n",
        0o644),
}


def debian_disk(system: DebianSystem, output: Path, size: int,
                files: dict[str, tuple[bytes, int]] | None = None,
                links: dict[str, str] | None = None) -> Path:
    """An ext4 image of the system at ``output`` (``size`` bytes), with ``files``
    (path in the root -> (content, mode)) and symbolic ``links`` (path -> target: a
    unit enabled) added; written under another name and renamed, so a failure
    leaves no half-made image."""
    _require_root("unpacking a Debian root (device nodes, owners)")
    if output.is_dir():
        raise UsageError(f"{output}: is a directory")
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if mkfs is None:
        raise GuestBuildError("mkfs.ext4 not found: install e2fsprogs")
    partial = output.with_name(output.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="vmm-debian-") as staging:
        root = Path(staging)
        result = subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xpf",
                                 str(system.root_tar)], capture_output=True, text=True)
        if result.returncode != 0:
            raise GuestBuildError(f"{system.root_tar}: tar failed: {result.stderr.strip()}")
        for path, (content, mode) in {**INSTALLER_FILES, **(files or {})}.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(mode)
        for path, destination in (links or {}).items():
            link = root / path.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(destination)
        with open(partial, "wb") as image:
            image.truncate(size)
        result = subprocess.run([mkfs, "-q", "-F", "-L", "debian", "-d", str(root), str(partial)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            first = (result.stderr.strip().splitlines() or ["?"])[0]
            raise GuestBuildError(f"mkfs.ext4 failed for {output}: {first}")
    os.replace(partial, output)
    return output


def boot_command(system: DebianSystem, disk: Path) -> str:
    return (f"vmm run --kernel {system.kernel} --initrd {system.initrd} --disk {disk} "
            "--cmdline 'root=/dev/vda ro' --mem 512M")


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise GuestBuildError(f"{what} needs root: run it with sudo")
