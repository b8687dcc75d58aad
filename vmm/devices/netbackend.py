"""Where a virtio-net device's frames go: a TAP device on the host.

``TapBackend`` opens ``/dev/net/tun`` and attaches to (or creates) the TAP
interface NAME (``IFF_TAP | IFF_NO_PI``: whole Ethernet frames, no packet
information prefix). Frames the guest sends are written to it; a thread reads
the frames the host sends and hands each to the device, which holds the
thread while the guest has no receive buffer posted (the kernel's TAP queue
keeps the rest meanwhile). Creating a TAP device needs CAP_NET_ADMIN; attaching
to one made with ``ip tuntap add NAME mode tap user USER`` does not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import threading
from collections import Counter
from typing import Callable

from vmm.errors import DeviceError

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
READ_SIZE = 65536


class TapBackend:
    def __init__(self, name: str) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.strip() != name:
            raise DeviceError(f"--net tap={name}: not an interface name (1-15 characters)")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"/dev/net/tun: {e.strerror}: the host needs the tun module "
                              "for --net tap") from None
        try:
            request = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
            answer = fcntl.ioctl(self.fd, TUNSETIFF, request)
        except OSError as e:
            os.close(self.fd)
            if e.errno == errno.EPERM:
                raise DeviceError(
                    f"--net tap={name}: creating a TAP device needs CAP_NET_ADMIN (run as root, "
                    f"or create it first: ip tuntap add {name} mode tap user $USER)") from None
            if e.errno == errno.EBUSY:
                raise DeviceError(f"--net tap={name}: in use by another process") from None
            raise DeviceError(f"--net tap={name}: TUNSETIFF: {e.strerror}") from None
        self.name = answer[:IFNAMSIZ].rstrip(b"\0").decode()
        self.errors: Counter[str] = Counter()
        self._stop_read, self._stop_write = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError as e:  # the host side is down (EIO): the frame is lost, as on a wire
            self.errors[errno.errorcode.get(e.errno, str(e.errno))] += 1

    def start(self, receive: Callable[[bytes, Callable[[], bool]], None]) -> None:
        """Read frames in a thread of our own; ``receive(frame, stopping)`` takes each."""
        self._thread = threading.Thread(target=self._read, args=(receive,), daemon=True,
                                        name=f"tap-{self.name}")
        self._thread.start()

    def _read(self, receive) -> None:
        stopping = lambda: self._stopping  # noqa: E731
        while not self._stopping:
            ready, _, _ = select.select([self.fd, self._stop_read], [], [])
            if self._stop_read in ready:
                return
            try:
                frame = os.read(self.fd, READ_SIZE)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                self.errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
                return
            receive(frame, stopping)

    def close(self) -> None:
        self._stopping = True
        os.write(self._stop_write, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in (self.fd, self._stop_read, self._stop_write):
            try:
                os.close(fd)
            except OSError:
                pass
