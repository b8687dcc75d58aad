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
              help="Which to run: vmm, vmm-snapshot, vmm-bzimage, vmm-net-user, qemu-kvm, qemu-tcg, "
              "ctr-vmm, ctr-runc, runc, runc-netns, unshare, process, or all.")
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
    from vmm.errors import UsageError, VmmError

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
    # Outputs asked for are checked before the benchmark spends minutes running.
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path:
            _check_writable(option, path)
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'vmm[plot]' "
                             "(the README's set-up installs it)") from None
    if setup:
        for problem in do_setup(progress):
            progress(f"set-up: {problem}")
    report = run_bench(chosen, runs=runs, progress=progress)
    click.echo(format_table(report))
    try:
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
        if plot_path:
            plot(report, plot_path)
    except OSError as e:
        raise VmmError(f"{e.filename}: cannot write: {e.strerror}") from None


def _check_writable(option: str, path: str) -> None:
    """One clear line now, not after the benchmark: can ``path`` be created or overwritten?"""
    import os

    from vmm.errors import UsageError

    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write: {e.strerror}") from None
    if not existed:
        os.unlink(path)
