"""`vmm run --net`: our guest on a TAP device, and on passt (user-mode networking).

TAP: inside a network namespace of the test's own, which keeps every packet
on this host (a TAP device in it with the host's address, 10.77.0.1/24, and
vmm run in it): `ping` the host, send it 100 KB over TCP (`nc`), receive
300 KB from it, serve it the 100 KB again (busybox httpd's sendfile, in TCP
segments of up to 64 KiB), checked by MD5 on each side. Needs root (ip netns) and KVM.
passt: the guest reaches only the host's loopback (passt's gateway address is
mapped to 127.0.0.1; the guest connects to nothing else): it fetches a file
from an HTTP server the test runs there, and a forward of a loopback port
reaches busybox httpd in the guest; a second NIC is eth1; both passts go
when vmm is killed.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time

import pytest

from tests.guest import BOOT_TIMEOUT, read_line
from tests.packages import require

pytestmark = [pytest.mark.kvm, pytest.mark.boot]

HOST, GUEST = "10.77.0.1", "10.77.0.2"
HOST_SERVER = """
import hashlib, socket, sys, threading
data = bytes.fromhex(sys.argv[1]) * 1000
def listen(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[2], port)); s.listen(1); s.settimeout(120)
    return s
rx, tx = listen(5001), listen(5002)
print("listening", flush=True)
def receive():
    c, _ = rx.accept(); c.settimeout(120); h = hashlib.md5(); n = 0
    while (b := c.recv(65536)):
        h.update(b); n += len(b)
    print("received", n, h.hexdigest(), flush=True)
def send():
    c, _ = tx.accept(); c.settimeout(120); c.sendall(data); c.close()
threads = [threading.Thread(target=f) for f in (receive, send)]
[t.start() for t in threads]; [t.join() for t in threads]
# then from the guest's httpd (sendfile: the guest's kernel sends segments of up to 64 KiB)
import time, urllib.request
for attempt in range(600):
    try:
        body = urllib.request.urlopen("http://%s/d" % sys.argv[3], timeout=60).read(); break
    except OSError:
        time.sleep(0.2)
print("fetched", len(body), hashlib.md5(body).hexdigest(), flush=True)
for attempt in range(600):  # the guest may end: once its `nc -l` listens (it starts late)
    try:
        socket.create_connection((sys.argv[3], 81), timeout=60).close(); break
    except OSError:
        time.sleep(0.2)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespace():
    if os.geteuid() != 0:
        pytest.fail("the --net tests make a network namespace: run them as root (CI does)")
    require("ip")
    name = f"vmmnet{os.getpid()}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "tuntap", "add", "vmmtap0", "mode", "tap")
        ip("-n", name, "addr", "add", f"{HOST}/24", "dev", "vmmtap0")
        ip("-n", name, "link", "set", "vmmtap0", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_guest_pings_and_exchanges_tcp_with_the_host_byte_for_byte(namespace, tmp_path):
    """With every offload on: the host's kernel checks the guest's checksums (the frames reach
    it partly summed) and receives its TCP segments whole (up to 64 KiB, TSO)."""
    import json

    pattern = random.Random(7).randbytes(300)  # the host sends it 1000 times
    server = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", HOST_SERVER,
                               pattern.hex(), HOST, GUEST], stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(server.stdout, 60).strip() == b"listening"
        script = (f"ping -c 1 -W 10 {HOST} | grep -o '1 packets received'; "
                  "yes vmm-net | head -c 100000 > /tmp/d; md5sum < /tmp/d; "
                  f"nc {HOST} 5001 < /tmp/d; nc {HOST} 5002 | md5sum; "
                  "mkdir /www; mv /tmp/d /www/d; httpd -p 80 -h /www; nc -l -p 81 >/dev/null")
        start = time.monotonic()
        guest = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "vmm", "run",
             "--net", f"tap=vmmtap0,ip={GUEST}/24,gw={HOST}", "--metrics",
             str(tmp_path / "metrics.json"), "--", "sh", "-c", script],
            capture_output=True, text=True, timeout=BOOT_TIMEOUT + 120)
        elapsed = time.monotonic() - start
        host_side = server.communicate(timeout=30)[0].split()
    finally:
        server.kill()
    lines = guest.stdout.split()
    assert guest.returncode == 0, guest.stderr
    assert lines[0:3] == ["1", "packets", "received"], guest.stdout
    sent_md5, received_md5 = lines[3], lines[5]
    assert host_side[:3] == ["received", "100000", sent_md5]  # guest -> host, byte for byte
    assert host_side[3:] == ["fetched", "100000", sent_md5]  # and again, in segments
    assert received_md5 == hashlib.md5(pattern * 1000).hexdigest()  # host -> guest
    nic = json.loads((tmp_path / "metrics.json").read_text())["devices"]["net0"]
    assert nic["offloads"] == "mrg_rxbuf,csum,guest_csum,host_tso4,host_tso6,guest_tso4,guest_tso6"
    assert nic["segmented_sent"] > 0 and nic["segmented_received"] > 0, nic
    # Nothing dropped but, maybe, a frame the host sent before the driver's reset at probe.
    assert nic["dropped_by_reason"] in ("", "rx_reset=1"), nic
    print(f"boot, ping and 400 KB over TCP: {elapsed:.1f} s")


