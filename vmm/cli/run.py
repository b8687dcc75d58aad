"""`vmm run`: boot a guest (our firmware, or Linux) and exit with its status."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--firmware", metavar="NAME|PATH",
              help="Run one of our payloads (hello, longmode, exitbench, fail) or a raw binary.")
@click.option("--kernel", metavar="PATH", help="bzImage or vmlinux (default: our guest kernel).")
@click.option("--initrd", metavar="PATH|none", help="initramfs (default: ours; 'none' for no initrd).")
@click.option("--cmdline", default="", metavar="ARGS", help="Extra kernel command-line arguments.")
@click.option("--mem", default=None, metavar="SIZE", help="Guest RAM, e.g. 512M, 2G [default: 512M; 2M for firmware].")
@click.option("--cpus", default=1, type=int, show_default=True, help="Number of vCPUs.")
@click.option("--disk", "disks", multiple=True, metavar="PATH[,ro][,serial=ID]",
              help="A raw disk image as virtio-blk (/dev/vda, /dev/vdb, ... in order).")
@click.option("--runloop", type=click.Choice(["c", "python"]), default="c", show_default=True,
              help="The vCPU loop: C (fast) or pure Python (readable).")
@click.option("--trace", is_flag=True, help="Print one line per exit to stderr.")
@click.option("--stats", is_flag=True, help="Print exit counts and timings at the end.")
@click.option("--timeout", type=float, default=None, metavar="SECONDS", help="Stop the guest after this long (status 124).")
@click.option("--console-log", is_flag=True, help="Show the guest kernel's log, not only the command's output.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(firmware, kernel, initrd, cmdline, mem, cpus, disks, runloop, trace, stats, timeout,
        console_log, command) -> None:
    """Boot a VM. With -- COMMAND..., run it in the guest and exit with its status."""
    from vmm.config import DiskConfig, VmConfig, parse_size

    mem_bytes = parse_size(mem) if mem else (2 << 20 if firmware else 512 << 20)
    config = VmConfig(
        mem=mem_bytes, cpus=cpus, firmware=firmware, kernel=kernel, initrd=initrd,
        cmdline=cmdline, command=tuple(command),
        disks=tuple(DiskConfig.parse(d) for d in disks),
        runloop=runloop, trace=trace, stats=stats, timeout=timeout, console_log=console_log,
        interactive=not command and sys.stdin.isatty(),
    )
    if firmware:
        from vmm.session import run_firmware

        result = run_firmware(config)
    else:
        from vmm.session import run_linux

        result = run_linux(config)
    sys.exit(result.status)
