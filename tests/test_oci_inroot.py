"""Paths inside a container's root (vmm/oci/inroot.py), and the bind mounts placed with them.

Two oracles: the host kernel's own ``openat2(RESOLVE_IN_ROOT)``, which resolves a
path as a process chrooted in the root would, against our O_PATH walk on random
trees of links (hypothesis); and, for the bind mounts a hostile image author would
try, a canary directory on the host listed before and after staging, with the
volume read back through ``RESOLVE_IN_ROOT`` where the container will look for it.
No KVM: the guest's side is in test_oci_runtime.py.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_oci_spec import CONTAINERD_LIKE
from vmm.oci import guest, inroot
from vmm.oci.spec import BundleError, load_bundle

SYS_OPENAT2 = 437  # x86_64 and aarch64 alike
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def kernel_open_in_root(root: int, path: str) -> int:
    """openat2(root, path, O_PATH, RESOLVE_IN_ROOT): the kernel's answer (OSError if none)."""
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    while True:
        fd = _libc.syscall(SYS_OPENAT2, root, path.encode(), ctypes.byref(how),
                           ctypes.sizeof(how))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code != errno.EAGAIN:  # EAGAIN: a rename raced the lookup; the kernel asks again
            raise OSError(code, os.strerror(code), path)


def read_in_root(root: Path, path: str) -> bytes:
    """What a process chrooted in ``root`` reads at ``path``."""
    with inroot.open_root(root) as fd:
        found = kernel_open_in_root(fd, path)
    try:
        with open(f"/proc/self/fd/{found}", "rb") as f:
            return f.read()
    finally:
        os.close(found)


def listing(top: Path) -> dict[str, tuple]:
    """Everything under ``top``: names, kinds, sizes, link targets (the canary's state)."""
    out = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
            out[os.path.relpath(path, top)] = (stat.S_IFMT(info.st_mode), info.st_size, target)
    return out


# --- the walk against the kernel ------------------------------------------------------------
NAMES = ["a", "b", "c"]
TARGETS = st.lists(st.sampled_from(NAMES + ["..", ".", ""]), min_size=1, max_size=4).map(
    "/".join).flatmap(lambda rel: st.sampled_from([rel, "/" + rel]))
NODES = st.dictionaries(
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join),
    st.one_of(st.just("dir"), st.just("file"), TARGETS), max_size=8)
PATHS = st.lists(st.sampled_from(NAMES + [".."]), min_size=1, max_size=5).map("/".join)


def build(top: Path, nodes: dict[str, str]) -> None:
    for path, kind in sorted(nodes.items()):
        where = top / path
        if not where.parent.is_dir() or os.path.lexists(where):
            continue  # a parent that is a file or a link: this node cannot be made
        if kind == "dir":
            where.mkdir()
        elif kind == "file":
            where.write_text(path)
        else:
            where.symlink_to(kind or ".")


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nodes=NODES, path=PATHS)
def test_the_walk_lands_where_the_kernels_resolve_in_root_does(tmp_path_factory, nodes, path):
    top = tmp_path_factory.mktemp("root")
    build(top, nodes)
    with inroot.open_root(top) as root:
        try:
            found = kernel_open_in_root(root, path)
            kernel = os.fstat(found)
            os.close(found)
        except OSError as e:
            kernel = e.errno
        try:
            with inroot.place(root, path, make_dirs=False) as spot:
                ours = spot.existing
        except inroot.RootPathError as e:
            ours = str(e)
    if isinstance(kernel, os.stat_result):
        if os.path.samestat(kernel, os.stat(top)):  # the root: no place to put anything
            assert isinstance(ours, str) and "the root itself" in ours, (path, nodes, ours)
        else:
            assert isinstance(ours, os.stat_result), (path, nodes, ours)
            assert os.path.samestat(ours, kernel), (path, nodes)
    else:
        problems = {errno.ENOENT: ("no such directory", None),
                    errno.ENOTDIR: ("not a directory",),
                    errno.ELOOP: ("too many levels of symbolic links",)}[kernel]
        assert ours is None and None in problems or isinstance(ours, str) and any(
            problem and problem in ours for problem in problems), (path, nodes, ours)


