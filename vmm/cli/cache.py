"""`vmm cache`: see and empty the snapshot cache (warm starts, container bases, image bases)."""

from __future__ import annotations

import time

import click


@click.group()
def cache() -> None:
    """The snapshots vmm keeps to start guests warm (capped by VMM_CACHE_MAX, default 512M)."""


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


@cache.command()
def ls() -> None:
    """List the cached snapshots, least recently used first."""
    from vmm.snapshot import cache as snapshots

    entries = snapshots.entries()
    now = time.time()
    for entry in entries:
        age = now - entry.last_used
        used = f"{age / 3600:.1f} h ago" if age >= 3600 else f"{age / 60:.0f} min ago"
        click.echo(f"{entry.path.name:26} {entry.kind:10} {_mib(entry.size):>10}  used {used}"
                   + ("  (in use)" if entry.in_use else ""))
    total = sum(e.size for e in entries)
    click.echo(f"{len(entries)} snapshot(s), {_mib(total)} of {_mib(snapshots.cache_max())} "
               f"(VMM_CACHE_MAX) in {snapshots.snapshot_cache_dir()}")


@cache.command()
@click.option("--all", "everything", is_flag=True, help="Remove every snapshot not in use.")
def prune(everything: bool) -> None:
    """Remove the least recently used snapshots down to VMM_CACHE_MAX (--all: every one)."""
    from vmm.snapshot import cache as snapshots

    removed = snapshots.prune(0 if everything else None)
    left = snapshots.entries()
    click.echo(f"removed {len(removed)} snapshot(s); {len(left)} left, "
               f"{_mib(sum(e.size for e in left))}"
               + (f" ({sum(e.in_use for e in left)} in use)" if any(e.in_use for e in left) else ""))
