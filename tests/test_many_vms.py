"""Several VMs at once: six `vmm run` processes side by side, each with its own result.

Two plain guests, two with two vCPUs, two with a disk each that holds a token
only that guest can read. Every one must print its own token and exit with
its own status: no shared state leaks between VMs (cached snapshots, disks,
the warm start's first run racing another).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.guest import BOOT_TIMEOUT

pytestmark = [pytest.mark.boot, pytest.mark.kvm]


def test_six_vmm_runs_at_once(tmp_path) -> None:
    runs = []
    for i in range(6):
        token = f"token-{i}-{tmp_path.name}"
        options: list[str] = []
        if i in (2, 3):
            options = ["--cpus", "2"]
            script = f'test "$(nproc)" = 2 && echo {token}; exit {40 + i}'
        elif i in (4, 5):
            disk = tmp_path / f"disk{i}.img"
            disk.write_bytes(token.encode().ljust(4096, b"\0"))
            options = ["--disk", f"{disk},ro"]
            script = f"head -c {len(token)} /dev/vda; echo; exit {40 + i}"
        else:
            script = f"echo {token}; exit {40 + i}"
        process = subprocess.Popen([sys.executable, "-m", "vmm", "run", *options, "--", "sh", "-c", script],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs.append((process, token, 40 + i))
    for process, token, status in runs:
        out, err = process.communicate(timeout=BOOT_TIMEOUT)
        assert (process.returncode, out.decode()) == (status, f"{token}\n"), err.decode()
