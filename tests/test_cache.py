"""The snapshot cache's bound (vmm/snapshot/cache.py): least recently used out first, never
one in use; `vmm cache ls` and `vmm cache prune`.

Without KVM on directories that look like snapshots; with KVM, a real VMM restored from
its snapshot keeps it through `vmm cache prune --all`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from tests.guest import BOOT_TIMEOUT, read_line
from vmm.cli import main
from vmm.snapshot import cache
from vmm.snapshot.state import STATE_FILE

MiB = 1 << 20


@pytest.fixture
def snapshots(tmp_path, monkeypatch):
    """A cache of its own, and a maker of fake snapshots (size on disk, last use)."""
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(cache.MAX_ENV, raising=False)

    def make(name: str, mib: int, used_ago_s: float):
        directory = cache.snapshot_cache_dir() / name
        directory.mkdir(parents=True)
        (directory / STATE_FILE).write_bytes(b"x")
        (directory / "memory").write_bytes(os.urandom(mib * MiB))  # really on disk
        when = time.time() - used_ago_s
        os.utime(directory, (when, when))
        return directory

    yield make
    for fd in cache._in_use:  # lookup()'s locks, as a VMM would hold them to its end
        os.close(fd)
    cache._in_use.clear()


def names() -> list[str]:
    return [e.path.name for e in cache.entries()]


def test_prune_removes_the_least_recently_used_down_to_the_cap(snapshots):
    for index, name in enumerate(["old", "older", "new", "oldest"]):
        snapshots(name, 2, {"oldest": 400, "older": 300, "old": 200, "new": 100}[name])
    assert names() == ["oldest", "older", "old", "new"]
    removed = cache.prune(5 * MiB)  # 8 MiB cached: two must go
    assert [p.name for p in removed] == ["oldest", "older"]
    assert names() == ["old", "new"]
    assert not any(p.name.startswith(".") for p in cache.snapshot_cache_dir().iterdir())


def test_a_lookup_makes_a_snapshot_recent_and_keeps_it_in_use(snapshots):
    snapshots("a", 1, 300)
    snapshots("b", 1, 200)
    assert cache.lookup("a") is not None  # used now: b is the oldest; and held by us
    assert names() == ["b", "a"]
    assert [e.in_use for e in cache.entries()] == [False, True]
    assert [p.name for p in cache.prune(0)] == ["b"]
    assert names() == ["a"]  # in use: never evicted, whatever the cap


def test_a_snapshot_held_by_another_process_is_in_use(snapshots):
    directory = snapshots("held", 1, 10)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
         "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)", str(directory)],
        stdout=subprocess.PIPE)
    try:
        assert read_line(holder.stdout, 60) == b"held\n"
        assert cache.prune(0) == [] and names() == ["held"]
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in cache.prune(0)] == ["held"]


def test_the_cap_comes_from_the_environment(snapshots, monkeypatch):
    assert cache.cache_max() == cache.DEFAULT_MAX
    monkeypatch.setenv(cache.MAX_ENV, "2G")
    assert cache.cache_max() == 2 << 30
    monkeypatch.setenv(cache.MAX_ENV, "lots")
    result = CliRunner().invoke(main, ["cache", "ls"])
    assert result.exit_code == 125
    assert result.output.strip() == "vmm: VMM_CACHE_MAX='lots': not a size (examples: 512M, 2G, 0)"


def test_cache_ls_and_prune_commands(snapshots, monkeypatch):
    snapshots("0123456789abcdef0123", 2, 7200)
    snapshots("img-0123456789abcdef0123", 1, 60)
    listed = CliRunner().invoke(main, ["cache", "ls"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split()[:4] == ["0123456789abcdef0123", "guest", "2.0", "MiB"]
    assert "used 2.0 h ago" in lines[0]
    assert lines[1].split()[:5] == ["img-0123456789abcdef0123", "image", "base", "1.0", "MiB"]
    assert lines[2].startswith("2 snapshot(s), 3.0 MiB of 512.0 MiB (VMM_CACHE_MAX) in ")
    monkeypatch.setenv(cache.MAX_ENV, "2M")
    pruned = CliRunner().invoke(main, ["cache", "prune"])
    assert pruned.output == "removed 1 snapshot(s); 1 left, 1.0 MiB\n"
    emptied = CliRunner().invoke(main, ["cache", "prune", "--all"])
    assert emptied.output == "removed 1 snapshot(s); 0 left, 0.0 MiB\n"


@pytest.mark.boot
@pytest.mark.kvm
def test_a_running_vmm_keeps_its_snapshot_through_prune_all(tmp_path):
    """The session's snapshot cache: the warm start's snapshot of this guest, in use."""
    vmm = [sys.executable, "-m", "vmm"]
    first = subprocess.run([*vmm, "run", "--", "true"], capture_output=True, timeout=BOOT_TIMEOUT)
    assert first.returncode == 0, first.stderr  # the snapshot exists now (made or restored)
    # Running while the host prunes and lists (~1 s): the guest's sleep is wall time.
    running = subprocess.Popen([*vmm, "run", "--", "sh", "-c", "echo up; sleep 8"],
                               stdout=subprocess.PIPE)
    try:
        assert read_line(running.stdout) == b"up\n"  # restored: it holds its snapshot
        pruned = subprocess.run([*vmm, "cache", "prune", "--all"], capture_output=True, text=True,
                                timeout=60)
        assert pruned.returncode == 0 and "(1 in use)" in pruned.stdout, pruned.stdout
        listed = subprocess.run([*vmm, "cache", "ls"], capture_output=True, text=True, timeout=60)
        assert listed.stdout.count("(in use)") == 1, listed.stdout
        assert running.wait(timeout=60) == 0
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    after = subprocess.run([*vmm, "cache", "prune", "--all"], capture_output=True, text=True,
                           timeout=60)
    assert after.stdout.startswith("removed 1 snapshot(s); 0 left"), after.stdout
