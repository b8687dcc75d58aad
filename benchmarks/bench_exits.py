#!/usr/bin/env python3
"""How fast can vmm take VM exits? exitbench under three loops, one figure per line.

    python3 benchmarks/bench_exits.py [-n N] [--rounds R]

The guest is firmware/exitbench: it reads N from the benchmark port, then does
N one-byte `out`s to that port, each one a VM exit, then prints a line and
ends. Three loops run it, interleaved, R rounds (default 3), median reported:

kvm limit
    A bare loop in C that does nothing but re-enter ``KVM_RUN``: no rule table,
    no clock reads per exit, no statistics; it answers the one `in` and stops
    at the first exit that is not the benchmark port. It is compiled here, at
    run time, with cffi (gcc needed), and runs on a VM built by the same
    ``builder.build_firmware_vm`` as ``vmm run``. Nothing can go faster on this
    host: its time is what KVM (entry, exit, the guest's three instructions)
    costs. ``kvm_limit_exits_per_s`` = exits / wall time.
c loop
    ``vmm run --firmware exitbench --runloop c`` in-process
    (``session.run_firmware``): vmm/kvm/runloop.c completes the benchmark
    port's exits from its rule table. ``c_loop_vs_limit`` =
    c_loop_exits_per_s / kvm_limit_exits_per_s: 1.0 means the C loop adds
    nothing to what KVM costs anyway (target: >= 0.9).
python loop
    The same with ``--runloop python``: every exit decoded and dispatched in
    Python.

``*_user_ns_per_exit``: wall time outside ``KVM_RUN`` per exit, i.e. what the
loop itself costs (wall - time inside KVM_RUN as the loop measured it, / exits).
For the bare loop it is not measured (timing each ioctl would be the very
overhead the bare loop leaves out); ``kvm_run_ns_per_exit`` is the C loop's
own measure of the time inside ``KVM_RUN``. ``*_in_kvm_fraction``: the share of
a loop's wall time spent inside ``KVM_RUN``, measured within each run, so it
holds even when other work on the host makes runs differ from each other
(``c_loop_vs_limit`` compares separate runs and is only as good as the host is
quiet: see ``load_average_1min``).

Exits counted: the whole run for the two vmm loops (N + 18 with the
start and the console line), the `in` and the N `out`s for the bare loop.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

BARE_LOOP_SOURCE = r"""
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <linux/kvm.h>

/* Re-enter the guest until an exit that is not port I/O on `port`; answer an
 * IN there with `value`. Returns the number of exits, *ns the wall time. */
