#!/usr/bin/env python3
"""virtio-blk throughput: a guest's sequential dd against the host on the same files.

    python3 benchmarks/bench_blk.py [--size 64] [--paths exit,ioeventfd] [--rounds 1] [--json FILE]
    python3 benchmarks/bench_blk.py --same-boot 3 [--size 32] [--json FILE]

One boot per notification path and round (``vmm run --virtio-notify exit`` and
``ioeventfd``; every other round in reverse order), in-process through ``vmm.session.run_linux``, with two disks:

* ``/dev/vda``: SIZE MiB of random bytes, read-only; the guest runs
  ``dd if=/dev/vda of=/dev/null bs=1M iflag=direct`` (busybox dd has
  ``iflag=direct``/``oflag=direct``: the guest's page cache is bypassed, each
  1 MiB block is one request DMA'd straight into dd's buffer);
* ``/dev/vdb``: SIZE MiB, written with
  ``dd if=/dev/zero of=/dev/vdb bs=1M oflag=direct conv=fsync`` (the fsync
  is one FLUSH request: ``fdatasync`` on the host).

The guest prints a marker line before and after each dd; the serial line is
handled synchronously in the vCPU thread, so the benchmark snapshots the
transports' counters exactly at the phase boundaries. A phase's time is the
device's view, from the first queue notification to the last interrupt of
the phase: it leaves out dd's start-up (a fork+exec costs ~1 s in a PVM guest)
but includes everything the guest does between requests. The guest's own
/proc/uptime around dd (start-up included) is printed too.

``--same-boot N`` compares the paths inside ONE boot instead: a read disk and
a write disk per path (``--virtio-notify exit,exit,ioeventfd,ioeventfd``, one
per disk), every phase N times, the paths alternating ABBA. On a host shared
with other VMs this is the fair A/B: separate boots land in different load.

The host does the same on the same files in the same run, before each boot:
buffered 1 MiB ``preadv``/``pwritev`` + ``fdatasync`` (what vmm's raw backend
does: the guest's disk *is* the host page cache), and ``O_DIRECT`` where the
file system allows it. ratio = guest MB/s / host buffered MB/s.

Per MB and per request: requests, notifications (QueueNotify writes: MMIO exits
on the ``exit`` path, eventfd kicks on ``ioeventfd``), interrupts, and MMIO
exits (every register access of the transport is one; on the ioeventfd path
the notify is not among them). MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1 << 20
MB = 1_000_000
BLOCK = MiB


# --- host side ----------------------------------------------------------------------------------
def host_read(path: Path, direct: bool) -> float:
    """Seconds to read the whole file in 1 MiB blocks."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, flags)
    try:
        size = os.fstat(fd).st_size
        start = time.perf_counter()
        for offset in range(0, size, BLOCK):
            os.preadv(fd, [buf], offset)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        buf.close()


def host_write(path: Path, direct: bool) -> float:
    """Seconds to overwrite the whole file in 1 MiB blocks, then fdatasync."""
    flags = os.O_WRONLY | (os.O_DIRECT if direct else 0)
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(path, flags)
    try:
        size = os.fstat(fd).st_size
        start = time.perf_counter()
        for offset in range(0, size, BLOCK):
            os.pwritev(fd, [buf], offset)
        os.fdatasync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        buf.close()


