"""Run a built VM: one host thread per vCPU, exits dispatched, a clean stop.

Two run loops do the same job:

* ``python``: ``KVM_RUN`` through the ioctl wrapper, then decode and dispatch
  every exit here. Read this one first.
* ``c`` (default): ``vmm_run_loop`` in vmm/kvm/runloop.c enters the guest with
  the GIL released and completes by itself the exits devices offered it as
  port rules (POST codes, benchmark port, console bytes); it returns here only
  for the rest.

Stopping: whoever ends the VM (a device, a timeout, Ctrl-C) calls
:meth:`Runner.stop`. It records the outcome once, sets ``immediate_exit`` on
every vCPU and sends each vCPU thread a signal, so a KVM_RUN in progress
returns EINTR at once and the next one does not start.

Pausing (snapshots): :meth:`Runner.pause` kicks every vCPU the same way, but
each vCPU thread then parks until the main thread has run the pause's action
(save the VM, write a request into its memory) and lets them go on. A vCPU
parks only on EINTR, that is after a ``KVM_RUN`` that KVM entered with
``immediate_exit`` set: KVM finishes the instruction of the last I/O exit in
that call, so no vCPU is caught half-way through one (KVM's API documentation
asks exactly this before state is saved).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from vmm.devices.bus import Bus, ReadAction, WriteAction
from vmm.dispatch import ExitDispatcher, ExitQuirks
from vmm.errors import KvmError, VmmError
from vmm.kvm import exits as kvm_exits
from vmm.kvm.ioctl import ffi, lib
from vmm.kvm.vcpu import Vcpu
from vmm.outcome import EXIT_NO_STATUS, EXIT_TIMEOUT, EXIT_VMM_ERROR, Outcome, StopReason
from vmm.stats import ExitStats

# The signal that kicks a vCPU thread out of KVM_RUN. Its handler does nothing:
# the point is only that the ioctl returns EINTR.
KICK_SIGNAL = signal.SIGUSR1


@dataclass(frozen=True)
class GracefulStop:
    """How a signal asks the guest to stop itself: ``ask`` (press the power button),
    then ``timeout`` seconds for it to power off before the VM is stopped hard."""

    ask: Callable[[], None]
    timeout: float
    signals: frozenset = frozenset({StopReason.SIGTERM})  # which signals ask; others stop
    what: str = "the power button"


class Runner:
    """Runs a VM's vCPUs; made before the VM, so that its devices can be wired to stop and pause it."""

    def __init__(self, *, runloop: str = "c", trace: TextIO | None = None) -> None:
        if runloop not in ("c", "python"):
            raise VmmError(f"--runloop must be 'c' or 'python', not {runloop!r}")
        self.runloop = runloop
        self.trace = trace
        self.vcpus: list[Vcpu] = []  # set by run()
        self.pio: Bus  # set by run()
        self.dispatcher: ExitDispatcher  # set by run()
        self.stats = ExitStats()
        self.outcome: Outcome | None = None
        self.first_run_ns: int | None = None  # monotonic time of the first KVM_RUN
        self.tick: Callable[[Vcpu], None] | None = None  # called on EINTR (profiler)
        self.on_debug = None  # KVM_EXIT_DEBUG handler (vmm/gdb/stub.py), given to the dispatcher
        self._stop_lock = threading.Lock()
        self._signalled: tuple[int, StopReason] | None = None  # stop_from_signal's, for run()
        # A machine that shuts itself down (a distribution under ACPI): the first signal
        # asks it to (the power button), the VM is stopped hard only after the grace time
        # or at a second signal.
        self.graceful: GracefulStop | None = None
        self._asked: tuple[int, StopReason] | None = None  # the signal that asked
        # Pausing: vCPU threads park on this condition (an RLock inside: a
        # signal handler calling stop() may run while the main thread holds it).
        self._cond = threading.Condition()
        self._pause_actions: list[Callable[[], None]] = []
        self._parked = 0
        self._resume_generation = 0
        self._local = threading.local()  # the vCPU whose exit this thread dispatches
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    # --- stopping -------------------------------------------------------------------
    def stop(self, status: int, reason: StopReason, detail: str = "") -> None:
        """End the VM with this outcome; the first caller wins."""
        with self._stop_lock:
            if self.outcome is None:
                self.outcome = Outcome(status, reason, detail)
        self._kick_all()
        with self._cond:
            self._cond.notify_all()  # parked vCPU threads: go and stop

    def stop_from_signal(self, status: int, reason: StopReason) -> None:
        """A signal handler's stop: no lock taken (the handler may run in the main thread
        while it holds ``_stop_lock`` or the pause condition: waiting on either would hang
        vmm). The flag and the kicks are enough: run() turns the flag into stop() within
        its 50 ms tick, and the kicked vCPUs see ``stopping``."""
        if self.graceful is not None and reason in self.graceful.signals \
                and self._asked is None and self.outcome is None:
            self._asked = (status, reason)  # run() presses the button (no device work here)
            return
        if self._signalled is None:
            self._signalled = (status, reason)
        for vcpu in self.vcpus:
            vcpu.request_immediate_exit()
        for thread in list(self._threads):
            if thread.ident is not None and thread.is_alive() \
                    and thread is not threading.current_thread():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    @property
    def stopping(self) -> bool:
        return self.outcome is not None or self._signalled is not None

    @property
    def vcpu_threads(self) -> list[threading.Thread]:
        """The vCPU threads started so far (the profiler kicks them)."""
        return list(self._threads)

    def _kick_all(self) -> None:
        for vcpu in self.vcpus:
            vcpu.request_immediate_exit()
        for thread in self._threads:
            if thread.ident is not None and thread.is_alive() \
                    and thread is not threading.current_thread():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    # --- pausing -------------------------------------------------------------------------
    def pause(self, action: Callable[[], None]) -> None:
        """Stop every vCPU, run ``action`` in the thread that called run(), go on.

        Any thread may ask (a device does, from the vCPU thread dispatching its
        exit). While ``action`` runs, no vCPU is inside ``KVM_RUN``: it may read
        and write every vCPU's state and guest memory. It may call :meth:`stop`.
        """
        with self._cond:
            self._pause_actions.append(action)
            self._cond.notify_all()
        self._kick_all()

    @property
    def current_vcpu(self) -> Vcpu | None:
        """In a device's handler: the vCPU whose exit is being dispatched."""
        return getattr(self._local, "vcpu", None)

    def _park(self) -> None:
        """In a vCPU thread, out of KVM_RUN: wait while a pause is asked for."""
        with self._cond:
            if not self._pause_actions or self.stopping:
                return
            generation = self._resume_generation
            self._parked += 1
            self._cond.notify_all()
            try:
                while self._resume_generation == generation and not self.stopping:
                    self._cond.wait()
            finally:
                self._parked -= 1

    def _serve_pause(self, alive: int) -> None:
        """Main thread, condition held: once every live vCPU is parked, run the actions."""
        if not self._pause_actions:
            return
        if self._parked < alive:
            self._kick_all()  # a kick can be lost between a check and KVM_RUN: again
            return
        actions, self._pause_actions = self._pause_actions, []
        self._cond.release()
        try:
            for action in actions:
                action()
        except BaseException as e:
            self._errors.append(e)
            self.stop(EXIT_VMM_ERROR, StopReason.VMM_ERROR, str(e))
        finally:
            self._cond.acquire()
            self._resume_generation += 1
            self._cond.notify_all()

    # --- running ----------------------------------------------------------------------
    def run(self, vcpus: list[Vcpu], pio: Bus, mmio: Bus, *, quirks: ExitQuirks | None = None,
            timeout: float | None = None) -> Outcome:
        """Start a thread per vCPU, dispatch their exits, wait for the outcome (or the timeout).

        A stop asked for before run() (a device during the build) ends it at once.
        """
        self.vcpus, self.pio = list(vcpus), pio
        self.dispatcher = ExitDispatcher(pio, mmio, self.stats, self.stop, kick_others=self._kick_all,
                                         quirks=quirks, trace=self.trace, vcpus=len(self.vcpus))
        self.dispatcher.on_debug = self.on_debug
        if threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, lambda *_: None)
        start = time.monotonic_ns()
        for vcpu in self.vcpus:
            thread = threading.Thread(
                target=self._vcpu_thread, args=(vcpu,), name=f"vcpu{vcpu.id}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        grace_ends = None  # once the guest was asked to shut down
        try:
            with self._cond:
                while alive := sum(t.is_alive() for t in self._threads):
                    if self._signalled is not None and self.outcome is None:
                        self.stop(*self._signalled)
                    if self._asked is not None and self.graceful is not None:
                        grace_ends = self._ask_or_give_up(self.graceful, self._asked, grace_ends)
                    if deadline is not None and time.monotonic() >= deadline:
                        self.stop(EXIT_TIMEOUT, StopReason.TIMEOUT, f"the guest ran longer than {timeout:g} s")
                        deadline = None
                    self._serve_pause(alive)
                    self._cond.wait(0.05)
        finally:
            self.stats.wall_ns = time.monotonic_ns() - (self.first_run_ns or start)
        if self._signalled is not None and self.outcome is None:
            self.stop(*self._signalled)  # the signal came as the last vCPU ended
        if self._errors:
            raise self._errors[0]
        return self.outcome or Outcome(EXIT_NO_STATUS, StopReason.ALL_STOPPED)

    def _ask_or_give_up(self, graceful: GracefulStop, asked: tuple[int, StopReason],
                        grace_ends: float | None) -> float | None:
        """The guest asked (once) to shut down; stopped with the signal's status if it
        has not powered off when the grace time ends. Returns when that is."""
        if grace_ends is None:
            graceful.ask()
            return time.monotonic() + graceful.timeout
        if time.monotonic() >= grace_ends and self.outcome is None:
            self.stop(*asked, f"the guest did not power off within {graceful.timeout:g} s "
                      f"(--stop-timeout) of {graceful.what}")
        return grace_ends

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        try:
            if self.runloop == "c":
                self._run_c(vcpu)
            else:
                self._run_python(vcpu)
        except BaseException as e:  # reported by run(); the VM must stop either way
            self._errors.append(e)
            self.stop(EXIT_VMM_ERROR, StopReason.VMM_ERROR, str(e))
        finally:
            with self._cond:
                self._cond.notify_all()  # the main thread counts live vCPUs again

    def _mark_first_run(self) -> None:
        if self.first_run_ns is None:
            self.first_run_ns = time.monotonic_ns()

    def _dispatch(self, vcpu: Vcpu, exit) -> bool:
        """One exit to the dispatcher. True when this vCPU must stop."""
        self._local.vcpu = vcpu  # for current_vcpu, in the device handling it
        return self.dispatcher.dispatch(vcpu, exit) or self.stopping

    def _interrupted(self, vcpu: Vcpu) -> bool:
        """KVM_RUN returned EINTR: stop if asked to, wait out a pause, else carry on."""
        self._park()  # returns at once unless a pause is pending
        if self.stopping:
            return True
        vcpu.clear_immediate_exit()
        if self.tick is not None:
            self.tick(vcpu)
        return False

    # The simple loop: every exit comes back to Python.
    def _run_python(self, vcpu: Vcpu) -> None:
        run = vcpu.run_struct
        outside_since = time.perf_counter_ns()
        while not self.stopping:
            entered = time.perf_counter_ns()
            self._mark_first_run()
            try:
                vcpu.run()
            except KvmError as e:
                if e.errno in (4, 11):  # EINTR, EAGAIN: a signal or immediate_exit
                    self.stats.add_times(time.perf_counter_ns() - entered, entered - outside_since)
                    outside_since = time.perf_counter_ns()
                    if self._interrupted(vcpu):
                        return
                    continue
                raise
            left = time.perf_counter_ns()
            self.stats.add_times(left - entered, entered - outside_since)
            outside_since = left
            if self._dispatch(vcpu, kvm_exits.decode_exit(run)):
                return

    # The fast loop: C completes what the devices' port rules allow.
    def _run_c(self, vcpu: Vcpu) -> None:
        loop = ffi.new("struct vmm_loop *")
        loop.vcpu_fd = vcpu.fd
        loop.run = vcpu.run_struct
        sinks: dict[int, Callable[[bytes], None]] = {}
        generation = None
        returned: int | None = None
        try:
            while not self.stopping:
                if self.trace is None and self.pio.fast_path_generation() != generation:
                    generation = self.pio.fast_path_generation()
                    sinks = self._load_rules(loop)
                self._mark_first_run()
                if returned is not None:  # Python's share: from the last return to now
                    self.stats.add_times(0, time.perf_counter_ns() - returned)
                result = lib.vmm_run_loop(loop)
                returned = time.perf_counter_ns()
                self._drain_output(loop, sinks)
                if result == lib.VMM_LOOP_OUTPUT:
                    continue
                if result == lib.VMM_LOOP_INTERRUPTED:
                    if self._interrupted(vcpu):
                        return
                    continue
                if result == lib.VMM_LOOP_ERROR:
                    raise KvmError("KVM_RUN", loop.last_errno)
                if self._dispatch(vcpu, kvm_exits.decode_exit(vcpu.run_struct)):
                    return
        finally:
            self._merge_c_stats(loop)

    def _load_rules(self, loop) -> dict[int, Callable[[bytes], None]]:
        """Copy the devices' current port rules into the C table."""
        self._merge_rule_hits(loop)
        actions_w = {WriteAction.PASS: lib.VMM_WRITE_PASS, WriteAction.DISCARD: lib.VMM_WRITE_DISCARD,
                     WriteAction.BUFFER: lib.VMM_WRITE_BUFFER}
        actions_r = {ReadAction.PASS: lib.VMM_READ_PASS, ReadAction.CONSTANT: lib.VMM_READ_CONSTANT}
        rules = self.pio.port_rules()[: lib.VMM_MAX_PORT_RULES]
        sinks: dict[int, Callable[[bytes], None]] = {}
        for slot, (port, rule) in zip(loop.rules, rules):
            slot.port = port
            slot.on_write = actions_w[rule.on_write]
            slot.on_read = actions_r[rule.on_read]
            slot.read_value = rule.read_value & 0xFFFFFFFF
            slot.hits = 0
            if rule.on_write is WriteAction.BUFFER and rule.sink is not None:
                sinks[port] = rule.sink
        loop.nrules = len(rules)
        return sinks

    def _drain_output(self, loop, sinks: dict[int, Callable[[bytes], None]]) -> None:
        # One console port may buffer at a time (the C buffer does not say whose
        # bytes they are); output must reach the host before any other exit is
        # handled, so that it stays in order.
        if loop.output_len:
            data = bytes(ffi.buffer(loop.output, loop.output_len))
            loop.output_len = 0
            for sink in sinks.values():
                sink(data)
                break

    def _merge_rule_hits(self, loop) -> None:
        for i in range(loop.nrules):
            rule = loop.rules[i]
            if rule.hits:
                # The C loop cannot tell IN from OUT per hit; rules are per port.
                self.stats.count("io", ("fast", rule.port), rule.hits)
                rule.hits = 0

    def _merge_c_stats(self, loop) -> None:
        self._merge_rule_hits(loop)
        self.stats.add_times(loop.ns_in_kvm_run, loop.ns_in_c_loop, loop.exits_in_c)

def install_stop_signals(runner: Runner) -> None:
    """Ctrl-C and SIGTERM stop the guest promptly, with the shell's usual statuses.

    The handler only sets a flag and kicks the vCPUs (Runner.stop_from_signal): it
    runs in the main thread, between any two bytecodes, locks held or not."""

    def handler(signum: int, _frame: object) -> None:
        runner.stop_from_signal(128 + signum, StopReason(signal.Signals(signum).name))

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


__all__ = ["GracefulStop", "Runner", "install_stop_signals"]