long bare_kvm_run_loop(int fd, void *page, unsigned short port, unsigned int value,
                       unsigned long long *ns)
{
    struct kvm_run *run = page;
    struct timespec a, b;
    long exits = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            exits = -errno;
            break;
        }
        exits++;
        if (run->exit_reason != KVM_EXIT_IO || run->io.port != port)
            break;
        if (run->io.direction == KVM_EXIT_IO_IN)
            memcpy((char *)run + run->io.data_offset, &value, run->io.size);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    *ns = (unsigned long long)(b.tv_sec - a.tv_sec) * 1000000000ull + b.tv_nsec - a.tv_nsec;
    return exits;
}
"""
BARE_LOOP_CDEF = ("long bare_kvm_run_loop(int fd, void *page, unsigned short port, unsigned int value, "
                  "unsigned long long *ns);")


def build_bare_loop():
    """Compile the bare loop (a few hundred ms with gcc; cached per source)."""
    import hashlib
    import importlib.util

    from cffi import FFI

    from vmm.firmware import cache_dir

    key = hashlib.sha256((BARE_LOOP_SOURCE + BARE_LOOP_CDEF).encode()).hexdigest()[:12]
    name = f"_bare_loop_{key}"
    directory = cache_dir() / "bench"
    directory.mkdir(parents=True, exist_ok=True)
    built = list(directory.glob(f"{name}*.so"))
    if not built:
        ffi = FFI()
        ffi.cdef(BARE_LOOP_CDEF)
        ffi.set_source(name, BARE_LOOP_SOURCE, extra_compile_args=["-O2"])
        with tempfile.TemporaryDirectory(dir=directory) as work:
            so = Path(ffi.compile(tmpdir=work, verbose=False))
            target = directory / so.name
            os.replace(so, target)
            built = [target]
    spec = importlib.util.spec_from_file_location(name, built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi, module.lib


def run_bare(n: int, bare) -> dict:
    from vmm.arch.x86_64.layout import BENCH_PORT, MiB
    from vmm.builder import build_firmware_vm
    from vmm.config import VmConfig
    from vmm.kvm.ioctl import ffi as vmm_ffi

    bffi, blib = bare
    machine = build_firmware_vm(VmConfig(mem=2 * MiB, firmware="exitbench"),
                                lambda data: None, lambda status: None, bench_count=n)
    try:
        vcpu = machine.vcpus[0]
        page = bffi.cast("void *", int(vmm_ffi.cast("uintptr_t", vcpu.run_struct)))
        ns = bffi.new("unsigned long long *")
        exits = blib.bare_kvm_run_loop(vcpu.fd, page, BENCH_PORT, n, ns)
        if exits < 0:
            raise OSError(-exits, os.strerror(-exits), "KVM_RUN")
        exits -= 1  # the last one is the first console byte, not the benchmark port
        if exits != n + 1:
            raise RuntimeError(f"bare loop: {exits} benchmark exits, expected {n + 1}")
        return {"exits": exits, "wall_ns": ns[0], "in_kvm_ns": None}
    finally:
        machine.close()


def run_vmm(n: int, runloop: str) -> dict:
    from vmm.arch.x86_64.layout import MiB
    from vmm.config import VmConfig
    from vmm.session import run_firmware

    out = io.BytesIO()
    result = run_firmware(VmConfig(mem=2 * MiB, firmware="exitbench", runloop=runloop),
                          stdout=out, stderr=io.StringIO(), bench_count=n, handle_signals=False)
    if result.status != 0 or out.getvalue() != b"exitbench: done\n" or result.stats.total != n + 18:
        raise RuntimeError(f"{runloop} loop: status {result.status}, output {out.getvalue()!r}, "
                           f"{result.stats.total} exits (expected {n + 18})")
    stats = result.stats
    return {"exits": stats.total, "wall_ns": stats.wall_ns, "in_kvm_ns": stats.ns_in_guest}


def machine_facts() -> list[tuple[str, str]]:
    from vmm.kvm.flavour import detect_flavour

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        ("kvm_flavour", detect_flavour()),
        ("cpu_model", model.replace(" ", "_")),
        ("cpus", str(os.cpu_count())),
        ("kernel", platform.release()),
        ("python", platform.python_version()),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200_000, help="exits per run (default 200000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median; default 3)")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 0xFFFFFFFF:
        parser.error("-n must be between 1 and 2**32-1")

    bare = build_bare_loop()
    runs: dict[str, list[dict]] = {"kvm_limit": [], "c_loop": [], "python_loop": []}
    for _ in range(args.rounds):
        runs["kvm_limit"].append(run_bare(args.n, bare))
        runs["c_loop"].append(run_vmm(args.n, "c"))
        runs["python_loop"].append(run_vmm(args.n, "python"))

    def median(name: str, f) -> float:
        return statistics.median(f(r) for r in runs[name])

    rate = {name: median(name, lambda r: r["exits"] / (r["wall_ns"] / 1e9)) for name in runs}
    user = {name: median(name, lambda r: (r["wall_ns"] - r["in_kvm_ns"]) / r["exits"])
            for name in ("c_loop", "python_loop")}
    kvm_run = median("c_loop", lambda r: r["in_kvm_ns"] / r["exits"])
    # Within one run, so immune to the host's load changing between runs:
    # the share of each loop's wall time spent inside KVM_RUN.
    in_kvm = {name: median(name, lambda r: r["in_kvm_ns"] / r["wall_ns"])
              for name in ("c_loop", "python_loop")}

    lines = [
        ("exits_per_run", str(args.n)),
        ("rounds", str(args.rounds)),
        *machine_facts(),
        ("kvm_limit_exits_per_s", f"{rate['kvm_limit']:.0f}"),
        ("c_loop_exits_per_s", f"{rate['c_loop']:.0f}"),
        ("python_loop_exits_per_s", f"{rate['python_loop']:.0f}"),
        ("c_loop_vs_limit", f"{rate['c_loop'] / rate['kvm_limit']:.3f}"),
        ("python_loop_vs_limit", f"{rate['python_loop'] / rate['kvm_limit']:.3f}"),
        ("kvm_limit_ns_per_exit", f"{1e9 / rate['kvm_limit']:.0f}"),
        ("kvm_run_ns_per_exit", f"{kvm_run:.0f}"),
        ("c_loop_user_ns_per_exit", f"{user['c_loop']:.0f}"),
        ("python_loop_user_ns_per_exit", f"{user['python_loop']:.0f}"),
        ("c_loop_in_kvm_fraction", f"{in_kvm['c_loop']:.3f}"),
        ("python_loop_in_kvm_fraction", f"{in_kvm['python_loop']:.3f}"),
        ("load_average_1min", f"{os.getloadavg()[0]:.2f}"),
    ]
    for name, value in lines:
        print(f"{name} {value}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
