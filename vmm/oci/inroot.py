"""Paths inside a container's root, resolved as the container itself will see them.

Everything inside an OCI image is hostile input. An image may hold a symlink
``data -> /etc/cron.d``; a user runs it with ``-v SRC:/data/x``; a runtime that
joins ``staging + "/data/x"`` and hands the string to ``os`` or ``shutil``
follows the image's link out of the root and writes the user's volume into the
host's ``/etc/cron.d``. runc closes this with securejoin and, since its
2019-2024 advisories, ``openat2(RESOLVE_IN_ROOT)`` on O_PATH descriptors.

Every host-side operation vmm does beneath a root goes through this module:

* :func:`place` finds where a path lands *inside* a root, as the kernel
  resolves it for a process chrooted there: a symlink is followed (an
  absolute one from the root, a relative one from its directory), ``..``
  never climbs above the root, and missing directories on the way are made
  (inside the root, where the links led). It returns the directory that
  holds the last component, as a descriptor, and that component's name.
* :func:`walk` lists a tree without ever following a symlink, each
  directory opened from the descriptor of its parent.

Why an O_PATH walk of our own and not ``openat2``: ``openat2`` resolves only
paths that exist, and a mount's destination often does not (runc's MkdirAll
needs a walk too), and Python's ``os`` has no ``openat2``. The tests check
this walk against the kernel's own ``RESOLVE_IN_ROOT`` (tests/test_oci_inroot.py).

Races: each step opens one name, with ``O_NOFOLLOW``, relative to the
descriptor of the directory before it, and a link's target is read from the
descriptor of the link that was opened (``readlinkat(fd, "")``): a name swapped
for a symlink after a check cannot redirect a later step, because no later
step uses the name. What is left (a directory we hold moved out of the root
by a rename) needs write access to the staging directory, which is ours
(0700, made by ``tempfile``).
"""

from __future__ import annotations

import os
import stat
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from vmm.errors import VmmError

MAX_SYMLINKS = 40  # the kernel's limit on links followed in one resolution (ELOOP)
MAX_DEPTH = 256  # directories deep: one descriptor each while walking
_OPEN_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class RootPathError(VmmError):
    """A path that cannot be placed inside a root (a loop, a file where a directory must be)."""


@dataclass(frozen=True)
class Spot:
    """Where a path lands inside a root: ``name`` in the directory ``parent``."""

    parent: int  # O_PATH descriptor of a directory inside the root; valid inside place()
    name: str
    path: str  # from the root, links resolved: "/tmp/escape-target/x"
    existing: os.stat_result | None  # what is there now (never a symlink), or None

    @property
    def host_path(self) -> str:
        """A name for tools that take paths: through the descriptor, so no link is re-read."""
        return f"/proc/self/fd/{self.parent}/{self.name}"


def _parts(path: str) -> list[str]:
    """The components; "" (a trailing or doubled slash) as ".": after a name, either one
    means that name must be a directory ("file/." is ENOTDIR), as for the kernel."""
    return [part or "." for part in path.split("/")]