def test_tap_without_a_name_gets_one_from_the_kernel_and_says_which(namespace):
    """vmmtap0 is the fixture's: the kernel takes the next free vmmtapN, gone after the run."""
    guest = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-m", "vmm", "run", "--net", "tap",
         "--", "sh", "-c", "ip -o link show eth0 | grep -o 'link/ether [0-9a-f:]*'"],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT)
    assert (guest.returncode, guest.stdout) == (0, "link/ether 52:54:00:12:34:56\n"), guest.stderr
    assert "vmm: --net tap: eth0 is on the host's TAP device vmmtap1\n" in guest.stderr
    links = subprocess.run(["ip", "-n", namespace, "-o", "link"], capture_output=True, text=True)
    assert "vmmtap1" not in links.stdout  # not persistent: it went with vmm


def test_a_bad_tap_name_is_one_line_and_no_boot():
    result = subprocess.run([sys.executable, "-m", "vmm", "run", "--net",
                             "tap=a-name-much-too-long", "--", "true"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tap=a-name-much-too-long: not an interface name" in lines[0], lines


# --- --net user: passt ---------------------------------------------------------------------
def _children_named(pid: int, name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if comm.startswith(name) and int(rest.split()[1]) == pid:
            found.append(int(entry))
    return found


def test_user_networking_fetches_from_the_hosts_loopback_and_forwards_a_port(tmp_path):
    """Only the host's loopback is reached: the guest talks to passt's gateway address, which
    passt maps to 127.0.0.1, and the forward binds 127.0.0.1 only."""
    import http.server
    import socket
    import threading
    import urllib.request

    require("passt")
    blob = random.Random(11).randbytes(150_000)
    (tmp_path / "blob").write_bytes(blob)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as probe:  # a free port on the host's loopback for the forward
        probe.bind(("127.0.0.1", 0))
        forward = probe.getsockname()[1]
    script = (f"ip -4 addr show eth0 | grep -o 'inet [0-9./]*'; grep nameserver /etc/resolv.conf; "
              "ip -o link show eth1 | grep -o '52:54:00:12:34:57'; "  # a second NIC, its own MAC
              f"wget -q -O - http://10.0.2.2:{server.server_port}/blob | md5sum; "
              "mkdir -p /www; echo hello-from-the-guest > /www/index.html; httpd -p 80 -h /www; "
              "echo ready; sleep 120")
    vmm = subprocess.Popen([sys.executable, "-m", "vmm", "run", "--net",
                            f"user,hostfwd=tcp:{forward}:80", "--net", "user", "--", "sh", "-c",
                            script],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    passts: list[int] = []
    try:
        lines = []
        while "ready" not in lines:
            line = read_line(vmm.stdout).decode()
            assert line, f"the guest ended early: {lines} {vmm.stderr.read()}"
            lines.append(line.strip())
        assert lines[0] == "inet 10.0.2.15/24"
        assert lines[1] == "nameserver 10.0.2.3"  # passt forwards it to the host's resolver
        assert lines[2] == "52:54:00:12:34:57"
        assert lines[3].split()[0] == hashlib.md5(blob).hexdigest()  # byte for byte
        with urllib.request.urlopen(f"http://127.0.0.1:{forward}/", timeout=60) as reply:
            assert reply.read() == b"hello-from-the-guest\n"
        passts = _children_named(vmm.pid, "passt")
        assert len(passts) == 2, passts  # one per NIC
    finally:
        vmm.kill()  # the hardest way out: passt must still go (its socket pair closes)
        vmm.wait()
        server.shutdown()
    def gone(pid: int) -> bool:  # not our child: /proc tells when it is gone (or a zombie)
        try:
            return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
        except OSError:
            return True

    deadline = time.monotonic() + 10
    while not all(map(gone, passts)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert passts and all(map(gone, passts))


# --- a VM with a NIC starts from a snapshot too ---------------------------------------------------
def _run_twice(prefix: list[str], net: str, script: str, tmp_path) -> list[tuple[str, str, dict]]:
    """Two runs of the same guest: (start, stdout, the NIC's counters) of each."""
    import json

    runs = []
    for i in range(2):
        metrics = tmp_path / f"metrics{i}.json"
        result = subprocess.run([*prefix, sys.executable, "-m", "vmm", "run", "--net", net,
                                 "--metrics", str(metrics), "--", "sh", "-c", script],
                                capture_output=True, text=True, timeout=BOOT_TIMEOUT)
        assert result.returncode == 0, result.stderr
        data = json.loads(metrics.read_text())
        runs.append((data["start"], result.stdout, data["devices"]["net0"]))
    return runs


def _http_server(directory, address: str, prefix: list[str]) -> subprocess.Popen:
    server = subprocess.Popen([*prefix, sys.executable, "-m", "http.server", "18779", "--bind",
                               address, "--directory", str(directory)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    return server


def test_a_run_with_passt_starts_from_its_snapshot_and_its_network_works(tmp_path):
    """The snapshot holds the NIC and its posted buffers; passt is started anew for the run."""
    require("passt")
    blob = random.Random(13).randbytes(120_000)
    (tmp_path / "blob").write_bytes(blob)
    server = _http_server(tmp_path, "127.0.0.1", [])
    try:
        runs = _run_twice([], "user", "wget -q -O - http://10.0.2.2:18779/blob | md5sum", tmp_path)
    finally:
        server.kill()
    assert runs[1][0] == "restored"
    for start, out, nic in runs:
        assert out.split()[0] == hashlib.md5(blob).hexdigest(), start
        assert nic["offloads"] == "mrg_rxbuf,csum,guest_csum" and nic["checksums_completed"] > 0


def test_a_run_with_a_tap_device_starts_from_its_snapshot_with_its_offloads(namespace, tmp_path):
    """Restored, the NIC tells the new TAP device what the driver took (TUNSETOFFLOAD): the
    host kernel then sends 64 KiB segments again, and the data arrives whole."""
    blob = random.Random(17).randbytes(300_000)
    (tmp_path / "blob").write_bytes(blob)
    prefix = ["ip", "netns", "exec", namespace]
    server = _http_server(tmp_path, HOST, prefix)
    try:
        runs = _run_twice(prefix, f"tap=vmmtap0,ip={GUEST}/24,gw={HOST}",
                          f"wget -q -O - http://{HOST}:18779/blob | md5sum", tmp_path)
    finally:
        server.kill()
    assert runs[1][0] == "restored"
    for start, out, nic in runs:
        assert out.split()[0] == hashlib.md5(blob).hexdigest(), start
        assert nic["segmented_received"] > 0, (start, nic)
