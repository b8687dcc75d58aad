"""The system packages whose programs the tests run: the one list, installed by the tests.

The README's test command, ``python3 -m pytest``, installs what is missing here
at the start of the session, as root on Debian (one ``apt-get install`` for
the whole batch, one progress line), the way ``vmm`` installs the guest
kernel's build dependencies (vmm/images/host.py). Elsewhere, or when that
fails, a test that needs a program calls :func:`require`, which fails (never
skips) naming the package. ``.ci/run`` and the README point here; add a
package here, nowhere else, when a test starts running a new program.
"""

from __future__ import annotations

import shutil

import pytest

# Debian package -> (the programs the tests run from it, which tests)
PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "binutils": (("as", "ld", "objcopy", "objdump"),
                 "test_firmware_build.py: our firmware payloads; test_pvm_syscall.py: the stub"),
    "e2fsprogs": (("mkfs.ext4", "debugfs", "e2fsck"), "disk and container root images"),
    "containerd": (("containerd", "ctr", "containerd-shim-runc-v2"),
                   "test_oci_containerd.py: a private containerd runs vmm-runtime"),
    "gdb": (("gdb",), "test_gdb.py: the real GDB against our stub"),
    "iproute2": (("ip",), "test_net.py: network namespaces, veth and TAP devices"),
    "passt": (("passt",), "test_net.py: --net user"),
    "acpica-tools": (("iasl",), "test_acpi.py: iasl disassembles every ACPI table vmm makes"),
    "lz4": (("lz4",), "test_decompress.py: kernel payloads as the kernel's build makes them"),
    "zstd": (("zstd",), "test_decompress.py: kernel payloads, Debian's initrd"),
    "lzop": (("lzop",), "test_decompress.py: LZO kernel payloads"),
    "mmdebstrap": (("mmdebstrap",), "test_distro.py: the Debian root whose kernel and systemd boot"),
}


def package_of(program: str) -> str:
    for package, (programs, _why) in PACKAGES.items():
        if program in programs:
            return package
    raise KeyError(f"{program} is not in tests/packages.py: add its package there")


def require(program: str) -> str:
    """The program's path, or the test fails naming the package to install."""
    package = package_of(program)  # first: a program missing from the list is a bug here
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if not path:
        pytest.fail(f"{program} not found: apt-get install {package} (tests/packages.py; "
                    "the test session installs it when run as root on Debian)", pytrace=False)
    return path
