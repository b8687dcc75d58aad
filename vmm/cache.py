"""Where vmm keeps what it builds: ``${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/vmm}``.

The guest kernel (guest-kernel/build.sh computes the same path in bash), the
initramfs and the firmware binaries live below it, each keyed by its inputs.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (empty variables count as unset)."""
    explicit = os.environ.get("VMM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vmm"
