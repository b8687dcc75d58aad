"""Configuration parsing and validation: no files, no KVM."""

from __future__ import annotations

import pytest

from vmm.arch.x86_64.layout import GiB, KiB, MiB
from vmm.config import DiskConfig, VmConfig, parse_size
from vmm.errors import UsageError


@pytest.mark.parametrize("text, size", [
    ("512M", 512 * MiB), ("512m", 512 * MiB), ("1G", GiB), ("2GiB", 2 * GiB),
    ("512MB", 512 * MiB), ("4096K", 4 * MiB), ("1024KiB", MiB), ("2048", 2 * GiB),
    ("1", MiB), (" 64M ", 64 * MiB), ("64G", 64 * GiB),
])
def test_parse_size_good(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, why", [
    ("12Q", "not a size"), ("", "not a size"), ("-1", "not a size"), ("1.5G", "not a size"),
    ("M", "not a size"), ("0x100", "not a size"), ("0", "too small"), ("512K", "too small"),
    ("65G", "too large"), ("1T", "too large"), ("4097K", "multiple of 4K"),
])
def test_parse_size_bad(text, why):
    with pytest.raises(UsageError, match=why) as info:
        parse_size(text)
    assert str(info.value).startswith(f"--mem {text!r}: ")


def test_parse_size_names_the_option():
    with pytest.raises(UsageError, match=r"^--size 'x'"):
        parse_size("x", option="--size")


@pytest.mark.parametrize("text, expected", [
    ("disk.img", DiskConfig("disk.img")),
    ("disk.img,ro", DiskConfig("disk.img", read_only=True)),
    ("disk.img,readonly", DiskConfig("disk.img", read_only=True)),
    ("/a/b.raw,ro,serial=root1", DiskConfig("/a/b.raw", True, "root1")),
    ("d,ro,rw", DiskConfig("d", False)),
    ("d,serial=" + "x" * 20, DiskConfig("d", serial="x" * 20)),
])
def test_disk_config_good(text, expected):
    assert DiskConfig.parse(text) == expected


@pytest.mark.parametrize("text, why", [
    ("", "no path"), (",ro", "no path"), ("d,bogus", "unknown option 'bogus'"),
    ("d,serial=" + "x" * 21, "longer than 20 bytes"), ("d,RO", "unknown option"),
])
def test_disk_config_bad(text, why):
    with pytest.raises(UsageError, match=why) as info:
        DiskConfig.parse(text)
    assert str(info.value).startswith(f"--disk {text!r}")


@pytest.mark.parametrize("kwargs, why", [
    ({"cpus": 0}, "--cpus"),
    ({"runloop": "rust"}, "--runloop"),
    ({"timeout": 0}, "--timeout"),
    ({"timeout": -1.0}, "--timeout"),
    ({"firmware": "hello", "kernel": "bzImage"}, "--firmware"),
    ({"firmware": "hello", "command": ("true",)}, "--firmware"),
    ({"firmware": "hello", "disks": (DiskConfig("d"),)}, "--firmware"),
])
def test_vm_config_refuses_bad_combinations(kwargs, why):
    with pytest.raises(UsageError, match=why):
        VmConfig(**kwargs)


def test_vm_config_defaults():
    config = VmConfig()
    assert (config.mem, config.cpus, config.runloop, config.timeout) == (128 * MiB, 1, "c", None)
    assert KiB == 1024
