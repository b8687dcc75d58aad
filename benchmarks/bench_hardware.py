#!/usr/bin/env python3
"""One command for a first run on a new host: what KVM is this, and how does vmm do on it?

    python3 benchmarks/bench_hardware.py [--out FILE] [--restores N]

Runs, in order, each step in its own `vmm` process (a failing step is recorded
with its error and the report goes on):

check        `vmm check`: flavour (and the evidence for it), capabilities
cpuid        the CPUID table vCPU 0 of a 1-vCPU guest gets: what vmm changed, TSC kHz,
             TSC-deadline, paravirtual or not (vmm/arch/x86_64/cpuid.py)
exits        benchmarks/bench_exits.py: exits per second, the bare KVM loop beside vmm's
cold_boot    `vmm run --cold --boot-timer --metrics F -- true`: boot to /init, phase by phase
restore      `vmm snapshot create`, then N x `vmm run --restore DIR -- true` (wall time and
             the process-start-to-first-KVM_RUN phase)
smp_clock    one cold boot with `--cpus 2 --cmdline apic=verbose`: `nproc`, the guest's
             clock sources and the kernel log lines about TSC, kvmclock and the LAPIC timer
             (with apic=verbose, a guest that calibrates its LAPIC timer says so)
distro       (--distro) Debian 12's own kernel, initramfs and systemd to a root shell,
             phase by phase, and SIGTERM to power-off (benchmarks/bench_distro.py)

and prints one JSON report (also to --out). On hardware KVM the figures to look
at are cold_boot.guest_boot_time_us (target: <= 60 ms), smp_clock.lapic_calibrated
(target: false: the TSC-deadline timer needs no calibration) and
smp_clock.current_clocksource (kvm-clock).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VMM = [sys.executable, "-m", "vmm"]
CLOCK_LINES = re.compile(r"clocksource|tsc|kvm-clock|kvmclock|apic timer|calibrat|hypervisor|"
                         r"deadline timer|lapic", re.I)
CALIBRATION = re.compile(r"calibrating APIC timer|APIC timer calibration", re.I)
SYSFS_CLOCK = "/sys/devices/system/clocksource/clocksource0"


def run(args: list[str], timeout: float) -> tuple[int, str, str, float]:
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return result.returncode, result.stdout, result.stderr, time.perf_counter() - start


def step(report: dict, name: str, function, *args) -> None:
    """Run one step; record its result, or its error, under ``name``."""
    print(f"[bench_hardware] {name} ...", file=sys.stderr, flush=True)
    try:
        report[name] = function(*args)
    except Exception as e:  # a broken step must not lose the others' figures
        report[name] = {"error": f"{type(e).__name__}: {e}"}


def check() -> dict:
    from vmm.kvm.flavour import flavour_evidence

    evidence = flavour_evidence()
    rc, out, err, _ = run([*VMM, "check"], 60)
    return {"rc": rc, "output": out.splitlines(), "stderr": err.strip(),
            "flavour": evidence.flavour, "modules": list(evidence.modules),
            "ruled_out": list(evidence.ruled_out), "why": evidence.why}


def cpuid_table() -> dict:
    from vmm.arch.x86_64 import cpu, cpuid
    from vmm.kvm.flavour import detect_flavour
    from vmm.kvm.system import Kvm

    with Kvm() as kvm:
        model, table = cpu.guest_table(kvm, detect_flavour(), 1)
    return {
        "vendor": cpuid.vendor(table.entries),
        "paravirt": model.paravirt, "tsc_deadline": model.tsc_deadline, "tsc_khz": model.tsc_khz,
        "leaves": len(table.entries),
        "changes": [f"{c.function:#x}.{c.index} {c.register or 'leaf'}: {c.why}"
                    for c in table.changes],
    }


def exits() -> dict:
    rc, out, err, _ = run([sys.executable, str(ROOT / "benchmarks" / "bench_exits.py"),
                           "-n", "100000", "--rounds", "1"], 300)
    if rc != 0:
        return {"rc": rc, "stderr": err.strip()[-2000:]}
    figures = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    keep = ("kvm_limit_exits_per_s", "c_loop_exits_per_s", "python_loop_exits_per_s",
            "c_loop_vs_limit", "kvm_run_ns_per_exit", "c_loop_user_ns_per_exit")
    return {name: float(figures[name]) for name in keep if name in figures}


def metrics_run(args: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.json"
        rc, out, err, wall = run([*VMM, "run", "--metrics", str(path), *args], timeout)
        metrics = json.loads(path.read_text()) if path.exists() else {}
    return {"rc": rc, "wall_s": round(wall, 3), "stdout": out, "stderr": err.strip()[-2000:],
            "metrics": metrics}


def cold_boot() -> dict:
    result = metrics_run(["--cold", "--boot-timer", "--", "true"], 600)
    metrics = result.pop("metrics")
    return {**{k: result[k] for k in ("rc", "wall_s")},
            "guest_boot_time_us": metrics.get("guest_boot_time_us"),
            "phases_ms": metrics.get("phases_ms"), "memory": metrics.get("memory"),
            "cmdline": metrics.get("guest", {}).get("cmdline")}


def restore(runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / "snap"
        rc, _out, err, wall = run([*VMM, "snapshot", "create", str(snapshot)], 600)
        if rc != 0:
            return {"snapshot_create_rc": rc, "stderr": err.strip()[-2000:]}
        restores = []
        for _ in range(runs):
            result = metrics_run(["--restore", str(snapshot), "--", "true"], 120)
            phases = result["metrics"].get("phases_ms", {})
            restores.append({"rc": result["rc"], "wall_ms": round(result["wall_s"] * 1000, 1),
                             "first_kvm_run_ms": phases.get("first_kvm_run"),
                             "command_done_ms": phases.get("command_done")})
    walls = sorted(r["wall_ms"] for r in restores)
    return {"snapshot_create_s": round(wall, 2), "runs": restores,
            "median_wall_ms": walls[len(walls) // 2]}


def smp_clock() -> dict:
    script = (f"nproc; cat {SYSFS_CLOCK}/current_clocksource {SYSFS_CLOCK}/available_clocksource;"
              " dmesg")
    rc, out, err, wall = run([*VMM, "run", "--cold", "--cpus", "2", "--cmdline", "apic=verbose",
                              "--", "sh", "-c", script], 600)
    lines = out.splitlines()
    log = [line for line in lines[3:] if CLOCK_LINES.search(line) and "command line" not in line.lower()]
    return {
        "rc": rc, "wall_s": round(wall, 2), "stderr": err.strip()[-2000:],
        "nproc": lines[0] if lines else None,
        "current_clocksource": lines[1] if len(lines) > 1 else None,
        "available_clocksources": lines[2].split() if len(lines) > 2 else [],
        "lapic_calibrated": any(CALIBRATION.search(line) for line in lines),
        "clock_log": log,
    }


def distro() -> dict:
    """Debian's own kernel, initramfs and systemd to a root shell: each phase (bench_distro.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_distro
    from vmm.images.debian import AUTOLOGIN, debian_disk, debian_system

    system = debian_system(lambda line: print(f"[bench_hardware] {line}", file=sys.stderr))
    with tempfile.TemporaryDirectory() as tmp:
        disk = debian_disk(system, Path(tmp) / "root.img", 2 << 30, AUTOLOGIN)
        result = bench_distro.boot("vmm", bench_distro.vmm_argv(system, disk),
                                   bench_distro.stop_vmm, 3600)
    result.pop("argv", None)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", metavar="FILE", help="also write the report here")
    parser.add_argument("--restores", type=int, default=3, help="restores to time (default 3)")
    parser.add_argument("--distro", action="store_true",
                        help="also boot Debian 12 as it ships to its shell (bench_distro.py, vmm "
                             "only): seconds on hardware KVM (target <= 2 s), half an hour on PVM")
    args = parser.parse_args(argv)
    if args.out:
        try:
            Path(args.out).touch()
        except OSError as e:
            parser.error(f"--out {args.out}: {e.strerror}")

    from vmm.bench.phases import host_facts

    report: dict = {"schema": "vmm-bench-hardware/1", "host": host_facts(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    step(report, "check", check)
    step(report, "cpuid", cpuid_table)
    step(report, "exits", exits)
    step(report, "cold_boot", cold_boot)
    step(report, "restore", restore, args.restores)
    step(report, "smp_clock", smp_clock)
    if args.distro:
        step(report, "distro", distro)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    failed = [name for name, value in report.items()
              if isinstance(value, dict) and ("error" in value or value.get("rc", 0) != 0)]
    if failed:
        print(f"[bench_hardware] steps that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
