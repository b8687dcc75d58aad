"""One `vmm run`: build the VM, run it, report, clean up, return the exit status.

This is the glue between the CLI and the builder/runner, kept out of the CLI
so that tests and benchmarks can run a VM in-process.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from vmm.config import VmConfig
from vmm.console import ConsoleOutput
from vmm.runner import EXIT_VMM_ERROR, Outcome, Runner, install_stop_signals
from vmm.stats import ExitStats


@dataclass
class RunResult:
    outcome: Outcome
    stats: ExitStats
    phases: dict[str, int] = field(default_factory=dict)
    devices: dict[str, dict] = field(default_factory=dict)  # virtio transports' counters

    @property
    def status(self) -> int:
        return self.outcome.status


def run_firmware(
    config: VmConfig,
    *,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
    bench_count: int = 0,
    handle_signals: bool = True,
) -> RunResult:
    """Run one of our firmware payloads (or a raw binary) to its end."""
    from vmm.builder import build_firmware_vm

    stderr = stderr or sys.stderr
    output = ConsoleOutput(stdout)
    runner_box: list[Runner] = []

    def on_exit(status: int) -> None:
        runner_box[0].stop(status, "guest exit", f"status {status} written to the exit port")

    machine = build_firmware_vm(config, output, on_exit, bench_count=bench_count)
    try:
        runner = Runner(
            machine.vcpus, machine.pio, machine.mmio,
            runloop=config.runloop, trace=stderr if config.trace else None,
        )
        runner_box.append(runner)
        if handle_signals:
            install_stop_signals(runner)
        outcome = runner.run(timeout=config.timeout)
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
) -> RunResult:
    """Boot Linux, run the command (or a shell), return the guest's exit status."""
    import time

    from vmm.builder import build_linux_vm
    from vmm.runner import EXIT_GUEST_PANIC, EXIT_NO_STATUS

    stderr = stderr or sys.stderr
    panic = PanicWatcher()
    output = ConsoleOutput(stdout, watchers=[panic])
    initcall_watch = None
    if initcalls:
        from vmm.profiler import InitcallWatcher

        initcall_watch = InitcallWatcher()
        output.watchers.append(initcall_watch)
    runner_box: list[Runner] = []

    def on_exit(status: int) -> None:
        runner_box[0].stop(status, "guest exit", f"status {status} written to the exit port")

    def on_reset() -> None:
        if panic.panicked:
            runner_box[0].stop(EXIT_GUEST_PANIC, "guest kernel panic", panic.message)
        else:
            runner_box[0].stop(EXIT_NO_STATUS, "guest reset", "the guest rebooted without reporting a status")

    def progress(line: str) -> None:
        print(f"vmm: {line}", file=stderr, flush=True)

    guest = build_linux_vm(config, output, on_exit, on_reset, progress)
    machine = guest.machine
    try:
        if on_built is not None:
            on_built(machine)
        quirks = None
        if machine.flavour == "pvm":
            from vmm.arch.x86_64.pvm import PvmQuirks

            quirks = PvmQuirks(guest.system_map)
        runner = Runner(machine.vcpus, machine.pio, machine.mmio, runloop=config.runloop,
                        trace=stderr if config.trace else None, quirks=quirks)
        runner_box.append(runner)
        if handle_signals:
            install_stop_signals(runner)
        profiler = None
        if profile is not None:
            from vmm.profiler import Profiler

            profiler = Profiler(machine.memory, hz=profile.hz)
            runner.tick = profiler.tick
            profiler.start(lambda: runner.vcpu_threads)
        try:
            outcome = _run_with_console(runner, guest, config, stdin)
        finally:
            if profiler is not None:
                profiler.stop()
        if outcome.reason in ("triple fault", "guest reset") and panic.panicked:
            outcome = Outcome(EXIT_GUEST_PANIC, "guest kernel panic", panic.message)
        machine.phases["first_kvm_run"] = runner.first_run_ns or 0
        machine.phases["first_output"] = output.first_byte_ns or 0
        for mark, name in ((1, "init_reached"), (2, "command_done")):
            if mark in guest.boot_timer.marks:
                machine.phases[name] = guest.boot_timer.marks[mark]
        machine.phases["guest_finished"] = time.monotonic_ns()
        if recorder is not None:
            recorder.before_close(machine, guest)
        report(outcome, runner, machine, config, stderr)
        if profiler is not None:
            from vmm.loader.symbols import SymbolTable

            symbols_path = profile.symbols or guest.system_map
            profiler.summary(SymbolTable.from_system_map(symbols_path) if symbols_path else None,
                             top=profile.top, out=stderr, folded=profile.out)
        if initcall_watch is not None:
            print(initcall_watch.format(), file=stderr)
        from vmm.devices.virtio.attach import device_counters

        return RunResult(outcome, runner.stats, machine.phases, device_counters(machine))
    finally:
        machine.close()


def _run_with_console(runner: Runner, guest, config: VmConfig, stdin) -> Outcome:
    """Run the guest with the host's input connected to its UART, if there is any."""
    from vmm.console import InteractiveConsole

    if config.command:
        return runner.run(timeout=config.timeout)
    stdin = stdin if stdin is not None else sys.stdin
    try:
        fd = stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return runner.run(timeout=config.timeout)
    with InteractiveConsole(guest.serial.enqueue_input,
                            lambda: runner.stop(0, "console escape", "Ctrl-A x"), fd=fd):
        return runner.run(timeout=config.timeout)


def report(outcome: Outcome, runner: Runner, machine, config: VmConfig, stderr: TextIO) -> None:
    """Say why the VM ended when it is not the guest's own doing, and --stats."""
    if outcome.reason not in ("guest exit", "console escape"):
        message = f"vmm: guest stopped: {outcome.reason}"
        if outcome.detail:
            message += f": {outcome.detail}"
        print(f"{message} (exit status {outcome.status})", file=stderr)
    if config.stats:
        names = {m.base + i: m.name for m in machine.pio.mappings() for i in range(m.length)}
        print(runner.stats.report(names), file=stderr)


__all__ = ["run_firmware", "run_linux", "RunResult", "EXIT_VMM_ERROR"]
