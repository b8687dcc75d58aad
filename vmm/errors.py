"""The VmmError family: every failure vmm reports to a user is one of these.

The CLI catches VmmError and prints ``vmm: <message>`` on one line with a non-zero
exit status; anything else escaping is a bug in vmm and shows a traceback.
"""

from __future__ import annotations

import errno as _errno
import os


class VmmError(Exception):
    """Base of every error vmm reports to the user as one line."""

    exit_status = 2


def unreadable(path, error: OSError) -> str:
    """``PATH: why`` for a file vmm could not read, in the words a user expects."""
    if isinstance(error, FileNotFoundError):
        return f"{path}: no such file"
    if isinstance(error, IsADirectoryError):
        return f"{path}: is a directory"
    if isinstance(error, PermissionError):
        return f"{path}: permission denied"
    return f"{path}: cannot read: {error.strerror or error}"


class UsageError(VmmError):
    """Bad user input: a missing file, a bad size, a bad option combination."""


class KvmUnavailableError(VmmError):
    """/dev/kvm is missing, unreadable, or speaks an API we do not know."""


class KvmError(VmmError):
    """An ioctl on a KVM file descriptor failed. Names the ioctl and the errno."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.errno = errno
        name = _errno.errorcode.get(errno, f"errno {errno}")
        message = f"{ioctl} failed: {name} ({os.strerror(errno)})"
        if detail:
            message += f": {detail}"
        super().__init__(message)


class GuestMemoryError(VmmError):
    """An access outside guest RAM, or a bad memory layout."""


class LoaderError(VmmError):
    """A kernel, initrd or firmware image that cannot be loaded."""


class GuestBuildError(VmmError):
    """Building the guest kernel, initramfs, firmware or a disk image failed."""


class DeviceError(VmmError):
    """A device could not be set up (a disk image in use, unreadable, ...)."""


class SnapshotError(VmmError):
    """A snapshot that cannot be saved or restored: missing, corrupt, or for another VM or host."""
