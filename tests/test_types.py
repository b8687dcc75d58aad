"""The type checker over vmm/: the interfaces (Protocols for devices, transports, backends,
interrupt lines and saved state) hold where they are used (mypy, configured in pyproject.toml;
``Any`` only where cffi's C objects cross)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.time_limit(600)
def test_mypy_finds_nothing_in_vmm(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found"), result.stdout
