"""Hashes for cache keys and identities: BLAKE2b, without importing hashlib.

``import hashlib`` initialises OpenSSL first (~2 ms here), and a warm
``vmm run`` computes several keys (kernel, initramfs, busybox, snapshot)
before its first KVM_RUN. BLAKE2b is built into Python (``_blake2``, the
module behind ``hashlib.blake2b``); the hashes are for naming cache
entries, not for security.
"""

from __future__ import annotations

try:
    from _blake2 import blake2b
except ImportError:  # a Python without the built-in module
    from hashlib import blake2b


def hasher(size: int = 32):
    """A new BLAKE2b object (``update()``, ``hexdigest()``) with a ``size``-byte digest."""
    return blake2b(digest_size=size)


def hexdigest(data: bytes, size: int = 16) -> str:
    return blake2b(data, digest_size=size).hexdigest()
