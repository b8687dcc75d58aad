#!/usr/bin/env python3
"""TCP through vmm's NIC, each backend with and without offloads, beside the host's own
loopback and the guest's own disk reads, in one run.

    python benchmarks/bench_net.py [--mb 4] [--json FILE]     (root: the TAP cases make a netns)

For each of: the host's loopback (Python both ends), `--net user` (passt) and `--net tap` (in a
network namespace made here), each with offloads (the default) and with `offload=off`:
- guest -> host: the host fetches MB megabytes from busybox httpd in the guest (sendfile: the
  guest's kernel sends from its page cache, no copy through a user program);
- host -> guest: the host sends MB megabytes to `nc > /dev/null` in the guest;
- request/response: 1-byte messages to `nc -l -e cat` in the guest, over one connection
  (median round trip);
timed on the host. For the VM cases also, from `vmm run --metrics`: the NIC's frames (and how
many were segments of up to 64 KiB), exits, kicks and interrupts per MB, and the VMM's ring work
as a share of the transfer time. The reference the issue sets: the same guest's virtio-blk read
rate (`dd iflag=direct bs=1M` of a 16 MiB disk, timed by the guest). Traffic goes only to the
host's loopback and to the namespace made here. The machine and the KVM flavour are printed
with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
ROUND_TRIPS = 100


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
    echo = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = echo.accept()
        while data := connection.recv(1):
            connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    trips = _round_trips(("127.0.0.1", echo.getsockname()[1]), ROUND_TRIPS)
    _wait(lambda: sink.result is not None and source.seconds is not None)
    return {"backend": "host loopback (Python)", "to_host_mb_s": size / MiB / sink.result[1],
            "from_host_mb_s": size / MiB / source.seconds,
            "round_trip_ms": 1000 * statistics.median(trips)}


def _wait(done, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _connect(address: tuple[str, int], timeout: float = 120) -> socket.socket:
    """Connect, retrying while the guest (or passt's forward) is not listening yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(address, timeout=600)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _http_get(address: tuple[str, int], path: str) -> tuple[int, float]:
    """GET ``path`` (HTTP/1.0): (body bytes, seconds from the first byte to the end)."""
    while True:
        with _connect(address) as c:
            c.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = c.recv(1 << 16)
            first = time.perf_counter()
            total = len(data)
            while chunk := c.recv(1 << 16):
                total += len(chunk)
            seconds = time.perf_counter() - first
        if data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200"):
            body_start = data.index(b"\r\n\r\n") + 4
            return total - body_start, seconds
        time.sleep(0.5)  # the forward answered before httpd listened: again


def _round_trips(address: tuple[str, int], count: int) -> list[float]:
    with _connect(address) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            c.sendall(b"x")
            if c.recv(1) != b"x":
                break
            times.append(time.perf_counter() - start)
        return times


def through_vmm(name: str, net: str, host: str, size: int, bind: str,
                guest: tuple[str, int, int, int] | None = None) -> dict:
    """``host``: the address the guest reaches the host's servers at; ``bind``: where they
    listen; ``guest``: where the host reaches the guest's web, echo and done ports (None:
    through passt's forwards, made here)."""
    source = Source(bind, size)
    if guest is None:
        web, echo, done = _free_port(), _free_port(), _free_port()
        net += f",hostfwd=tcp:{web}:80,hostfwd=tcp:{echo}:82,hostfwd=tcp:{done}:81"
        guest = ("127.0.0.1", web, echo, done)
    address, web, echo, done = guest
    script = (f"mkdir /www; dd if=/dev/zero of=/www/blob bs=1M count={size // MiB} 2>/dev/null; "
              "httpd -p 80 -h /www; (nc -l -p 82 -e cat &); "
              f"nc {host} {source.port} > /dev/null; nc -l -p 81 > /dev/null")
    with tempfile.TemporaryDirectory() as work:
        metrics = Path(work) / "metrics.json"
        started = time.perf_counter()
        vm = subprocess.Popen([sys.executable, "-m", "vmm", "run", "--net", net,
                               "--metrics", str(metrics), "--", "sh", "-c", script],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait(lambda: source.seconds is not None or vm.poll() is not None, timeout=1200)
            if source.seconds is None:
                return {"backend": name, "error": vm.communicate()[1].strip().splitlines()[-1:]}
            got, to_host = _http_get((address, web), "/blob")
            trips = _round_trips((address, echo), ROUND_TRIPS)
            _connect((address, done)).close()
            _, err = vm.communicate(timeout=120)
        finally:
            if vm.poll() is None:
                vm.kill()
        wall = time.perf_counter() - started
        if vm.returncode != 0 or got != size or len(trips) != ROUND_TRIPS:
            return {"backend": name, "error": [f"status {vm.returncode}, {got} bytes, "
                                               f"{len(trips)} round trips", *err.splitlines()[-1:]]}
        data = json.loads(metrics.read_text())
    nic = data["devices"].get("net0", {})
    mb = 2 * size / MiB
    transfer = to_host + source.seconds
    return {
        "backend": name,
        "to_host_mb_s": size / MiB / to_host,
        "from_host_mb_s": size / MiB / source.seconds,
        "round_trip_ms": 1000 * statistics.median(trips),
        "offloads": nic.get("offloads"),
        "frames_sent": nic.get("frames_sent"), "segments_sent": nic.get("segmented_sent"),
        "kb_per_frame_sent": nic.get("bytes_sent", 0) / 1024 / max(1, nic.get("frames_sent", 1)),
        "frames_received": nic.get("frames_received"),
        "segments_received": nic.get("segmented_received"),
        "exits_per_mb": data["exits"]["exits_total"] / mb,  # the boot's included: an upper bound
        "vmm_share_of_transfer": (nic.get("busy_ns", 0) / 1e9) / transfer,
        "notifications_per_mb": nic.get("notifications", 0) / mb,
        "interrupts_per_mb": nic.get("interrupts", 0) / mb,
        "run_seconds": wall,
    }


def disk_read_rate(work: Path) -> dict:
    """The same guest reading a 16 MiB virtio-blk disk (O_DIRECT, 1 MiB requests), timed by
    the guest's own clock (/proc/uptime, 20 ms ticks)."""
    image = work / "disk.img"
    image.write_bytes(os.urandom(16 * MiB))
    script = ("read a b < /proc/uptime; dd if=/dev/vda of=/dev/null bs=1M iflag=direct "
              "2>/dev/null; read c d < /proc/uptime; echo $a $c")
    result = subprocess.run([sys.executable, "-m", "vmm", "run", "--disk", f"{image},ro", "--",
                             "sh", "-c", script], capture_output=True, text=True, timeout=600)
    try:
        before, after = map(float, result.stdout.split())
    except ValueError:
        return {"backend": "virtio-blk read", "error": result.stderr.strip().splitlines()[-1:]}
    return {"backend": "virtio-blk read (guest)", "to_host_mb_s": 16 / (after - before)}


def tap_case(size: int, offload: bool) -> dict:
    name = f"--net tap{'' if offload else ', offload=off'}"
    if os.geteuid() != 0:
        return {"backend": name, "error": "needs root (a network namespace)"}
    namespace = f"vmmbench{os.getpid()}"
    run = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True)  # noqa: E731
    run("netns", "add", namespace)
    try:
        run("-n", namespace, "link", "set", "lo", "up")
        run("-n", namespace, "tuntap", "add", "vbtap0", "mode", "tap")
        run("-n", namespace, "addr", "add", "10.78.0.1/24", "dev", "vbtap0")
        run("-n", namespace, "link", "set", "vbtap0", "up")
        # the host's servers must live in the namespace too: run this script's helper there
        result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, __file__,
                                 "--inner-tap", str(size), "--offload", "on" if offload else "off"],
                                capture_output=True, text=True, timeout=1800)
        try:
            return json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"backend": name, "error": result.stderr.strip().splitlines()[-1:]}
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=4, help="megabytes each way [4]")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--inner-tap", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offload", default="on", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner_tap:  # inside the namespace: one TAP case, as one JSON line
        suffix = "" if args.offload == "on" else ", offload=off"
        print(json.dumps(through_vmm(f"--net tap{suffix}",
                                     f"tap=vbtap0,ip=10.78.0.2/24,gw=10.78.0.1,offload={args.offload}",
                                     "10.78.0.1", args.inner_tap, "10.78.0.1",
                                     guest=("10.78.0.2", 80, 82, 81))))
        return 0
    from vmm.bench.phases import host_facts, machine_line

    size = args.mb * MiB
    print(f"bench_net: {args.mb} MiB each way; machine: {machine_line(host_facts())}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        rows = [loopback(size), disk_read_rate(Path(work))]
    for offload in (True, False):
        suffix = "" if offload else ",offload=off"
        rows.append(through_vmm(f"--net user{suffix}", f"user{suffix}", "10.0.2.2", size,
                                "127.0.0.1"))
        rows.append(tap_case(size, offload))
    print(f"\n{'':<24} {'guest->host':>12} {'host->guest':>12} {'round trip':>10} "
          f"{'KB/frame':>8} {'exits/MB':>8} {'VMM share':>9} {'kicks/MB':>8} {'irqs/MB':>7}")
    for row in rows:
        if "error" in row:
            print(f"{row['backend']:<24} error: {row['error']}")
            continue
        line = f"{row['backend']:<24} {row['to_host_mb_s']:>7.2f} MB/s"
        if "from_host_mb_s" in row:
            line += f" {row['from_host_mb_s']:>7.2f} MB/s {row['round_trip_ms']:>7.2f} ms"
        if "exits_per_mb" in row:
            line += (f" {row['kb_per_frame_sent']:>8.1f} {row['exits_per_mb']:>8.0f}"
                     f" {100 * row['vmm_share_of_transfer']:>8.1f}% {row['notifications_per_mb']:>8.0f}"
                     f" {row['interrupts_per_mb']:>7.0f}")
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host_facts(), "mib": args.mb,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
