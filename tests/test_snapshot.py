"""Snapshots of real guests: save at /init's ready point, restore, run commands, refuse bad input.

One snapshot of the default guest is made per test session (a cold boot, ~11 s
on our PVM CI host) and restored by most tests (~0.5 s each); one more, with
two vCPUs and a disk, for the disk and SMP tests. Broken snapshots are made by
copying and editing the good one: those tests never start a VM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.guest import BOOT_TIMEOUT, vmm_run
from vmm.snapshot.state import MEMORY_FILE, STATE_FILE
from vmm.snapshot.statefile import FORMAT_VERSION, HEADER, decode_sections, encode_sections

pytestmark = [pytest.mark.boot, pytest.mark.kvm]

EXIT_VMM_ERROR = 125


def vmm(*args: str, timeout: float = BOOT_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm", *args], capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def snapshot_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("snapshots") / "default"
    result = vmm("snapshot", "create", str(directory))
    assert result.returncode == 0, result.stderr.decode()
    assert b"snapshot saved to" in result.stdout
    assert (directory / STATE_FILE).is_file() and (directory / MEMORY_FILE).is_file()
    return directory


@pytest.fixture(scope="session")
def disk_snapshot(tmp_path_factory) -> tuple[Path, Path]:
    """Two vCPUs and a writable 1 MiB disk of 0x5a bytes."""
    work = tmp_path_factory.mktemp("disk-snapshot")
    image = work / "disk.img"
    image.write_bytes(b"\x5a" * (1 << 20))
    directory = work / "snapshot"
    result = vmm("snapshot", "create", str(directory), "--cpus", "2", "--disk", str(image))
    assert result.returncode == 0, result.stderr.decode()
    return directory, image


def restore(directory: Path, *command: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return vmm_run("--restore", str(directory), *options, "--", *command)


def one_vmm_line(result: subprocess.CompletedProcess, pattern: str) -> str:
    assert result.returncode == EXIT_VMM_ERROR, (result.returncode, result.stderr.decode())
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmm: "), lines
    assert pattern in lines[0], lines[0]
    return lines[0]


# --- a restored guest runs commands like a booted one --------------------------------------------
def test_restored_guest_runs_the_command_with_its_argv_and_status(snapshot_dir) -> None:
    tricky = ["a b", '"quoted"', "$HOME", "ü", "", "--", "x=1 y", "%00"]
    result = restore(snapshot_dir, "sh", "-c", 'printf "[%s]" "$@"; echo; exit 7', "sh", *tricky)
    assert result.returncode == 7, result.stderr.decode()
    assert result.stdout.decode() == "".join(f"[{a}]" for a in tricky) + "\n"
    assert result.stderr == b""


def test_restored_guest_reports_a_missing_command_as_127(snapshot_dir) -> None:
    result = restore(snapshot_dir, "no-such-command")
    assert result.returncode == 127
    assert b"no-such-command: applet not found" in result.stdout  # the guest console: stdout


def test_ten_restores_of_one_snapshot_at_once(snapshot_dir) -> None:
    processes = [
        subprocess.Popen([sys.executable, "-m", "vmm", "run", "--restore", str(snapshot_dir), "--",
                          "sh", "-c", f"echo token-{i}; exit {i + 10}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(10)
    ]
    for i, process in enumerate(processes):
        out, err = process.communicate(timeout=BOOT_TIMEOUT)
        assert process.returncode == i + 10, err.decode()
        assert out.decode() == f"token-{i}\n"


def test_clock_is_the_hosts_after_a_restore(snapshot_dir) -> None:
    """The saved guest's clock stood still; /init sets it from the host's on restore."""
    meta = json.loads(decode_sections((snapshot_dir / STATE_FILE).read_bytes(), "s")["meta"])
    age = time.time() - meta["created_ns"] / 1e9
    if age < 5:  # make the snapshot old enough for a stale clock to show
        time.sleep(5 - age)
    result = restore(snapshot_dir, "date", "+%s")
    assert result.returncode == 0, result.stderr.decode()
    assert abs(int(result.stdout) - time.time()) <= 2


def test_two_restores_do_not_share_random_numbers(snapshot_dir) -> None:
    outputs = [restore(snapshot_dir, "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1")
               for _ in range(2)]
    assert all(r.returncode == 0 for r in outputs), [r.stderr for r in outputs]
    first, second = (r.stdout.decode().split() for r in outputs)
    assert len(first) == 16 and first != second


def test_guest_memory_writes_stay_private(snapshot_dir) -> None:
    before = (snapshot_dir / MEMORY_FILE).read_bytes()
    result = restore(snapshot_dir, "sh", "-c", "dd if=/dev/zero of=/big bs=1M count=8 2>/dev/null; rm /big")
    assert result.returncode == 0, result.stderr.decode()
    assert (snapshot_dir / MEMORY_FILE).read_bytes() == before


def test_profile_works_on_a_restored_guest(snapshot_dir) -> None:
    result = restore(snapshot_dir, "true", options=("--profile", "200"))
    assert result.returncode == 0, result.stderr.decode()
    assert b"profile:" in result.stderr and b"samples" in result.stderr


def test_restored_metrics_have_the_restore_phases(snapshot_dir, tmp_path) -> None:
    path = tmp_path / "metrics.json"
    result = restore(snapshot_dir, "true", options=("--metrics", str(path), "--boot-timer"))
    assert result.returncode == 0, result.stderr.decode()
    metrics = json.loads(path.read_text())
    assert metrics["start"] == "restored" and metrics["guest_boot_time_us"] is None
    phases = metrics["phases_ms"]
    assert (phases["imports_done"] < phases["state_loaded"] < phases["kvm_ready"]
            < phases["first_kvm_run"] < phases["command_done"] < phases["vmm_exited"])
    assert "init_reached" not in phases  # no boot
    assert "Restored from a snapshot" in result.stderr.decode()
    # What the VMM holds besides the guest's pages: positive, and below the peak. (The RAM is a
    # private mapping of the memory file: its page cache is not this VM's, so "touched" is
    # the Rss of the mapping, not mincore's answer, or the overhead came out negative.)
    memory = metrics["memory"]
    assert 0 < memory["guest_touched_bytes"] < memory["peak_rss_bytes"]
    assert 0 < memory["vmm_overhead_bytes"] < memory["peak_rss_bytes"]


def test_show_walks_the_sections(snapshot_dir) -> None:
    result = vmm("snapshot", "show", str(snapshot_dir))
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    for needle in ("meta:", "devices:", "vm:", "vcpu0:", "64-bit mode", "IA32_TSC", "mailbox",
                   "format and checksum verified"):
        assert needle in text, needle


# --- two vCPUs and a disk ---------------------------------------------------------------------------
def test_two_vcpus_and_disk_writes_reach_the_image_then_a_changed_disk_is_refused(disk_snapshot) -> None:
    directory, image = disk_snapshot
    result = restore(directory, "sh", "-c",
                     "nproc; od -An -tx1 -N2 /dev/vda; printf hello | dd of=/dev/vda bs=512 seek=3 conv=notrunc 2>/dev/null; sync")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode().split()
    assert out[:3] == ["2", "5a", "5a"]
    data = image.read_bytes()
    assert data[1536:1541] == b"hello" and data[:1536] == b"\x5a" * 1536
    # The guest's page cache in the snapshot holds blocks of the old content: refused.
    line = one_vmm_line(restore(directory, "true"), "changed since the snapshot")
    assert str(image) in line
    assert image.read_bytes() == data  # nothing written


def test_restore_options_that_contradict_the_snapshot(snapshot_dir, tmp_path) -> None:
    one_vmm_line(vmm_run("--restore", str(snapshot_dir), "--mem", "256M", "--", "true"),
                 "--mem 256M: the snapshot's VM has 128M")
    one_vmm_line(vmm_run("--restore", str(snapshot_dir), "--cpus", "2", "--", "true"),
                 "--cpus 2: the snapshot's VM has 1 vCPUs")
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    one_vmm_line(vmm_run("--restore", str(snapshot_dir), "--disk", str(image), "--", "true"),
                 "--disk: the snapshot's VM has these disks: none")
    result = vmm_run("--restore", str(snapshot_dir), "--kernel", "x", "--", "true")
    assert result.returncode == EXIT_VMM_ERROR and b"--restore" in result.stderr


# --- broken and foreign snapshots: one line, status 125, nothing written ------------------------------
def copy_snapshot(source: Path, target: Path) -> Path:
    target.mkdir()
    shutil.copy(source / STATE_FILE, target / STATE_FILE)
    os.symlink(source / MEMORY_FILE, target / MEMORY_FILE)
    return target


def edit_meta(directory: Path, **changes) -> None:
    sections = decode_sections((directory / STATE_FILE).read_bytes(), "s")
    meta = json.loads(sections["meta"])
    for key, value in changes.items():
        target = meta
        *path, last = key.split("__")
        for part in path:
            target = target[part]
        target[last] = value
    sections["meta"] = json.dumps(meta).encode()
    (directory / STATE_FILE).write_bytes(encode_sections(sections))


@pytest.mark.parametrize("break_it, message", [
    (lambda d: (d / STATE_FILE).write_bytes((d / STATE_FILE).read_bytes()[:1000]), "truncated"),
    (lambda d: (d / STATE_FILE).write_bytes((d / STATE_FILE).read_bytes()[:-1] + b"!"), "checksum mismatch"),
    (lambda d: (d / STATE_FILE).unlink(), "no such file"),
    (lambda d: (d / MEMORY_FILE).unlink(), "the snapshot's RAM is missing"),
    (lambda d: edit_meta(d, host__flavour="intel"), "taken on KVM intel"),
    (lambda d: edit_meta(d, host__cpuid_digest="0" * 32), "taken on another CPU"),
    (lambda d: edit_meta(d, mem="lots"), "meta.mem: expected an integer"),
    (lambda d: edit_meta(d, memory_size=1 << 20), "do not add up"),
])
def test_broken_snapshots_are_refused(snapshot_dir, tmp_path, break_it, message) -> None:
    directory = copy_snapshot(snapshot_dir, tmp_path / "copy")
    break_it(directory)
    before = sorted((p.name, p.lstat().st_size) for p in directory.iterdir())
    one_vmm_line(restore(directory, "true"), message)
    assert sorted((p.name, p.lstat().st_size) for p in directory.iterdir()) == before


def test_other_format_version_and_truncated_memory(snapshot_dir, tmp_path) -> None:
    directory = copy_snapshot(snapshot_dir, tmp_path / "copy")
    data = bytearray((directory / STATE_FILE).read_bytes())
    data[8:12] = (7).to_bytes(4, "little")
    (directory / STATE_FILE).write_bytes(bytes(data))
    one_vmm_line(restore(directory, "true"), f"snapshot format 7, this vmm reads format {FORMAT_VERSION}")

    directory = copy_snapshot(snapshot_dir, tmp_path / "copy2")
    (directory / MEMORY_FILE).unlink()
    with open(directory / MEMORY_FILE, "wb") as f:
        f.truncate(1 << 20)
    one_vmm_line(restore(directory, "true"), "truncated or not this snapshot's")
    assert HEADER.parse((snapshot_dir / STATE_FILE).read_bytes())["body_crc32"] == zlib.crc32(
        (snapshot_dir / STATE_FILE).read_bytes()[HEADER.sizeof():])


def test_snapshot_create_refuses_a_non_empty_directory(tmp_path) -> None:
    (tmp_path / "file").write_text("mine")
    one_vmm_line(vmm("snapshot", "create", str(tmp_path)), "exists and is not empty")
    assert (tmp_path / "file").read_text() == "mine"


def test_restore_of_a_directory_that_is_not_a_snapshot(tmp_path) -> None:
    one_vmm_line(restore(tmp_path / "nothing", "true"), "no such directory")
    one_vmm_line(restore(tmp_path, "true"), "no such file (not a snapshot directory?)")


# --- the warm default ------------------------------------------------------------------------------
def test_plain_vmm_run_restores_its_cached_snapshot(tmp_path) -> None:
    """The first run of a guest makes the snapshot (or an earlier test did); the next restores it."""
    for attempt in ("first", "second"):
        path = tmp_path / f"{attempt}.json"
        result = vmm_run("--metrics", str(path), "--", "echo", attempt)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode() == f"{attempt}\n"
    first = json.loads((tmp_path / "first.json").read_text())["start"]
    assert first in ("restored", "cold+saved")
    assert json.loads((tmp_path / "second.json").read_text())["start"] == "restored"
    cold = vmm_run("--cold", "--metrics", str(tmp_path / "cold.json"), "--", "true")
    assert cold.returncode == 0 and json.loads((tmp_path / "cold.json").read_text())["start"] == "cold"


def test_snapshot_create_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path) -> None:
    """A 4 MiB tmpfs (in a mount namespace of the test's own) cannot hold the guest's RAM."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs in a mount namespace: run it as root (CI does)")
    small = tmp_path / "small"
    small.mkdir()
    script = ('mount -t tmpfs -o size=4m tmpfs "$1" && "$2" -m vmm snapshot create "$1/snap"; '
              'status=$?; ls -A "$1"; exit $status')
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(small), sys.executable],
                            capture_output=True, text=True, timeout=BOOT_TIMEOUT)
    assert result.returncode == EXIT_VMM_ERROR, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"vmm: {small}/snap: cannot save the snapshot: No space left on device"]
    assert result.stdout == ""  # nothing left on the full disk, not even the staging directory
