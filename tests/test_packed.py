"""vmm/packed.py: named little-endian fields over the struct module."""

from __future__ import annotations

import struct

import pytest

from vmm.packed import Packed


def test_build_parse_and_size() -> None:
    entry = Packed(("addr", "Q"), ("size", "Q"), ("type", "I"), ("tag", "4s"))
    assert entry.sizeof() == 24
    data = entry.build(addr=0x1000, size=0x2000, type=1, tag=b"ABCD")
    assert data == struct.pack("<QQI4s", 0x1000, 0x2000, 1, b"ABCD")
    assert entry.parse(b"\xff" + data, 1) == {"addr": 0x1000, "size": 0x2000, "type": 1, "tag": b"ABCD"}


def test_missing_unknown_and_out_of_range_fields_are_errors() -> None:
    entry = Packed(("a", "B"), ("b", "H"))
    with pytest.raises(KeyError):
        entry.build(a=1)
    with pytest.raises(TypeError, match="unknown fields: c"):
        entry.build(a=1, b=2, c=3)
    with pytest.raises(struct.error):
        entry.build(a=256, b=0)


def test_the_default_boot_path_does_not_import_construct() -> None:
    """construct costs ~25 ms of start-up: only the bzImage/zero-page path may import it."""
    import subprocess
    import sys

    code = ("import sys, vmm.builder, vmm.loader.linux, vmm.arch.x86_64.mptable, vmm.loader.pvh;"
            "print('construct' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