def test_missing_directories_are_made_where_the_links_lead(tmp_path):
    top = tmp_path / "root"
    top.mkdir()
    (top / "data").symlink_to("/srv/../../../volumes")  # absolute, climbing above the root
    with inroot.open_root(top) as root:
        with inroot.place(root, "/data/x/y") as spot:
            assert (spot.path, spot.name, spot.existing) == ("/volumes/x/y", "y", None)
            os.mkdir(spot.name, dir_fd=spot.parent)
    assert (top / "volumes" / "x" / "y").is_dir()
    assert (top / "srv").is_dir()  # as `mkdir -p srv/../volumes` makes it: inside the root


@pytest.mark.parametrize("links, path, problem", [
    ({"a": "b", "b": "a"}, "/a/x", "too many levels of symbolic links"),
    ({"loop": "loop/x"}, "/loop", "too many levels of symbolic links"),
    ({}, "/", "the root itself"),
    ({"up": ".."}, "/up/..", "the root itself"),
])
def test_paths_that_cannot_land_inside_are_refused(tmp_path, links, path, problem):
    for name, target in links.items():
        os.symlink(target, tmp_path / name)
    with inroot.open_root(tmp_path) as root:
        with pytest.raises(inroot.RootPathError, match=problem):
            with inroot.place(root, path):
                pass


def test_a_file_in_the_middle_is_not_a_directory(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0\n")
    with inroot.open_root(tmp_path) as root:
        with pytest.raises(inroot.RootPathError, match="/etc/passwd: not a directory"):
            with inroot.place(root, "/etc/passwd/x"):
                pass


def test_the_walk_lists_links_as_links_and_refuses_endless_depth(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "out").symlink_to("/etc")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert [(e.path, stat.S_IFMT(e.info.st_mode)) for e in inroot.walk(fd)] == [
            ("/d", stat.S_IFDIR), ("/d/f", stat.S_IFREG), ("/out", stat.S_IFLNK)]
    finally:
        os.close(fd)
    deep = tmp_path / "deep"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(inroot.MAX_DEPTH + 2):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(inroot.RootPathError, match="deeper than"):
            list(inroot.walk(fd))
    finally:
        os.close(fd)


# --- bind mounts a hostile image author would try -------------------------------------------
@pytest.fixture
def hostile(tmp_path):
    """(bundle maker, canary): the canary is a host directory every image below aims at."""
    canary = tmp_path / "canary"
    (canary / "keep").mkdir(parents=True)
    (canary / "keep" / "file").write_text("host data\n")
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "payload").write_text("the user's volume\n")
    host_file = tmp_path / "hosts"
    host_file.write_text("127.0.0.1 box\n")

    def bundle(links: dict[str, str], mounts: list[tuple[str, Path]], dirs=()) -> Path:
        directory = tmp_path / "bundle"
        root = directory / "rootfs"
        (root / "etc").mkdir(parents=True)
        for name in dirs:
            (root / name).mkdir(parents=True, exist_ok=True)
        for name, target in links.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target.format(canary=canary), root / name)
        config = json.loads(json.dumps(CONTAINERD_LIKE))
        config["mounts"] += [{"destination": destination.format(canary=canary), "type": "bind",
                              "source": str(source), "options": ["rbind", "rw"]}
                             for destination, source in mounts]
        (directory / "config.json").write_text(json.dumps(config))
        return directory

    return bundle, canary, volume, host_file


# (links in the image, the mount's destination, where the container finds the volume)
ESCAPES = {
    "absolute link on the path": ({"data": "{canary}"}, "/data/x", "/data/x"),
    "relative link climbing out": ({"srv/data": "../../../../../../../../../{canary}"},
                                   "/srv/data/x", "/srv/data/x"),
    "link as the last component": ({"data/x": "{canary}"}, "/data/x", "/data/x"),
    "dotdot in the destination": ({}, "/../../../../../../../..{canary}/x", "{canary}/x"),
    "a chain of links": ({"a": "b", "b": "c/d", "c/d": "/../{canary}"}, "/a/x", "/a/x"),
    "a link to the root's parent": ({"data": "../.."}, "/data{canary}/x", "{canary}/x"),
}


