"""Host packages the guest images are built from, installed on first use when we can.

Building the default guest needs Debian's busybox-static (the guest's
userspace), musl-tools (a small static /init) and e2fsprogs (ext4 images).
As root on Debian we install what is missing, as guest-kernel/build.sh does
for the kernel; otherwise we say exactly what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from vmm.errors import GuestBuildError


def missing_packages(packages: list[str]) -> list[str]:
    """Those of ``packages`` dpkg does not have installed (one dpkg-query for all)."""
    result = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *packages],
                            capture_output=True, text=True)
    installed = {line.split()[0].split(":")[0] for line in result.stdout.splitlines()
                 if line.endswith("install ok installed")}
    return [p for p in packages if p not in installed]


def ensure_packages(packages: list[str], progress=None) -> None:
    """apt-get install the missing ones when root on Debian; else raise with the command."""
    if not shutil.which("dpkg-query"):
        return  # not Debian: the caller's own checks say what is missing
    missing = missing_packages(packages)
    if not missing:
        return
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise GuestBuildError(f"missing packages: run 'sudo {' '.join(command[:2])} {' '.join(missing)}'")
    if progress:
        progress(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise GuestBuildError(f"apt-get install {' '.join(missing)} failed: {last}")
