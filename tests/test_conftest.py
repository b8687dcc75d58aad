"""tests/conftest.py itself: kvm tests fail (never skip) without KVM, and are counted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ONE_KVM_TEST = "tests/test_kvm_firmware.py::test_kvm_api_version_and_capabilities"


def run_pytest(tmp_path, device=None):
    report = tmp_path / "report"
    env = dict(os.environ, VMM_KVM_TESTS_REPORT=str(report))
    env.pop("VMM_TEST_KVM_DEVICE", None)
    if device:
        env["VMM_TEST_KVM_DEVICE"] = device
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", ONE_KVM_TEST],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    return result, report.read_text() if report.exists() else None


def test_kvm_test_fails_loudly_without_kvm(tmp_path):
    result, report = run_pytest(tmp_path, device="/nonexistent/kvm")
    assert result.returncode == 1, result.stdout
    assert ("1 failed" in result.stdout or "1 error" in result.stdout), result.stdout
    assert "skipped" not in result.stdout
    assert "this test needs a usable /dev/kvm: /nonexistent/kvm: not found" in result.stdout
    assert report == "0\n"


@pytest.mark.kvm
def test_passed_kvm_tests_are_counted(tmp_path):
    result, report = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout
    assert report == "1\n"
    assert "kvm/boot tests: 1 of 1 collected passed" in result.stdout


def test_a_test_that_waits_forever_fails_at_its_time_limit(tmp_path):
    """The backstop: a blocking wait (here a pipe nobody writes to) is interrupted, the test
    fails naming its limit, and the next test still runs."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import os, pytest\n"
        "@pytest.mark.time_limit(1)\n"
        "def test_waits_forever():\n"
        "    read_end, _write_end = os.pipe()\n"
        "    os.read(read_end, 1)\n"
        "def test_next():\n"
        "    pass\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
         "-c", str(ROOT / "pyproject.toml"), "--confcutdir", str(ROOT), "-p", "tests.conftest",
         str(probe)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "over its time limit of 1 s" in result.stdout, result.stdout
    assert "1 failed, 1 passed" in result.stdout, result.stdout
