"""`vmm bench boot`: the same tiny job as a VM, a container, a namespaced process and a process.

The job is "print a line and exit". Each contender is a command line run as a
child process; the wall time is measured here, from just before fork/exec to
the child's exit (``os.wait4``, which also gives the child tree's peak RSS).
Runs are interleaved round-robin (each round starts one contender later) so
that drift on a busy machine hits every contender alike.

Contenders (``--contenders``, default all):

* ``vmm``: our default guest booted from scratch: ``vmm run --cold --metrics F -- echo LINE``
  (vmlinux, PVH entry); the VMM's own phases come back through the metrics file;
* ``vmm-snapshot``: what plain ``vmm run --metrics F -- echo LINE`` does: restore the
  cached snapshot of the same guest (made, untimed, before the first run);
* ``vmm-bzimage``: the same with ``--kernel bzImage`` (the kernel's own LZ4
  decompressor runs first: on PVM hosts in KVM's instruction emulator);
* ``qemu-kvm``: QEMU ``-M microvm -enable-kvm``, same kernel, initramfs and command line;
* ``qemu-tcg``: the same with ``-accel tcg`` (QEMU translates guest code itself);
* ``runc``: an OCI container (busybox bundle built here) doing ``echo LINE``;
* ``unshare``: ``unshare -pfmuin --mount-proc busybox echo LINE`` (namespaces, no image);
* ``process``: ``busybox echo LINE``, a plain fork/exec.

A contender whose tool is missing is *skipped* with the reason; one that fails
is *failed* with the reason (and not retried after a failed first run); no
contender's failure stops the benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from vmm.bench.phases import SPAWN_ENV, host_facts, machine_line

LINE = "vmm-bench-hello"
SCHEMA = "vmm-bench-boot/1"
ALL_CONTENDERS = ("vmm", "vmm-snapshot", "vmm-bzimage", "vmm-net-user", "qemu-kvm", "qemu-tcg",
                  "ctr-vmm", "ctr-runc", "runc", "runc-netns", "unshare", "process")
EXIT_PORT = 0x501  # vmm/arch/x86_64/layout.EXIT_PORT; QEMU's isa-debug-exit sits there too

#: Timeouts per contender (seconds). A VM boot here takes ~35-120 s (PVM: the guest
#: kernel is emulated); the bzImage's decompressor adds to that; QEMU+KVM hangs on PVM.
TIMEOUTS = {"vmm": 300.0, "vmm-snapshot": 60.0, "vmm-bzimage": 600.0, "qemu-kvm": 20.0, "qemu-tcg": 60.0,
            "runc": 30.0, "unshare": 10.0, "process": 10.0, "ctr-vmm": 120.0, "ctr-runc": 30.0,
            "vmm-net-user": 300.0, "runc-netns": 30.0}


@dataclass
class Measurement:
    """One run of one contender."""

    ok: bool
    wall_ms: float | None = None
    reason: str = ""
    exit_status: int | None = None
    peak_rss_bytes: int | None = None
    metrics: dict[str, Any] | None = None  # vmm contenders: their --metrics JSON
    last_output: str = ""  # the last line the job printed, when it failed

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "wall_ms": self.wall_ms, "reason": self.reason,
                               "exit_status": self.exit_status, "peak_rss_bytes": self.peak_rss_bytes}
        if self.last_output:
            out["last_output"] = self.last_output
        if self.metrics is not None:
            out["phases_ms"] = self.metrics.get("phases_ms")
            out["guest_boot_time_us"] = self.metrics.get("guest_boot_time_us")
            out["memory"] = self.metrics.get("memory")
            out["exits_total"] = (self.metrics.get("exits") or {}).get("exits_total")
        return out


class Contender:
    """A way to run the job. Subclasses fill in prepare/argv/check."""

    name = "contender"
    label = "contender"
    kind = "process"  # "vm", "container" or "process"

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout if timeout is not None else TIMEOUTS.get(self.name, 60.0)
        self.workdir: Path | None = None

    def prepare(self, workdir: Path) -> str | None:
        """Get ready (once); return a reason to skip, or None."""
        self.workdir = workdir
        return None

    def argv(self, run_dir: Path) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def check(self, status: int, stdout: str, stderr: str, run_dir: Path) -> str | None:
        """None when the job was done; else what went wrong."""
        if status != 0:
            return f"exit status {status}: {_last_line(stderr)}"
        if LINE not in stdout:
            return f"the line was not printed: {_last_line(stderr) or _last_line(stdout)}"
        return None

    def hint(self) -> str:
        """Why this contender may fail on this host ('' when nothing is known)."""
        return ""

    def after(self, run_dir: Path, measurement: Measurement) -> None:
        """Collect extra data / clean up after a run (not timed)."""

    def cleanup(self) -> None:
        """Undo prepare (not timed)."""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _host_echo() -> list[str]:
    """The host-side job: busybox echo (the same binary the guest and the container use)."""
    from vmm.images.initramfs import default_busybox

    try:
        return [str(default_busybox()), "echo", LINE]
    except Exception:  # noqa: BLE001 (no busybox at all: the host's echo still measures a process)
        return [shutil.which("echo") or "/bin/echo", LINE]


# --- vmm ------------------------------------------------------------------------------

class VmmContender(Contender):
    name = "vmm"
    label = "vmm (vmlinux, PVH)"
    kind = "vm"

    def __init__(self, timeout: float | None = None, extra: Iterable[str] = ()) -> None:
        super().__init__(timeout)
        self.extra = list(extra)

    def prepare(self, workdir: Path) -> str | None:
        super().prepare(workdir)
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "/dev/kvm is missing or not readable and writable"
        try:
            from vmm.images.kernel import cached_kernel

            if cached_kernel() is None:
                return "the guest kernel is not built yet (run `vmm run -- true` once: it builds it)"
        except Exception as e:  # noqa: BLE001 - reported, never raised
            return f"cannot find the guest kernel: {e}"
        return None

    start = ["--cold"]  # how `vmm run` starts the guest

    def argv(self, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "vmm", "run", *self.start, "--metrics",
                str(run_dir / "metrics.json"), "--timeout", f"{self.timeout:g}", *self.extra,
                "--", "echo", LINE]

    def after(self, run_dir: Path, measurement: Measurement) -> None:
        try:
            measurement.metrics = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            measurement.metrics = None


class VmmSnapshotContender(VmmContender):
    """`vmm run` as a user runs it: the guest restored from its cached snapshot."""

    name = "vmm-snapshot"
    label = "vmm, restored from a snapshot"
    start: list[str] = []

    def prepare(self, workdir: Path) -> str | None:
        reason = super().prepare(workdir)
        if reason:
            return reason
        # The first run of a guest boots it and saves the snapshot: not timed.
        made = subprocess.run([sys.executable, "-m", "vmm", "run", "--", "true"],
                              capture_output=True, text=True, timeout=600)
        if made.returncode != 0:
            return f"could not make the snapshot: {_last_line(made.stderr) or made.returncode}"
        return None

    def check(self, status: int, stdout: str, stderr: str, run_dir: Path) -> str | None:
        problem = super().check(status, stdout, stderr, run_dir)
        if problem:
            return problem
        try:
            start = json.loads((run_dir / "metrics.json").read_text()).get("start")
        except (OSError, ValueError):
            return "no metrics file"
        return None if start == "restored" else f"the guest was not restored ({start})"


class VmmBzImageContender(VmmContender):
    name = "vmm-bzimage"
    label = "vmm (bzImage, LZ4)"

    def prepare(self, workdir: Path) -> str | None:
        reason = super().prepare(workdir)
        if reason:
            return reason
        from vmm.images.kernel import cached_kernel

        artifacts = cached_kernel()
        if artifacts is None or not artifacts.bzimage.is_file():
            return "no bzImage in the guest kernel cache"
        self.extra = ["--kernel", str(artifacts.bzimage)]
        return None


class VmmNetUserContender(VmmContender):
    """`vmm run --cold --net user`: a NIC on passt, booted from scratch as ``vmm`` is."""

    name = "vmm-net-user"
    label = "vmm --net user (passt), cold"

    def prepare(self, workdir: Path) -> str | None:
        reason = super().prepare(workdir)
        if reason:
            return reason
        if not shutil.which("passt"):
            return "passt not installed (apt-get install passt)"
        self.extra = ["--net", "user"]
        return None


# --- QEMU -----------------------------------------------------------------------------

def guest_cmdline() -> str:
    """The kernel command line vmm gives its default guest running `echo LINE`."""
    from vmm.arch.x86_64 import pvm
    from vmm.builder import BASE_CMDLINE, DEFAULT_INITRAMFS_CMDLINE, QUIET_CMDLINE, encode_argv
    from vmm.kvm.flavour import detect_flavour

    options = list(BASE_CMDLINE + DEFAULT_INITRAMFS_CMDLINE + QUIET_CMDLINE)
    options += list(pvm.cmdline_options(detect_flavour(), our_kernel=True))
    options.append(encode_argv(("echo", LINE)))
    return " ".join(options)


class QemuContender(Contender):
    name = "qemu-tcg"
    label = "QEMU microvm + TCG"
    kind = "vm"
    accel = ["-accel", "tcg"]

    def prepare(self, workdir: Path) -> str | None:
        super().prepare(workdir)
        qemu = shutil.which("qemu-system-x86_64")
        if not qemu:
            return "qemu-system-x86_64 not installed (vmm bench boot --setup, or apt-get install qemu-system-x86)"
        self.qemu = qemu
        try:
            from vmm.images.initramfs import default_initramfs
            from vmm.images.kernel import cached_kernel

            artifacts = cached_kernel()
            if artifacts is None:
                return "the guest kernel is not built yet (run `vmm run -- true` once)"
            self.kernel = artifacts.vmlinux
            self.initrd = default_initramfs()
            self.cmdline = guest_cmdline()
        except Exception as e:  # noqa: BLE001
            return f"cannot find the guest kernel/initramfs: {e}"
        return None

    def argv(self, run_dir: Path) -> list[str]:
        return [self.qemu, "-M", "microvm,acpi=off", *self.accel, "-m", "512M", "-smp", "1",
                "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
                "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.cmdline,
                "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=1"]

    def check(self, status: int, stdout: str, stderr: str, run_dir: Path) -> str | None:
        # isa-debug-exit: QEMU exits with (value << 1) | 1; our /init writes the command's status.
        if LINE in stdout and status == 1:
            return None
        detail = _last_line(stderr) or _last_line(stdout) or "no output"
        return f"exit status {status}: {detail}"


class QemuKvmContender(QemuContender):
    name = "qemu-kvm"
    label = "QEMU microvm + KVM"
    accel = ["-enable-kvm"]

    def hint(self) -> str:
        from vmm.kvm.flavour import Flavour, detect_flavour

        if detect_flavour() is Flavour.PVM:
            return ("expected on KVM PVM: the guest kernel meets an instruction KVM's emulator cannot run "
                    "(xrstor, int3, ...) and QEMU re-enters KVM_RUN forever; vmm works around it")
        return ""

    def prepare(self, workdir: Path) -> str | None:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "/dev/kvm is missing or not readable and writable"
        return super().prepare(workdir)


# --- containers and processes ---------------------------------------------------------

class RuncContender(Contender):
    name = "runc"
    label = "runc (OCI container)"
    kind = "container"

    def prepare(self, workdir: Path) -> str | None:
        super().prepare(workdir)
        runc = shutil.which("runc")
        if not runc:
            return "runc not installed (vmm bench boot --setup, or apt-get install runc)"
        self.runc = runc
        if os.geteuid() != 0:
            return "runc needs root here (a rootless bundle needs user-namespace set-up)"
        try:
            self.bundle, self.state = build_runc_bundle(workdir, self.runc)
        except Exception as e:  # noqa: BLE001
            return f"cannot build the busybox bundle: {e}"
        self._count = 0
        return None

    def argv(self, run_dir: Path) -> list[str]:
        self._count += 1
        self.container_id = f"vmm-bench-{os.getpid()}-{self._count}"
        return [self.runc, "--root", str(self.state), "run", "--bundle", str(self.bundle),
                self.container_id]

    def after(self, run_dir: Path, measurement: Measurement) -> None:
        subprocess.run([self.runc, "--root", str(self.state), "delete", "--force", self.container_id],
                       capture_output=True, check=False)


class CtrRuncContender(Contender):
    """`ctr run --rm IMAGE ID echo LINE` through containerd and its runc shim.

    The same client, image and command for both runtimes: containerd 1.6 with a
    private root and socket (vmm/oci/containerd.py), a busybox image imported
    once; only ``--runc-binary`` differs.
    """

    name = "ctr-runc"
    label = "containerd + runc (ctr run)"
    kind = "container"
    runtime: list[str] = []

    def prepare(self, workdir: Path) -> str | None:
        super().prepare(workdir)
        from vmm.errors import VmmError
        from vmm.oci.containerd import PrivateContainerd, image_from_busybox

        if os.geteuid() != 0:
            return "containerd needs root"
        self.daemon = PrivateContainerd(workdir / "containerd")
        try:
            self.daemon.start()
            self.daemon.import_image(image_from_busybox(workdir / "containerd"))
        except VmmError as e:
            self.daemon.stop()
            return str(e)
        self._count = 0
        return self.warm_up()

    def warm_up(self) -> str | None:
        return None

    def argv(self, run_dir: Path) -> list[str]:
        from vmm.oci.containerd import BUSYBOX_IMAGE

        self._count += 1
        return [*self.daemon.ctr, "run", "--rm", *self.runtime, BUSYBOX_IMAGE,
                f"{self.name}-{os.getpid()}-{self._count}", "echo", LINE]

    def cleanup(self) -> None:
        if getattr(self, "daemon", None) is not None:
            self.daemon.stop()


class CtrVmmContender(CtrRuncContender):
    """The same `ctr run`, with vmm-runtime as the shim's runc: the container is a VM."""

    name = "ctr-vmm"
    label = "containerd + vmm (ctr run)"
    kind = "vm"

    def prepare(self, workdir: Path) -> str | None:
        from vmm.oci.containerd import runtime_binary

        binary = runtime_binary()
        if not binary.exists():
            return f"{binary}: not installed (pip install -e .)"
        self.runtime = ["--runc-binary", str(binary)]
        return super().prepare(workdir)

    def warm_up(self) -> str | None:
        """One untimed run: the first container of its size boots and saves the base."""
        assert self.workdir is not None  # prepare() came first
        result = subprocess.run(self.argv(self.workdir), capture_output=True, text=True,
                                timeout=max(self.timeout, 900))
        if result.returncode != 0 or LINE not in result.stdout:
            self.daemon.stop()
            return f"the warm-up run failed: {_last_line(result.stderr) or result.returncode}"
        return None