@contextmanager
def open_root(path: str | os.PathLike) -> Iterator[int]:
    """An O_PATH descriptor of a root directory (the caller's path: followed)."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def place(root: int, path: str, *, make_dirs: bool = True) -> Iterator[Spot]:
    """Where ``path`` lands inside ``root``; the directories on the way made if ``make_dirs``.

    Raises RootPathError when it cannot land inside: a symlink loop, a file in
    the middle of the path, or the root itself as the destination.
    """
    walk = _Walk(root)
    try:
        yield walk.resolve(path, make_dirs)
    finally:
        walk.close()


class _Walk:
    """A stack of directory descriptors from the root down; ``..`` pops, never past the root."""

    def __init__(self, root: int) -> None:
        self.stack: list[tuple[int, str]] = [(root, "")]  # the root's descriptor is the caller's

    def close(self) -> None:
        while len(self.stack) > 1:
            os.close(self.stack.pop()[0])

    def where(self, name: str) -> str:
        return "/" + "/".join([n for _, n in self.stack[1:]] + [name])

    def resolve(self, path: str, make_dirs: bool) -> Spot:
        todo, links = deque(_parts(path)), 0
        while todo:
            name = todo.popleft()
            if name == ".":
                continue  # the name before it was entered as a directory, or refused
            if name == "..":
                if len(self.stack) > 1:
                    os.close(self.stack.pop()[0])
                continue
            here = self.stack[-1][0]
            try:
                fd = os.open(name, _OPEN_PATH, dir_fd=here)
            except FileNotFoundError:
                if not todo:  # the last component: its directory is found
                    return Spot(here, name, self.where(name), None)
                if not make_dirs:
                    raise RootPathError(f"{self.where(name)}: no such directory") from None
                try:
                    os.mkdir(name, 0o755, dir_fd=here)
                except FileExistsError:
                    pass  # made meanwhile: looked at again below like any other name
                todo.appendleft(name)
                continue
            info = os.fstat(fd)
            if stat.S_ISLNK(info.st_mode):
                try:
                    target = os.readlink("", dir_fd=fd)  # the link we opened, not the name
                finally:
                    os.close(fd)
                links += 1
                if links > MAX_SYMLINKS:
                    raise RootPathError(f"{path}: too many levels of symbolic links")
                if target.startswith("/"):  # absolute: from the root, never the host's /
                    self.close()
                todo.extendleft(reversed(_parts(target)))
                continue
            if not todo:
                os.close(fd)
                return Spot(here, name, self.where(name), info)
            if not stat.S_ISDIR(info.st_mode):
                os.close(fd)
                raise RootPathError(f"{self.where(name)}: not a directory")
            if len(self.stack) > MAX_DEPTH:
                os.close(fd)
                raise RootPathError(f"{path}: deeper than {MAX_DEPTH} directories")
            self.stack.append((fd, name))
        # The path ended on a directory already entered ("x/..", "x/.", a link to a directory).
        if len(self.stack) == 1:
            raise RootPathError(f"{path}: the root itself")
        fd, name = self.stack.pop()
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        return Spot(self.stack[-1][0], name, self.where(name), info)


@dataclass(frozen=True)
class Entry:
    path: str  # from the top of the walk: "/bin/sh"
    parent: int  # descriptor of the directory holding it; valid until the walk moves on
    name: str
    info: os.stat_result  # lstat: a symlink is a symlink

    @property
    def host_path(self) -> str:
        """A path for calls that take no descriptor (xattrs), the last component not followed."""
        return f"/proc/self/fd/{self.parent}/{self.name}"

    def open(self) -> int:
        """The regular file itself, read-only (RootPathError if it changed since listed)."""
        fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=self.parent)
        if not os.path.samestat(os.fstat(fd), self.info):
            os.close(fd)
            raise RootPathError(f"{self.path}: changed while it was read")
        return fd


def walk(top: int, path: str = "", depth: int = 0) -> Iterator[Entry]:
    """Everything beneath the directory ``top`` (a readable descriptor), sorted by name.

    No symlink is followed: each directory is opened with O_NOFOLLOW from its
    parent's descriptor and must be the one listed.
    """
    if depth > MAX_DEPTH:
        raise RootPathError(f"{path}: deeper than {MAX_DEPTH} directories")
    for name in sorted(os.listdir(top)):
        info = os.stat(name, dir_fd=top, follow_symlinks=False)
        entry = Entry(f"{path}/{name}", top, name, info)
        yield entry
        if stat.S_ISDIR(info.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=top)
            try:
                if not os.path.samestat(os.fstat(sub), info):
                    raise RootPathError(f"{entry.path}: changed while it was read")
                yield from walk(sub, entry.path, depth + 1)
            finally:
                os.close(sub)
