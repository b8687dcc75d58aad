"""Kvm: the /dev/kvm file descriptor. One method per system ioctl."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from vmm.errors import KvmError, KvmUnavailableError
from vmm.kvm.ioctl import ffi, ioctl, lib

if TYPE_CHECKING:
    from vmm.kvm.vm import Vm

KVM_DEVICE = "/dev/kvm"
# Entries we ask KVM_GET_SUPPORTED_CPUID for; it says E2BIG if too few.
_MAX_CPUID_ENTRIES = 256


def cpuid_entries(cpuid) -> list[tuple[int, int, int, int, int, int, int]]:
    """A filled ``struct kvm_cpuid2`` as (function, index, flags, eax, ebx, ecx, edx) tuples."""
    return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))]


class Kvm:
    """An open /dev/kvm. Creates VMs and answers questions about the host's KVM."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path}: not found: this kernel has no KVM, or it is not loaded "
                "(modprobe kvm_intel / kvm_amd; inside a VM enable nested virtualization)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"{path}: permission denied: add yourself to the 'kvm' group "
                "(sudo usermod -aG kvm $USER, then log in again) or run as root"
            ) from None
        except OSError as e:
            raise KvmUnavailableError(f"{path}: cannot open: {e.strerror}") from None
        self.path = path
        try:
            version = self.get_api_version()
        except BaseException:  # not KVM at all (e.g. /dev/null): ENOTTY
            os.close(self.fd)
            raise
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(
                f"{path}: KVM API version {version}, vmm speaks {lib.KVM_API_VERSION}"
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one method per ioctl -------------------------------------------------
    def get_api_version(self) -> int:
        return ioctl(self.fd, "KVM_GET_API_VERSION")

    def check_extension(self, capability: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else a positive (often a count)."""
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", capability)

    def get_vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def get_supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """(function, index, flags, eax, ebx, ecx, edx) for every leaf KVM supports."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": _MAX_CPUID_ENTRIES,
                                                "entries": _MAX_CPUID_ENTRIES})
        ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
        return cpuid_entries(cpuid)

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: every MSR a VMM should save and restore for a vCPU."""
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        try:
            ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", probe)
        except KvmError as e:
            if e.errno != errno.E2BIG:  # E2BIG: too small, and nmsrs now says how many
                raise
        count = probe.nmsrs
        msrs = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
        ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", msrs)
        return [msrs.indices[i] for i in range(msrs.nmsrs)]

    def create_vm(self) -> "Vm":
        from vmm.kvm.vm import Vm

        return Vm(self, ioctl(self.fd, "KVM_CREATE_VM", 0))

    # --- conveniences built on the ioctls --------------------------------------
    def max_vcpus(self) -> int:
        """How many vCPUs one VM may have (KVM_CAP_MAX_VCPUS, else NR_VCPUS, else 4)."""
        return (
            self.check_extension(lib.KVM_CAP_MAX_VCPUS)
            or self.check_extension(lib.KVM_CAP_NR_VCPUS)
            or 4
        )

    def recommended_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_NR_VCPUS) or 4
