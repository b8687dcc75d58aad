"""Once the guest runs, vmm imports nothing (issue 23): every module a run will use is
imported before the first KVM_RUN (LinuxRun.used_once_running), so a seccomp jail can
refuse the open of any Python file from then on, and no guest action pays an import.

Each run here is a real `vmm run` in its own interpreter, with Runner.run wrapped to
list the modules that appeared while the vCPUs ran.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.boot

PROBE = """
import atexit, sys
from vmm import runner
original = runner.Runner.run
new, runs = [], []
def run(self, *args, **kwargs):
    runs.append(1)
    before = set(sys.modules)
    try:
        return original(self, *args, **kwargs)
    finally:
        new.extend(sorted(set(sys.modules) - before))
runner.Runner.run = run
atexit.register(lambda: print(f"runs: {len(runs)}; imported while the guest ran: {new}",
                              file=sys.stderr))
from vmm.cli import main
sys.argv = ["vmm", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("options", [
    [],  # the warm start (the first run of the session saves the snapshot at the ready point)
    ["--cold"],
    ["--cold", "--disk", "{disk},ro", "--cpus", "2"],
], ids=["warm", "cold", "cold-disk-smp"])
def test_nothing_is_imported_while_the_guest_runs(tmp_path, options):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    args = [option.format(disk=disk) for option in options]
    result = subprocess.run([sys.executable, "-c", PROBE, "run", *args, "--", "cat",
                             "/proc/cpuinfo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "runs: 1; imported while the guest ran: []" in result.stderr, result.stderr
