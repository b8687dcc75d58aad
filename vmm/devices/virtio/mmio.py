"""The virtio-mmio transport, version 2 ("modern", virtio 1.x section 4.2).

A 4 KiB window of 32-bit registers, then the device's configuration space at
0x100. The guest kernel finds the window through
``virtio_mmio.device=4K@0xd0000000:5`` and talks to it with plain loads and
stores, each one an MMIO exit that the bus turns into :meth:`read` or
:meth:`write` here. The transport knows nothing of block devices: it
negotiates features, runs the status state machine and holds the queue
registers; when the driver writes QueueNotify, a :class:`QueueServer`
(vmm/devices/virtio/service.py) runs the device over that queue, and the
transport interrupts the driver if the ring says it wants to hear.

The phases of the status state machine (spec 2.1, 3.1.1) hold by themselves,
whatever order the driver writes in:

* features are written between DRIVER and FEATURES_OK;
* queue registers (QueueSel, QueueNum, QueueReady, the ring addresses) are
  accepted only between FEATURES_OK and DRIVER_OK: a queue's layout depends on
  the negotiated features, and a running queue's must not change;
* QueueReady = 1 checks and freezes a queue's size and areas; DRIVER_OK
  *activates* the ready queues with the negotiated features, and only then does
  the device see them;
* configuration-space writes are accepted once FEATURES_OK is set (the
  features decide the layout);
* notifications are served only while DRIVER_OK is set and nothing failed.

Everything the guest writes is hostile and nothing it writes makes this class
raise: a value that makes no sense is ignored, counted in ``stats.errors``
under its reason, and traced; a ring that cannot be trusted any more sets
DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from vmm.config import NotifyPath
from vmm.devices.irq import InterruptLine
from vmm.devices.virtio.queue import (ChainError, DescriptorChain, Queue, QueueError,
                                      RingError)
from vmm.devices.virtio.service import QueueServer, TransportStats
from vmm.devices.virtio.state import QueueState, TransportState
from vmm.memory import GuestMemory

if TYPE_CHECKING:
    from vmm.devices.virtio.iothread import IoEventThread



def _report_bug(name: str, queue_index: int, error: Exception) -> None:
    """A vmm bug met serving a queue: one line on stderr with where it happened. Not
    ``logging`` or ``traceback``: importing them costs 10 ms of every run's start, and
    nothing may be imported once the guest runs (a jail refuses the file)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
    print(f"vmm: {name}: internal error on queue {queue_index}: {error!r}{where} "
          "(a bug in vmm: the device needs a reset)", file=sys.stderr, flush=True)


MAGIC_VALUE = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = int.from_bytes(b"vmm\0", "little")

# Register offsets (spec 4.2.2).
MAGIC = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0  # virtio 1.2, only with VIRTIO_F_RING_RESET: not offered, reads 0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100
WINDOW_SIZE = 0x1000

# Device status bits (spec 2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

INT_USED_RING = 1  # InterruptStatus bit 0: a used buffer notification
INT_CONFIG = 2  # bit 1: the configuration (or DEVICE_NEEDS_RESET) changed

# Feature bits that belong to the transport and ring, not to one device type (spec 6).
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32


