"""Serving a queue the driver notified, and the transport's statistics.

:class:`QueueServer` is the part of a virtio transport that touches the
rings: take every available chain, have the device do it, give it back, and
decide whether the driver wants an interrupt for it. It knows no registers
and no interrupt lines; the transport (vmm/devices/virtio/mmio.py) calls
:meth:`QueueServer.serve` on a notification and signals what it returns.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from vmm.devices.virtio.queue import ChainError, Queue
from vmm.memory import GuestMemory


@dataclass
class TransportStats:
    """What a transport counts. Never reset: benchmarks read them before and after."""

    notifications: int = 0  # QueueNotify writes (MMIO exits or ioeventfd kicks)
    interrupts: int = 0  # interrupts signalled (used ring and config)
    register_reads: int = 0  # register window accesses: each one an MMIO exit
    register_writes: int = 0
    chain_errors: int = 0  # malformed chains returned unprocessed
    first_notify_ns: int = 0  # monotonic ns of the first notification since restart_timing()
    last_interrupt_ns: int = 0  # monotonic ns of the last interrupt
    busy_ns: int = 0  # time spent working on rings, any thread
    errors: Counter = field(default_factory=Counter)  # ignored guest writes, by reason
    last_error: str = ""

    def error(self, reason: str, detail: str = "") -> None:
        self.errors[reason] += 1
        self.last_error = f"{reason}: {detail}" if detail else reason

    def notified(self, kicks: int) -> None:
        self.notifications += kicks
        if not self.first_notify_ns:
            self.first_notify_ns = time.monotonic_ns()

    def interrupted(self) -> None:
        self.interrupts += 1
        self.last_interrupt_ns = time.monotonic_ns()

    def as_dict(self) -> dict[str, int]:
        return {
            "notifications": self.notifications, "interrupts": self.interrupts,
            "register_reads": self.register_reads, "register_writes": self.register_writes,
            "chain_errors": self.chain_errors, "errors": sum(self.errors.values()),
            "first_notify_ns": self.first_notify_ns, "last_interrupt_ns": self.last_interrupt_ns,
            "busy_ns": self.busy_ns,
        }


class QueueServer:
    """Runs a device over one notified queue."""

    def __init__(self, device, memory: GuestMemory, stats: TransportStats,
                 error: Callable[[str, str], None]) -> None:
        self.device = device  # has process_chain(queue_index, chain, memory) -> bytes written
        self.memory = memory
        self.stats = stats
        self._error = error

    def next_chain(self, queue: Queue):
        """The next well-formed available chain, or None; malformed ones go back with
        length 0 (counted). A broken ring raises :class:`RingError`."""
        while True:
            try:
                return queue.pop()
            except ChainError as e:
                self.malformed(e)
                queue.add_used(e.head, 0)

    def malformed(self, error: ChainError) -> None:
        """Count and report a malformed chain (its return to the driver is the caller's)."""
        self.stats.chain_errors += 1
        self._error(f"malformed chain: {type(error).__name__}", str(error))

    def serve(self, queue_index: int, queue: Queue) -> bool:
        """Every available chain, done and returned; True when the driver wants an interrupt.

        A malformed chain goes back with length 0 (counted); a broken ring
        raises :class:`RingError` after what was done is in the used ring.
        A queue the device fills when it has something (virtio-net's receive
        queue, ``device.deferred_queues``) is not served: the device hears
        that buffers were posted, and takes them when it needs them.
        """
        if queue_index in getattr(self.device, "deferred_queues", ()):
            self.device.buffers_posted(queue_index)
            return queue.needs_notification()
        while True:
            queue.disable_notification()
            while True:
                chain = self.next_chain(queue)
                if chain is None:
                    break
                written = self.device.process_chain(queue_index, chain, self.memory)
                queue.add_used(chain.head, written)
            # Chains published while we worked, with notifications off, are ours too.
            if not queue.enable_notification():
                break
        return queue.needs_notification()
