#!/usr/bin/env python3
"""Boot-to-userspace time of the default guest, before and after the kernel diet.

    python benchmarks/bench_boot_phases.py [--runs 5] [--before PATH|none] [--kernel PATH]
                                           [--profile-runs 1] [--top 10] [--json FILE]

Each run is a fresh `vmm run --cold --metrics F -- true` process; the figure is
``init_reached - first_kvm_run`` (the guest's own boot: first instruction to
our /init writing the boot-timer port), with process start → init beside it.
Variants are interleaved (after, before, after, before, ...) so that load from
other processes on a shared host hits both alike; medians are reported.

The "before" variant is the guest as it was before the diet (docs/profiling.md):
the saved pre-diet vmlinux (default ``~/.cache/vmm/kernel-prediet/vmlinux``,
copied there from the kernel cache before guest-kernel/config changed) booted
*without* the command-line part of the diet (the options listed in
:data:`DIET_CMDLINE` and :data:`DIET_HIDDEN_FEATURES`, and PVM's cost-only
options ``PVM_COST_OPTIONS``, are taken out of vmm's command line for it, in the
child process only).

Then one more run per variant with ``--profile`` gives the top profile entries
and the profiler's overhead (its boot-to-init against the unprofiled median).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# What the diet added to vmm's kernel command line (vmm/builder.py BASE_CMDLINE,
# vmm/arch/x86_64/pvm.py PVM_HIDDEN_FEATURES); the "before" variant boots without.
DIET_CMDLINE = ("noreplace-smp",)  # prefixes of options to take out
DIET_HIDDEN_FEATURES = ("erms", "fsrm")
DEFAULT_BEFORE = Path(os.environ.get("VMM_CACHE_DIR", Path.home() / ".cache" / "vmm")) / "kernel-prediet" / "vmlinux"

# Runs in the child: optionally undo the command-line diet, then the real CLI.
CHILD = r"""
import sys, json
spec = json.loads(sys.argv[1])
if spec["undiet"]:
    import vmm.builder as b
    import vmm.arch.x86_64.pvm as p
    b.BASE_CMDLINE = tuple(o for o in b.BASE_CMDLINE
                           if not any(o.startswith(d) for d in spec["diet_cmdline"]))
    # The PVM options as pvm.py builds them, less the diet: hidden ERMS/FSRM and the cost options.
    p.PVM_CMDLINE = tuple(
        "clearcpuid=" + ",".join(f for f in p.PVM_HIDDEN_FEATURES if f not in spec["diet_features"])
        if o.startswith("clearcpuid=") else o
        for o in p.PVM_CMDLINE if o not in p.PVM_COST_OPTIONS)
