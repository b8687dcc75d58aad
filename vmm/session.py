"""One `vmm run`: build the VM, run it, report, clean up, return the exit status.

This is the glue between the CLI and the builder/runner, kept out of the CLI
so that tests and benchmarks can run a VM in-process.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from vmm.config import VmConfig
from vmm.console import ConsoleOutput
from vmm.outcome import EXIT_GUEST_PANIC, EXIT_NO_STATUS, EXIT_VMM_ERROR, Outcome, StopReason
from vmm.runner import GracefulStop, Runner, install_stop_signals
from vmm.stats import ExitStats

if TYPE_CHECKING:
    from vmm.builder import LinuxGuest
    from vmm.profiler import Profiler
    from vmm.snapshot.state import Snapshot


@dataclass
class RunResult:
    outcome: Outcome
    stats: ExitStats
    phases: dict[str, int] = field(default_factory=dict)
    devices: dict[str, dict] = field(default_factory=dict)  # virtio transports' counters
    start: str = "cold"  # how the guest came to be: cold, restored, cold+saved

    @property
    def status(self) -> int:
        return self.outcome.status


def quirks_for(machine, system_map: Path | None = None):
    """What this KVM needs vmm to finish for a guest (PVM's emulator gaps), or None."""
    from vmm.kvm.flavour import Flavour

    if machine.flavour is Flavour.PVM:
        from vmm.arch.x86_64.pvm import PvmQuirks

        return PvmQuirks(machine.memory, system_map)
    return None


def run_firmware(
    config: VmConfig,
    *,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
    bench_count: int = 0,
    handle_signals: bool = True,
    gdb: tuple[str, int] | None = None,
) -> RunResult:
    """Run one of our firmware payloads (or a raw binary) to its end (under GDB with ``gdb``)."""
    from vmm.builder import build_firmware_vm

    stderr = stderr or sys.stderr
    runner = Runner(runloop=config.runloop, trace=stderr if config.trace else None)

    def on_exit(status: int) -> None:
        runner.stop(status, StopReason.GUEST_EXIT, f"status {status} written to the exit port")

    machine = build_firmware_vm(config, ConsoleOutput(stdout), on_exit, bench_count=bench_count)
    try:
        if handle_signals:
            install_stop_signals(runner)
        with debugger(gdb, machine, runner, stderr):
            outcome = runner.run(machine.vcpus, machine.pio, machine.mmio,
                                 quirks=quirks_for(machine), timeout=config.timeout)
        report(outcome, runner, machine, config, stderr)
        return RunResult(outcome, runner.stats, machine.phases)
    finally:
        machine.close()


class PanicWatcher:
    """Spots the guest kernel's panic message in the console stream."""

    MARKER = b"Kernel panic - not syncing"

    def __init__(self) -> None:
        self.panicked = False
        self._line = b""  # the panic line, collected until its newline arrives
        self._tail = b""

    @property
    def message(self) -> str:
        return self._line.split(b"\n")[0].decode(errors="replace").strip()

    def __call__(self, data: bytes) -> None:
        if self.panicked:
            if b"\n" not in self._line and len(self._line) < 512:
                self._line += data
            return
        window = self._tail + data
        if self.MARKER in window:
            self.panicked = True
            self._line = window[window.index(self.MARKER):]
        self._tail = window[-len(self.MARKER):]


@contextlib.contextmanager
def debugger(address: tuple[str, int] | None, machine, runner: Runner, log: TextIO):
    """`--gdb`: a GDB stub for this run, the VM stopped before its first instruction."""
    if address is None:
        yield None
        return
    from vmm.errors import UsageError
    from vmm.gdb.stub import GdbStub
    from vmm.kvm.flavour import Flavour

    from vmm.kvm.capabilities import DEBUG, require

    require(machine.kvm, DEBUG)
    try:
        pvm = machine.flavour is Flavour.PVM  # what its instruction emulator cannot do
        stub = GdbStub(address, machine, runner, log=log, software_breakpoints=not pvm,
                       watchpoints=not pvm, user_steps=not pvm)
    except OSError as e:
        raise UsageError(f"--gdb {address[0]}:{address[1]}: {e.strerror or e}") from None
    try:
        stub.install()
        yield stub
    finally:
        stub.close(runner.outcome)


# --- how the guest comes to be ------------------------------------------------------------
@dataclass(frozen=True)
class ColdBoot:
    """Boot the kernel; the command goes on the kernel command line."""


@dataclass(frozen=True)
class SaveAtReady:
    """Boot the kernel to /init's ready point and save the VM there.

    ``then_run``: deliver the command and go on in the same VM (the warm
    start's first run); else stop once saved (``vmm snapshot create``).
    ``replace``: a snapshot already in ``directory`` wins (the cache).
    """

    directory: Path
    then_run: bool = False
    replace: bool = False


@dataclass(frozen=True)
class BootToReady:
    """Boot the kernel to /init's ready point and deliver the request there (no snapshot).

    What an OCI container's VMM does (vmm/oci/monitor.py): the VM is created, then
    waits at the ready point for `start`.
    """


@dataclass(frozen=True)
class FromSnapshot:
    """Restore a saved VM and deliver the command to its waiting /init."""

    directory: Path
    snapshot: Snapshot  # already loaded and checked


def _make_guest(start, config: VmConfig, output, events, progress):
    if isinstance(start, FromSnapshot):
        from vmm.snapshot.restore import restore_linux_vm

        return restore_linux_vm(start.directory, start.snapshot, config, output, events)
    from vmm.builder import build_linux_vm

    return build_linux_vm(config, output, events, progress,
                          mailbox=isinstance(start, (SaveAtReady, BootToReady)))


def run_linux(
    config: VmConfig,
    *,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
    stdin=None,
    handle_signals: bool = True,
    recorder=None,  # vmm.bench.phases.PhaseRecorder (--boot-timer, --metrics)
    profile=None,  # vmm.profiler.ProfileOptions: sample guest RIPs (--profile)
    initcalls: bool = False,  # summarize initcall_debug lines at exit (--initcalls)
    on_built=None,  # called with the Machine before it runs (benchmarks read device counters)
    start: ColdBoot | SaveAtReady | FromSnapshot = ColdBoot(),
    gdb: tuple[str, int] | None = None,  # --gdb: serve GDB there, the VM stopped at its start
) -> RunResult:
    """Boot Linux (or restore it), run the command (or a shell), return the guest's exit status.

    A guest whose own init runs is a machine: when it reboots, it boots again (a
    fresh VM, as a PC resets), unless ``config.reboot`` is False.
    """
    while True:
        run = LinuxRun(config, start, stdout=stdout, stderr=stderr or sys.stderr,
                       recorder=recorder, profile=profile, initcalls=initcalls, gdb=gdb)
        run.build()
        try:
            if on_built is not None:
                on_built(run.machine)
            if handle_signals:
                install_stop_signals(run.runner)
            outcome = run.execute(stdin)
            result = run.finish(outcome)
        finally:
            run.machine.close()
        if outcome.reason is not StopReason.GUEST_REBOOT or not config.reboot:
            return result
        run.progress("the guest rebooted: booting it again (--no-reboot: exit instead)")


class LinuxRun:
    """One run of a Linux guest, step by step: build (or restore), execute, finish.

    The runner exists before the VM: the devices are wired straight to its
    stop and pause, and the console watchers to the output.
    """

    def __init__(self, config: VmConfig, start, *, stdout, stderr: TextIO, recorder=None,
                 profile=None, initcalls: bool = False, error_stream: BinaryIO | None = None,
                 gdb: tuple[str, int] | None = None) -> None:
        """``error_stream``: where the second UART's bytes go (``config.stderr_uart``);
        ``gdb``: serve a debugger there (vmm/gdb/stub.py)."""
        self.config = config
        self.gdb = gdb
        self.start = start
        self.stderr = stderr
        self.recorder = recorder
        self.profile = profile
        self.runner = Runner(runloop=config.runloop, trace=stderr if config.trace else None)
        self.panic = PanicWatcher()
        self.output = ConsoleOutput(stdout, watchers=[self.panic])
        self.error_output = ConsoleOutput(error_stream) if error_stream is not None else None
        self.initcalls = None
        if initcalls:
            from vmm.profiler import InitcallWatcher

            self.initcalls = InitcallWatcher()
            self.output.watchers.append(self.initcalls)
        self.guest: LinuxGuest  # made by build()
        self.profiler: Profiler | None = None  # while --profile samples

    @property
    def machine(self):
        return self.guest.machine

    def progress(self, line: str) -> None:
        _progress(self.stderr, line)

    # --- build ---------------------------------------------------------------------------
    def build(self) -> None:
        import importlib

        from vmm.builder import GuestEvents

        events = GuestEvents(self.on_exit, self.on_reset, self.on_ready, self.error_output,
                             self.on_poweroff)
        self.guest = _make_guest(self.start, self.config, self.output, events, self.progress)
        for module in self.used_once_running():
            importlib.import_module(module)

    def used_once_running(self) -> tuple[str, ...]:
        """The modules the guest's own actions will have this run use (its ready point, a
        save there), imported before the first KVM_RUN: once the guest runs nothing is
        imported (a jail's seccomp filter refuses the module file's open)."""
        modules = ("vmm.arch.x86_64.paging",)  # the ready point: the mailbox's pages
        return modules + (("vmm.snapshot.save",) if isinstance(self.start, SaveAtReady) else ())

    # --- what the devices report -------------------------------------------------------------
    def on_exit(self, status: int) -> None:
        self.runner.stop(status, StopReason.GUEST_EXIT, f"status {status} written to the exit port")

    def on_poweroff(self) -> None:
        self.runner.stop(0, StopReason.GUEST_POWEROFF, "the guest powered off (ACPI S5)")

    def on_reset(self) -> None:
        if self.panic.panicked:
            self.runner.stop(EXIT_GUEST_PANIC, StopReason.GUEST_PANIC, self.panic.message)
        elif not self.config.init_is_ours:  # a machine: reboot is one of its fates
            self.runner.stop(0, StopReason.GUEST_REBOOT)
        else:
            self.runner.stop(EXIT_NO_STATUS, StopReason.GUEST_RESET,
                             "the guest rebooted without reporting a status")

    def on_ready(self, address: int, length: int) -> None:
        """/init is at its ready point (in the vCPU thread that dispatches its port write)."""
        from vmm.arch.x86_64.paging import translator
        from vmm.devices.mailbox import buffer_extents

        vcpu = self.runner.current_vcpu
        assert vcpu is not None  # a port write: the vCPU thread dispatching it
        try:
            extents = buffer_extents(translator(self.machine.memory, vcpu.get_sregs().cr3),
                                     address, length)
        except ValueError as e:
            self.runner.stop(EXIT_VMM_ERROR, StopReason.VMM_ERROR, f"guest mailbox: {e}")
            return
        self.runner.pause(lambda: self.at_ready(extents))

    def at_ready(self, extents: list[tuple[int, int]]) -> None:
        """Every vCPU stopped at the ready point: save the VM, hand over the command."""
        start = self.start
        if isinstance(start, SaveAtReady):
            from vmm.errors import SnapshotError
            from vmm.snapshot.save import save_snapshot

            try:
                saved = save_snapshot(start.directory, self.guest, self.config, extents,
                                      replace=start.replace)
            except SnapshotError as e:
                if not start.then_run:
                    raise
                self.progress(f"warning: the warm-start snapshot was not saved: {e}")
            else:
                self.machine.phases["snapshot_saved"] = time.monotonic_ns()
                if not start.then_run:
                    self.runner.stop(0, StopReason.SNAPSHOT_SAVED, saved.summary())
                    return
        self.deliver(extents)

    def deliver(self, extents: list[tuple[int, int]]) -> None:
        """The command (argv, time, entropy) into /init's request buffer."""
        from vmm.devices.mailbox import deliver, encode_request

        deliver(self.machine.memory, extents,
                encode_request(self.config.command, interactive=not self.config.command))

    # --- execute -----------------------------------------------------------------------------
    def quirks(self):
        return quirks_for(self.machine, self.guest.system_map)

    def execute(self, stdin) -> Outcome:
        """Run the vCPUs (under the profiler if asked) until the guest ends.

        A restored guest waits at its ready point: its command goes in first.
        """
        if isinstance(self.start, FromSnapshot):
            self.deliver(list(self.start.snapshot.meta.mailbox))
        self.runner.graceful = self.graceful_stop(stdin)
        if self.profile is not None:
            from vmm.profiler import Profiler

            profiler = self.profiler = Profiler(self.machine.memory, hz=self.profile.hz)
            self.runner.tick = profiler.tick
            profiler.start(lambda: self.runner.vcpu_threads)
        try:
            with debugger(self.gdb, self.machine, self.runner, self.stderr):
                outcome = _run_with_console(self.runner, self.guest, self.config, stdin,
                                            self.quirks())
        finally:
            if self.profiler is not None:
                self.profiler.stop()
        if outcome.reason in (StopReason.TRIPLE_FAULT, StopReason.GUEST_RESET) and self.panic.panicked:
            outcome = Outcome(EXIT_GUEST_PANIC, StopReason.GUEST_PANIC, self.panic.message)
        return outcome

    def graceful_stop(self, stdin) -> GracefulStop | None:
        """A machine (the guest's own init) with an ACPI power button: SIGTERM presses
        it, and SIGINT too when no terminal sends it (with one, Ctrl-C is the guest's).
        vmm's /init has nothing to shut down: a signal stops it at once."""
        power = self.guest.devices.get("power")
        if self.config.init_is_ours or power is None:
            return None
        signals = {StopReason.SIGTERM}
        if not _is_terminal(stdin if stdin is not None else sys.stdin):
            signals.add(StopReason.SIGINT)
        return GracefulStop(power.press_button, self.config.stop_timeout,
                            frozenset(signals))

    # --- finish ------------------------------------------------------------------------------
    def finish(self, outcome: Outcome) -> RunResult:
        """Phases, reports, the result; the VM still exists (the caller closes it)."""
        machine, phases = self.machine, self.machine.phases
        phases["first_kvm_run"] = self.runner.first_run_ns or 0
        phases["first_output"] = self.output.first_byte_ns or 0
        for mark, name in ((1, "init_reached"), (2, "command_done")):
            if mark in self.guest.boot_timer.marks:
                phases[name] = self.guest.boot_timer.marks[mark]
        phases["guest_finished"] = time.monotonic_ns()
        if self.recorder is not None:
            self.recorder.before_close(machine, self.guest)
        report(outcome, self.runner, machine, self.config, self.stderr)
        if self.profiler is not None:
            from vmm.loader.symbols import SymbolTable

            symbols_path = self.profile.symbols or self.guest.system_map
            self.profiler.summary(SymbolTable.from_system_map(symbols_path) if symbols_path else None,
                                  top=self.profile.top, out=self.stderr, folded=self.profile.out)
        if self.initcalls is not None:
            print(self.initcalls.format(), file=self.stderr)
        kind = {FromSnapshot: "restored", SaveAtReady: "cold+saved"}.get(type(self.start), "cold")
        return RunResult(outcome, self.runner.stats, phases, self.guest.devices.counters(), kind)


def run_linux_guest(config: VmConfig, *, restore: str | None = None, cold: bool = False,
                    given: dict[str, bool] | None = None, recorder=None, stderr: TextIO | None = None,
                    **options) -> RunResult:
    """`vmm run` for Linux: from ``restore``, else from the cached snapshot, else a cold boot.

    ``given``: which of mem/cpus/disks the user set (a snapshot fixes them: they
    must agree). ``options`` go to :func:`run_linux`.
    """
    from vmm.errors import SnapshotError
    from vmm.loader.files import check_guest_files
    from vmm.snapshot import cache
    from vmm.snapshot.restore import load_snapshot, restore_config

    check_guest_files(config)  # before the cache key names them, or a progress line
    stderr = stderr or sys.stderr
    options.update(recorder=recorder, stderr=stderr)

    def progress(line: str) -> None:
        _progress(stderr, line)

    def loaded(directory: Path):
        snapshot = load_snapshot(directory)
        if recorder is not None:
            recorder.mark("state_loaded")
        return snapshot

    def restored(snapshot, directory: Path, config: VmConfig) -> RunResult:
        if recorder is not None:
            recorder.config = config  # the snapshot's machine
        return run_linux(config, start=FromSnapshot(directory, snapshot), **options)

    if restore:
        snapshot = loaded(Path(restore))
        config = restore_config(snapshot, config, name=restore,
                                **{f"{k}_given": v for k, v in (given or {}).items()})
        return restored(snapshot, Path(restore), config)
    if cold or options.get("gdb") or cache.warm_start_possible(config) is not None:
        return run_linux(config, **options)  # --gdb: from the first instruction, so cold

    cache.cache_max()  # a bad VMM_CACHE_MAX is said now, not after the run
    directory, key = warm_snapshot(config, progress)
    if key is None:
        return run_linux(config, **options)
    if directory is not None:
        try:
            snapshot = loaded(directory)
            warm = restore_config(snapshot, config, mem_given=True, cpus_given=True, disks_given=True,
                                  name=str(directory))
            return restored(snapshot, directory, warm)
        except SnapshotError as e:  # stale or damaged: replace it, this run boots
            progress(f"the cached snapshot cannot be used ({e}); booting and saving a new one")
            cache.discard(directory)
    else:
        progress("first run of this guest: booting it, saving a snapshot for the next runs "
                 "(--cold: never)")
    target = cache.snapshot_cache_dir() / key
    result = run_linux(config, start=SaveAtReady(target, then_run=True, replace=True), **options)
    cache.prune()  # the cache stays under VMM_CACHE_MAX, least recently used out first
    return result


def warm_snapshot(config: VmConfig, progress) -> tuple[Path | None, str | None]:
    """(the cached snapshot of this guest or None, its key; None if this KVM cannot have one)."""
    from vmm.builder import resolve_initrd, resolve_kernel
    from vmm.kvm.capabilities import SNAPSHOT, missing
    from vmm.kvm.flavour import detect_flavour
    from vmm.kvm.system import Kvm
    from vmm.snapshot import cache
    from vmm.snapshot.state import HostIdentity

    kernel, _ = resolve_kernel(config, progress)
    initrd = resolve_initrd(config, progress)
    with Kvm() as kvm:
        absent = missing(kvm, SNAPSHOT)
        if absent:
            progress(f"this KVM cannot save snapshots (it lacks {', '.join(c.name for c in absent)}): "
                     "booting")
            return None, None
        host = HostIdentity.of(kvm, detect_flavour())
    key = cache.cache_key(config, kernel, initrd, host)
    return cache.lookup(key), key


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _progress(stderr: TextIO, line: str) -> None:
    """What vmm says while it works (building, first runs): one `vmm:` line on stderr."""
    print(f"vmm: {line}", file=stderr, flush=True)


def _run_with_console(runner: Runner, guest, config: VmConfig, stdin, quirks) -> Outcome:
    """Run the guest with the host's input connected to its UART, if there is any."""
    from vmm.console import InteractiveConsole

    machine = guest.machine

    def run() -> Outcome:
        return runner.run(machine.vcpus, machine.pio, machine.mmio, quirks=quirks,
                          timeout=config.timeout)

    if config.command:
        return run()
    stdin = stdin if stdin is not None else sys.stdin
    try:
        fd = stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return run()
    with InteractiveConsole(guest.serial.enqueue_input,
                            lambda: runner.stop(0, StopReason.CONSOLE_ESCAPE, "Ctrl-A x"), fd=fd):
        return run()


def report(outcome: Outcome, runner: Runner, machine, config: VmConfig, stderr: TextIO) -> None:
    """Say why the VM ended when it is not the guest's own doing, and --stats."""
    if outcome.reason not in (StopReason.GUEST_EXIT, StopReason.CONSOLE_ESCAPE,
                              StopReason.SNAPSHOT_SAVED):
        message = f"vmm: guest stopped: {outcome.reason}"
        if outcome.detail:
            message += f": {outcome.detail}"
        print(f"{message} (exit status {outcome.status})", file=stderr)
    if config.stats:
        names = {m.base + i: m.name for m in machine.pio.mappings() for i in range(m.length)}
        print(runner.stats.report(names), file=stderr)


__all__ = ["run_firmware", "run_linux", "RunResult", "EXIT_VMM_ERROR"]
