"""Queue notifications without a trip through the vCPU thread: ioeventfd + an I/O thread.

By default a guest's write to QueueNotify (offset 0x50 of the virtio-mmio
window) is an MMIO exit: KVM stops the vCPU, the run loop hands the write to
:meth:`VirtioMmioTransport.write`, the request is done right there in the vCPU
thread, and the vCPU only runs again when the device has finished.

With an *ioeventfd* (``KVM_IOEVENTFD``) KVM recognises that one write inside
the kernel -- address ``base + 0x50``, 4 bytes, value equal to the queue index
(``datamatch``) -- bumps an eventfd's counter and resumes the guest at once:
no exit reaches user space. :class:`IoEventThread`, one per device, blocks in
``epoll`` on its queues' eventfds and runs :meth:`VirtioMmioTransport.notify`
for each queue that was kicked. A write that does not match (another value, a
queue that does not exist) is still an ordinary MMIO exit that the transport
answers, so a hostile guest sees the same device either way.

The interrupt goes the same way backwards: :class:`IrqfdLine` is an eventfd
bound to the GSI with ``KVM_IRQFD``; writing 1 to it makes KVM raise and lower
the line (an edge), one ``write(2)`` instead of two ``KVM_IRQ_LINE`` ioctls.

Registration is by address and queue index, which a guest reset does not
change (it rewrites the queues' ring addresses, not where QueueNotify is), so
the eventfds are registered once when the device is attached. A kick that
arrives while the queue is not ready is handled like the MMIO write would be:
counted as an error and ignored. KVM drops the ioeventfds and irqfds with the
VM; :meth:`IoEventThread.close` (a machine closer, run before the VM fd is
closed) stops the thread, waits for a request in progress to finish, and
closes the eventfds.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Callable

EVENTFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


def _read_eventfd(fd: int) -> int:
    """The counter (writes since the last read), 0 if nothing was written."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class IoEventThread:
    """Waits on one device's queue eventfds and runs the transport's notify().

    ``notify(queue_index, kicks)`` is usually ``transport.notify``; the
    transport's lock serialises it against the vCPU's register accesses.
    """

    def __init__(self, notify: Callable[[int, int], None], name: str = "virtio-io",
                 trace: Callable[[str], None] | None = None) -> None:
        self._notify = notify
        self.name = name
        self.trace = trace
        self.queues: dict[int, int] = {}  # eventfd -> queue index
        self._stop_fd = os.eventfd(0, EVENTFD_FLAGS)
        self._epoll = select.epoll()
        self._epoll.register(self._stop_fd, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._closed = False
        # Statistics.
        self.kicks = 0  # guest writes KVM turned into eventfd increments
        self.wakeups = 0  # times the thread woke up with work
        self.errors: list[str] = []

    def add_queue(self, queue_index: int) -> int:
        """A new eventfd for this queue; register it with KVM, then start()."""
        if self._thread is not None:
            raise RuntimeError("add_queue after start")
        fd = os.eventfd(0, EVENTFD_FLAGS)
        self.queues[fd] = queue_index
        self._epoll.register(fd, select.EPOLLIN)
        return fd

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self._stop_fd:
                    return
                kicks = _read_eventfd(fd)
                if not kicks:
                    continue
                queue_index = self.queues[fd]
                self.kicks += kicks
                self.wakeups += 1
                if self.trace is not None:
                    self.trace(f"{self.name}: ioeventfd queue {queue_index}: {kicks} kick(s), "
                               "handled in the I/O thread")
                try:
                    self._notify(queue_index, kicks)
                except Exception as e:  # the transport never raises; never die silently either
                    self.errors.append(repr(e))

    def close(self) -> None:
        """Stop the thread (after the request in progress) and close the eventfds."""
        if self._closed:
            return
        self._closed = True
        os.eventfd_write(self._stop_fd, 1)
        if self._thread is not None:
            self._thread.join()
        self._epoll.close()
        for fd in [*self.queues, self._stop_fd]:
            os.close(fd)
        self.queues.clear()


class IrqfdLine:
    """An edge-triggered interrupt through an irqfd: pulse() is one eventfd write.

    ``register(fd, gsi)`` is ``vm.irqfd``. Has the same ``pulse()`` as
    :class:`vmm.devices.irq.IrqLine`, which the transport uses for edges.
    """

    kind = "irqfd"

    def __init__(self, register: Callable[[int, int], None], gsi: int) -> None:
        self.irq = gsi
        self.fd = os.eventfd(0, EVENTFD_FLAGS)
        try:
            register(self.fd, gsi)
        except BaseException:
            os.close(self.fd)
            raise
        self.raised = 0

    def pulse(self) -> None:
        self.raised += 1
        os.eventfd_write(self.fd, 1)

    def set_level(self, high: bool) -> None:
        if high:  # an irqfd has no level: a rising edge is all it can give
            self.pulse()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
