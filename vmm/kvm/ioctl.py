"""The one place where a KVM ioctl is made and its errno turned into KvmError.

Every wrapper method (Kvm, Vm, Vcpu) calls :func:`ioctl` with the ioctl's
*name*; the number comes from the compiled header, and a failure raises
``KvmError("KVM_SET_USER_MEMORY_REGION", EINVAL)`` so a user sees which call
failed and why, never a bare ``OSError``.
"""

from __future__ import annotations

from typing import Any

from vmm.errors import KvmError
from vmm.kvm._kvm import ffi, lib

__all__ = ["ffi", "lib", "ioctl", "ioctl_read"]


def ioctl(fd: int, name: str, arg: Any = 0) -> int:
    """Call ioctl(fd, <name>, arg); return its result or raise KvmError(name, errno).

    ``arg`` is an int or a cffi pointer. cffi releases the GIL for the call, so
    a blocking KVM_RUN does not stop other Python threads.
    """
    request = getattr(lib, name)
    if isinstance(arg, int):
        rc = lib.ioctl(fd, request, ffi.cast("unsigned long", arg))
    else:
        rc = lib.ioctl(fd, request, arg)
    if rc < 0:
        raise KvmError(name, ffi.errno)
    return rc


def ioctl_read(fd: int, name: str, ctype: str, init: dict | None = None) -> Any:
    """A new ``ctype`` (optionally with some fields set first) filled by ioctl ``name``: the KVM_GET_* shape."""
    value = ffi.new(ctype + " *", init)
    ioctl(fd, name, value)
    return value
