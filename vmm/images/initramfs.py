"""The default guest's userspace: busybox-static and our /init, as an initramfs.

Uncompressed on purpose: the guest kernel would decompress in its emulated
kernel mode on PVM hosts, which costs far more than reading extra bytes.
Built once into the cache, keyed by its inputs (init.c, busybox, this file,
the port numbers), so ``vmm run`` pays nothing after the first time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vmm.arch.x86_64 import layout
from vmm.cache import cache_dir
from vmm.digest import hasher
from vmm.errors import GuestBuildError
from vmm.images.cpio import CpioWriter

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
INIT_SOURCE = Path(__file__).with_name("init.c")
DIRECTORIES = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root",
               "etc", "newroot", "mnt", "run", "var")


def default_busybox(progress=None) -> Path:
    """The guest's busybox: ours, built with musl (vmm/images/busybox.py), built on first use.

    Falls back to Debian's glibc busybox-static, with a warning, where ours
    cannot be built: the guest works the same, its commands start slower.
    """
    from vmm.images.busybox import build_busybox, cached_busybox

    built = cached_busybox()
    if built is not None:
        return built
    try:
        return build_busybox(progress)
    except GuestBuildError as e:
        if progress:
            progress(f"warning: {e}; using the system's busybox-static instead "
                     "(glibc: slower process start-up in the guest)")
        return find_busybox()


def find_busybox() -> Path:
    """Debian's static busybox (glibc), the fallback userland."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            if b"ld-linux" in path.read_bytes()[:4096 * 4]:
                continue  # dynamically linked: useless without its libraries
            return path
    raise GuestBuildError(
        "no static busybox found (/bin/busybox): install it with "
        "'apt-get install busybox-static'"
    )


def _compiler() -> list[str]:
    if shutil.which("musl-gcc"):
        return ["musl-gcc", "-static", "-Os", "-s"]
    if shutil.which("gcc"):
        return ["gcc", "-static", "-Os", "-s"]  # glibc: ~800 KiB, slower to unpack
    raise GuestBuildError("no C compiler for the guest's /init: install musl-tools (or gcc)")


def _port_defines() -> list[str]:
    """What /init shares with vmm, from vmm's own definitions (init.c checks the sizes)."""
    from vmm.devices import mailbox

    return [f"-DEXIT_PORT={layout.EXIT_PORT:#x}", f"-DBOOT_TIMER_PORT={layout.BOOT_TIMER_PORT:#x}",
            f"-DMAILBOX_PORT={layout.MAILBOX_PORT:#x}",
            f"-DMAILBOX_MAGIC={mailbox.DESCRIPTOR_MAGIC:#x}u",
            f"-DMAILBOX_DESCRIPTOR_SIZE={mailbox.DESCRIPTOR.size}",
            f"-DREQUEST_MAGIC={mailbox.REQUEST_MAGIC:#x}u",
            f"-DREQUEST_VERSION={mailbox.REQUEST_VERSION}",
            f"-DREQUEST_HEADER_SIZE={mailbox.REQUEST_HEADER.size}",
            f"-DREQUEST_INTERACTIVE={mailbox.REQUEST_INTERACTIVE}u",
            f"-DREQUEST_PREPARE={mailbox.REQUEST_PREPARE}u",
            f"-DREQUEST_SEED_BYTES={mailbox.SEED_BYTES}",
            f"-DMAILBOX_SIZE={mailbox.MAILBOX_SIZE}", f"-DMAX_ARGS={mailbox.MAX_ARGS}",
            f"-DMAX_ENV={mailbox.MAX_ENV}", f"-DMAX_MOUNTS={mailbox.MAX_MOUNTS}",
            f"-DMAX_RLIMITS={mailbox.MAX_RLIMITS}", f"-DMAX_GROUPS={mailbox.MAX_GROUPS}",
            f"-DMAX_PRELOAD={mailbox.MAX_PRELOAD}"]


#: The directories a container's minimal root has (its mounts land on them).
BUSYBOX_ROOT_DIRS = ("bin", "proc", "sys", "dev", "tmp", "etc")


def busybox_root(root: Path, applets: tuple[str, ...] | list[str]) -> Path:
    """A minimal root file system at ``root``: our busybox as /bin/busybox, links for ``applets``.

    What the OCI bundles and images of the tests and benchmarks hold (a container
    of busybox, as `docker run busybox` would be).
    """
    import shutil

    for directory in BUSYBOX_ROOT_DIRS:
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(default_busybox(), root / "bin" / "busybox")
    for applet in applets:
        link = root / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    return root


