"""`vmm bench`: measurements. `vmm bench boot`: a VM beside a container and a process."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks (boot: a VM beside a container and a process)."""


@bench.command()
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 1000),
              help="Runs of each contender (interleaved round-robin).")
@click.option("--contenders", default="all", show_default=True, metavar="NAME,...",
              help="Which to run: vmm, vmm-bzimage, qemu-kvm, qemu-tcg, runc, unshare, process, or all.")
@click.option("--timeout", "timeouts", multiple=True, metavar="NAME=SECONDS",
              help="Override one contender's timeout (repeatable), e.g. vmm-bzimage=900.")
@click.option("--json", "json_path", metavar="FILE", help="Write the full report as JSON.")
@click.option("--plot", "plot_path", metavar="FILE", help="Write a PNG chart (needs matplotlib).")
@click.option("--setup", is_flag=True, help="Install missing tools first (qemu-system-x86, runc; apt-get, as root).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def boot(runs, contenders, timeouts, json_path, plot_path, setup, quiet) -> None:
    """Run "print a line and exit" as a VM, a container, a namespaced process and a process."""
    import json

    from vmm.bench.boot import ALL_CONTENDERS, make_contenders, run_bench
    from vmm.bench.boot import setup as do_setup
    from vmm.bench.report import format_table, plot
    from vmm.errors import UsageError

    def progress(line: str) -> None:
        if not quiet:
            click.echo(f"bench: {line}", err=True)

    names = list(ALL_CONTENDERS) if contenders == "all" else [n.strip() for n in contenders.split(",") if n.strip()]
    overrides = {}
    for item in timeouts:
        name, _, seconds = item.partition("=")
        try:
            overrides[name] = float(seconds)
        except ValueError:
            raise UsageError(f"--timeout {item!r}: NAME=SECONDS") from None
    try:
        chosen = make_contenders(names, overrides)
    except ValueError as e:
        raise UsageError(f"--contenders: {e}") from None
    if setup:
        for problem in do_setup(progress):
            progress(f"set-up: {problem}")
    report = run_bench(chosen, runs=runs, progress=progress)
    click.echo(format_table(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if plot_path:
        try:
            plot(report, plot_path)
        except ImportError:
            click.echo("vmm: --plot needs matplotlib (pip install 'vmm[plot]'): no chart written", err=True)
