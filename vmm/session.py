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


def report(outcome: Outcome, runner: Runner, machine, config: VmConfig, stderr: TextIO) -> None:
    """Say why the VM ended when it is not the guest's own doing, and --stats."""
    if outcome.reason not in ("guest exit",):
        message = f"vmm: guest stopped: {outcome.reason}"
        if outcome.detail:
            message += f": {outcome.detail}"
        print(f"{message} (exit status {outcome.status})", file=stderr)
    if config.stats:
        names = {m.base + i: m.name for m in machine.pio.mappings() for i in range(m.length)}
        print(runner.stats.report(names), file=stderr)


__all__ = ["run_firmware", "RunResult", "EXIT_VMM_ERROR"]