def initramfs_key(busybox: Path) -> str:
    digest = hasher()
    digest.update(INIT_SOURCE.read_bytes())
    digest.update(Path(__file__).read_bytes())
    # busybox by identity, not content: hashing 2 MB on every `vmm run` costs
    # more than the rest of this key; a package upgrade changes size or mtime.
    info = Path(busybox).stat()
    digest.update(f"{busybox}:{info.st_size}:{info.st_mtime_ns}".encode())
    digest.update(" ".join(_compiler() + _port_defines()).encode())
    return digest.hexdigest()[:16]


def default_initramfs(progress=None) -> Path:
    """The cached default initramfs, built on first use."""
    from vmm.images.host import ensure_packages

    if not any(Path(c).is_file() for c in BUSYBOX_CANDIDATES) or not shutil.which("musl-gcc"):
        ensure_packages(["busybox-static", "musl-tools"], progress)
    busybox = default_busybox(progress)
    target = cache_dir() / "initramfs" / initramfs_key(busybox) / "initramfs.cpio"
    if target.exists():
        return target
    if progress:
        progress(f"building the default initramfs into {target.parent}")
    target.parent.mkdir(parents=True, exist_ok=True)
    archive = build_initramfs(busybox)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(archive)
    os.replace(tmp.name, target)
    return target


def compile_init() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "init"
        command = _compiler() + _port_defines() + ["-Wall", "-o", str(out), str(INIT_SOURCE)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["(no output)"])[0]
            raise GuestBuildError(f"compiling the guest /init failed: {first}")
        return out.read_bytes()


def busybox_applets(busybox: Path) -> list[str]:
    result = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True)
    if result.returncode != 0:
        raise GuestBuildError(f"{busybox} --list-full failed")
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


# Applet links in the initramfs: every cpio entry costs guest boot time on PVM
# hosts (268 links: ~8 % of the boot; 6 links measured 16 % faster boot-to-init).
# busybox's shell finds every applet without links, and /init falls back to
# busybox for a command it cannot find; these are for programs that exec others.
INITRAMFS_APPLETS = frozenset({
    "bin/sh", "bin/ash", "bin/ls", "bin/cat", "bin/echo", "bin/true", "bin/false", "bin/mount",
    "bin/sleep", "bin/dd", "usr/bin/env", "usr/bin/xargs", "usr/bin/sha256sum", "bin/uname",
})


def userspace_tree(busybox: Path, all_applets: bool = True) -> list[tuple]:
    """The default guest's files, as (kind, path, ...) entries.

    One description serves both the initramfs (cpio) and the ext4 root file
    system image (vmm/images/rootfs.py). Kinds: ("dir", path), ("file", path,
    data, mode), ("symlink", path, target), ("chardev", path, major, minor, mode).
    """
    init = compile_init()
    tree: list[tuple] = [("dir", d) for d in DIRECTORIES]
    tree += [
        ("chardev", "dev/console", 5, 1, 0o600),  # the kernel opens it for init's stdio
        ("chardev", "dev/null", 1, 3, 0o666),
        ("file", "init", init, 0o755),  # the initramfs's entry point
        ("file", "bin/busybox", busybox.read_bytes(), 0o755),
    ]
    for applet in busybox_applets(busybox):
        if applet in ("bin/busybox", "sbin/init"):
            continue
        if all_applets or applet in INITRAMFS_APPLETS:
            tree.append(("symlink", applet, "/bin/busybox"))
    # Booted from a disk without an initramfs, the kernel runs /sbin/init: ours.
    tree.append(("symlink", "sbin/init", "/init"))
    tree += [
        ("file", "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
        ("file", "etc/group", b"root:x:0:\n", 0o644),
        ("file", "etc/hostname", b"vmm\n", 0o644),
        # The nameserver a NIC's kernel ip= option names (vmm/config.py): the kernel lists it
        # there, so the guest needs no DHCP client and /init no network code.
        ("symlink", "etc/resolv.conf", "/proc/net/pnp"),
    ]
    return tree


def build_initramfs(busybox: Path) -> bytes:
    archive = CpioWriter()
    for kind, path, *rest in userspace_tree(busybox, all_applets=False):
        if kind == "dir":
            archive.directory(path)
        elif kind == "file":
            archive.file(path, rest[0], rest[1])
        elif kind == "symlink":
            archive.symlink(path, rest[0])
        elif kind == "chardev":
            archive.char_device(path, rest[0], rest[1], rest[2])
    return archive.finish()
