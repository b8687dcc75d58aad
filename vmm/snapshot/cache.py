"""The warm start: `vmm run` restores a cached snapshot of the same guest instead of booting it.

``~/.cache/vmm/snapshots/<key>/`` holds one snapshot per distinct guest, made
the first time that guest runs (boot to /init's ready point, save, then run
the command in that same VM) and restored every later time. The key hashes
everything that shapes the guest up to the ready point, so that a change to
any of it makes a new snapshot instead of reusing a stale one:

* the kernel and the initramfs, by identity (path, size, inode, mtime and
  ctime: any write to a file changes its ctime);
* the options that shape the VM: --mem, --cpus, --cmdline, --console-log,
  --virtio-notify, each disk's identity and options;
* vmm itself: its version and the size and mtime of each of its source files
  (a changed device model must not read an older state);
* the host: the KVM flavour, the CPUID features, the host kernel's release.

Options that do not change the guest (--timeout, --trace, --stats,
--runloop, --profile...) are not in the key. A run with a writable disk
boots cold: its content changes with every run, and a snapshot is only good
for the disk content it saw (vmm/snapshot/restore.py refuses a changed disk).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vmm import __version__
from vmm.cache import cache_dir
from vmm.config import VmConfig
from vmm.devices.model import plan_devices
from vmm.devices.platform import LINUX_DEVICES
from vmm.digest import hexdigest
from vmm.snapshot import codec
from vmm.snapshot.state import STATE_FILE, FileIdentity
from vmm.snapshot.statefile import FORMAT_VERSION

def snapshot_cache_dir() -> Path:
    return cache_dir() / "snapshots"


def warm_start_possible(config: VmConfig) -> str | None:
    """None if this run can use a cached snapshot; else why it boots cold."""
    if config.firmware:
        return "firmware payloads boot in microseconds"
    if not config.init_is_ours:
        return "the guest's own init runs (--initrd): there is no ready point to save at"
    writable = [d.path for d in config.disks if not d.read_only]
    if writable:
        return f"disk {writable[0]} is writable: its content changes with every run"
    return None


def vmm_code_identity() -> list:
    """vmm's own source files, by name, size and mtime (cheap: no file is read)."""
    root = Path(__file__).resolve().parents[1]
    files = []
    for directory, _, names in os.walk(root):
        for name in names:
            if name.endswith((".py", ".c", ".h", ".so", ".sh")):
                info = os.stat(os.path.join(directory, name))
                files.append((os.path.relpath(os.path.join(directory, name), root),
                              info.st_size, info.st_mtime_ns))
    return sorted(files)


def cache_key(config: VmConfig, kernel: Path, initrd: Path | None, host) -> str:
    """The snapshot's name in the cache: a hash of everything that shapes the guest.

    ``host`` is the :class:`vmm.snapshot.state.HostIdentity` of this machine.
    """

    def identity(path: Path | None):
        if path is None:
            return None
        file = FileIdentity.of(path)
        return [file.path, file.size, file.device, file.inode, file.mtime_ns, file.ctime_ns]

    facts = {
        "format": FORMAT_VERSION,
        "vmm": [__version__, vmm_code_identity()],
        "kernel": identity(kernel),
        "initrd": identity(initrd),
        "mem": config.mem,
        "cpus": config.cpus,
        "cmdline": config.cmdline,
        "console_log": config.console_log,
        "virtio_notify": config.virtio_notify,
        "decompress": config.decompress,
        "pvm_time_scale": config.pvm_time_scale,  # a command-line option vmm adds
        # Every device as the guest sees it (the table a snapshot keeps: ids, resources, a
        # NIC's MAC, MTU and features...); not the host's side, which each run makes anew:
        # a TAP device's name, passt's forwards. Then the disks' files, by identity.
        "devices": [codec.encode(spec.record()) for spec in plan_devices(LINUX_DEVICES, config)],
        "disks": [identity(Path(d.path)) for d in config.disks],
        "host": [host.flavour, host.cpuid_digest, os.uname().release],
    }
    return hexdigest(json.dumps(facts, sort_keys=True).encode(), 10)


