"""Find or build vmm's guest Linux kernel (``guest-kernel/``).

The kernel is Debian's ``linux-source-6.1`` + ``guest-kernel/patches/*.patch`` +
the config fragment ``guest-kernel/config`` on top of ``make tinyconfig``.
``guest-kernel/build.sh`` does all the work and caches the result under::

    ${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/vmm}/kernel/<key>/
        bzImage  vmlinux  System.map  config  version

where ``<key>`` hashes the source package version, the fragment, the patches and
build.sh itself.  This module only drives build.sh: ``cached_kernel()`` asks it
for the key (``build.sh --print-key``, no build) and ``build_kernel()`` runs it.
A full build takes ~5 minutes on 2 cores; a cached kernel is found in
milliseconds.
"""

from __future__ import annotations

import collections
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vmm.errors import GuestBuildError
from vmm.package_data import source_folder

#: The package that ships ``guest-kernel/`` when vmm is installed (setuptools
#: package data); in a source checkout we use the folder itself.
SOURCE_PACKAGE = "vmm.guest_kernel"
BUILD_SCRIPT = "build.sh"

#: Files build.sh puts in every output directory.
ARTIFACTS = ("bzImage", "vmlinux", "System.map", "config", "version")


@dataclass(frozen=True)
class KernelArtifacts:
    """One built guest kernel in the cache."""

    directory: Path
    bzimage: Path  # compressed (LZ4) bzImage: 64-bit boot protocol
    vmlinux: Path  # uncompressed ELF with symbols and the PVH entry note
    system_map: Path  # symbols for the RIP-sampling profiler
    config: Path  # the final .config
    release: str  # `uname -r` of the guest, e.g. "6.1.192"

    @classmethod
    def from_directory(cls, directory: Path) -> KernelArtifacts:
        directory = Path(directory)
        return cls(
            directory=directory,
            bzimage=directory / "bzImage",
            vmlinux=directory / "vmlinux",
            system_map=directory / "System.map",
            config=directory / "config",
            release=(directory / "version").read_text().strip(),
        )


def guest_kernel_dir() -> Path:
    """The folder holding build.sh, the config fragment and the patches."""
    return source_folder(SOURCE_PACKAGE, BUILD_SCRIPT, "guest-kernel")


def _script() -> Path:
    script = guest_kernel_dir() / BUILD_SCRIPT
    if not script.is_file():
        raise GuestBuildError(f"guest kernel build script not found: {script}")
    return script


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() and (directory / name).stat().st_size > 0 for name in ARTIFACTS)


# build.sh's key covers the source package's version (dpkg), the config, the
# patches and itself. Asking it costs a bash + dpkg-query start (~25 ms idle,
# far more on a loaded host) on every `vmm run`, so its answer is memoised
# against a stamp of the same inputs: their contents and dpkg's database mtime
# (which changes whenever a package is installed or upgraded).
DPKG_STATUS = Path("/var/lib/dpkg/status")


def _inputs_stamp() -> str:
    import os

    from vmm.digest import hasher

    digest = hasher()
    here = guest_kernel_dir()
    for path in [here / "config", *sorted((here / "patches").glob("*.patch")), _script()]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        digest.update(str(DPKG_STATUS.stat().st_mtime_ns).encode())
    except OSError:
        digest.update(b"no-dpkg")
    digest.update(os.environ.get("VMM_CACHE_DIR", "").encode())
    digest.update(os.environ.get("XDG_CACHE_HOME", "").encode())
    return digest.hexdigest()


def _memo_path() -> Path:
    from vmm.cache import cache_dir

    return cache_dir() / "kernel" / ".key-memo"


def kernel_key() -> tuple[str, Path]:
    """(cache key, output directory) of the kernel the current sources describe. No build."""
    stamp = _inputs_stamp()
    memo = _memo_path()
    try:
        saved_stamp, saved_key, saved_directory = memo.read_text().splitlines()[:3]
        if saved_stamp == stamp:
            return saved_key, Path(saved_directory)
    except (OSError, ValueError):
        pass
    key, directory = _ask_build_script()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_name(f".key-memo.{__import__('os').getpid()}")
        partial.write_text(f"{stamp}\n{key}\n{directory}\n")
        partial.replace(memo)
    except OSError:
        pass  # a read-only cache only costs the subprocess next time
    return key, directory


def _ask_build_script() -> tuple[str, Path]:
    try:
        result = subprocess.run(
            ["bash", str(_script()), "--print-key"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise GuestBuildError(f"cannot run guest kernel build script: {exc}") from exc
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) < 2:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise GuestBuildError(f"build.sh --print-key failed (exit {result.returncode}): {detail}")
    return lines[0].strip(), Path(lines[1].strip())


def cached_kernel() -> KernelArtifacts | None:
    """The already-built kernel for the current sources, or None. Cheap: never builds."""
    _key, directory = kernel_key()
    if not _complete(directory):
        return None
    return KernelArtifacts.from_directory(directory)


def build_kernel(progress: Callable[[str], None] | None = None) -> KernelArtifacts:
    """Build the guest kernel if needed (minutes) and return it.

    build.sh's output lines (stdout and stderr, ``[kernel] ...``) go to
    ``progress`` as they come.  Raises GuestBuildError if the build fails.
    """
    tail: collections.deque[str] = collections.deque(maxlen=40)
    try:
        proc = subprocess.Popen(
            ["bash", str(_script())],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
    except OSError as exc:
        raise GuestBuildError(f"cannot run guest kernel build script: {exc}") from exc
    assert proc.stdout is not None
    with proc:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            if progress is not None:
                progress(line)
    if proc.returncode != 0:
        errors = [line for line in tail if "error" in line.lower()]
        detail = (errors or list(tail) or ["no output"])[-1]
        raise GuestBuildError(f"guest kernel build failed (exit {proc.returncode}): {detail}")
    directory = Path(tail[-1].strip()) if tail else Path()
    if not tail or not _complete(directory):
        raise GuestBuildError(f"guest kernel build produced no complete output directory (last line: {tail[-1] if tail else ''!r})")
    return KernelArtifacts.from_directory(directory)
