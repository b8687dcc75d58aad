#!/usr/bin/env python3
"""Restore time against guest RAM size: does restoring cost more with more --mem?

    python benchmarks/bench_restore.py [--mem 128M,512M,2G] [--runs 5] [--json FILE]

For each size, one snapshot of the default guest (``vmm snapshot create``: a
cold boot, not timed), then ``--runs`` rounds of ``vmm run --restore DIR
--metrics F -- true``, the sizes interleaved in each round (each round starts
one size later) so that a busy host hits them alike. Medians of:

* ``restore``: ``state_loaded`` → ``kvm_ready``, the restore proper (VM and
  irqchip created, the memory file mapped, devices and vCPU states set);
* ``first KVM_RUN``: process start → first ``KVM_RUN`` (Python's start and
  imports included);
* ``command done``: process start → the guest's `true` exited;
* ``wall``: the whole process, measured here (VMM exit and teardown included);
* ``memory file``: what the snapshot stores of its RAM (a sparse file).

The memory file is mapped ``MAP_PRIVATE``, never read up front, so the
restore should not grow with RAM; only the pages the guest touches cost
(page faults served from the page cache), and those are the same pages for
every size. The machine and KVM flavour are printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def vmm(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def one_restore(directory: Path, work: Path) -> dict:
    metrics = work / "metrics.json"
    env = {**os.environ, "VMM_SPAWN_NS": str(time.monotonic_ns())}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vmm", "run", "--restore", str(directory),
                             "--metrics", str(metrics), "--", "true"],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    wall = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"bench: restore of {directory} failed ({result.returncode}): {result.stderr}")
    phases = json.loads(metrics.read_text())["phases_ms"]
    return {
        "restore_ms": phases["kvm_ready"] - phases["state_loaded"],
        "first_kvm_run_ms": phases["first_kvm_run"],
        "command_done_ms": phases["command_done"],
        "wall_ms": wall * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mem", default="128M,512M,2G", help="sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args()

    from vmm.bench.phases import host_facts, machine_line

    host = host_facts()
    print(f"# {machine_line(host)}; load average {os.getloadavg()[0]:.2f}")
    sizes = [s.strip() for s in args.mem.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="vmm-bench-restore-"))
    try:
        snapshots = {}
        for size in sizes:
            directory = work / f"snapshot-{size}"
            started = time.monotonic()
            made = vmm("snapshot", "create", str(directory), "--mem", size)
            if made.returncode != 0:
                raise SystemExit(f"bench: snapshot create --mem {size} failed: {made.stderr}")
            snapshots[size] = directory
            stored = (directory / "memory").stat().st_blocks * 512
            print(f"# --mem {size}: snapshot made in {time.monotonic() - started:.1f} s "
                  f"(cold boot + save), memory file {stored / 2**20:.1f} MiB on disk", flush=True)
        samples: dict[str, list[dict]] = {size: [] for size in sizes}
        for round_ in range(args.runs):
            order = sizes[round_ % len(sizes):] + sizes[: round_ % len(sizes)]
            for size in order:
                samples[size].append(one_restore(snapshots[size], work))
        results = {}
        print(f"{'--mem':>6} {'restore':>9} {'1st KVM_RUN':>12} {'cmd done':>9} {'wall':>8} {'memory file':>12}")
        for size in sizes:
            median = {key: statistics.median(s[key] for s in samples[size]) for key in samples[size][0]}
            stored = (snapshots[size] / "memory").stat().st_blocks * 512
            results[size] = {**median, "memory_file_bytes": stored, "runs": samples[size]}
            print(f"{size:>6} {median['restore_ms']:7.1f}ms {median['first_kvm_run_ms']:10.1f}ms "
                  f"{median['command_done_ms']:7.1f}ms {median['wall_ms']:6.1f}ms "
                  f"{stored / 2**20:9.1f}MiB")
        base = results[sizes[0]]
        for size in sizes[1:]:
            print(f"# restore at {size} / at {sizes[0]}: "
                  f"{results[size]['restore_ms'] / base['restore_ms']:.2f}x; "
                  f"wall {results[size]['wall_ms'] / base['wall_ms']:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps({"host": host, "runs": args.runs, "results": results},
                                                  indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