def build_runc_bundle(workdir: Path, runc: str) -> tuple[Path, Path]:
    """An OCI bundle: rootfs with static busybox, config.json from `runc spec`, edited."""
    from vmm.images.initramfs import busybox_root

    bundle = workdir / "bundle"
    busybox_root(bundle / "rootfs", ("sh", "echo"))
    result = subprocess.run([runc, "spec", "--bundle", str(bundle)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"runc spec: {_last_line(result.stderr)}")
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["args"] = ["/bin/echo", LINE]
    config["process"]["terminal"] = False
    config["root"]["readonly"] = True
    config["hostname"] = "vmm-bench"
    config_path.write_text(json.dumps(config, indent=2))
    state = workdir / "runc-state"
    state.mkdir(exist_ok=True)
    return bundle, state


class RuncNetnsContender(RuncContender):
    """runc in a network namespace with a veth pair to the host, made for each run and timed
    with it, as a CNI bridge plugin would (addresses on both ends, links up)."""

    name = "runc-netns"
    label = "runc + netns + veth (CNI-like)"
    NETNS = "vmmbenchnet"

    def prepare(self, workdir: Path) -> str | None:
        reason = super().prepare(workdir)
        if reason:
            return reason
        if not shutil.which("ip"):
            return "ip not found (apt-get install iproute2)"
        config_path = self.bundle / "config.json"
        config = json.loads(config_path.read_text())
        namespaces = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
        namespaces.append({"type": "network", "path": f"/var/run/netns/{self.NETNS}"})
        config["linux"]["namespaces"] = namespaces
        netns_bundle = workdir / "bundle-netns"
        shutil.copytree(self.bundle, netns_bundle, symlinks=True)
        (netns_bundle / "config.json").write_text(json.dumps(config, indent=2))
        self.bundle = netns_bundle
        return None

    def argv(self, run_dir: Path) -> list[str]:
        runc = super().argv(run_dir)
        n = self.NETNS
        script = (f"ip netns add {n} && ip link add vbveth0 type veth peer name vbveth1 netns {n} "
                  f"&& ip addr add 10.79.0.1/24 dev vbveth0 && ip link set vbveth0 up "
                  f"&& ip -n {n} addr add 10.79.0.2/24 dev vbveth1 && ip -n {n} link set vbveth1 up "
                  f"&& ip -n {n} link set lo up && exec {' '.join(runc)}")
        return ["sh", "-c", script]

    def after(self, run_dir: Path, measurement: Measurement) -> None:
        super().after(run_dir, measurement)
        subprocess.run(["ip", "link", "del", "vbveth0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.NETNS], capture_output=True)


class UnshareContender(Contender):
    name = "unshare"
    label = "unshare -pfmuin (namespaces)"
    kind = "process"

    def prepare(self, workdir: Path) -> str | None:
        super().prepare(workdir)
        unshare = shutil.which("unshare")
        if not unshare:
            return "unshare not found (util-linux)"
        self.unshare = unshare
        if os.geteuid() != 0:
            return "unshare -pfmuin needs root"
        return None

    def argv(self, run_dir: Path) -> list[str]:
        return [self.unshare, "-pfmuin", "--mount-proc", *_host_echo()]


class ProcessContender(Contender):
    name = "process"
    label = "process (fork/exec)"
    kind = "process"

    def argv(self, run_dir: Path) -> list[str]:
        return _host_echo()


CONTENDERS: dict[str, type[Contender]] = {
    "ctr-vmm": CtrVmmContender,
    "vmm-net-user": VmmNetUserContender,
    "runc-netns": RuncNetnsContender,
    "ctr-runc": CtrRuncContender,
    "vmm": VmmContender,
    "vmm-snapshot": VmmSnapshotContender,
    "vmm-bzimage": VmmBzImageContender,
    "qemu-kvm": QemuKvmContender,
    "qemu-tcg": QemuContender,
    "runc": RuncContender,
    "unshare": UnshareContender,
    "process": ProcessContender,
}


def make_contenders(names: Iterable[str], timeouts: dict[str, float] | None = None) -> list[Contender]:
    timeouts = timeouts or {}
    out = []
    for name in names:
        if name not in CONTENDERS:
            raise ValueError(f"unknown contender {name!r} (known: {', '.join(ALL_CONTENDERS)})")
        out.append(CONTENDERS[name](timeouts.get(name)))
    return out


# --- running --------------------------------------------------------------------------

def measure(contender: Contender, run_dir: Path) -> Measurement:
    """One run: spawn, wait (with the contender's timeout), check. Never raises."""
    try:
        argv = contender.argv(run_dir)
        env = contender.env()
    except Exception as e:  # noqa: BLE001
        return Measurement(False, reason=f"cannot build the command: {e}")
    out_path, err_path = run_dir / "stdout", run_dir / "stderr"
    timed_out = threading.Event()
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.monotonic_ns()
            env[SPAWN_ENV] = str(start)
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                    start_new_session=True)

            def kill() -> None:
                timed_out.set()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

            timer = threading.Timer(contender.timeout, kill)
            timer.start()
            try:
                _pid, wait_status, usage = os.wait4(proc.pid, 0)
                end = time.monotonic_ns()
            finally:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            try:  # anything the job left behind in its session (QEMU helpers, a stuck runc)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    except OSError as e:
        return Measurement(False, reason=f"cannot run {argv[0]}: {e.strerror or e}")
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    # Not usage.ru_maxrss: the child was forked from this (large) Python process, and the
    # kernel keeps the pre-exec RSS in it. probe_rss() measures it apart.
    m = Measurement(True, wall_ms=(end - start) / 1e6, exit_status=proc.returncode)
    if timed_out.is_set():
        m.ok = False
        detail = _last_line(stderr) or _last_line(stdout) or "no output at all"
        hint = contender.hint()
        m.reason = f"timed out after {contender.timeout:g} s" + (f": {hint}" if hint else f" ({detail})")
        m.last_output = detail
    else:
        problem = contender.check(proc.returncode, stdout, stderr, run_dir)
        if problem:
            m.ok, m.reason = False, problem
    try:
        contender.after(run_dir, m)
    except Exception as e:  # noqa: BLE001
        m.reason = (m.reason + "; " if m.reason else "") + f"after-run step failed: {e}"
    return m


def probe_rss(contender: Contender, run_dir: Path) -> int | None:
    """Peak RSS of one untimed run, in bytes, through `busybox time -v` (None if unknown).

    Measured apart from the timed runs because a child forked from Python inherits
    Python's peak RSS in its rusage; busybox is small (its own floor: a few MiB).
    """
    from vmm.images.initramfs import BUSYBOX_CANDIDATES

    busybox = next((c for c in BUSYBOX_CANDIDATES if Path(c).is_file()), None)
    if busybox is None:
        return None
    try:
        argv = [busybox, "time", "-v", *contender.argv(run_dir)]
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=contender.timeout, env=contender.env(), start_new_session=True)
        contender.after(run_dir, Measurement(True))
    except (OSError, subprocess.TimeoutExpired, Exception):  # noqa: BLE001
        return None
    for line in result.stderr.splitlines():
        if "Maximum resident set size" in line:
            try:
                return int(line.rsplit(":", 1)[1]) * 1024
            except ValueError:
                return None
    return None


@dataclass
class ContenderResult:
    contender: Contender
    skipped: str | None = None
    measurements: list[Measurement] = field(default_factory=list)
    given_up: str | None = None  # failed its first run: not run again

    @property
    def status(self) -> str:
        if self.skipped:
            return "skipped"
        ok = [m for m in self.measurements if m.ok]
        if not ok:
            return "failed"
        return "ok" if len(ok) == len(self.measurements) else "partial"

    @property
    def reason(self) -> str:
        if self.skipped:
            return self.skipped
        failures = [m.reason for m in self.measurements if not m.ok]
        if not failures:
            return ""
        text = failures[0]
        if len(failures) > 1:
            text += f" ({len(failures)} failed runs)"
        if self.given_up:
            text += " (failed its first run: not retried)"
        return text

    def summary(self) -> dict[str, Any]:
        ok = [m for m in self.measurements if m.ok]
        walls = [m.wall_ms for m in ok if m.wall_ms is not None]
        out: dict[str, Any] = {
            "runs_ok": len(ok), "runs_failed": len(self.measurements) - len(ok),
            "wall_ms": _stats(walls),
            "peak_rss_bytes_median": _median([m.peak_rss_bytes for m in ok if m.peak_rss_bytes]),
            "peak_rss_source": None,
        }
        if out["peak_rss_bytes_median"] is not None:
            out["peak_rss_source"] = "untimed run under busybox time -v (floor: a few MiB)"
        metrics = [m.metrics for m in ok if m.metrics]
        if metrics:
            names: list[str] = []
            for m in metrics:
                names += [n for n in m.get("phases_ms", {}) if n not in names]
            out["phases_ms_median"] = {
                n: _median([m["phases_ms"][n] for m in metrics if n in m.get("phases_ms", {})]) for n in names}
            out["guest_boot_time_ms"] = _stats(
                [m["guest_boot_time_us"] / 1000 for m in metrics if m.get("guest_boot_time_us") is not None])
            for key in ("vmm_overhead_bytes", "guest_touched_bytes", "peak_rss_bytes"):
                out[f"{key}_median"] = _median([(m.get("memory") or {}).get(key) for m in metrics
                                                if (m.get("memory") or {}).get(key) is not None])
            out["peak_rss_source"] = "the VMM's own VmHWM (--metrics)"
            out["exits_total_median"] = _median([(m.get("exits") or {}).get("exits_total") for m in metrics
                                                 if (m.get("exits") or {}).get("exits_total") is not None])
            if metrics[0].get("guest"):
                out["guest"] = metrics[0]["guest"]
        return out

    def as_dict(self) -> dict[str, Any]:
        c = self.contender
        return {"name": c.name, "label": c.label, "kind": c.kind, "status": self.status,
                "reason": self.reason, "timeout_s": c.timeout, "summary": self.summary(),
                "runs": [m.as_dict() for m in self.measurements]}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


def run_bench(contenders: list[Contender], runs: int = 3,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prepare every contender, run them interleaved `runs` times, return the report dict."""
    progress = progress or (lambda line: None)
    host = host_facts()
    results = [ContenderResult(c) for c in contenders]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vmm-bench-") as tmp:
        tmpdir = Path(tmp)
        for index, result in enumerate(results):
            workdir = tmpdir / f"{index}-{result.contender.name}"
            workdir.mkdir()
            try:
                result.skipped = result.contender.prepare(workdir)
            except Exception as e:  # noqa: BLE001
                result.skipped = f"set-up failed: {e}"
            if result.skipped:
                progress(f"{result.contender.name}: skipped: {result.skipped}")
        active = [r for r in results if not r.skipped]
        try:
            for round_index in range(runs):
                shift = round_index % len(active) if active else 0
                for result in active[shift:] + active[:shift]:
                    if result.given_up:
                        continue
                    c = result.contender
                    run_dir = tmpdir / f"run-{c.name}-{round_index}"
                    run_dir.mkdir()
                    m = measure(c, run_dir)
                    result.measurements.append(m)
                    if m.ok:
                        progress(f"run {round_index + 1}/{runs} {c.name}: {m.wall_ms:.1f} ms")
                    else:
                        progress(f"run {round_index + 1}/{runs} {c.name}: FAILED: {m.reason}")
                        if len(result.measurements) == 1:
                            result.given_up = m.reason
            for result in active:  # memory, apart from the timing (see probe_rss)
                c = result.contender
                if c.kind == "vm" and c.name.startswith("vmm"):
                    continue  # the VMM measures its own (metrics)
                if any(m.ok for m in result.measurements):
                    run_dir = tmpdir / f"rss-{c.name}"
                    run_dir.mkdir()
                    rss = probe_rss(c, run_dir)
                    for m in result.measurements:
                        if m.ok:
                            m.peak_rss_bytes = rss
        finally:
            for result in results:
                try:
                    result.contender.cleanup()
                except Exception:  # noqa: BLE001
                    pass
    try:
        load_after = os.getloadavg()[0]
    except OSError:
        load_after = None
    return {
        "schema": SCHEMA,
        "job": f"print a line ({LINE!r}) and exit",
        "runs": runs,
        "started_unix": started,
        "duration_s": round(time.time() - started, 1),
        "host": host | {"load_average_1min_after": load_after},
        "machine": machine_line(host),
        "contenders": [r.as_dict() for r in results],
    }


# --- set-up ---------------------------------------------------------------------------

SETUP_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "runc": "runc"}


def setup(progress: Callable[[str], None]) -> list[str]:
    """Install the missing tools with apt-get (as root). Returns what could not be done."""
    missing = [pkg for tool, pkg in SETUP_PACKAGES.items() if not shutil.which(tool)]
    if not missing:
        progress("set-up: qemu-system-x86_64 and runc are installed")
        return []
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return [f"cannot install {', '.join(missing)}: needs root and apt-get"]
    progress(f"set-up: apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            return [f"{' '.join(command[:2])} failed: {_last_line(result.stderr)}"]
    return []