@pytest.mark.parametrize("case", ESCAPES)
def test_a_volume_never_lands_outside_the_root(hostile, tmp_path, case):
    make, canary, volume, _ = hostile
    links, destination, seen_at = ESCAPES[case]
    before = listing(canary)
    spec = load_bundle(make(links, [(destination, volume)]))
    staged = guest.stage_root(spec, tmp_path)
    assert listing(canary) == before  # not a byte outside the root
    assert staged.is_relative_to(tmp_path) and staged != spec.root
    where = seen_at.format(canary=canary)
    assert read_in_root(staged, f"{where}/payload") == b"the user's volume\n"  # where runc puts it
    assert not list(spec.root.rglob("payload"))  # nor in the bundle's own root


def test_a_file_bind_over_a_link_lands_at_the_links_target_inside(hostile, tmp_path):
    make, canary, _, host_file = hostile
    before = listing(canary)
    spec = load_bundle(make({"etc/hosts": "{canary}/keep/file"}, [("/etc/hosts", host_file)]))
    staged = guest.stage_root(spec, tmp_path)
    assert listing(canary) == before and (canary / "keep" / "file").read_text() == "host data\n"
    assert read_in_root(staged, "/etc/hosts") == b"127.0.0.1 box\n"


def test_a_bind_source_that_is_a_link_is_followed(hostile, tmp_path):
    make, canary, volume, _ = hostile
    link = tmp_path / "volume-link"
    link.symlink_to(volume)
    spec = load_bundle(make({}, [("/data", link)]))
    staged = guest.stage_root(spec, tmp_path)
    assert read_in_root(staged, "/data/payload") == b"the user's volume\n"
    assert (staged / "data").is_dir() and not (staged / "data").is_symlink()


def test_a_volume_hides_what_the_image_had_there(hostile, tmp_path):
    """Even a link the image put *inside* the destination cannot lead the copy out."""
    make, canary, volume, _ = hostile
    (volume / "keep").mkdir()
    (volume / "keep" / "mine").write_text("mine\n")
    before = listing(canary)
    spec = load_bundle(make({"data/keep": "{canary}/keep"}, [("/data", volume)], dirs=["data"]))
    (spec.root / "data" / "image-file").write_text("the image's\n")
    staged = guest.stage_root(spec, tmp_path)
    assert listing(canary) == before
    assert sorted(p.name for p in (staged / "data").iterdir()) == ["keep", "payload"]
    assert read_in_root(staged, "/data/keep/mine") == b"mine\n"


@pytest.mark.parametrize("links, destination, dirs, problem", [
    ({"data": "/proc/self/root{canary}"}, "/data/x", (), "a bind mount into /proc is refused"),
    ({"a": "b", "b": "a"}, "/a/x", (), "too many levels of symbolic links"),
    ({}, "/etc/passwd/x", (), "/etc/passwd: not a directory"),
    ({}, "/..", (), "the root itself"),
    ({"data": "/etc/os"}, "/data", (), "the image has a file at /etc/os, the source is a directory"),
])
def test_a_mount_that_cannot_be_placed_is_refused_in_one_line(hostile, tmp_path, links,
                                                              destination, dirs, problem):
    make, canary, volume, _ = hostile
    before = listing(canary)
    bundle = make(links, [(destination, volume)], dirs)
    (bundle / "rootfs" / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (bundle / "rootfs" / "etc" / "os").write_text("image\n")
    spec = load_bundle(bundle)
    with pytest.raises(BundleError) as refused:
        guest.stage_root(spec, tmp_path)
    message = str(refused.value)
    assert problem in message and "\n" not in message, message
    assert message.startswith(f"{spec.bundle}/config.json: mount ")
    assert listing(canary) == before


def test_the_image_base_scan_reads_nothing_through_the_images_links(hostile, tmp_path):
    """The root's digest covers the link, not what it points at on the host."""
    from vmm.oci import imagebase

    make, canary, volume, _ = hostile
    spec = load_bundle(make({"data": "{canary}"}, [("/data/x", volume)]))
    first = imagebase.scan(spec, 128 << 20)
    (canary / "keep" / "file").write_text("changed on the host\n")
    assert imagebase.scan(spec, 128 << 20) == first
    assert not any(path.startswith(str(canary)) for path in first.preload)
