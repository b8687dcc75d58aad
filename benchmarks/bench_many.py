#!/usr/bin/env python3
"""How many guests of the default size does this host hold, and what limits it?

    python benchmarks/bench_many.py [--counts 1,4,8,16] [--seconds 20]

For each count N: N `vmm run -- sleep SECONDS` processes at once (restored
from the cached snapshot of the default guest, made first if needed), all
started together. Measured per guest, from the kernel's accounting of each
vmm process (``os.wait4``): CPU time (user + system: on PVM the guest
kernel's emulated work is the host kernel's system time) and peak RSS; and
for the host, the CPU used by all N over the wall time, against the cores it
has. An idle guest still costs CPU for its timer tick (its kernel runs on the
jiffies clock, periodic, on PVM), so CPU, not memory, is what runs out first
here. The machine and KVM flavour are printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one_round(count: int, seconds: float) -> dict:
    started = time.monotonic()
    processes = [subprocess.Popen([sys.executable, "-m", "vmm", "run", "--", "sleep", f"{seconds:g}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
                 for _ in range(count)]
    cpu, rss, failed = [], [], 0
    for process in processes:
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        failed += process.returncode != 0
        cpu.append(usage.ru_utime + usage.ru_stime)
        rss.append(usage.ru_maxrss * 1024)
    wall = time.monotonic() - started
    return {"count": count, "wall_s": wall, "failed": failed,
            "cpu_s_per_guest": sum(cpu) / count, "peak_rss_mib_per_guest": sum(rss) / count / 2**20,
            "host_cpu_share": sum(cpu) / wall / (os.cpu_count() or 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    from vmm.bench.phases import host_facts, machine_line

    host = host_facts()
    print(f"# {machine_line(host)}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    made = subprocess.run([sys.executable, "-m", "vmm", "run", "--", "true"], capture_output=True,
                          cwd=ROOT)  # the cached snapshot, so every guest below is a restore
    if made.returncode != 0:
        raise SystemExit(f"bench: vmm run failed: {made.stderr.decode()}")
    print(f"{'guests':>6} {'wall':>7} {'CPU/guest':>10} {'CPU/guest/s':>12} {'RSS/guest':>10} "
          f"{'host CPU used':>14} {'failed':>6}")
    for count in (int(c) for c in args.counts.split(",")):
        r = one_round(count, args.seconds)
        print(f"{count:>6} {r['wall_s']:6.1f}s {r['cpu_s_per_guest']:9.2f}s "
              f"{r['cpu_s_per_guest'] / args.seconds * 100:10.1f} % {r['peak_rss_mib_per_guest']:8.1f}Mi "
              f"{r['host_cpu_share'] * 100:12.0f} % {r['failed']:>6}", flush=True)


if __name__ == "__main__":
    main()
