"""`vmm snapshot`: save a booted guest to a directory, and look inside one."""

from __future__ import annotations

import sys

import click

from vmm.cli.run import build_config, machine_options


@click.group()
def snapshot() -> None:
    """Snapshots: a VM saved at /init's ready point, restored by vmm run --restore DIR."""


@snapshot.command()
@click.argument("directory", type=click.Path(file_okay=False))
@machine_options
def create(directory, kernel, initrd, cmdline, mem, cpus, disks, nets, root, virtio_notify,
           runloop, trace, stats, timeout, console_log, acpi, no_reboot, stop_timeout,
           pvm_time_scale, decompress) -> None:
    """Boot a guest to its ready point and save it in DIRECTORY (new or empty).

    The guest's /init waits there for a command: `vmm run --restore DIRECTORY
    -- COMMAND...` starts from it, as many times as you like.
    """
    import time
    from pathlib import Path

    from vmm.errors import SnapshotError, UsageError
    from vmm.outcome import StopReason
    from vmm.session import SaveAtReady, run_linux
    from vmm.snapshot.save import check_target

    if initrd is not None:
        raise UsageError(f"--initrd {initrd}: a snapshot is saved at the ready point of "
                         "vmm's /init, which --initrd replaces")
    target = Path(directory)
    check_target(target)  # now, not after the boot
    if any(n != "none" for n in nets):
        raise SnapshotError("--net: a VM with a NIC cannot be saved yet (its TAP device is "
                            "outside the VM)")
    config = build_config(kernel=kernel, initrd=initrd, cmdline=cmdline, mem=mem, cpus=cpus,
                          disks=disks, root=root, virtio_notify=virtio_notify, runloop=runloop,
                          trace=trace, stats=stats, timeout=timeout, console_log=console_log,
                          acpi=acpi, decompress=decompress, pvm_time_scale=pvm_time_scale)
    from vmm.loader.files import check_guest_files

    check_guest_files(config)  # as `vmm run` checks them
    start = time.monotonic()
    result = run_linux(config, start=SaveAtReady(target))
    if result.outcome.reason is not StopReason.SNAPSHOT_SAVED:
        raise SnapshotError(
            f"the guest stopped before /init's ready point ({result.outcome.reason}"
            + (f": {result.outcome.detail}" if result.outcome.detail else "")
            + "): a snapshot needs vmm's /init (the default initramfs)")
    click.echo(f"{result.outcome.detail} (boot and save: {time.monotonic() - start:.1f} s)")
    sys.exit(0)


@snapshot.command()
@click.argument("directory", type=click.Path(file_okay=False))
def show(directory) -> None:
    """Print what a snapshot holds, section by section (docs/snapshots.md explains each)."""
    from pathlib import Path

    from vmm.snapshot.restore import load_snapshot
    from vmm.snapshot.show import describe

    click.echo(describe(load_snapshot(Path(directory)), Path(directory)))
