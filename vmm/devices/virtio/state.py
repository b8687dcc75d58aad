"""A virtio device's saved state, as plain values (the snapshot's, apart from the wiring).

Light on purpose: the snapshot's reader and the device table name these types
without importing the transport and the queues themselves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueState:
    """A queue's registers and the device's place in its rings (as vm-virtio's QueueState).

    The rings themselves live in guest RAM, which a snapshot saves anyway.
    """

    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    next_avail: int
    next_used: int
    signalled_used: int | None
    broken: str | None


@dataclass(frozen=True)
class TransportState:
    """The transport's registers and its queues (the device's own state is apart)."""

    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    interrupt_status: int
    config_generation: int
    shm_sel: int
    queues: tuple[QueueState, ...]
