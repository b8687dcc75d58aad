"""Helpers for tests that boot our guest: the built kernel and a `vmm` subprocess."""

from __future__ import annotations

import os
import string
import subprocess
import sys
from pathlib import Path

# A boot takes ~35-55 s on our PVM CI host (guest kernel code is emulated);
# generous limits keep a slow, shared machine from failing good runs.
BOOT_TIMEOUT = 600


def guest_kernel():
    """The cached guest kernel's artifacts, building it if needed (CI builds it first)."""
    from vmm.images.kernel import build_kernel, cached_kernel

    return cached_kernel() or build_kernel()


def vmm_run(*args: str, timeout: float = BOOT_TIMEOUT, input: bytes | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m vmm run ARGS...`) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "vmm", "run", *args], capture_output=True, timeout=timeout,
        input=input, env={**os.environ, **(env or {})},
    )


def decode_argv(encoded: str) -> list[str]:
    """Python mirror of images/init.c's decode_argv, for round-trip tests."""
    raw = bytearray()
    i = 0
    while i < len(encoded):
        pair = encoded[i + 1 : i + 3]
        if encoded[i] == "%" and len(pair) == 2 and all(c in string.hexdigits for c in pair):
            raw.append(int(encoded[i + 1 : i + 3], 16))
            i += 3
        else:
            raw += encoded[i].encode()
            i += 1
    return [os.fsdecode(part) for part in bytes(raw).split(b"\0")]


def kernel_path(name: str) -> Path:
    artifacts = guest_kernel()
    return {"bzImage": artifacts.bzimage, "vmlinux": artifacts.vmlinux}[name]