class VirtioDevice(Protocol):
    """What the transport needs of a device (virtio-blk is one)."""

    device_id: int
    queue_max_sizes: tuple[int, ...]  # one entry per virtqueue

    @property
    def features(self) -> int: ...  # every feature bit the device offers

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def activate(self, features: int) -> None: ...  # the features the driver accepted

    def reset(self) -> None: ...

    def process_chain(self, queue_index: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        """Do one request; return the bytes written into the chain. Must not raise."""
        ...


# Why the transport ignores a guest write: the keys of stats.errors.
BAD_ACCESS = "bad register access"
READ_ONLY = "write to a read-only or reserved register"
FEATURES_OUTSIDE_NEGOTIATION = "driver features written outside negotiation"
FEATURES_PAST_63 = "driver features past bit 63"
QUEUE_OUTSIDE_SETUP = "queue register outside queue set-up (FEATURES_OK..DRIVER_OK)"
NO_SUCH_QUEUE = "queue register of a queue that does not exist"
QUEUE_FROZEN = "queue register written while the queue is ready"
QUEUE_REFUSED = "queue set-up refused"
CONFIG_BEFORE_FEATURES = "configuration written before FEATURES_OK"
STATUS_CLEARED = "status bits cleared without a reset"
STATUS_ORDER = "status bit set out of order"
STATUS_UNKNOWN = "unknown status bits"
FEATURES_NEVER_OFFERED = "driver accepted features never offered"
NO_VERSION_1 = "driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
NOT_RUNNING = "notify while the device is not running"
QUEUE_NOT_READY = "notify of a queue that is not ready"
NEEDS_RESET = "device needs reset"
INTERNAL = "internal error"

_QUEUE_REGISTERS = (QUEUE_SEL, QUEUE_NUM, QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH,
                    QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH)
_RING_ADDRESS = {QUEUE_DESC_LOW: "desc_table", QUEUE_DRIVER_LOW: "avail_ring",
                 QUEUE_DEVICE_LOW: "used_ring"}


class VirtioMmioTransport:
    """One virtio device behind a virtio-mmio register window: registers and status machine."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        interrupt: InterruptLine,
        *,
        name: str = "virtio-mmio",
        level_triggered: bool = False,
    ) -> None:
        """``interrupt`` has ``pulse()`` (edge, the default) or ``set_level(bool)``.

        With ``level_triggered`` the line follows InterruptStatus != 0, as a
        level-triggered irqchip pin or a resample irqfd wants.
        """
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        self.name = name
        self.level_triggered = level_triggered
        self.trace: Callable[[str], None] | None = None  # --trace: one line per event
        self._lock = threading.RLock()  # re-entered by state() inside paused()
        self.queues = [Queue(size) for size in device.queue_max_sizes]
        self.stats = TransportStats()  # never reset (benchmarks read them)
        self.server = QueueServer(device, memory, self.stats, self._error)
        self.notify_path = NotifyPath.EXIT  # how QueueNotify reaches notify()
        self.io_thread: IoEventThread | None = None  # serving the ioeventfds, if any
        self._reset_registers()

    # --- state -----------------------------------------------------------------------------
    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.shm_sel = 0
        for queue in self.queues:
            queue.reset()

    def state(self) -> TransportState:
        with self._lock:
            return TransportState(
                status=self.status, device_features_sel=self.device_features_sel,
                driver_features_sel=self.driver_features_sel,
                driver_features=self.driver_features, queue_sel=self.queue_sel,
                interrupt_status=self.interrupt_status, config_generation=self.config_generation,
                shm_sel=self.shm_sel, queues=tuple(q.state() for q in self.queues),
            )

    @contextlib.contextmanager
    def paused(self):
        """Hold off the I/O thread and the vCPUs' register accesses (while a snapshot reads state)."""
        with self._lock:
            yield

    def restore(self, state: TransportState) -> None:
        """Take on a saved state, and serve what the driver queued meanwhile.

        A kick the guest gave just before the snapshot may have been counted in
        an ioeventfd that no longer exists: each active queue is looked at once,
        which is harmless when it holds nothing new.
        """
        if len(state.queues) != len(self.queues):
            raise ValueError(f"{self.name} state: {len(state.queues)} queues, "
                             f"the device has {len(self.queues)}")
        unknown = state.driver_features & ~self.device.features
        if unknown:  # masking them would leave the driver using what the device refuses
            raise ValueError(f"{self.name} state: the driver accepted features {unknown:#x} "
                             "that this device does not offer")
        with self._lock:
            self.status = state.status & 0xFF
            self.device_features_sel = state.device_features_sel
            self.driver_features_sel = state.driver_features_sel
            self.driver_features = state.driver_features & ((1 << 64) - 1)
            self.queue_sel = state.queue_sel
            self.interrupt_status = state.interrupt_status & (INT_USED_RING | INT_CONFIG)
            self.config_generation = state.config_generation
            self.shm_sel = state.shm_sel
            for queue, queue_state in zip(self.queues, state.queues):
                if queue_state.size > queue.max_size:
                    raise ValueError(f"{self.name} state: queue size {queue_state.size} "
                                     f"> {queue.max_size}")
                queue.restore(queue_state, self.memory)
            if self.status & STATUS_DRIVER_OK:
                self._activate()
            self._update_level()
            if self._running():
                for index, queue in enumerate(self.queues):
                    if queue.active and not queue.broken:
                        self._notify(index, kicks=0)

    def reset(self) -> None:
        """The driver wrote 0 to Status: back to power-on state (spec 2.4)."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._reset_registers()
        self.device.reset()
        self._update_level()

    @property
    def requests(self) -> int:
        """Requests the device has handled (for per-MB statistics)."""
        return getattr(self.device, "requests", 0)

    @property
    def negotiated_features(self) -> int:
        return self.driver_features & self.device.features

    def _error(self, reason: str, detail: str = "") -> None:
        self.stats.error(reason, detail)
        self._emit(f"ignored: {self.stats.last_error}")

    def _emit(self, message: str) -> None:
        if self.trace is not None:
            self.trace(f"{self.name}: {message}")

    # phases of the status machine
    def _in_queue_setup(self) -> bool:
        return (self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED | STATUS_NEEDS_RESET)
                == STATUS_FEATURES_OK)

    def _running(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK) and not self.status & (STATUS_FAILED | STATUS_NEEDS_RESET)

    # --- the bus protocol -----------------------------------------------------------------
    def counters(self) -> dict[str, int | str]:
        """The statistics as one dict (benchmarks, --metrics)."""
        device = self.device
        return {
            "notify_path": self.notify_path,
            "interrupt": getattr(self.interrupt, "kind", "KVM_IRQ_LINE"),
            "requests": self.requests,
            "bytes_read": getattr(device, "bytes_read", 0),
            "bytes_written": getattr(device, "bytes_written", 0),
            **self.stats.as_dict(),
            "io_thread_wakeups": getattr(self.io_thread, "wakeups", 0),
            **(device.counters() if hasattr(device, "counters") else {}),
        }

    def restart_timing(self) -> None:
        """Forget the first notification's time (a benchmark starts a new phase)."""
        self.stats.first_notify_ns = 0

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            self.stats.register_reads += 1
            if offset >= CONFIG:
                return self._read_config(offset - CONFIG, size)
            if size != 4 or offset % 4:
                self._error(BAD_ACCESS, f"read of {size} bytes at {offset:#x}")
                return bytes(size)
            return struct.pack("<I", self._read_register(offset) & 0xFFFFFFFF)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.stats.register_writes += 1
            if offset >= CONFIG:
                self._write_config(offset - CONFIG, bytes(data))
                return
            if len(data) != 4 or offset % 4:
                self._error(BAD_ACCESS, f"write of {len(data)} bytes at {offset:#x}")
                return
            value = struct.unpack("<I", data)[0]
            if offset == QUEUE_NOTIFY:
                self._notify(value)
            else:
                self._write_register(offset, value)

    def notify(self, queue_index: int, kicks: int = 1) -> None:
        """A queue notification from elsewhere than the register (an ioeventfd thread).

        ``kicks``: how many guest writes the eventfd counted; one pass over the
        ring serves them all.
        """
        with self._lock:
            self._notify(queue_index, kicks)

    @property
    def lock(self):
        """The transport's lock (re-entrant): a device's own state shares it (virtio-net)."""
        return self._lock

    def receive(self, queue_index: int, fill) -> bool:
        """Device-initiated: ``fill(take, memory)`` on the chains the driver posted.

        For a queue the driver stocks with empty buffers (virtio-net's receive
        queue), from the device's own thread. ``take()`` gives the next posted
        chain, or None when there is none; ``fill`` returns the used entries
        ``[(head, bytes written), ...]`` for the chains it took, in order, or
        None when they were too few (nothing written): they go back, and the
        driver is asked to notify the queue when it posts more. False when the
        device is not running or the chains are too few. A malformed chain ends
        the attempt: it and the chains taken before it go back with length 0
        (the frame is lost, counted); a broken ring needs a reset.
        """
        with self._lock:
            if not self._running() or queue_index >= len(self.queues) \
                    or not self.queues[queue_index].active:
                return False
            queue = self.queues[queue_index]
            try:
                while isinstance(used := self._fill_from(queue, fill), int):
                    if not queue.enable_notification(seen=used):
                        return False  # the driver kicks the queue when it posts more
                for head, written in used:
                    queue.add_used(head, written)
                if used and queue.needs_notification():
                    self._signal(INT_USED_RING)
                return True
            except RingError as e:
                self._needs_reset(f"{type(e).__name__}: queue {queue_index}: {e}")
                return False

    def _fill_from(self, queue: Queue, fill) -> list[tuple[int, int]] | int:
        """``fill``'s used entries, or how many chains it found too few and put back."""
        taken: list[DescriptorChain] = []

        def take() -> DescriptorChain | None:
            chain = queue.pop()
            if chain is not None:
                taken.append(chain)
            return chain

        try:
            used = fill(take, self.memory)
        except ChainError as e:
            self.server.malformed(e)
            return [(chain.head, 0) for chain in taken] + [(e.head, 0)]
        if used is None:
            if len(taken) >= queue.size:  # the whole ring cannot hold it: it never will
                self._error("frame larger than every posted buffer", f"{len(taken)} chains")
                return [(chain.head, 0) for chain in taken]
            queue.put_back(len(taken))
            return len(taken)
        return used

    def config_changed(self) -> None:
        """The device's configuration changed (a resized disk): tell the driver."""
        with self._lock:
            self.config_generation += 1
            self._signal(INT_CONFIG)

    # --- registers ----------------------------------------------------------------------------
    def _selected(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        queue = self._selected()
        if offset == MAGIC:
            return MAGIC_VALUE
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self.device.features >> (32 * self.device_features_sel)
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue else 0
        if offset == QUEUE_NUM:
            return queue.size if queue else 0
        if offset == QUEUE_READY:
            return int(queue.ready) if queue else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH,
                      QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
            if queue is None:
                return 0
            address = getattr(queue, _RING_ADDRESS[offset & ~4])
            return address >> 32 if offset % 8 else address
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions: length ~0 means "none"
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0  # write-only and reserved registers read as 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == STATUS:
            self._write_status(value)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self._update_level()
        elif offset == SHM_SEL:
            self.shm_sel = value
        elif offset in _QUEUE_REGISTERS:
            self._write_queue_register(offset, value)
        else:
            self._error(READ_ONLY, f"{offset:#x} = {value:#x}")

    def _write_driver_features(self, value: int) -> None:
        if self.status & STATUS_FEATURES_OK or not self.status & STATUS_DRIVER:
            self._error(FEATURES_OUTSIDE_NEGOTIATION, f"{value:#x}")
            return
        if self.driver_features_sel > 1:
            if value:
                self._error(FEATURES_PAST_63, f"sel {self.driver_features_sel}")
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        if not self._in_queue_setup():
            self._error(QUEUE_OUTSIDE_SETUP, f"{offset:#x} = {value:#x}, status {self.status:#x}")
            return
        if offset == QUEUE_SEL:
            self.queue_sel = value
            return
        queue = self._selected()
        if queue is None:
            self._error(NO_SUCH_QUEUE, f"queue {self.queue_sel}")
            return
        if offset == QUEUE_READY:
            self._write_queue_ready(queue, value)
            return
        if queue.ready:
            self._error(QUEUE_FROZEN, f"{offset:#x}")
            return
        if offset == QUEUE_NUM:
            queue.size = value  # checked when the queue is made ready
            return
        attribute = _RING_ADDRESS[offset & ~4]
        old = getattr(queue, attribute)
        new = (old & 0xFFFFFFFF) | (value << 32) if offset % 8 else (old & ~0xFFFFFFFF) | value
        setattr(queue, attribute, new)

    def _write_queue_ready(self, queue: Queue, value: int) -> None:
        if value == 0:
            queue.ready = False
            return
        if queue.ready:
            return
        problem = queue.check_areas(self.memory)
        if problem:
            self._error(QUEUE_REFUSED, problem)
            return  # QueueReady reads back 0: the driver sees it failed
        queue.ready = True  # frozen; the device uses it from DRIVER_OK

    def _write_config(self, offset: int, data: bytes) -> None:
        if not self.status & STATUS_FEATURES_OK or self.status & STATUS_FAILED:
            self._error(CONFIG_BEFORE_FEATURES, f"{len(data)} bytes at {offset:#x}")
            return
        self.device.write_config(offset, data)

    # --- the status state machine (spec 2.1, 3.1.1) ---------------------------------------------
    def _write_status(self, value: int) -> None:
        if value == 0:
            self._emit("reset")
            self._reset()
            return
        value &= ~STATUS_NEEDS_RESET  # the device's bit: the driver cannot set or clear it
        current = self.status & ~STATUS_NEEDS_RESET
        if value & current != current or value & ~0xFF:
            self._error(STATUS_CLEARED, f"{self.status:#x} -> {value:#x}")
            return
        new = value & ~current
        if new & STATUS_FAILED:
            self.status |= STATUS_FAILED  # the driver gave up; anything else it wrote is moot
            return
        steps = [
            (STATUS_ACKNOWLEDGE, 0),
            (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
            (STATUS_FEATURES_OK, STATUS_DRIVER),
            (STATUS_DRIVER_OK, STATUS_FEATURES_OK),
        ]
        for bit, needs in steps:
            if not new & bit:
                continue
            if needs and not self.status & needs:
                self._error(STATUS_ORDER, f"{self.status:#x} -> {value:#x}")
                return
            if bit == STATUS_FEATURES_OK and not self._features_acceptable():
                return  # FEATURES_OK does not stick: the driver reads it back and gives up
            if bit == STATUS_DRIVER_OK:
                self._activate()
                self._emit(f"DRIVER_OK, features {self.negotiated_features:#x}")
            self.status |= bit
        if value & ~(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
                     | STATUS_FAILED):
            self._error(STATUS_UNKNOWN, f"{value:#x}")

    def _activate(self) -> None:
        """DRIVER_OK: the device and every ready queue start, with the negotiated features."""
        features = self.negotiated_features
        for queue in self.queues:
            if queue.ready:
                queue.activate(self.memory,
                               event_idx=bool(features >> VIRTIO_RING_F_EVENT_IDX & 1),
                               indirect=bool(features >> VIRTIO_RING_F_INDIRECT_DESC & 1))
        self.device.activate(features)

    def _features_acceptable(self) -> bool:
        offered = self.device.features
        if self.driver_features & ~offered:
            self._error(FEATURES_NEVER_OFFERED, f"{self.driver_features & ~offered:#x}")
            return False
        if not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
            self._error(NO_VERSION_1)
            return False
        return True

    # --- queue notifications and interrupts ------------------------------------------------------
    def _notify(self, queue_index: int, kicks: int = 1) -> None:
        self.stats.notified(kicks)
        self._emit(f"notify queue {queue_index}")
        if not self._running():
            self._error(NOT_RUNNING, f"status {self.status:#x}")
            return
        if queue_index >= len(self.queues) or not self.queues[queue_index].active:
            self._error(QUEUE_NOT_READY, f"queue {queue_index}")
            return
        queue = self.queues[queue_index]
        start = time.monotonic_ns()
        try:
            if self.server.serve(queue_index, queue):
                self._signal(INT_USED_RING)
        except RingError as e:
            self._needs_reset(f"{type(e).__name__}: queue {queue_index}: {e}")
            try:  # chains finished before the ring broke still deserve their interrupt
                if queue.needs_notification():
                    self._signal(INT_USED_RING)
            except QueueError:
                pass
        except Exception as e:  # a bug in vmm, not the guest's fault; still never kill the vCPU
            _report_bug(self.name, queue_index, e)
            self._needs_reset(f"{INTERNAL}: {e!r}")
            self.stats.errors[INTERNAL] += 1
        finally:
            self.stats.busy_ns += time.monotonic_ns() - start

    def _needs_reset(self, why: str) -> None:
        self._error(NEEDS_RESET, why)
        if not self.status & STATUS_NEEDS_RESET:
            self.status |= STATUS_NEEDS_RESET
            if self.status & STATUS_DRIVER_OK:
                self._signal(INT_CONFIG)  # spec 2.1.2: tell the driver

    def _signal(self, reason: int) -> None:
        self.interrupt_status |= reason
        self.stats.interrupted()
        if self.trace is not None:
            self._emit(f"interrupt (status {self.interrupt_status:#x}) via "
                       f"{getattr(self.interrupt, 'kind', 'KVM_IRQ_LINE')}")
        if self.level_triggered:
            self._update_level()
        elif hasattr(self.interrupt, "pulse"):
            self.interrupt.pulse()
        else:
            self.interrupt.set_level(True)
            self.interrupt.set_level(False)

    def _update_level(self) -> None:
        if self.level_triggered:
            self.interrupt.set_level(self.interrupt_status != 0)

    def _read_config(self, offset: int, size: int) -> bytes:
        data = self.device.read_config(offset, size)
        return data[:size].ljust(size, b"\0")