def direct_supported(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


# --- guest side ---------------------------------------------------------------------------------
GUEST_SCRIPT = (
    "echo @@mark read-begin; read u0 x < /proc/uptime; "
    "dd if=/dev/vda of=/dev/null bs=1M count={n} iflag=direct 2>/dev/null || echo @@fail read; "
    "read u1 x < /proc/uptime; echo @@mark read-end; echo @@uptime read $u0 $u1; "
    "echo @@mark write-begin; read u0 x < /proc/uptime; "
    "dd if=/dev/zero of=/dev/vdb bs=1M count={n} oflag=direct conv=fsync 2>/dev/null "
    "|| echo @@fail write; "
    "read u1 x < /proc/uptime; echo @@mark write-end; echo @@uptime write $u0 $u1"
)


class MarkerWatcher(io.RawIOBase):
    """The guest's stdout: snapshots the transports' counters at each ``@@mark`` line."""

    def __init__(self) -> None:
        self.machine = None
        self.snapshots: dict[str, dict] = {}
        self.lines: list[str] = []
        self._partial = b""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self._partial += data
        while b"\n" in self._partial:
            line, self._partial = self._partial.split(b"\n", 1)
            text = line.decode(errors="replace").strip()
            self.lines.append(text)
            if text.startswith("@@mark ") and self.machine is not None:
                from vmm.devices.virtio.mmio import VirtioMmioTransport

                name = text.split()[1]  # every transport's counters, by device id (blk0...)
                self.snapshots[name] = {m.name: m.device.counters()
                                        for m in self.machine.mmio.mappings()
                                        if isinstance(m.device, VirtioMmioTransport)}
                if name.endswith("-begin"):
                    for m in self.machine.mmio.mappings():
                        if hasattr(m.device, "restart_timing"):
                            m.device.restart_timing()
        return len(data)


def phase_figures(begin: dict, end: dict, phase: str, guest_wall_s: float = 0.0) -> dict:
    """One phase's figures from one device's counters at its begin and end markers."""
    d = {k: end[k] - begin[k] for k in ("requests", "bytes_read", "bytes_written",
                                        "notifications", "interrupts", "register_reads",
                                        "register_writes", "busy_ns", "io_thread_wakeups")}
    moved = d["bytes_read"] if phase == "read" else d["bytes_written"]
    window_s = (end["last_interrupt_ns"] - end["first_notify_ns"]) / 1e9
    exits = d["register_reads"] + d["register_writes"]
    mb = moved / MB
    return {
        "bytes": moved,
        "device_window_s": round(window_s, 4),
        "guest_MBps": round(mb / window_s, 2) if window_s > 0 else None,
        "guest_dd_wall_s": round(guest_wall_s, 2),
        "device_busy_fraction": round(d["busy_ns"] / 1e9 / window_s, 3) if window_s > 0 else None,
        "requests": d["requests"],
        "notifications": d["notifications"],
        "interrupts": d["interrupts"],
        "mmio_exits": exits,
        "io_thread_wakeups": d["io_thread_wakeups"],
        "requests_per_MB": round(d["requests"] / mb, 3),
        "notifications_per_MB": round(d["notifications"] / mb, 3),
        "interrupts_per_MB": round(d["interrupts"] / mb, 3),
        "mmio_exits_per_MB": round(exits / mb, 3),
        "mmio_exits_per_request": round(exits / d["requests"], 3) if d["requests"] else None,
        "notifications_per_request": round(d["notifications"] / d["requests"], 3)
        if d["requests"] else None,
    }


def run_same_boot(paths: list[str], read_img: Path, write_imgs: list[Path], size_mib: int,
                  repeats: int, timeout: float) -> list[dict]:
    """One boot, one read disk and one write disk per path; the phases alternate between paths."""
    from vmm.config import DiskConfig, VmConfig
    from vmm.session import run_linux

    disks, notify, devices = [], [], {}
    for i, path_name in enumerate(paths):
        disks += [DiskConfig(str(read_img), read_only=True), DiskConfig(str(write_imgs[i]))]
        notify += [path_name, path_name]
        devices[path_name] = (2 * i, 2 * i + 1)  # disk numbers: vd[a+n], virtio-blk<n>
    # Shell functions keep the script short: it travels on the kernel command line.
    script = [
        "x(){ l=$1; shift; echo @@mark $l-begin; \"$@\" 2>/dev/null || echo @@fail $l; "
        "echo @@mark $l-end; }",
        f"r(){{ x read$1 dd if=/dev/$2 of=/dev/null bs=1M count={size_mib} iflag=direct; }}",
        f"w(){{ x write$1 dd if=/dev/zero of=/dev/$2 bs=1M count={size_mib} oflag=direct conv=fsync; }}",
    ]
    steps = []
    for rep in range(repeats):
        for kind in ("read", "write"):
            order = paths if rep % 2 == 0 else paths[::-1]  # ABBA
            for path_name in order:
                n = devices[path_name][0 if kind == "read" else 1]
                label = f"{rep}{path_name}"
                steps.append((kind + label, kind, path_name, n, rep))
                script.append(f"{kind[0]} {label} vd{'abcdefgh'[n]}")
    watcher = MarkerWatcher()
    config = VmConfig(disks=tuple(disks), command=("sh", "-c", "; ".join(script)),
                      virtio_notify=",".join(notify), timeout=timeout)
    stderr = io.StringIO()
    result = run_linux(config, stdout=watcher, stderr=stderr, handle_signals=False,
                       on_built=lambda machine: setattr(watcher, "machine", machine))
    if result.status != 0 or any(line.startswith("@@fail") for line in watcher.lines):
        raise RuntimeError(f"guest run failed (status {result.status}): {stderr.getvalue()[-2000:]}"
                           f"\n{watcher.lines[-10:]}")
    rows = []
    for label, kind, path_name, n, rep in steps:
        device = f"virtio-blk{n}"
        figures = phase_figures(watcher.snapshots[f"{label}-begin"][device],
                                watcher.snapshots[f"{label}-end"][device], kind)
        rows.append({"path": path_name, "phase": kind, "repeat": rep + 1, **figures})
    return rows


def run_guest(path_name: str, read_img: Path, write_img: Path, size_mib: int, timeout: float) -> dict:
    from vmm.config import DiskConfig, VmConfig
    from vmm.session import run_linux

    watcher = MarkerWatcher()
    config = VmConfig(
        disks=(DiskConfig(str(read_img), read_only=True), DiskConfig(str(write_img))),
        command=("sh", "-c", GUEST_SCRIPT.format(n=size_mib)),
        virtio_notify=path_name, timeout=timeout,
    )
    stderr = io.StringIO()
    started = time.monotonic()

    def on_built(machine) -> None:
        watcher.machine = machine

    result = run_linux(config, stdout=watcher, stderr=stderr, handle_signals=False,
                       on_built=on_built)
    boot_s = time.monotonic() - started
    if result.status != 0 or any(line.startswith("@@fail") for line in watcher.lines):
        raise RuntimeError(f"guest run failed (status {result.status}): {stderr.getvalue()[-2000:]}"
                           f"\n{watcher.lines[-10:]}")
    out = {"path": path_name, "run_s": round(boot_s, 1)}
    uptimes = {}
    for line in watcher.lines:
        if line.startswith("@@uptime "):
            _, phase, u0, u1 = line.split()
            uptimes[phase] = float(u1) - float(u0)
    for phase, device in (("read", "blk0"), ("write", "blk1")):
        out[phase] = phase_figures(watcher.snapshots[f"{phase}-begin"][device],
                                   watcher.snapshots[f"{phase}-end"][device], phase,
                                   uptimes.get(phase, 0.0))
    # Cross-check against the run loop's own exit counts (--stats): MMIO exits in the windows.
    out["run_mmio_exits_total"] = result.stats.by_reason.get("mmio", 0)
    out["transport_register_accesses_total"] = sum(
        c["register_reads"] + c["register_writes"] for c in result.devices.values())
    return out


def machine_facts() -> dict:
    from vmm.kvm.flavour import DESCRIPTIONS, detect_flavour

    flavour = detect_flavour()
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": model, "cpus": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(),
            "kvm_flavour": flavour, "kvm": DESCRIPTIONS.get(flavour, flavour),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="MiB per phase (default 64)")
    parser.add_argument("--paths", default="exit,ioeventfd", help="notification paths to compare")
    parser.add_argument("--rounds", type=int, default=1, help="boots per path, interleaved")
    parser.add_argument("--timeout", type=float, default=420, help="per boot, seconds")
    parser.add_argument("--dir", default=None, help="where the images go (default: a temp dir)")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--same-boot", type=int, metavar="N", default=0,
                        help="instead: ONE boot with a read and a write disk per path (one "
                             "--virtio-notify per disk), each phase N times, paths alternating")
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if args.same_boot:
        return main_same_boot(args, paths)

    facts = machine_facts()
    print(f"machine: {facts['host']}, {facts['cpu']}, {facts['cpus']} CPUs, Linux {facts['kernel']}, "
          f"load {facts['load_average_1min']}")
    print(f"kvm: {facts['kvm']}")
    with tempfile.TemporaryDirectory(prefix="vmm-bench-blk-", dir=args.dir) as tmp:
        read_img, write_img = Path(tmp) / "read.img", Path(tmp) / "write.img"
        size = args.size * MiB
        with open(read_img, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        with open(write_img, "wb") as f:
            f.write(bytes(size))
        direct = direct_supported(read_img)
        host = {"read_buffered": [], "write_buffered": [], "read_direct": [], "write_direct": []}
        runs = []
        for round_ in range(args.rounds):
            # ABBA: every other round in reverse, so a drift in the host's load hits both paths.
            for path_name in (paths if round_ % 2 == 0 else paths[::-1]):
                # The host, right before this boot, on the same files.
                host_read(read_img, False)  # warm: the guest reads through the page cache too
                host["read_buffered"].append(size / MB / host_read(read_img, False))
                host["write_buffered"].append(size / MB / host_write(write_img, False))
                if direct:
                    host["read_direct"].append(size / MB / host_read(read_img, True))
                    host["write_direct"].append(size / MB / host_write(write_img, True))
                print(f"round {round_ + 1}: booting with --virtio-notify {path_name} ...",
                      file=sys.stderr, flush=True)
                run = run_guest(path_name, read_img, write_img, args.size, args.timeout)
                run["round"] = round_ + 1
                runs.append(run)
                print(f"  {path_name}: read {run['read']['guest_MBps']} MB/s, "
                      f"write {run['write']['guest_MBps']} MB/s ({run['run_s']} s)",
                      file=sys.stderr, flush=True)
    host_median = {k: round(statistics.median(v), 1) for k, v in host.items() if v}
    summary = {}
    for path_name in paths:
        mine = [r for r in runs if r["path"] == path_name]
        summary[path_name] = {}
        for phase in ("read", "write"):
            rows = [r[phase] for r in mine]
            med = {k: statistics.median(row[k] for row in rows)
                   for k in rows[0] if isinstance(rows[0][k], (int, float))}
            med["ratio_vs_host_buffered"] = round(med["guest_MBps"] / host_median[f"{phase}_buffered"], 4)
            if direct:
                med["ratio_vs_host_direct"] = round(med["guest_MBps"] / host_median[f"{phase}_direct"], 4)
            summary[path_name][phase] = med

    print(f"\nsequential dd, bs=1M, {args.size} MiB per phase, {args.rounds} boot(s) per path "
          f"(medians); MB = 10^6 bytes")
    print(f"host, same files: read {host_median['read_buffered']} MB/s buffered"
          + (f", {host_median['read_direct']} O_DIRECT" if direct else ", O_DIRECT unsupported here")
          + f"; write+fdatasync {host_median['write_buffered']} MB/s buffered"
          + (f", {host_median['write_direct']} O_DIRECT" if direct else ""))
    header = (f"{'path':<10} {'phase':<6} {'guest MB/s':>10} {'ratio':>7} {'req/MB':>7} "
              f"{'notif/MB':>9} {'irq/MB':>7} {'exits/MB':>9} {'exits/req':>9} {'busy':>5}")
    print(header)
    for path_name, phases in summary.items():
        for phase, m in phases.items():
            print(f"{path_name:<10} {phase:<6} {m['guest_MBps']:>10.1f} "
                  f"{m['ratio_vs_host_buffered']:>7.3f} {m['requests_per_MB']:>7.2f} "
                  f"{m['notifications_per_MB']:>9.2f} {m['interrupts_per_MB']:>7.2f} "
                  f"{m['mmio_exits_per_MB']:>9.2f} {m['mmio_exits_per_request']:>9.2f} "
                  f"{m['device_busy_fraction']:>5.2f}")
    print("ratio: guest / host buffered (the backend's own I/O); exits: MMIO exits; busy: share "
          "of the phase the device spent working on the ring")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": facts, "size_mib": args.size,
                                               "host_MBps_median": host_median,
                                               "host_MBps_samples": host, "runs": runs,
                                               "summary": summary}, indent=2))
    return 0


