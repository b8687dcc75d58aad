"""The phases of one `vmm run`, from process start to VMM exit: `--boot-timer`, `--metrics FILE`.

Every phase is a CLOCK_MONOTONIC timestamp in nanoseconds (``time.monotonic_ns()``),
one clock for the whole machine, so a parent process (``vmm bench boot``) can put
its own timestamps beside ours. In the order they happen::

    process_start   the kernel created our process (before the Python interpreter)
    cli_start       first line of vmm.cli ran (interpreter up, site imports done)
    imports_done    the VMM's modules are imported (KVM bindings included), options parsed
    loaded          kernel and initrd read and copied into guest RAM (builder)
    kvm_ready       VM, memory, irqchip, PIT, devices and vCPUs created (builder)
    first_kvm_run   the first KVM_RUN ioctl (runner)
    init_reached    the guest's /init wrote 1 to the boot-timer port
    first_output    the first byte on the guest's serial console (with a quiet kernel, the
                    command's own output; with --console-log, the kernel's first line)
    command_done    /init wrote 2 to the boot-timer port (the command has exited)
    guest_finished  the run loop returned (the guest wrote its status to the exit port)
    vmm_exited      VM closed, guest memory unmapped, metrics measured; only exit() is left

``process_start`` comes from the parent when it says so (``VMM_SPAWN_NS`` in the
environment: its monotonic clock just before fork/exec, what ``vmm bench boot``
does), else from ``/proc/self/stat`` (the kernel's start time of this process,
in clock ticks: 10 ms resolution at USER_HZ=100).

The boot-time figure (``Guest-boot-time``, as Firecracker's boot-timer device
logs it) is ``init_reached - process_start``: from "run this VM" to the guest's
userspace, everything included.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from vmm.kvm.flavour import cpu_model

#: The order phases happen in on a normal run (a phase may be missing: a guest
#: that never reaches init has no init_reached).
PHASES = (
    "process_start",
    "cli_start",
    "imports_done",
    "loaded",
    "kvm_ready",
    "first_kvm_run",
    "init_reached",
    "first_output",
    "command_done",
    "guest_finished",
    "vmm_exited",
)

#: A run restored from a snapshot has no boot: its state is loaded instead, and
#: a run that boots and saves one (the warm start's first run) marks when it was
#: saved. Every phase that can happen, in the order they happen.
ALL_PHASES = (
    "process_start",
    "cli_start",
    "imports_done",
    "state_loaded",
    "loaded",
    "kvm_ready",
    "first_kvm_run",
    "init_reached",
    "snapshot_saved",
    "first_output",
    "command_done",
    "guest_finished",
    "vmm_exited",
)

#: What each phase boundary means, for tables, charts and docs.
DESCRIPTIONS = {
    "process_start": "process created (fork/exec)",
    "cli_start": "Python interpreter started, vmm.cli running",
    "imports_done": "vmm modules and KVM bindings imported",
    "loaded": "kernel + initrd read and loaded into guest RAM",
    "state_loaded": "snapshot state read and checked (restore)",
    "kvm_ready": "VM, irqchip, devices and vCPUs created (and restored)",
    "snapshot_saved": "VM saved at /init's ready point",
    "first_kvm_run": "first KVM_RUN",
    "init_reached": "guest /init started (boot timer 1)",
    "first_output": "first serial byte",
    "command_done": "command exited (boot timer 2)",
    "guest_finished": "guest wrote its exit status",
    "vmm_exited": "VM torn down, VMM exiting",
}

SPAWN_ENV = "VMM_SPAWN_NS"
SCHEMA = "vmm-run-metrics/1"


# --- process start -------------------------------------------------------------------

def proc_start_ns(stat_text: str | None = None) -> int | None:
    """This process's start on CLOCK_MONOTONIC, from /proc/self/stat (None if unreadable).

    Field 22 (starttime) counts clock ticks since boot on CLOCK_BOOTTIME; the
    difference BOOTTIME - MONOTONIC is the time spent suspended, subtracted here.
    """
    try:
        text = stat_text if stat_text is not None else Path("/proc/self/stat").read_text()
        # comm (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = text[text.rindex(")") + 2:].split()
        ticks = int(fields[19])  # field 22 overall: fields 3.. start at index 0
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    suspended = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    return ticks * 1_000_000_000 // hz - suspended


def process_start(cli_start: int | None = None) -> tuple[int | None, str]:
    """(process start in monotonic ns, where it came from)."""
    from_proc = proc_start_ns()
    spawn = os.environ.get(SPAWN_ENV)
    if spawn:
        try:
            value = int(spawn)
        except ValueError:
            value = None
        # Trust the parent only if it is plausible: before us, and near what /proc says.
        if value is not None and (cli_start is None or value <= cli_start) and (
                from_proc is None or abs(value - from_proc) < 1_000_000_000):
            return value, f"parent's clock before exec ({SPAWN_ENV})"
    if from_proc is not None:
        return from_proc, "/proc/self/stat starttime (clock-tick resolution)"
    return cli_start, "vmm.cli start (interpreter start not included)"


# --- host and guest facts -------------------------------------------------------------

def host_facts() -> dict[str, Any]:
    """The machine a figure was measured on (printed with every benchmark)."""
    from vmm.kvm.flavour import DESCRIPTIONS as FLAVOURS
    from vmm.kvm.flavour import detect_flavour

    flavour = detect_flavour()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "host_kernel": platform.release(),
        "kvm_flavour": flavour,
        "kvm_description": FLAVOURS.get(flavour, flavour),
        "python": platform.python_version(),
        "load_average_1min": load,
    }


def machine_line(host: dict[str, Any]) -> str:
    """One line naming the machine, for tables and chart titles."""
    return (f"{host.get('cpu_model')}, {host.get('cores')} cores, Linux {host.get('host_kernel')}, "
            f"KVM flavour: {host.get('kvm_flavour')}")


def _kernel_release_from_image(path: Path) -> str | None:
    """'6.1.192' from a vmlinux's or bzImage's "Linux version ..." string (None if absent)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if data[0x202:0x206] == b"HdrS":  # bzImage: kernel_version points into the setup code
        offset = int.from_bytes(data[0x20E:0x210], "little") + 0x200
        text = data[offset:offset + 256].split(b"\0")[0].decode(errors="replace")
        return text.split()[0] if text else None
    marker = data.find(b"Linux version ")
    if marker < 0:
        return None
    return data[marker + 14:marker + 80].split()[0].decode(errors="replace")


