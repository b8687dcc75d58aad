"""Write a newc cpio archive (what an initramfs is) without root or cpio(1).

Format: for each entry a 110-byte ASCII header ("070701" and 13 eight-digit
hex fields), the NUL-terminated name padded to 4 bytes, the data padded to 4
bytes; a final entry named "TRAILER!!!". Device nodes are just headers, so we
can ship /dev/console without mknod privileges.
"""

from __future__ import annotations

import stat

NEWC_MAGIC = b"070701"


class CpioWriter:
    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.lstrip("/").encode() + b"\0"
        fields = [self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0]
        self._ino += 1
        header = NEWC_MAGIC + b"".join(f"{f:08x}".encode() for f in fields)
        self._parts.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        archive = b"".join(self._parts)
        return archive + b"\0" * (-len(archive) % 512)
