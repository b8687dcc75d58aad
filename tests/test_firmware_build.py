"""Building the built-in firmware payloads (no KVM needed: binutils only)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.packages import require

from vmm import firmware
from vmm.arch.x86_64 import layout
from vmm.errors import GuestBuildError, LoaderError



@pytest.fixture
def binutils() -> None:
    """GNU as, ld and objcopy, or the test fails naming binutils."""
    for tool in ("as", "ld", "objcopy"):
        require(tool)

EXPECTED = {"hello", "longmode", "exitbench", "fail"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_available_firmware_lists_the_builtins():
    names = firmware.available_firmware()
    assert EXPECTED <= set(names)
    assert names == sorted(names)


@pytest.mark.usefixtures("binutils")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_builds_into_a_valid_image(name, private_cache):
    path = firmware.firmware_path(name)
    assert path.name == f"{name}.bin"
    assert private_cache / "firmware" in path.parents
    image = path.read_bytes()
    assert 16 <= len(image) <= layout.FIRMWARE_MAX_SIZE
    # The reset vector: the image's last 16 bytes, starting with a jump
    # (EA = far jmp, E9/EB = near jmp).
    assert image[-16] in (0xEA, 0xE9, 0xEB)
    # Our stubs are all `ljmp $0xF000, $start`: the segment must be F000 and
    # the offset must land inside the image (which ends at offset 0x10000).
    if image[-16] == 0xEA:
        offset = int.from_bytes(image[-15:-13], "little")
        segment = int.from_bytes(image[-13:-11], "little")
        assert segment == layout.RESET_CS_SELECTOR
        assert 0x10000 - len(image) <= offset < layout.RESET_IP


@pytest.mark.usefixtures("binutils")
def test_cached_image_is_reused_without_running_the_assembler(monkeypatch):
    first = firmware.firmware_path("hello")
    mtime = first.stat().st_mtime_ns

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"subprocess run for a cached image: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    second = firmware.firmware_path("hello")
    assert second == first
    assert second.stat().st_mtime_ns == mtime


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "explicit"))
    assert firmware.cache_dir() == tmp_path / "explicit"
    monkeypatch.setenv("VMM_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert firmware.cache_dir() == tmp_path / "xdg" / "vmm"
    monkeypatch.delenv("VMM_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert firmware.cache_dir() == Path.home() / ".cache" / "vmm"


def test_unknown_name_raises_loader_error():
    with pytest.raises(LoaderError) as info:
        firmware.firmware_path("no-such-payload")
    message = str(info.value)
    assert message.startswith("no-such-payload: no such firmware file or built-in payload")
    assert "built-ins: " in message and "hello" in message and "longmode" in message


def test_user_path_is_returned_as_is(tmp_path):
    image = tmp_path / "mine.bin"
    image.write_bytes(b"\xf4" * 16)
    assert firmware.firmware_path(str(image)) == image
    assert firmware.firmware_path(image) == image


@pytest.mark.usefixtures("binutils")
def test_assembler_error_becomes_guest_build_error(tmp_path, monkeypatch):
    sources = tmp_path / "src"
    sources.mkdir()
    real = firmware.source_dir()
    for keep in ["firmware.ld", *(p.name for p in real.glob("*.inc"))]:
        shutil.copy(real / keep, sources / keep)
    (sources / "broken.S").write_text(".code16\n.section .text\n    movq %nosuchreg, %ax\n")
    monkeypatch.setattr(firmware, "source_dir", lambda: sources)
    with pytest.raises(GuestBuildError) as info:
        firmware.firmware_path("broken")
    message = str(info.value)
    assert message.startswith("firmware broken: as failed:")
    assert "broken.S:3" in message and "Error" in message
    # Nothing half-built is left in the cache.
    assert not list((tmp_path / "cache").rglob("*.bin"))


def test_layout_inc_mirrors_layout_py():
    """Every `.equ NAME, value` in firmware/*.inc whose NAME is in layout.py agrees."""
    checked = 0
    for inc in firmware.source_dir().glob("*.inc"):
        for match in re.finditer(
            r"^\s*\.equ\s+(\w+)\s*,\s*(0x[0-9A-Fa-f]+|\d+)", inc.read_text(), re.MULTILINE
        ):
            name, value = match.group(1), int(match.group(2), 0)
            if hasattr(layout, name):
                assert getattr(layout, name) == value, f"{inc.name}: {name}"
                checked += 1
    assert checked >= 8