def guest_facts(kernel_path: str | os.PathLike | None, kernel_format: str | None = None,
                mem: int = 0, cpus: int = 0) -> dict[str, Any]:
    """The guest kernel (release, config hash), RAM and vCPUs."""
    facts: dict[str, Any] = {"kernel": str(kernel_path) if kernel_path else None,
                             "kernel_format": kernel_format, "ram_bytes": mem, "vcpus": cpus,
                             "kernel_release": None, "kernel_config_sha256": None}
    if not kernel_path:
        return facts
    path = Path(kernel_path)
    version = path.with_name("version")  # our cache layout: version and config beside the image
    config = path.with_name("config")
    try:
        facts["kernel_release"] = version.read_text().strip() if version.is_file() else None
    except OSError:
        pass
    if not facts["kernel_release"]:
        facts["kernel_release"] = _kernel_release_from_image(path)
    try:
        if config.is_file():
            facts["kernel_config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
    except OSError:
        pass
    return facts


# --- memory ---------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- the recorder ---------------------------------------------------------------------

def relative_ms(phases: dict[str, int], start: int | None = None) -> dict[str, float]:
    """Phases in ms after process_start, in PHASES order (then any others)."""
    base = start if start is not None else phases.get("process_start") or min(phases.values())
    names = [n for n in ALL_PHASES if phases.get(n)] + sorted(
        n for n in phases if n not in ALL_PHASES and phases[n])
    return {n: round((phases[n] - base) / 1e6, 3) for n in names}


def boot_time_us(phases: dict[str, int]) -> int | None:
    """process_start → init_reached, in µs (Firecracker's Guest-boot-time)."""
    if phases.get("process_start") and phases.get("init_reached"):
        return (phases["init_reached"] - phases["process_start"]) // 1000
    return None


class PhaseRecorder:
    """Collects one run's phases and facts; prints the summary line and writes the JSON.

    The CLI creates it when --boot-timer or --metrics is given; session.run_linux
    calls :meth:`before_close` while the VM still exists (to count the guest
    pages the host backed); the CLI calls :meth:`finish` after the VM is closed.
    """

    def __init__(self, config, *, boot_timer: bool = False, metrics_path: str | None = None,
                 cli_start: int | None = None) -> None:
        self.config = config
        self.boot_timer = boot_timer
        self.metrics_path = metrics_path
        self.phases: dict[str, int] = {}
        start, self.start_source = process_start(cli_start)
        if start:
            self.phases["process_start"] = start
        if cli_start:
            self.phases["cli_start"] = cli_start
        self.guest_touched: int | None = None
        self.rss_before_close: int | None = None
        self.guest: dict[str, Any] = {}

    def mark(self, name: str, when: int | None = None) -> None:
        self.phases[name] = when if when is not None else time.monotonic_ns()

    def before_close(self, machine, guest=None) -> None:
        """While the VM exists: guest RAM the host really backed, the guest's facts."""
        try:
            self.guest_touched = machine.memory.mapped_bytes()
        except Exception:  # a measurement must never break the run
            self.guest_touched = None
        self.rss_before_close = _current_rss()
        if guest is not None:
            self.guest = {"kernel_path": str(guest.kernel_path),
                          "kernel_format": getattr(guest.entry, "kernel_format", None),
                          "cmdline": guest.cmdline}

    def finish(self, result, stderr=None) -> dict[str, Any]:
        """After the VM is closed: mark vmm_exited, print/write what was asked. Returns the metrics."""
        for name, value in (result.phases or {}).items():
            if value:
                self.phases.setdefault(name, value)
        self.mark("vmm_exited")
        metrics = self.metrics(result)
        if self.boot_timer:
            print(summary_text(metrics), file=stderr or sys.stderr, flush=True)
        if self.metrics_path:
            tmp = f"{self.metrics_path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(metrics, f, indent=2)
                f.write("\n")
            os.replace(tmp, self.metrics_path)
        return metrics

    def metrics(self, result) -> dict[str, Any]:
        config = self.config
        peak = peak_rss_bytes()
        overhead = peak - self.guest_touched if self.guest_touched is not None else None
        kernel = self.guest.get("kernel_path") or config.kernel
        if not kernel and not config.firmware:
            try:
                from vmm.images.kernel import cached_kernel

                artifacts = cached_kernel()
                kernel = str(artifacts.vmlinux) if artifacts else None
            except Exception:
                kernel = None
        outcome = result.outcome
        return {
            "schema": SCHEMA,
            "status": result.status,
            "start": getattr(result, "start", "cold"),  # cold, restored, or cold+saved
            "outcome": {"reason": outcome.reason, "detail": outcome.detail},
            "command": list(config.command),
            "process_start_source": self.start_source,
            "guest_boot_time_us": boot_time_us(self.phases),
            "phases_ms": relative_ms(self.phases),
            "phases_ns": {n: self.phases[n] for n in relative_ms(self.phases)},
            "exits": result.stats.as_dict(),
            "devices": getattr(result, "devices", {}),  # each virtio transport's counters
            "memory": {
                "peak_rss_bytes": peak,
                "rss_before_close_bytes": self.rss_before_close,
                "guest_ram_bytes": config.mem,
                "guest_touched_bytes": self.guest_touched,
                "vmm_overhead_bytes": overhead,
            },
            "host": host_facts(),
            "guest": guest_facts(kernel, self.guest.get("kernel_format"), config.mem, config.cpus)
            | ({"cmdline": self.guest["cmdline"]} if self.guest.get("cmdline") else {}),
        }


def _current_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def summary_text(metrics: dict[str, Any]) -> str:
    """`Guest-boot-time = N us` and the phase breakdown (what --boot-timer prints)."""
    boot = metrics.get("guest_boot_time_us")
    phases = metrics["phases_ms"]
    if metrics.get("start") == "restored":
        lines = [f"Restored from a snapshot: first KVM_RUN {phases.get('first_kvm_run', 0):.1f} ms, "
                 f"command done {phases.get('command_done', 0):.1f} ms after process start"]
    else:
        lines = [f"Guest-boot-time = {boot} us" if boot is not None
                 else "Guest-boot-time = unknown (the guest never reached init)"]
    previous = 0.0
    for name, ms in metrics["phases_ms"].items():
        lines.append(f"  {name:<15} {ms:12.3f} ms  (+{ms - previous:10.3f} ms)  {DESCRIPTIONS.get(name, '')}")
        previous = ms
    memory = metrics["memory"]
    if memory.get("vmm_overhead_bytes") is not None:
        lines.append(f"  memory: peak RSS {memory['peak_rss_bytes'] / 2**20:.1f} MiB, guest RAM touched "
                     f"{memory['guest_touched_bytes'] / 2**20:.1f} MiB, VMM overhead "
                     f"{memory['vmm_overhead_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)
