"""`vmm kernel`: build and locate our guest kernel."""

from __future__ import annotations

import click


@click.group()
def kernel() -> None:
    """Our guest Linux kernel (guest-kernel/): build it, show where it is."""


@kernel.command()
def build() -> None:
    """Build the guest kernel (or reuse the cached build) and print its files."""
    from vmm.images.kernel import build_kernel

    artifacts = build_kernel(lambda line: click.echo(line, err=True))
    _show(artifacts)


@kernel.command()
@click.option("--vmlinux", "only", flag_value="vmlinux",
              help="Print only vmlinux's path (for `gdb $(vmm kernel path --vmlinux)`).")
@click.option("--bzimage", "only", flag_value="bzimage", help="Print only the bzImage's path.")
@click.option("--system-map", "only", flag_value="system_map", help="Print only System.map's path.")
def path(only: str | None) -> None:
    """Print the cached kernel's files; exit 1 if it is not built yet."""
    from vmm.images.kernel import cached_kernel

    artifacts = cached_kernel()
    if artifacts is None:
        click.echo("vmm: the guest kernel is not built yet: run 'vmm kernel build'", err=True)
        raise SystemExit(1)
    if only:
        click.echo(getattr(artifacts, only))
    else:
        _show(artifacts)


def _show(artifacts) -> None:
    click.echo(f"release:    {artifacts.release}")
    click.echo(f"bzImage:    {artifacts.bzimage}")
    click.echo(f"vmlinux:    {artifacts.vmlinux}")
    click.echo(f"System.map: {artifacts.system_map}")
    click.echo(f"config:     {artifacts.config}")
