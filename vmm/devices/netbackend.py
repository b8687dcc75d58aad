"""Where a virtio-net device's frames go: a TAP device on the host, or passt.

``TapBackend`` opens ``/dev/net/tun`` and attaches to (or creates) the TAP
interface NAME (``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``: whole Ethernet frames,
no packet information prefix, each after the same 12-byte virtio_net_hdr_v1
the guest's driver uses, so checksum and segmentation offloads pass through
to the host kernel untouched; ``TUNSETOFFLOAD`` tells the kernel which ones the
guest's driver takes, and it sums and segments the rest itself). Frames the guest sends are written to it; a thread reads
the frames the host sends and hands each to the device, which holds the
thread while the guest has no receive buffer posted (the kernel's TAP queue
keeps the rest meanwhile). Creating a TAP device needs CAP_NET_ADMIN; attaching
to one made with ``ip tuntap add NAME mode tap user USER`` does not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import select
import struct
import threading
import time
from collections import Counter
from typing import Callable

from vmm.config import IFNAMSIZ, is_interface_name
from vmm.errors import DeviceError

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HEADER_SIZE = 12  # virtio_net_hdr_v1 (with num_buffers), as virtio 1.x drivers lay it
DEFAULT_TAP_NAME = "vmmtap%d"  # the kernel replaces %d with the first free number
READ_SIZE = VNET_HEADER_SIZE + 65535 + 14 + 4  # a header and a 64 KiB segment (GSO), with VLAN


class _FrameReader:
    """What both backends share: a thread of their own that takes frames one by one to
    ``receive(frame, stopping)`` (the device, which may hold it), and errors counted by name."""

    thread_name = "net"
    vnet_header = False  # frames only, no virtio_net_hdr (vmm/devices/virtio/net.py)

    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False

    @property
    def threads(self) -> tuple[str, ...]:
        """The threads this backend runs, by name (the jail's seccomp filters are per thread)."""
        return (self.thread_name,)

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool) -> None:
        """Bare frames carry no offloads: nothing to tell the host side."""

    def _count(self, error: OSError) -> None:
        code = error.errno or 0
        self.errors[errno.errorcode.get(code, str(code))] += 1

    def _next_frame(self) -> bytes | None:
        """The next frame from the host side; None when there will be no more."""
        raise NotImplementedError

    def start(self, receive: Callable[[bytes, Callable[[], bool]], None]) -> None:
        self._thread = threading.Thread(target=self._read, args=(receive,), daemon=True,
                                        name=self.thread_name)
        self._thread.start()

    def _read(self, receive) -> None:
        stopping = lambda: self._stopping  # noqa: E731
        while not self._stopping:
            frame = self._next_frame()
            if frame is None:
                return
            receive(frame, stopping)

    def _stop_thread(self) -> bool:
        """After the subclass has woken its thread (a pipe, a socket shut down): True once it
        has ended, False if it is still running (its descriptors must then stay open)."""
        if self._thread is not None:
            self._thread.join(timeout=5)
            return not self._thread.is_alive()
        return True


class TapBackend(_FrameReader):
    vnet_header = True

    def __init__(self, name: str = DEFAULT_TAP_NAME) -> None:
        if not is_interface_name(name):
            raise DeviceError(f"--net tap={name}: not an interface name (1-15 characters)")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"/dev/net/tun: {e.strerror}: the host needs the tun module "
                              "for --net tap") from None
        try:
            request = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(),
                                  IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            answer = fcntl.ioctl(self.fd, TUNSETIFF, request)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HEADER_SIZE))
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
        super().__init__()
        self.thread_name = f"tap-{self.name}"
        self._stop_read, self._stop_write = os.pipe2(os.O_CLOEXEC)

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool) -> None:
        """What the guest's driver takes: the kernel sums and segments the rest for it."""
        flags = 0
        if csum:  # segments come partly summed: no TSO without CSUM
            flags = TUN_F_CSUM | (TUN_F_TSO4 if tso4 else 0) | (TUN_F_TSO6 if tso6 else 0)
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            self._count(e)

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError as e:  # the host side is down (EIO): the frame is lost, as on a wire
            self._count(e)

    def _next_frame(self) -> bytes | None:
        while True:
            ready, _, _ = select.select([self.fd, self._stop_read], [], [])
            if self._stop_read in ready:
                return None
            try:
                return os.read(self.fd, READ_SIZE)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EINTR):
                    self._count(e)
                    return None

    def close(self) -> None:
        """Safe twice; the descriptors close only after the reader thread has ended."""
        if self._closed:
            return
        self._closed = self._stopping = True
        os.write(self._stop_write, b"x")
        if not self._stop_thread():
            return  # still in a read: a leaked descriptor, not one closed under it
        for fd in (self.fd, self._stop_read, self._stop_write):
            os.close(fd)


# --- user-mode networking: passt ----------------------------------------------------------
GUEST_ADDRESS, GATEWAY, PREFIX = "10.0.2.15", "10.0.2.2", 24  # as QEMU's user networking
DNS_ADDRESS = "10.0.2.3"  # as QEMU's: passt forwards queries to it to the host's resolver
PASST_MTU = 65520  # passt's own default: the largest 802.3 frame, rounded to 32-bit words
LENGTH = struct.Struct(">I")  # passt's qemu socket protocol: a frame, prefixed by its length


