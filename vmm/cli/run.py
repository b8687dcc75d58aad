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
@click.option("--mem", default=None, metavar="SIZE", help="Guest RAM, e.g. 512M, 2G [default: 128M; 2M for firmware].")
@click.option("--cpus", default=1, type=int, show_default=True, help="Number of vCPUs.")
@click.option("--disk", "disks", multiple=True, metavar="PATH[,ro][,serial=ID]",
              help="A raw disk image as virtio-blk (/dev/vda, /dev/vdb, ... in order).")
@click.option("--root", metavar="DEV", help="Run the command inside this disk's file system (e.g. /dev/vda).")
@click.option("--virtio-notify", default="ioeventfd", show_default=True,
              metavar="ioeventfd|exit[,...]",
              help="virtio queue notifications: ioeventfd + an I/O thread (and irqfd interrupts), or "
                   "MMIO exits handled in the vCPU thread; a list: one per --disk. docs/virtio.md has the "
                   "measurements.")
@click.option("--runloop", type=click.Choice(["c", "python"]), default="c", show_default=True,
              help="The vCPU loop: C (fast) or pure Python (readable).")
@click.option("--trace", is_flag=True, help="Print one line per exit to stderr.")
@click.option("--stats", is_flag=True, help="Print exit counts and timings at the end.")
@click.option("--timeout", type=float, default=None, metavar="SECONDS", help="Stop the guest after this long (status 124).")
@click.option("--console-log", is_flag=True, help="Show the guest kernel's log, not only the command's output.")
@click.option("--profile", is_flag=False, flag_value="100", default=None, metavar="[=HZ]",
              help="Sample the guest's RIP (default 100 Hz) and print the hottest functions at exit.")
@click.option("--profile-out", metavar="FILE", help="With --profile: write folded stacks (flame graphs).")
@click.option("--symbols", metavar="FILE", help="With --profile: System.map of a --kernel of your own.")
@click.option("--initcalls", is_flag=True,
              help="Boot with initcall_debug and print the slowest initcalls at exit (shows the kernel log).")
@click.option("--boot-timer", is_flag=True,
              help="Print Guest-boot-time (process start to guest /init) and the phases to stderr.")
@click.option("--metrics", metavar="FILE",
              help="Write the phases, exit counts, memory and host facts as JSON (vmm/bench/phases.py).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(firmware, kernel, initrd, cmdline, mem, cpus, disks, root, virtio_notify, runloop, trace,
        stats, timeout,
        console_log, profile, profile_out, symbols, initcalls, boot_timer, metrics, command) -> None:
    """Boot a VM. With -- COMMAND..., run it in the guest and exit with its status."""
    from vmm.config import DiskConfig, VmConfig, parse_size

    mem_bytes = parse_size(mem) if mem else (2 << 20 if firmware else VmConfig.mem)
    profile_options = None
    if profile is not None or profile_out or symbols:
        from vmm.errors import UsageError
        from vmm.profiler import ProfileOptions, parse_hz

        try:
            profile_options = ProfileOptions(hz=parse_hz(profile), out=profile_out, symbols=symbols)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if firmware and (profile_options or initcalls):
        from vmm.errors import UsageError

        raise UsageError("--profile/--initcalls: only for Linux guests, not --firmware")
    if initcalls:  # the timings come through the kernel log: show it, at debug level
        cmdline, console_log = f"{cmdline} initcall_debug loglevel=8".strip(), True
    disk_configs = tuple(DiskConfig.parse(d) for d in disks)
    if root:
        cmdline = f"{cmdline} vmm.root={root}".strip()
        if _root_disk_is_read_only(root, disk_configs):
            cmdline += " ro"  # our /init (and the kernel, for a root it mounts) mount it read-only
    config = VmConfig(
        mem=mem_bytes, cpus=cpus, firmware=firmware, kernel=kernel, initrd=initrd,
        cmdline=cmdline, command=tuple(command),
        disks=disk_configs,
        virtio_notify=virtio_notify, runloop=runloop, trace=trace, stats=stats, timeout=timeout,
        console_log=console_log,
        interactive=not command and sys.stdin.isatty(),
    )
    recorder = None
    if boot_timer or metrics:
        from vmm.bench.phases import PhaseRecorder
        from vmm.cli import START_NS

        recorder = PhaseRecorder(config, boot_timer=boot_timer, metrics_path=metrics, cli_start=START_NS)
    if firmware:
        from vmm.session import run_firmware

        result = run_firmware(config)
    else:
        import vmm.builder  # noqa: F401 (the KVM bindings: counted in imports_done)
        from vmm.session import run_linux

        if recorder is not None:
            recorder.mark("imports_done")
        result = run_linux(config, recorder=recorder, profile=profile_options, initcalls=initcalls)
    if recorder is not None:
        recorder.finish(result)
    sys.exit(result.status)


def _root_disk_is_read_only(root: str, disks) -> bool:
    """--root /dev/vdX names the X-th --disk (virtio-blk devices are probed in order)."""
    import re

    match = re.fullmatch(r"/dev/vd([a-z])", root)
    if not match:
        return False
    index = ord(match.group(1)) - ord("a")
    return index < len(disks) and disks[index].read_only
