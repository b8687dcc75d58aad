#!/usr/bin/env python3
"""TCP throughput through vmm's NIC, each backend beside the host's own loopback, in one run.

    python benchmarks/bench_net.py [--mb 4] [--json FILE]        (root: the TAP case makes a netns)

For each of: the host's loopback (a Python client), `--net user` (passt), `--net tap` (in a
network namespace made here): MB megabytes guest -> host (`dd if=/dev/zero | nc`), then MB
host -> guest (`nc > /dev/null`), timed on the host from the first byte to the end of the
stream. For the VM cases also, from `vmm run --metrics`: exits, time spent in the VMM
outside KVM_RUN, and the NIC's notifications, interrupts and ring work (busy time), per MB.
Traffic goes only to the host's loopback and to the namespace made here. The machine and the
KVM flavour are printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


class Sink:
    """Accepts one connection, reads to EOF: (bytes, seconds from the first byte to EOF)."""

    def __init__(self, host: str) -> None:
        self.socket = socket.create_server((host, 0))
        self.port = self.socket.getsockname()[1]
        self.result: tuple[int, float] | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        self.socket.settimeout(600)
        connection, _ = self.socket.accept()
        total, first = 0, None
        while chunk := connection.recv(1 << 16):
            first = first or time.perf_counter()
            total += len(chunk)
        self.result = (total, time.perf_counter() - (first or time.perf_counter()))


class Source:
    """Accepts one connection, sends ``size`` bytes, waits for the peer to close: seconds."""

    def __init__(self, host: str, size: int) -> None:
        self.socket = socket.create_server((host, 0))
        self.port = self.socket.getsockname()[1]
        self.size = size
        self.seconds: float | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        self.socket.settimeout(600)
        connection, _ = self.socket.accept()
        start = time.perf_counter()
        block = bytes(1 << 16)
        left = self.size
        while left:
            sent = connection.send(block[:min(left, len(block))])
            left -= sent
        connection.shutdown(socket.SHUT_WR)
        while connection.recv(1 << 16):
            pass
        self.seconds = time.perf_counter() - start


def loopback(size: int) -> dict:
    sink, source = Sink("127.0.0.1"), Source("127.0.0.1", size)
    with socket.create_connection(("127.0.0.1", sink.port)) as c:
        block = bytes(1 << 16)
        for _ in range(size // len(block)):
            c.sendall(block)
    with socket.create_connection(("127.0.0.1", source.port)) as c:
        while c.recv(1 << 16):
            pass
    _wait(lambda: sink.result is not None and source.seconds is not None)
    return {"backend": "host loopback", "to_host_mb_s": size / MiB / sink.result[1],
            "from_host_mb_s": size / MiB / source.seconds}


def _wait(done, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def through_vmm(name: str, net: str, host: str, size: int, prefix: list[str],
                bind: str) -> dict:
    sink, source = Sink(bind), Source(bind, size)
    count = size // (64 * 1024)
    script = (f"dd if=/dev/zero bs=64k count={count} 2>/dev/null | nc {host} {sink.port}; "
              f"nc {host} {source.port} > /dev/null")
    with tempfile.TemporaryDirectory() as work:
        metrics = Path(work) / "metrics.json"
        started = time.perf_counter()
        result = subprocess.run([*prefix, sys.executable, "-m", "vmm", "run", "--net", net,
                                 "--metrics", str(metrics), "--", "sh", "-c", script],
                                capture_output=True, text=True, timeout=1200)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            return {"backend": name, "error": result.stderr.strip().splitlines()[-1:]}
        data = json.loads(metrics.read_text())
    _wait(lambda: sink.result is not None and source.seconds is not None)
    nic = data["devices"].get("virtio-net0", {})
    mb = 2 * size / MiB
    transfer = sink.result[1] + source.seconds
    return {
        "backend": name,
        "to_host_mb_s": size / MiB / sink.result[1],
        "from_host_mb_s": size / MiB / source.seconds,
        "exits_per_mb": data["exits"]["exits_total"] / mb,  # the boot's included: an upper bound
        "vmm_share_of_transfer": (nic.get("busy_ns", 0) / 1e9) / transfer,
        "notifications_per_mb": nic.get("notifications", 0) / mb,
        "interrupts_per_mb": nic.get("interrupts", 0) / mb,
        "run_seconds": wall,
    }


def tap_case(size: int) -> dict:
    if os.geteuid() != 0:
        return {"backend": "--net tap", "error": "needs root (a network namespace)"}
    name = f"vmmbench{os.getpid()}"
    run = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True)  # noqa: E731
    run("netns", "add", name)
    try:
        run("-n", name, "link", "set", "lo", "up")
        run("-n", name, "tuntap", "add", "vbtap0", "mode", "tap")
        run("-n", name, "addr", "add", "10.78.0.1/24", "dev", "vbtap0")
        run("-n", name, "link", "set", "vbtap0", "up")
        # the host's servers must live in the namespace too: run this script's helper there
        return _tap_in_namespace(name, size)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _tap_in_namespace(namespace: str, size: int) -> dict:
    result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, __file__,
                             "--inner-tap", str(size)], capture_output=True, text=True,
                            timeout=1200)
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"backend": "--net tap", "error": result.stderr.strip().splitlines()[-1:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=4, help="megabytes each way [4]")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--inner-tap", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner_tap:  # inside the namespace: the TAP case alone, as one JSON line
        print(json.dumps(through_vmm("--net tap", "tap=vbtap0,ip=10.78.0.2/24,gw=10.78.0.1",
                                     "10.78.0.1", args.inner_tap, [], "10.78.0.1")))
        return 0
    from vmm.bench.phases import host_facts, machine_line

    size = args.mb * MiB
    print(f"bench_net: {args.mb} MiB each way; machine: {machine_line(host_facts())}", flush=True)
    rows = [loopback(size),
            through_vmm("--net user (passt)", "user", "10.0.2.2", size, [], "127.0.0.1"),
            tap_case(size)]
    print(f"\n{'backend':<22} {'guest->host':>12} {'host->guest':>12} {'exits/MB':>9} "
          f"{'VMM share':>9} {'kicks/MB':>9} {'irqs/MB':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['backend']:<22} error: {row['error']}")
            continue
        extra = ""
        if "exits_per_mb" in row:
            extra = (f" {row['exits_per_mb']:>9.0f} {100 * row['vmm_share_of_transfer']:>8.1f}%"
                     f" {row['notifications_per_mb']:>9.0f} {row['interrupts_per_mb']:>8.0f}")
        print(f"{row['backend']:<22} {row['to_host_mb_s']:>8.2f} MB/s {row['from_host_mb_s']:>8.2f} MB/s"
              + extra)
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host_facts(), "mib": args.mb,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
