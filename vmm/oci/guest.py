"""A ContainerSpec turned into what the guest needs: a root disk, and /init's settings.

* The root file system reaches the guest as an ext4 image of ``root.path``
  (``mkfs.ext4 -d``: no mount, no privileges), with the bind mounts' host files
  copied in at their destinations: the guest cannot see the host's files, so a
  bind mount is a copy taken at ``create`` (read-only ones behave the same;
  writes to a read-write one stay in the container). Writes go to the image,
  not to ``root.path``. Each destination is resolved *inside* a private copy of
  the root (vmm/oci/inroot.py): the image's symlinks cannot send a volume out
  of it onto the host.
* The root and the process go to /init as "key=value" settings
  (vmm/images/init.c, ``parse_settings``) in two mailbox requests: the root's
  (the disk, the kernel mounts with their options already split into MS_*
  flags and file-system data as runc does, the files to read ahead), then the
  process's (hostname, cwd, environment, limits, identity). Between the two
  the VM can be saved: the *image base* of vmm/oci/monitor.py.
"""

from __future__ import annotations

import os
import resource
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from vmm.oci import inroot
from vmm.oci.spec import BundleError, ContainerSpec, MountKind

ROOT_DEVICE = "/dev/vda"  # the rootfs image is the guest's first (only) disk
MiB = 1 << 20
MIN_IMAGE = 64 * MiB
# ext4 features the root disk goes without: the container's disk is a scratch copy
# (a crash loses its writes, as a container's overlay upper dir would be thrown away),
# and on PVM every block the guest kernel checksums or journals is emulated work.
# Measured on AMD EPYC, PVM: `vmm-runtime run` of echo 2.19 s with a journal, 1.81 s
# without; `start` to the first output 1.37 s -> 1.28 s without metadata checksums
# (crc32c, in software: the emulator cannot run the crc32 instruction).
MKFS_FEATURES_OFF = "^has_journal,^metadata_csum"
FREE_SPACE = 64 * MiB  # room for the container's own writes

# mount(8) option -> (flag, set?) ; <sys/mount.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_SYNCHRONOUS, MS_REMOUNT, MS_MANDLOCK, MS_DIRSYNC = 16, 32, 64, 128
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
MOUNT_FLAGS = {
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True), "mand": (MS_MANDLOCK, True), "nomand": (MS_MANDLOCK, False),
    "noatime": (MS_NOATIME, True), "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True), "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True), "nostrictatime": (MS_STRICTATIME, False),
}
# Propagation options shape how mounts spread between namespaces; the guest has one.
PROPAGATION = {"private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable",
               "runbindable"}


def mount_flags(options: tuple[str, ...]) -> tuple[int, str]:
    """(MS_* flags, file-system data) from a mount's options, as runc splits them."""
    flags, data = 0, []
    for option in options:
        if option in MOUNT_FLAGS:
            bit, on = MOUNT_FLAGS[option]
            flags = flags | bit if on else flags & ~bit
        elif option not in PROPAGATION and option not in ("bind", "rbind"):
            data.append(option)
    return flags, ",".join(data)


def root_settings(spec: ContainerSpec, preload: tuple[str, ...] = (),
                  root_device: str = ROOT_DEVICE) -> tuple[str, ...]:
    """The root's settings: /init mounts the disk and the kernel mounts, reads ``preload`` ahead."""
    out = [f"root={root_device}"]
    if spec.root_readonly:
        out.append("root_ro=1")
    for mount in spec.mounts:
        if mount.kind is not MountKind.KERNEL:
            continue  # binds are in the image; skipped ones are documented
        flags, data = mount_flags(mount.options)
        fields = (mount.type, mount.source or mount.type, mount.destination, str(flags), data)
        if any("\t" in f for f in fields):
            raise BundleError(f"{spec.bundle}/config.json: mount {mount.destination}: "
                              "a tab in a mount field")
        out.append("mount=" + "\t".join(fields))
    out += [f"preload={path}" for path in preload]
    return tuple(out)


def process_settings(spec: ContainerSpec) -> tuple[str, ...]:
    """The process's settings, applied in the order runc applies them (the identity last)."""
    out = []
    if spec.hostname:
        out.append(f"hostname={spec.hostname}")
    out.append(f"cwd={spec.cwd}")
    out += [f"env={entry}" for entry in spec.env]
    for limit in spec.rlimits:
        out.append(f"rlimit={getattr(resource, limit.type)} {limit.soft} {limit.hard}")
    out.append("groups=" + ",".join(str(g) for g in spec.additional_gids))
    out += [f"gid={spec.gid}", f"uid={spec.uid}"]
    return tuple(out)


def fit_preload(spec: ContainerSpec, preload: tuple[str, ...]) -> tuple[str, ...]:
    """As many of ``preload`` as the root's request has room for (reading ahead is a hint)."""
    from vmm.devices import mailbox

    preload = preload[:mailbox.MAX_PRELOAD]
    while preload and len(root_request(spec, preload, seed=b"")) > mailbox.MAILBOX_SIZE:
        preload = preload[:-1]
    return preload


def root_request(spec: ContainerSpec, preload: tuple[str, ...] = (), *, wait_root: bool = True,
                 seed: bytes | None = None) -> bytes:
    from vmm.devices import mailbox

    extra = ("wait_root=1",) if wait_root else ()
    return mailbox.encode_request((), settings=root_settings(spec, preload) + extra, prepare=True,
                                  seed=seed)


