"""The `vmm` command through click's CliRunner: help, version, bad input (no KVM).

Bad input must give exactly one line starting with ``vmm:``, a non-zero exit
status and never a traceback.
"""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from vmm import __version__
from vmm.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def lines(result):
    return [line for line in result.output.splitlines() if line.strip()]


def assert_one_clear_line(result, pattern):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    (line,) = lines(result)
    assert line.startswith("vmm: "), line
    assert re.search(pattern, line), line


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag):
    result = invoke(flag)
    assert result.exit_code == 0
    assert "Usage: " in result.output
    assert "check" in result.output and "run" in result.output


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_subcommand_help(flag):
    for command in ("run", "check"):
        result = invoke(command, flag)
        assert result.exit_code == 0, result.output
        assert f"Usage: main {command}" in result.output or "Usage: " in result.output
    assert "--firmware" in invoke("run", flag).output


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag):
    result = invoke(flag)
    assert result.exit_code == 0
    assert result.output.strip() == f"vmm, version {__version__}"


@pytest.mark.parametrize("mem, why", [
    ("12Q", r"--mem '12Q': not a size"),
    ("0", r"--mem '0': too small"),
    ("999G", r"--mem '999G': too large"),
])
def test_bad_mem(mem, why):
    assert_one_clear_line(invoke("run", "--firmware", "hello", "--mem", mem), why)


def test_firmware_needs_a_megabyte():
    # 1M is the minimum parse_size accepts; the firmware builder's own check is the same.
    result = invoke("run", "--firmware", "hello", "--mem", "512K")
    assert_one_clear_line(result, "too small")


def test_missing_firmware_file(tmp_path):
    missing = tmp_path / "nope.bin"
    assert_one_clear_line(invoke("run", "--firmware", str(missing)),
                          re.escape(str(missing)) + r": no such firmware file")


def test_unknown_builtin_lists_the_builtins():
    result = invoke("run", "--firmware", "helo")
    assert_one_clear_line(result, r"helo: no such firmware file or built-in payload \(built-ins: .*hello")


def test_empty_firmware_file(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert_one_clear_line(invoke("run", "--firmware", str(empty)), r"empty file")


def test_firmware_that_is_a_directory(tmp_path):
    assert_one_clear_line(invoke("run", "--firmware", str(tmp_path)), r"is a directory")


def test_firmware_larger_than_64k(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\xf4" * (64 * 1024 + 1))
    assert_one_clear_line(invoke("run", "--firmware", str(big)), r"65537 bytes, larger than the 64 KiB")


def test_unreadable_firmware_file(tmp_path, monkeypatch):
    # Tests often run as root, for whom chmod 000 changes nothing: refuse the read instead.
    from pathlib import Path

    target = tmp_path / "secret.bin"
    target.write_bytes(b"\xeb\xfe")
    real = Path.read_bytes

    def read_bytes(self):
        if self == target:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert_one_clear_line(invoke("run", "--firmware", str(target)), r"permission denied")


def test_bad_disk_option():
    assert_one_clear_line(invoke("run", "--disk", "x,bogus"), r"unknown option 'bogus'")


def test_firmware_with_a_command_is_refused():
    assert_one_clear_line(invoke("run", "--firmware", "hello", "--", "true"), r"--firmware runs a bare payload")


def test_bad_runloop_is_a_usage_error_without_traceback():
    result = invoke("run", "--firmware", "hello", "--runloop", "rust")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "Invalid value for '--runloop'" in result.output


def _no_kvm(monkeypatch):
    import vmm.kvm.system as system

    real_open = system.os.open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/dev/kvm":
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(system.os, "open", fake_open)


def test_run_without_dev_kvm(monkeypatch):
    _no_kvm(monkeypatch)
    result = invoke("run", "--firmware", "hello")
    assert_one_clear_line(result, r"^vmm: /dev/kvm: not found: .*modprobe")
    assert result.exit_code == 125


def test_check_without_dev_kvm(monkeypatch):
    _no_kvm(monkeypatch)
    result = invoke("check")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert re.search(r"^kvm: (pvm|intel|amd|unknown) ", result.output, re.M)
    assert "/dev/kvm: NOT USABLE: /dev/kvm: not found" in result.output


def test_root_on_a_read_only_disk_is_mounted_read_only() -> None:
    from vmm.cli.run import _root_disk_is_read_only
    from vmm.config import DiskConfig

    disks = (DiskConfig("a.img"), DiskConfig("b.img", read_only=True))
    assert not _root_disk_is_read_only("/dev/vda", disks)
    assert _root_disk_is_read_only("/dev/vdb", disks)
    assert not _root_disk_is_read_only("/dev/vdc", disks)  # no such disk: the guest will say
    assert not _root_disk_is_read_only("/dev/sda", disks)


def test_kernel_path_prints_one_file_for_tools(monkeypatch, tmp_path):
    """`gdb $(vmm kernel path --vmlinux)`: one path each; the README's set-up built the kernel."""
    from vmm.images.kernel import build_kernel

    built = build_kernel(lambda line: None)  # the cached one
    for option, expected in (("--vmlinux", built.vmlinux), ("--bzimage", built.bzimage),
                             ("--system-map", built.system_map)):
        result = invoke("kernel", "path", option)
        assert result.exit_code == 0 and result.output == f"{expected}\n", result.output
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))  # an empty cache: nothing built
    result = invoke("kernel", "path", "--vmlinux")
    assert result.exit_code == 1
    assert result.output == "vmm: the guest kernel is not built yet: run 'vmm kernel build'\n"
