"""`vmm run`: boot a guest (our firmware, or Linux) and exit with its status.

A Linux guest starts warm by default: from a snapshot of the same guest in
the cache (made on its first run), or from ``--restore DIR``; ``--cold``
boots it from scratch (vmm/snapshot/cache.py says what "the same" means).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

# Options that shape a Linux VM: `vmm run` and `vmm snapshot create` take the same.
MACHINE_OPTIONS = [
    click.option("--kernel", metavar="PATH", help="bzImage or vmlinux (default: our guest kernel)."),
    click.option("--initrd", metavar="PATH|none",
                 help="initramfs (default: ours; 'none' for no initrd). Its own /init "
                      "runs: no -- COMMAND, the VM is a machine (see --stop-timeout)."),
    click.option("--cmdline", default="", metavar="ARGS", help="Extra kernel command-line arguments."),
    click.option("--mem", default=None, metavar="SIZE",
                 help="Guest RAM, e.g. 512M, 2G [default: 128M; 2M for firmware]."),
    click.option("--cpus", default=None, type=int, help="Number of vCPUs [default: 1]."),
    click.option("--disk", "disks", multiple=True, metavar="PATH[,ro][,serial=ID]",
                 help="A raw disk image as virtio-blk (/dev/vda, /dev/vdb, ... in order)."),
    click.option("--net", "nets", multiple=True,
                 metavar="none|user[,hostfwd=tcp:H:G]|tap[=NAME][,ip=A/P][,gw=A][,dns=A][,mac=M]",
                 help="A virtio-net NIC (repeatable; eth0, eth1...): user-mode networking through "
                      "passt (10.0.2.15, gateway 10.0.2.2 = the host's loopback, DNS 10.0.2.3), or a TAP device "
                      "(ip=/gw=/dns= configure the guest; no NAME: the kernel names it vmmtapN); "
                      "offload=off: no checksum or segmentation offloads."),
    click.option("--root", metavar="DEV",
                 help="Run the command inside this disk's file system (e.g. /dev/vda)."),
    click.option("--virtio-notify", default="ioeventfd", show_default=True,
                 metavar="ioeventfd|exit[,...]",
                 help="virtio queue notifications: ioeventfd + an I/O thread (and irqfd interrupts), "
                      "or MMIO exits handled in the vCPU thread; a list: one per --disk. "
                      "docs/virtio.md has the measurements."),
    click.option("--runloop", type=click.Choice(["c", "python"]), default="c", show_default=True,
                 help="The vCPU loop: C (fast) or pure Python (readable)."),
    click.option("--trace", is_flag=True, help="Print one line per exit to stderr."),
    click.option("--stats", is_flag=True, help="Print exit counts and timings at the end."),
    click.option("--timeout", type=float, default=None, metavar="SECONDS",
                 help="Stop the guest after this long (status 124)."),
    click.option("--console-log", is_flag=True,
                 help="Show the guest kernel's log, not only the command's output."),
    click.option("--acpi", type=click.Choice(["on", "off"]), default=None,
                 help="ACPI tables for the guest [default: on for a --kernel not ours, which "
                      "finds its virtio devices only through them; off for ours]."),
    click.option("--no-reboot", is_flag=True,
                 help="With the guest's own init (--initrd): a reboot ends vmm with status 0 "
                      "instead of restarting the VM."),
    click.option("--stop-timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                 help="With the guest's own init: SIGTERM presses the ACPI power button and "
                      "waits this long for the power-off before stopping the VM (status 143) "
                      "[default: 60]."),
    click.option("--pvm-time-scale", type=click.IntRange(1, 16), default=1, metavar="N",
                 help="PVM only: tell the guest its TSC runs N times faster than it does, so its "
                      "clocks run N times slower and its timer ticks N times less often (the "
                      "tick is most of a distribution kernel's emulated boot; its date then "
                      "falls behind) [default: 1]."),
    click.option("--decompress/--no-decompress", default=True,
                 help="Decompress a bzImage's kernel and a compressed initrd on the host (the "
                      "guest's own decompressor is emulated on PVM) [default: on]."),
]


def machine_options(function):
    for option in reversed(MACHINE_OPTIONS):
        function = option(function)
    return function


def build_config(*, firmware=None, kernel=None, initrd=None, cmdline="", mem=None, cpus=None,
                 disks=(), nets=(), root=None, virtio_notify="ioeventfd", runloop="c", trace=False,
                 stats=False, timeout=None, console_log=False, command=(), acpi=None,
                 decompress=True, no_reboot=False, stop_timeout=None, pvm_time_scale=1):
    """The VmConfig the options describe (validated: bad input raises UsageError)."""
    from vmm.config import DEFAULT_STOP_TIMEOUT, DiskConfig, NetConfig, VmConfig, parse_size
    from vmm.errors import UsageError

    mem_bytes = parse_size(mem) if mem else (2 << 20 if firmware else VmConfig.mem)
    disk_configs = tuple(DiskConfig.parse(d) for d in disks)
    if root and initrd is not None:
        raise UsageError(f"--root {root}: vmm's /init mounts it, and --initrd replaces that init "
                         "(the kernel mounts the root the command line names: root=DEV)")
    if root:
        cmdline = f"{cmdline} vmm.root={root}".strip()
        if _root_disk_is_read_only(root, disk_configs):
            cmdline += " ro"  # our /init (and the kernel, for a root it mounts) mount it read-only
    return VmConfig(
        mem=mem_bytes, cpus=cpus if cpus is not None else 1, firmware=firmware, kernel=kernel,
        initrd=initrd, cmdline=cmdline, command=tuple(command), disks=disk_configs,
        nets=tuple(n for n in (NetConfig.parse(text) for text in nets) if n is not None),
        virtio_notify=virtio_notify, runloop=runloop, trace=trace, stats=stats, timeout=timeout,
        console_log=console_log, interactive=not command and sys.stdin.isatty(),
        acpi=_acpi_for(acpi, kernel), decompress=decompress, reboot=not no_reboot,
        stop_timeout=DEFAULT_STOP_TIMEOUT if stop_timeout is None else stop_timeout,
        pvm_time_scale=pvm_time_scale,
    )


def _acpi_for(choice: str | None, kernel: str | None) -> bool | None:
    """--acpi on|off; by default on for a kernel that is not ours (a --kernel naming our
    own build is ours: it finds its devices on the command line)."""
    if choice is not None:
        return choice == "on"
    if kernel is None:
        return False
    from vmm.images.kernel import cached_kernel

    ours = cached_kernel()
    resolved = Path(kernel).resolve()
    return not (ours and resolved in (Path(ours.bzimage).resolve(), Path(ours.vmlinux).resolve()))


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--firmware", metavar="NAME|PATH",
              help="Run one of our payloads (hello, longmode, exitbench, fail) or a raw binary.")
@click.option("--exits", type=click.IntRange(1, 0xFFFFFFFF), default=None, metavar="N",
              help="With --firmware exitbench: how many exits it makes [default: 100000].")
@machine_options
@click.option("--restore", metavar="DIR",
              help="Start from this snapshot (vmm snapshot create) instead of booting.")
@click.option("--cold", is_flag=True,
              help="Boot from scratch instead of restoring the cached snapshot of this guest.")
@click.option("--profile", is_flag=False, flag_value="100", default=None, metavar="[=HZ]",
              help="Sample the guest's RIP (default 100 Hz) and print the hottest functions at exit.")
@click.option("--profile-out", metavar="FILE", help="With --profile: write folded stacks (flame graphs).")
@click.option("--symbols", metavar="FILE", help="With --profile: System.map of a --kernel of your own.")
@click.option("--initcalls", is_flag=True,
              help="Boot with initcall_debug and print the slowest initcalls at exit (shows the kernel "
                   "log; implies --cold).")
@click.option("--gdb", "gdb", metavar="[HOST:]PORT",
              help="Serve GDB's remote protocol there (default host 127.0.0.1): the VM starts "
                   "stopped before its first instruction; a Linux guest boots cold.")
@click.option("--boot-timer", is_flag=True,
              help="Print Guest-boot-time (process start to guest /init) and the phases to stderr.")
@click.option("--metrics", metavar="FILE",
              help="Write the phases, exit counts, memory and host facts as JSON (vmm/bench/phases.py).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(firmware, exits, kernel, initrd, cmdline, mem, cpus, disks, nets, root, virtio_notify, runloop, trace,
        stats, timeout, console_log, acpi, no_reboot, stop_timeout, pvm_time_scale, decompress, restore, cold,
        profile, profile_out, symbols,
        initcalls,
        gdb, boot_timer, metrics, command) -> None:
    """Boot a VM. With -- COMMAND..., run it in the guest and exit with its status.

    A Linux guest starts from a snapshot of itself when vmm has one (the first
    run of a guest boots it and saves one: ~/.cache/vmm/snapshots).

    With --initrd the guest's own init runs (a distribution's initramfs): the VM
    is a machine, with no command; its console is the terminal, and vmm exits
    when it powers off (0). SIGTERM presses its ACPI power button.
    """
    from vmm.errors import UsageError

    profile_options = None
    if profile is not None or profile_out or symbols:
        from vmm.profiler import ProfileOptions, parse_hz

        try:
            profile_options = ProfileOptions(hz=parse_hz(profile), out=profile_out, symbols=symbols)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if exits is not None and firmware != "exitbench":
        raise UsageError("--exits N: only with --firmware exitbench (the payload that counts them)")
    if firmware and (profile_options or initcalls or restore):
        raise UsageError("--profile/--initcalls/--restore: only for Linux guests, not --firmware")
    if restore and any(n != "none" for n in nets):
        raise UsageError("--net with --restore: a VM with a NIC starts from the snapshot that "
                         "the same `vmm run --net ...` saved (its warm start), not from --restore")
    if restore and (cold or kernel or initrd or cmdline or root or console_log or initcalls):
        raise UsageError("--restore: the snapshot fixes the kernel, initrd and command line "
                         "(no --cold, --kernel, --initrd, --cmdline, --root, --console-log, --initcalls)")
    if initcalls:  # the timings come through the kernel log: show it, at debug level
        cmdline, console_log, cold = f"{cmdline} initcall_debug loglevel=8".strip(), True, True
    gdb_address = None
    if gdb is not None:
        from vmm.gdb.stub import parse_address

        try:
            gdb_address = parse_address(gdb)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if restore:
            raise UsageError("--gdb starts the guest at its first instruction: not with --restore")
    config = build_config(
        firmware=firmware, kernel=kernel, initrd=initrd, cmdline=cmdline, mem=mem, cpus=cpus,
        disks=disks, nets=nets, root=root, virtio_notify=virtio_notify, runloop=runloop, trace=trace,
        stats=stats, timeout=timeout, console_log=console_log, command=command, acpi=acpi,
        decompress=decompress, no_reboot=no_reboot, stop_timeout=stop_timeout,
        pvm_time_scale=pvm_time_scale)
    recorder = None
    if boot_timer or metrics:
        from vmm.bench.phases import PhaseRecorder
        from vmm.cli import START_NS

        recorder = PhaseRecorder(config, boot_timer=boot_timer, metrics_path=metrics, cli_start=START_NS)
    if firmware:
        from vmm.session import run_firmware

        result = run_firmware(config, gdb=gdb_address, bench_count=exits or 0)
    else:
        import vmm.builder  # noqa: F401 (the KVM bindings: counted in imports_done)
        from vmm.session import run_linux_guest

        if recorder is not None:
            recorder.mark("imports_done")
        result = run_linux_guest(
            config, restore=restore, cold=cold,
            given={"mem": mem is not None, "cpus": cpus is not None, "disks": bool(disks)},
            recorder=recorder, profile=profile_options, initcalls=initcalls, gdb=gdb_address)
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
