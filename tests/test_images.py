"""The default guest's userland: musl busybox from Debian's source, in the initramfs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vmm.images.busybox import MUSL_INCOMPATIBLE, cached_busybox, deb_src_lines
from vmm.images.initramfs import default_initramfs


def test_the_initramfs_holds_our_musl_busybox_not_the_fallback() -> None:
    """CI builds it first (.ci/run); a silent fall-back to glibc busybox would slow every command."""
    initramfs = default_initramfs()
    busybox = cached_busybox()
    assert busybox is not None, "the musl busybox was not built (see the warning of vmm image initramfs)"
    assert "musl static" in (busybox.parent / "version").read_text()
    assert busybox.read_bytes() in initramfs.read_bytes()
    assert b"ld-linux" not in busybox.read_bytes()[:16384]  # static
    result = subprocess.run([str(busybox), "sh", "-c", "echo $((6 * 7))"], capture_output=True, text=True)
    assert result.stdout == "42\n"


def test_deb_src_lines_from_both_apt_formats(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "deb http://deb.debian.org/debian bookworm main contrib\n"
        "# deb http://commented.out/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror/debian bookworm-updates main\n")
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb-src\nURIs: http://x/debian\nSuites: y\nComponents: main\n\n"
        "Types: deb\nURIs: http://off/debian\nSuites: z\nComponents: main\nEnabled: no\n")
    assert deb_src_lines((tmp_path / "sources.list", parts)) == [
        "deb-src http://deb.debian.org/debian bookworm main contrib",
        "deb-src http://deb.debian.org/debian-security bookworm-security main",
        "deb-src http://mirror/debian bookworm-updates main",
    ]


def test_only_the_gnu_regex_options_are_dropped() -> None:
    assert MUSL_INCOMPATIBLE == ("CONFIG_FEATURE_VI_REGEX_SEARCH", "CONFIG_EXTRA_COMPAT")