# The cap on the snapshots cached here (VMM_CACHE_MAX changes it). A snapshot of the
# default 128 MiB guest takes ~13 MiB of disk (its memory file is sparse: only the pages
# the guest touched), a container's image base ~14 MiB: 512 MiB holds ~38 of them, more
# guests and images than one user runs in turn, and a quarter of what the guest kernel's
# build tree beside it already takes (~2 GiB). Without a cap one afternoon of tests and
# `docker run`s left 51 snapshots (703 MiB) that nothing ever removed.
DEFAULT_MAX = 512 << 20
MAX_ENV = "VMM_CACHE_MAX"
_in_use: list[int] = []  # descriptors of the snapshots this process uses (shared locks)


def cache_max() -> int:
    """The cap in bytes: VMM_CACHE_MAX (512M, 2G, 0 for none kept), else DEFAULT_MAX."""
    from vmm.config import size_in_bytes
    from vmm.errors import UsageError

    text = os.environ.get(MAX_ENV, "").strip()
    if not text:
        return DEFAULT_MAX
    size = size_in_bytes(text)
    if size is None:
        raise UsageError(f"{MAX_ENV}={text!r}: not a size (examples: 512M, 2G, 0)")
    return size


@dataclass(frozen=True)
class Entry:
    """One cached snapshot, as `vmm cache ls` shows it."""

    path: Path
    size: int  # bytes on disk (its memory file is sparse)
    last_used: float  # the directory's mtime: lookup() touches it
    in_use: bool  # a running VMM holds it (restored from it, or copying its disk)

    @property
    def kind(self) -> str:
        return "image base" if self.path.name.startswith("img-") else "guest"


def _disk_usage(directory: Path) -> int:
    total = 0
    for entry in os.scandir(directory):
        try:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            pass
    return total


def _try_lock(directory: Path, mode: int) -> int | None:
    """A descriptor of ``directory`` holding the flock ``mode`` (never waits), or None."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def entries() -> list[Entry]:
    """The cached snapshots, least recently used first."""
    root = snapshot_cache_dir()
    try:
        names = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []
    found = []
    for directory in names:
        try:
            last_used = directory.stat().st_mtime
            size = _disk_usage(directory)
        except OSError:
            continue  # removed meanwhile
        probe = _try_lock(directory, fcntl.LOCK_EX)
        if probe is not None:
            os.close(probe)
        found.append(Entry(directory, size, last_used, in_use=probe is None))
    return sorted(found, key=lambda e: e.last_used)


def lookup(key: str) -> Path | None:
    """The cached snapshot's directory, marked as used; None if there is none yet.

    The process holds a shared lock on it from here to its end, so that no
    prune removes it while this VM restores from it or copies its disk.
    """
    directory = snapshot_cache_dir() / key
    if not (directory / STATE_FILE).is_file():
        return None
    fd = _try_lock(directory, fcntl.LOCK_SH)
    if fd is None:
        return None  # being evicted this instant: as good as gone
    if not (directory / STATE_FILE).is_file():  # evicted between the check and the lock
        os.close(fd)
        return None
    _in_use.append(fd)
    try:
        os.utime(directory)  # most recently used: evicted last
    except OSError:
        pass
    return directory


def discard(directory: Path) -> None:
    """Remove a cached snapshot that could not be restored (it is made again)."""
    shutil.rmtree(directory, ignore_errors=True)


def evict(entry: Entry) -> bool:
    """Remove one snapshot unless a VMM uses it; True if it went."""
    fd = _try_lock(entry.path, fcntl.LOCK_EX)
    if fd is None:
        return False  # in use
    try:
        # Renamed first: a lookup no longer finds it while its files go.
        doomed = entry.path.with_name(f".evicted-{entry.path.name}-{os.getpid()}")
        os.rename(entry.path, doomed)
    except OSError:
        return False
    finally:
        os.close(fd)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def prune(limit: int | None = None) -> list[Path]:
    """Evict the least recently used snapshots until the cache holds at most ``limit``
    bytes (VMM_CACHE_MAX); one in use is skipped. Returns what was removed."""
    limit = cache_max() if limit is None else limit
    cached = entries()
    total = sum(e.size for e in cached)
    removed = []
    for entry in cached:
        if total <= limit:
            break
        if evict(entry):
            total -= entry.size
            removed.append(entry.path)
    return removed