class PasstBackend(_FrameReader):
    """User-mode networking, no privileges: passt, given one end of a socket pair.

    passt (Debian's ``passt``) runs as our child with ``--fd``: every frame on
    the stream is prefixed with its length (big-endian, 32 bits). It answers
    ARP and DHCP, translates the guest's TCP/UDP/ICMP into host sockets, and
    maps the gateway address to the host's loopback: a guest connection to
    10.0.2.2:PORT reaches 127.0.0.1:PORT; DNS queries to 10.0.2.3 go to the
    host's first nameserver. ``forwards`` (HOSTPORT, GUESTPORT)
    bind 127.0.0.1:HOSTPORT on the host to the guest's GUESTPORT. With ``-1``
    passt exits when its end of the pair closes, so it never outlives vmm.
    """

    thread_name = "passt"
    SEND_QUEUE = 64  # frames waiting for passt, at most (4 MiB at 64 KiB each); more are dropped

    def __init__(self, mac: bytes, forwards: tuple[tuple[int, int], ...] = ()) -> None:
        """``mac``: the guest NIC's. Until passt has seen a frame from the guest it does not
        know it, and sends to 00:00:00:00:00:00, which the guest would drop (a forwarded
        connection to a guest that has sent nothing yet): those get ``mac`` instead."""
        self.mac = mac
        import shutil
        import socket
        import subprocess
        import tempfile

        passt = shutil.which("passt")
        if passt is None:
            raise DeviceError("--net user needs passt: apt-get install passt")
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # One option per forward: an address in a spec applies to all of its ports.
        tcp = [arg for host, guest in forwards
               for arg in ("--tcp-ports", f"127.0.0.1/{host}:{guest}")] or ["--tcp-ports", "none"]
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [passt, "--foreground", "--quiet", "--one-off", "--ipv4-only",
             "--fd", str(theirs.fileno()), "--address", GUEST_ADDRESS, "--netmask", str(PREFIX),
             "--gateway", GATEWAY, "--dns-forward", DNS_ADDRESS, "--no-dhcp-dns",
             "--no-dhcp-search",
             *tcp, "--udp-ports", "none"],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=self._log)
        theirs.close()
        super().__init__()
        self.dropped = 0  # frames the guest sent that passt did not take in time
        # The writer: a stalled passt (stopped, busy) blocks it, never the vCPU or the NIC's
        # I/O thread that send() runs in (Firecracker's TAP is non-blocking for the same
        # reason). The stream's framing forbids a partial write, so no non-blocking send.
        self._outgoing: queue.Queue[bytes | None] = queue.Queue(self.SEND_QUEUE)
        self._writer = threading.Thread(target=self._write_frames, daemon=True,
                                        name="passt-tx")
        self._writer.start()
        time.sleep(0.02)  # passt refuses bad options at once: say so now, not at the first frame
        if self.process.poll() is not None:
            message = self._messages()
            self.close()
            raise DeviceError(f"--net user: passt exited: {message}")

    def _messages(self) -> str:
        self._log.seek(0)
        lines = [line for line in self._log.read().decode(errors="replace").splitlines()
                 if line and "syslog" not in line]
        return lines[-1] if lines else "(no message)"

    @property
    def threads(self) -> tuple[str, ...]:
        return (self.thread_name, self._writer.name)

    def send(self, frame: bytes) -> None:
        """Queued for the writer, never waited for: a full queue drops the frame (counted),
        as a wire drops what a stalled peer does not take."""
        try:
            self._outgoing.put_nowait(LENGTH.pack(len(frame)) + frame)
        except queue.Full:
            self.dropped += 1

    def _write_frames(self) -> None:
        while (data := self._outgoing.get()) is not None:
            try:
                self.socket.sendall(data)
            except OSError as e:
                self._count(e)
                if self._stopping:
                    return

    def _read_exactly(self, count: int) -> bytes | None:
        data = bytearray()
        while len(data) < count:
            try:
                chunk = self.socket.recv(count - len(data))
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def _next_frame(self) -> bytes | None:
        header = self._read_exactly(LENGTH.size)
        if header is None:
            return None
        length = LENGTH.unpack(header)[0]
        if length > READ_SIZE:  # a peer that lost the framing: nothing after it makes sense
            self.errors["bad_length"] += 1
            return None
        frame = self._read_exactly(length)
        if frame is not None and frame[:6] == bytes(6):
            frame = self.mac + frame[6:]
        return frame

    def close(self) -> None:
        """Safe twice. The socket is shut down first (the reader and a writer stuck on a
        stalled passt return), closed only once both threads have ended."""
        import socket

        if self._closed:
            return
        self._closed = self._stopping = True
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if hasattr(self, "_writer"):
            try:
                self._outgoing.put_nowait(None)
            except queue.Full:
                pass  # the writer sees the shut-down socket and _stopping instead
            self._writer.join(timeout=5)
        reader_done = self._stop_thread()
        if reader_done and not (hasattr(self, "_writer") and self._writer.is_alive()):
            self.socket.close()
        try:
            self.process.wait(timeout=5)
        except Exception:
            self.process.kill()
            self.process.wait()
        self._log.close()
