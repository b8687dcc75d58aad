"""Helpers for tests that boot our guest: the built kernel and a `vmm` subprocess."""

from __future__ import annotations

import os
import select
import string
import subprocess
import sys
import time
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


def read_line(stream, timeout: float = BOOT_TIMEOUT) -> bytes:
    """One line from a subprocess's pipe, or AssertionError after ``timeout`` s: a test
    waiting on a guest that never answers fails, it does not hang. b"" at the end.

    Reads the descriptor itself, a byte at a time: nothing stays in Python's buffer,
    so the stream can still be read (communicate) afterwards.
    """
    fd, line = stream.fileno(), bytearray()
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line within {timeout} s (so far: {bytes(line)!r})")
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return bytes(line)


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