def process_request(spec: ContainerSpec, *, seed: bytes | None = None) -> bytes:
    from vmm.devices import mailbox

    return mailbox.encode_request(spec.args, interactive=spec.terminal,
                                  settings=process_settings(spec), seed=seed)


def check_limits(spec: ContainerSpec) -> None:
    """Refuse at create what the guest's /init has no room for (one line naming the field)."""
    from vmm.devices import mailbox

    where = f"{spec.bundle}/config.json"
    kernel_mounts = sum(1 for m in spec.mounts if m.kind is MountKind.KERNEL)
    counts = {
        "process.args": (len(spec.args), mailbox.MAX_ARGS - 1),
        "process.env": (len(spec.env), mailbox.MAX_ENV),
        "mounts": (kernel_mounts, mailbox.MAX_MOUNTS),
        "process.rlimits": (len(spec.rlimits), mailbox.MAX_RLIMITS),
        "process.user.additionalGids": (len(spec.additional_gids), mailbox.MAX_GROUPS),
    }
    for name, (count, limit) in counts.items():
        if count > limit:
            raise BundleError(f"{where}: {name}: {count} entries; vmm's guest takes at most {limit}")
    for what, request in (("the mounts", root_request(spec, seed=b"")),
                          ("the process (args, env)", process_request(spec, seed=b""))):
        if len(request) > mailbox.MAILBOX_SIZE:
            raise BundleError(f"{where}: {what} take {len(request)} bytes; "
                              f"vmm's guest takes at most {mailbox.MAILBOX_SIZE}")


def tree_size(root: Path) -> int:
    """The bytes under ``root``, never following a link (an upper bound for the image)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return sum(entry.info.st_size for entry in inroot.walk(fd))
    finally:
        os.close(fd)


def _copy(source: str | Path, target: str, pass_fds: tuple[int, ...] = ()) -> None:
    """``cp -a`` of ``source`` to the new name ``target``: owners, modes, times, xattrs, hard
    links and device nodes kept, symlinks copied as symlinks; ``source`` itself followed."""
    cp = shutil.which("cp") or "/bin/cp"
    result = subprocess.run([cp, "-a", "-H", "-T", "--", str(source), target],
                            pass_fds=pass_fds, capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["?"])[0]
        raise BundleError(f"{source}: cannot copy into the container's root: {first}")


def _bind(spec: ContainerSpec, root: int, mount) -> None:
    """Put a copy of the bind mount's source where the mount would be, inside ``root``.

    The destination is resolved inside the root (vmm/oci/inroot.py): the image's
    symlinks and ".." are followed as the container will follow them, and never out
    of it. What the image had there goes, as a mount hides what lies beneath it.
    """
    where = f"{spec.bundle}/config.json: mount {mount.destination}"
    source_is_dir = os.path.isdir(mount.source)  # the user's: a link there is followed
    try:
        with inroot.place(root, mount.destination) as spot:
            if spot.path == "/proc" or spot.path.startswith("/proc/"):
                raise BundleError(f"{where}: lands on {spot.path} in the image; "
                                  "a bind mount into /proc is refused, as runc refuses it")
            if spot.existing is not None:
                there_is_dir = stat.S_ISDIR(spot.existing.st_mode)
                if there_is_dir != source_is_dir:
                    kinds = ("a file", "a directory")
                    raise BundleError(f"{where}: the image has {kinds[there_is_dir]} at "
                                      f"{spot.path}, the source is {kinds[source_is_dir]}")
                if there_is_dir:
                    shutil.rmtree(spot.name, dir_fd=spot.parent)
                else:
                    os.unlink(spot.name, dir_fd=spot.parent)
            _copy(mount.source, spot.host_path, pass_fds=(spot.parent,))
    except inroot.RootPathError as e:
        raise BundleError(f"{where}: {e}") from None
    except OSError as e:
        raise BundleError(f"{where}: {e.strerror or e}") from None


def stage_root(spec: ContainerSpec, staging: Path) -> Path:
    """The directory the root disk is made of: ``root.path`` itself, or, with bind
    mounts, a copy of it in ``staging`` (private to us) with their sources in place."""
    binds = [m for m in spec.mounts if m.kind is MountKind.BIND]
    if not binds:
        return spec.root
    staged = staging / "root"
    _copy(spec.root, str(staged))
    with inroot.open_root(staged) as root:
        for mount in binds:
            _bind(spec, root, mount)
    return staged


def build_root_image(spec: ContainerSpec, image: Path) -> int:
    """The ext4 image of the container's root (plus its bind mounts); returns its size."""
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    if not Path(mkfs).exists():
        raise BundleError("mkfs.ext4 not found: install e2fsprogs")
    with tempfile.TemporaryDirectory(dir=image.parent) as staging:
        source = stage_root(spec, Path(staging))
        try:
            size = max(MIN_IMAGE, -(-(tree_size(source) * 5 // 4 + FREE_SPACE) // MiB) * MiB)
        except (OSError, inroot.RootPathError) as e:
            raise BundleError(f"{spec.root}: cannot read the container's root: {e}") from None
        with open(image, "wb") as f:
            f.truncate(size)
        result = subprocess.run([mkfs, "-q", "-F", "-L", "container", "-O", MKFS_FEATURES_OFF,
                                 "-d", str(source), str(image)], capture_output=True, text=True)
    if result.returncode != 0:
        image.unlink(missing_ok=True)
        first = (result.stderr.strip().splitlines() or ["?"])[0]
        raise BundleError(f"{spec.root}: cannot make the container's root disk: mkfs.ext4: {first}")
    return size