sys.argv = ["vmm", "run", *spec["args"]]
from vmm.cli import main
main()
"""


def one_run(kernel: str | None, undiet: bool, profile: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="vmm-bench-") as tmp:
        metrics = Path(tmp) / "metrics.json"
        args = ["--cold", "--metrics", str(metrics)]
        if kernel:
            args += ["--kernel", kernel]
        if profile:
            args += ["--profile", "--profile-out", str(Path(tmp) / "profile.folded")]
        args += ["--", "true"]
        spec = {"undiet": undiet, "args": args, "diet_cmdline": DIET_CMDLINE,
                "diet_features": DIET_HIDDEN_FEATURES}
        env = {**os.environ, "VMM_SPAWN_NS": str(time.monotonic_ns())}
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True,
                              timeout=timeout, env=env, cwd=ROOT)
        err = proc.stderr.decode(errors="replace")
        if proc.returncode != 0 or not metrics.exists():
            raise SystemExit(f"bench: vmm run failed (status {proc.returncode}):\n{err[-2000:]}")
        data = json.loads(metrics.read_text())
    ns = data["phases_ns"]
    result = {
        "boot_to_init_s": (ns["init_reached"] - ns["first_kvm_run"]) / 1e9,
        "process_to_init_s": (data.get("guest_boot_time_us") or 0) / 1e6,
        "host": data["host"],
        "cmdline": data.get("guest", {}).get("cmdline", ""),
    }
    if profile:
        result["profile"] = [line for line in err.splitlines()
                             if re.match(r"\s*\d+\.\d%\s+\d+\s+\S", line) or "vmm: profile:" in line]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel", help="the 'after' kernel (default: our current guest kernel)")
    ap.add_argument("--before", default=str(DEFAULT_BEFORE),
                    help="pre-diet vmlinux, or 'none' to measure only the current guest")
    ap.add_argument("--profile-runs", type=int, default=1, help="profiled runs per variant (0: none)")
    ap.add_argument("--top", type=int, default=10, help="profile entries to show")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", metavar="FILE", help="write all figures here")
    opts = ap.parse_args()

    from vmm.bench.phases import host_facts, machine_line

    variants = {"after": (opts.kernel, False)}
    if opts.before != "none":
        if not Path(opts.before).exists():
            print(f"bench: no pre-diet kernel at {opts.before}: measuring only the current guest "
                  "(--before none to silence)", file=sys.stderr)
        else:
            variants["before"] = (opts.before, True)
    host = host_facts()
    print(f"machine: {machine_line(host)}")
    print(f"KVM flavour: {host['kvm_flavour']} ({host['kvm_description']}); "
          f"load average at start: {host['load_average_1min']}")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(opts.runs):
        for name, (kernel, undiet) in variants.items():
            r = one_run(kernel, undiet, False, opts.timeout)
            runs[name].append(r)
            print(f"  run {i + 1}/{opts.runs} {name:6s}: boot→init {r['boot_to_init_s']:6.2f} s, "
                  f"process start→init {r['process_to_init_s']:6.2f} s", flush=True)
    profiled: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(opts.profile_runs):
        for name, (kernel, undiet) in variants.items():
            r = one_run(kernel, undiet, True, opts.timeout)
            profiled[name].append(r)
            print(f"  profiled {i + 1}/{opts.profile_runs} {name:6s}: boot→init "
                  f"{r['boot_to_init_s']:6.2f} s", flush=True)

    print(f"\nmedians of {opts.runs} runs (load average now {os.getloadavg()[0]:.2f}):")
    print(f"{'variant':8s} {'boot→init':>10s} {'min':>7s} {'max':>7s} {'start→init':>11s}"
          + ("  profiled boot→init (overhead)" if opts.profile_runs else ""))
    summary = {}
    for name in variants:
        b = [r["boot_to_init_s"] for r in runs[name]]
        p = [r["process_to_init_s"] for r in runs[name]]
        med = statistics.median(b)
        line = f"{name:8s} {med:9.2f}s {min(b):6.2f}s {max(b):6.2f}s {statistics.median(p):10.2f}s"
        summary[name] = {"boot_to_init_median_s": med, "boot_to_init_s": b, "process_to_init_s": p}
        if profiled[name]:
            pm = statistics.median(r["boot_to_init_s"] for r in profiled[name])
            line += f"  {pm:9.2f}s ({100 * (pm / med - 1):+.1f} %)"
            summary[name]["profiled_boot_to_init_s"] = [r["boot_to_init_s"] for r in profiled[name]]
        print(line)
    if "before" in summary:
        a, b = summary["after"]["boot_to_init_median_s"], summary["before"]["boot_to_init_median_s"]
        print(f"diet: {b:.2f} s → {a:.2f} s ({b / a:.2f}x faster to userspace)")
    for name in variants:
        if profiled[name]:
            print(f"\ntop profile entries, {name} (one profiled run):")
            for line in profiled[name][0]["profile"][: opts.top + 2]:
                print("  " + line.removeprefix("vmm: profile: ").rstrip())
            summary[name]["profile"] = profiled[name][0]["profile"]
        summary[name]["cmdline"] = runs[name][0]["cmdline"]
    if opts.json:
        Path(opts.json).write_text(json.dumps({"host": host, "variants": summary}, indent=2))


if __name__ == "__main__":
    main()