def host_samples(read_img: Path, write_img: Path, size: int, direct: bool, n: int = 3) -> dict:
    host = {"read_buffered": [], "write_buffered": [], "read_direct": [], "write_direct": []}
    host_read(read_img, False)
    for _ in range(n):
        host["read_buffered"].append(size / MB / host_read(read_img, False))
        host["write_buffered"].append(size / MB / host_write(write_img, False))
        if direct:
            host["read_direct"].append(size / MB / host_read(read_img, True))
            host["write_direct"].append(size / MB / host_write(write_img, True))
    return host


def main_same_boot(args, paths: list[str]) -> int:
    """Both paths in one boot: the same guest, the same load, phases alternating (ABBA)."""
    facts = machine_facts()
    print(f"machine: {facts['host']}, {facts['cpu']}, {facts['cpus']} CPUs, Linux {facts['kernel']}, "
          f"load {facts['load_average_1min']}")
    print(f"kvm: {facts['kvm']}")
    size = args.size * MiB
    with tempfile.TemporaryDirectory(prefix="vmm-bench-blk-", dir=args.dir) as tmp:
        read_img = Path(tmp) / "read.img"
        with open(read_img, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        write_imgs = []
        for path_name in paths:
            write_imgs.append(Path(tmp) / f"write-{path_name}.img")
            write_imgs[-1].write_bytes(bytes(size))
        direct = direct_supported(read_img)
        host = host_samples(read_img, write_imgs[0], size, direct)
        print(f"one boot, --virtio-notify per disk, {args.same_boot} x each phase ...",
              file=sys.stderr, flush=True)
        started = time.monotonic()
        rows = run_same_boot(paths, read_img, write_imgs, args.size, args.same_boot, args.timeout)
        run_s = time.monotonic() - started
        after = host_samples(read_img, write_imgs[0], size, direct)
        for k in host:
            host[k] += after[k]
    host_median = {k: round(statistics.median(v), 1) for k, v in host.items() if v}
    summary = {}
    for path_name in paths:
        for kind in ("read", "write"):
            mine = [r for r in rows if r["path"] == path_name and r["phase"] == kind]
            med = {k: statistics.median(r[k] for r in mine) for k in mine[0]
                   if isinstance(mine[0][k], (int, float)) and k != "repeat"}
            med["samples_MBps"] = [r["guest_MBps"] for r in mine]
            med["ratio_vs_host_buffered"] = round(med["guest_MBps"] / host_median[f"{kind}_buffered"], 5)
            summary.setdefault(path_name, {})[kind] = med
    print(f"\nsequential dd, bs=1M, {args.size} MiB per phase, one boot ({run_s:.0f} s), every phase "
          f"{args.same_boot} times per path, alternating (medians); MB = 10^6 bytes")
    print(f"host, same files: read {host_median['read_buffered']} MB/s buffered"
          + (f", {host_median['read_direct']} O_DIRECT" if direct else ", O_DIRECT unsupported here")
          + f"; write+fdatasync {host_median['write_buffered']} MB/s buffered"
          + (f", {host_median['write_direct']} O_DIRECT" if direct else ""))
    print(f"{'path':<10} {'phase':<6} {'guest MB/s':>10} {'ratio':>8} {'req/MB':>7} {'notif/MB':>9} "
          f"{'irq/MB':>7} {'exits/MB':>9} {'exits/req':>9} {'busy':>5}  samples")
    for path_name, phases in summary.items():
        for kind, m in phases.items():
            print(f"{path_name:<10} {kind:<6} {m['guest_MBps']:>10.2f} {m['ratio_vs_host_buffered']:>8.5f} "
                  f"{m['requests_per_MB']:>7.2f} {m['notifications_per_MB']:>9.2f} "
                  f"{m['interrupts_per_MB']:>7.2f} {m['mmio_exits_per_MB']:>9.2f} "
                  f"{m['mmio_exits_per_request']:>9.2f} {m['device_busy_fraction']:>5.3f}  "
                  f"{m['samples_MBps']}")
    if len(paths) == 2:
        for kind in ("read", "write"):
            a = [r["guest_MBps"] for r in rows if r["path"] == paths[0] and r["phase"] == kind]
            b = [r["guest_MBps"] for r in rows if r["path"] == paths[1] and r["phase"] == kind]
            ratios = [y / x for x, y in zip(a, b)]
            print(f"{kind}: {paths[1]} / {paths[0]}, phase by phase: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": facts, "size_mib": args.size,
                                               "mode": "same-boot", "run_s": run_s,
                                               "host_MBps_median": host_median,
                                               "host_MBps_samples": host, "phases": rows,
                                               "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
