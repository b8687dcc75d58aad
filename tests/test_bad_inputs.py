"""Every bad file a user can name, on every path a run takes: one `vmm:` line, exit 125.

The files: missing, a directory, unreadable, empty, random bytes; given as
--kernel, --initrd, --disk and --restore to a cold run, a warm run (the
snapshot cache's key names them), a run from --restore and `vmm snapshot
create`; and a bundle's config.json to vmm-runtime (runc's convention there:
"vmm-runtime: " and exit 1). Nothing boots: each is refused before KVM is used,
and nothing is left behind. As root, "unreadable" drops the capabilities that
let root read a mode-000 file (setpriv), or it would read it.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

VMM = [sys.executable, "-m", "vmm"]
KINDS = ("missing", "directory", "unreadable", "empty", "random")
# What the one line says, past the file's name, for each kind of file.
SAYS = {"missing": "no such file", "directory": "is a directory", "unreadable": "permission denied",
        "empty": "empty", "random": "not "}
DROP_ROOTS_READ = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def bad_file(directory: Path, kind: str) -> Path:
    path = directory / f"bad-{kind}"
    if kind == "directory":
        path.mkdir()
    elif kind != "missing":
        path.write_bytes(b"" if kind == "empty" else random.Random(kind).randbytes(70_000))
        if kind == "unreadable":
            path.chmod(0)
    return path


def refused(args: list[str], kind: str, timeout: float = 60) -> str:
    """Run vmm; check the one line and the status; return the line."""
    prefix = DROP_ROOTS_READ if kind == "unreadable" and os.geteuid() == 0 else []
    result = subprocess.run([*prefix, *VMM, *args], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 125, (args, result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("vmm: "), (args, result.stderr)
    assert result.stdout == "", (args, result.stdout)
    return lines[0]


def command(option: list[str]) -> list[str]:
    """A command for vmm's /init; with --initrd the guest's own init runs, and takes none."""
    return [] if option[0] == "--initrd" else ["--", "true"]


PATHS = {  # how each path is asked for, around the bad option
    "cold": lambda option: ["run", "--cold", *option, *command(option)],
    "warm": lambda option: ["run", *option, *command(option)],
    "snapshot create": lambda option: ["snapshot", "create", "{snapshot}", *option],
}


# Random bytes are a good raw disk (the guest reads them, as from QEMU's or Firecracker's
# raw images): not in the table for --disk. A snapshot is saved at the ready point of
# vmm's /init, which --initrd replaces: `snapshot create` refuses any --initrd (below).
CASES = [(option, path, kind) for option in ("--kernel", "--initrd", "--disk") for path in PATHS
         for kind in KINDS if (option, kind) != ("--disk", "random")
         and (option, path) != ("--initrd", "snapshot create")]


@pytest.mark.parametrize("option, path, kind", CASES)
def test_a_bad_file_is_one_line_on_every_path(tmp_path, path, option, kind):
    bad = bad_file(tmp_path, kind)
    value = f"{bad},ro" if option == "--disk" and path == "warm" else str(bad)  # ro: warm-able
    snapshot = tmp_path / "snapshot"
    args = [a.format(snapshot=snapshot) for a in PATHS[path]([option, value])]
    line = refused(args, kind)
    assert str(bad) in line and SAYS[kind] in line.removeprefix(f"vmm: {bad}"), line
    assert not snapshot.exists()  # snapshot create left nothing


def test_snapshot_create_refuses_an_initrd_in_one_line(tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701")
    line = refused(["snapshot", "create", str(tmp_path / "snapshot"), "--initrd", str(initrd)],
                   "random")
    assert f"--initrd {initrd}" in line and "ready point" in line, line
    assert not (tmp_path / "snapshot").exists()


def test_a_command_with_the_guests_own_init_is_one_line(tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701")
    line = refused(["run", "--initrd", str(initrd), "--", "true"], "random")
    assert "--initrd replaces it" in line, line


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "random"])
def test_a_bad_disk_with_restore_is_one_line(tmp_path, kind):
    bad = bad_file(tmp_path, kind)
    line = refused(["run", "--restore", str(tmp_path), "--disk", str(bad), "--", "true"], kind)
    assert str(bad) in line and SAYS[kind] in line, line


def _snapshot_directory(directory: Path, kind: str) -> tuple[Path, str]:
    """A --restore argument of each bad kind, and what its line says."""
    path = directory / f"snapshot-{kind}"
    if kind == "missing":
        return path, "no such directory"
    if kind == "directory":  # a directory is what --restore wants: an empty one
        path.mkdir()
        return path, "no such file (not a snapshot directory?)"
    if kind == "empty":  # a snapshot whose state file is empty
        path.mkdir()
        (path / "vm.state").write_bytes(b"")
        return path, "empty file, not a vmm snapshot"
    if kind == "random":
        path.mkdir()
        (path / "vm.state").write_bytes(random.Random(7).randbytes(70_000))
        return path, "not a vmm snapshot"
    path.mkdir()  # unreadable
    (path / "vm.state").write_bytes(b"x")
    (path / "vm.state").chmod(0)
    return path, "permission denied"


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_restore_is_one_line(tmp_path, kind):
    directory, says = _snapshot_directory(tmp_path, kind)
    line = refused(["run", "--restore", str(directory), "--", "true"], kind)
    assert str(directory) in line and says in line, line


@pytest.mark.parametrize("kind", KINDS)
def test_vmm_runtime_refuses_a_bad_config_json_in_one_line(tmp_path, kind):
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    config = bad_file(bundle, kind)
    config.rename(bundle / "config.json") if config.exists() or config.is_symlink() else None
    root = tmp_path / "state"
    prefix = DROP_ROOTS_READ if kind == "unreadable" and os.geteuid() == 0 else []
    result = subprocess.run([*prefix, sys.executable, "-m", "vmm.oci", "--root", str(root),
                             "create", "--bundle", str(bundle), "c1"],
                            capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vmm-runtime: {bundle}/config.json: "), lines
    assert not (root / "c1").exists()


def test_acpi_on_for_a_kernel_without_acpi_is_one_line(tmp_path):
    """Our kernel has no CONFIG_ACPI: its symbols say so, before anything boots."""
    line = refused(["run", "--cold", "--acpi", "on", "--", "true"], "random")
    assert "--acpi on" in line and "no ACPI support" in line and "vmlinux" in line, line
