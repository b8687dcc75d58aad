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

import json
import os
import shutil
import time
from pathlib import Path

from vmm import __version__
from vmm.cache import cache_dir
from vmm.config import VmConfig
from vmm.digest import hexdigest
from vmm.snapshot.state import STATE_FILE, FileIdentity
from vmm.snapshot.statefile import FORMAT_VERSION

KEEP = 8  # snapshots kept in the cache; older unused ones are removed


def snapshot_cache_dir() -> Path:
    return cache_dir() / "snapshots"


def warm_start_possible(config: VmConfig) -> str | None:
    """None if this run can use a cached snapshot; else why it boots cold."""
    if config.firmware:
        return "firmware payloads boot in microseconds"
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
        "stderr_uart": config.stderr_uart,
        "disks": [[identity(Path(d.path)), d.read_only, d.serial] for d in config.disks],
        # What the guest saw of each NIC (its kernel configured eth<i> from it); not the
        # host's side, which each run makes anew: a TAP device's name, passt's forwards.
        "nets": [[n.backend, n.ip, n.gateway, n.dns, n.mac, n.offload] for n in config.nets],
        "host": [host.flavour, host.cpuid_digest, os.uname().release],
    }
    return hexdigest(json.dumps(facts, sort_keys=True).encode(), 10)


def lookup(key: str) -> Path | None:
    """The cached snapshot's directory, marked as used; None if there is none yet."""
    directory = snapshot_cache_dir() / key
    if not (directory / STATE_FILE).is_file():
        return None
    try:
        os.utime(directory)  # most recently used: pruned last
    except OSError:
        pass
    return directory


def discard(directory: Path) -> None:
    """Remove a cached snapshot that could not be restored (it is made again)."""
    shutil.rmtree(directory, ignore_errors=True)


def prune(keep: int = KEEP, *, older_than_s: float = 24 * 3600) -> list[Path]:
    """Remove cached snapshots beyond the ``keep`` most recently used, unused for a day.

    Returns what was removed. A snapshot in use by a running VM can go: its
    memory file stays mapped until that VM ends.
    """
    root = snapshot_cache_dir()
    try:
        entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    now = time.time()
    for stale in entries[keep:]:
        if now - stale.stat().st_mtime > older_than_s:
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed
