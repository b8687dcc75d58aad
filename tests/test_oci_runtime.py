"""vmm-runtime, the runc-compatible command line: an OCI bundle run as a VM.

Without KVM: the container store, the settings /init receives, the request
that carries them, and bad input (nothing left behind in --root). With KVM
(one cold boot, ~11 s on our PVM CI host, that saves the container base; the
other containers restore it): the runc flows on a busybox bundle, create / state /
start / state / delete, create / start / kill, and a created container deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest import BOOT_TIMEOUT
from tests.test_oci_spec import CONTAINERD_LIKE
from vmm.devices import mailbox
from vmm.oci import guest
from vmm.oci.lifecycle import set_child_subreaper
from vmm.oci.spec import load_bundle
from vmm.oci.store import DEFAULT_ROOT, ContainerError, Record, Status, Store, check_id, oci_state
from vmm.snapshot.cache import snapshot_cache_dir

RUNTIME = [sys.executable, "-m", "vmm.oci"]
APPLETS = "sh echo cat hostname id pwd env ls sleep mount sort grep head".split()


def runtime(root: Path, *args: str, log: Path | None = None, timeout: float = 60,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    options = ["--root", str(root)]
    if log is not None:
        options += ["--log", str(log), "--log-format", "json"]
    return subprocess.run([*RUNTIME, *options, *args], stdout=stdout, stderr=stderr,
                          timeout=timeout)


def make_bundle(directory: Path, args: list[str], **process) -> Path:
    """A bundle whose rootfs is our static busybox and a few applet links."""
    from vmm.images.initramfs import busybox_root

    rootfs = busybox_root(directory / "rootfs", APPLETS)
    (rootfs / "work").mkdir()
    config = json.loads(json.dumps(CONTAINERD_LIKE))
    config["process"].update(args=args, **process)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# --- without KVM --------------------------------------------------------------------------
def test_ids_follow_runcs_rule():
    assert check_id("abc-1.2_x+y") == "abc-1.2_x+y"
    for bad in ("", "a/b", "..", "a b", "x\0"):
        with pytest.raises(ContainerError):
            check_id(bad)


def test_store_refuses_an_id_twice_and_reports_dead_vmms_as_stopped(tmp_path):
    store = Store(tmp_path / "root")
    _, record = store.reserve("c1", tmp_path)
    with pytest.raises(ContainerError, match="container with id exists: c1"):
        store.reserve("c1", tmp_path)
    record.status, record.pid, record.pid_start = Status.RUNNING, os.getpid(), 1  # wrong start time
    store.save(record)
    assert store.load("c1").status is Status.STOPPED  # a reused pid is not our VMM
    state = oci_state(store.load("c1"))
    assert state["status"] == "stopped" and state["pid"] == 0 and state["ociVersion"]
    with pytest.raises(ContainerError, match="container does not exist: c2"):
        store.load("c2")


def test_settings_carry_the_process_and_kernel_mounts(tmp_path):
    host_file = tmp_path / "resolv.conf"
    host_file.write_text("nameserver 127.0.0.1\n")
    bundle = make_bundle(tmp_path / "b", ["true"], cwd="/work",
                         user={"uid": 5, "gid": 6, "additionalGids": [7, 8]})
    config = json.loads((bundle / "config.json").read_text())
    config["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind",
                             "source": str(host_file), "options": ["rbind", "ro"]})
    (bundle / "config.json").write_text(json.dumps(config))
    spec = load_bundle(bundle)
    root = guest.root_settings(spec, ("/bin/busybox",))
    assert root[0] == "root=/dev/vda" and root[-1] == "preload=/bin/busybox"
    settings = root + guest.process_settings(spec)
    mounts = [s.removeprefix("mount=").split("\t") for s in settings if s.startswith("mount=")]
    by_target = {m[2]: m for m in mounts}
    assert set(by_target) == {"/proc", "/dev", "/dev/pts", "/dev/shm", "/sys", "/run"}  # no mqueue
    proc_type, _, _, proc_flags, _ = by_target["/proc"]
    assert proc_type == "proc" and int(proc_flags) == guest.MS_NOSUID | guest.MS_NOEXEC | guest.MS_NODEV
    assert int(by_target["/sys"][3]) & guest.MS_RDONLY
    assert by_target["/dev/pts"][4] == "newinstance,ptmxmode=0666,mode=0620,gid=5"
    assert [s for s in settings if s.startswith(("cwd", "gid", "uid", "groups", "hostname"))] == [
        "hostname=box", "cwd=/work", "groups=7,8", "gid=6", "uid=5"]
    assert "rlimit=7 1024 1024" in settings  # RLIMIT_NOFILE
    assert settings[-1] == "uid=5"  # the identity changes last, as runc does


def test_one_vmm_at_a_time_claims_the_build_of_a_container_base(tmp_path, monkeypatch):
    """A second first-container of the same size boots on its own root instead of waiting."""
    import fcntl

    from vmm.oci import monitor

    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    assert monitor.claim_base_build("k1")
    held = monitor._claims[-1]
    other = os.open(tmp_path / "oci" / "k1.building", os.O_RDWR)
    with pytest.raises(BlockingIOError):  # what another VMM process meets
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not monitor.claim_base_build("k1")  # and the claim says so
    assert monitor.claim_base_build("k2")  # another size: its own base
    for fd in (other, held, monitor._claims.pop()):
        os.close(fd)
    monitor._claims.remove(held)


@pytest.mark.parametrize("change, message", [
    ({"env": [f"V{i}=x" for i in range(300)]}, "process.env: 300 entries; vmm's guest takes at most 256"),
    ({"args": ["echo", "x" * 70000]}, "bytes; vmm's guest takes at most 65536"),
    ({"user": {"uid": 0, "gid": 0, "additionalGids": list(range(40))}},
     "process.user.additionalGids: 40 entries"),
])
def test_what_the_guest_has_no_room_for_is_refused_at_create(tmp_path, change, message):
    root = tmp_path / "state"
    process = {"args": ["true"], **change}
    bundle = make_bundle(tmp_path / "b", process.pop("args"), **process)
    result = runtime(root, "create", "--bundle", str(bundle), "c1")
    assert result.returncode == 1 and message in result.stderr.decode(), result.stderr
    assert not root.exists() or not any(root.iterdir())


def test_mount_options_split_into_flags_and_data():
    flags, data = guest.mount_flags(("nosuid", "ro", "rw", "size=64k", "rprivate", "mode=755"))
    assert flags == guest.MS_NOSUID and data == "size=64k,mode=755"


def test_request_carries_settings_after_the_arguments():
    request = mailbox.encode_request(("echo", "hi"), settings=("root=/dev/vda", "cwd=/"),
                                     now_ns=0, seed=b"")
    header = mailbox.REQUEST_HEADER.unpack_from(request)
    magic, version, _flags, argc, argv_bytes = header[:5]
    settings_bytes = header[-2]
    assert (magic, version, argc) == (mailbox.REQUEST_MAGIC, 2, 2)
    body = request[mailbox.REQUEST_HEADER.size:]
    assert body[:argv_bytes] == b"echo\0hi\0"
    assert body[argv_bytes:argv_bytes + settings_bytes] == b"root=/dev/vda\0cwd=/\0"
    with pytest.raises(ValueError):
        mailbox.encode_request(("x",), settings=("no-equals",))


def test_bad_bundle_leaves_nothing_behind_and_logs_json(tmp_path):
    root, log = tmp_path / "state", tmp_path / "log.json"
    bundle = make_bundle(tmp_path / "b", [])  # process.args empty
    result = runtime(root, "create", "--bundle", str(bundle), "c1", log=log)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == \
        f"vmm-runtime: {bundle}/config.json: process.args: empty: there is no program to run"
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "process.args" in entry["msg"]
    assert not root.exists() or not any(root.iterdir())


def test_unknown_ids_and_exec_are_clear_errors(tmp_path):
    for args, message in ((("start", "nope"), "container does not exist: nope"),
                          (("state", "nope"), "container does not exist: nope"),
                          (("kill", "nope", "KILL"), "container does not exist: nope"),
                          (("exec", "nope", "ls"), "exec is not supported")):
        result = runtime(tmp_path, *args)
        assert result.returncode == 1 and message in result.stderr.decode(), args


def test_features_lists_what_vmm_supports(tmp_path):
    features = json.loads(runtime(tmp_path, "features").stdout)
    assert "proc" in features["linux"]["mountTypes"] and "nfs" not in features["linux"]["mountTypes"]
    assert "ro" in features["mountOptions"]


# --- with KVM: the runc flows -----------------------------------------------------------------
def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    raise AssertionError(f"the VMM {pid} did not exit in {timeout} s")


def create(root: Path, bundle: Path, container_id: str, out: Path, pid_file: Path):
    """`create` with the container's stdio on files, as the shim gives FIFOs: the VMM
    inherits them, so a pipe would stay open (and `communicate` wait) until it exits."""
    errors = out.with_name(out.name + ".stderr")
    with open(out, "wb") as stdout, open(errors, "wb") as stderr:
        created = runtime(root, "create", "--bundle", str(bundle), "--pid-file", str(pid_file),
                          container_id, stdout=stdout, stderr=stderr, timeout=BOOT_TIMEOUT)
    assert created.returncode == 0, errors.read_text()
    return created


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _state(root: Path, container_id: str) -> dict:
    result = runtime(root, "state", container_id)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.boot
@pytest.mark.kvm
def test_create_state_start_state_delete(tmp_path):
    set_child_subreaper()  # as containerd's shim: we wait for the VMM
    script = ("echo hello from $(hostname) as $(id -u):$(id -g) in $(pwd) groups $(id -G); env | sort; "
              "grep 'open files' /proc/self/limits; ls /dev; echo data > /work/file; "
              "cat /work/file; exit 7")
    env = ["PATH=/bin", "GREETING=hi there"]
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", script], cwd="/work", env=env,
                         user={"uid": 1000, "gid": 1000, "additionalGids": [10, 20]})
    os.chown(bundle / "rootfs" / "work", 1000, 1000)  # owners reach the guest's root disk
    root, out, pid_file = tmp_path / "state", tmp_path / "stdout", tmp_path / "pid"
    create(root, bundle, "c1", out, pid_file)
    pid = int(pid_file.read_text())
    state = _state(root, "c1")
    assert (state["status"], state["pid"], state["id"]) == ("created", pid, "c1")
    assert state["bundle"] == str(bundle.resolve()) and state["ociVersion"].startswith("1.")
    assert out.read_bytes() == b""  # the process has not run

    assert runtime(root, "start", "c1").returncode == 0
    second = runtime(root, "start", "c1")
    assert second.returncode == 1 and b"cannot start a container in the" in second.stderr
    assert _wait(pid, 120) == 7  # the VMM's status is the process's
    assert _state(root, "c1")["status"] == "stopped"
    lines = out.read_text().splitlines()
    assert lines[0] == "hello from box as 1000:1000 in /work groups 1000 10 20"
    assert lines[1:4] == ["GREETING=hi there", "PATH=/bin", "PWD=/work"]  # exactly its env
    assert "Max open files            1024                 1024" in lines[5]
    assert {"null", "zero", "urandom", "pts", "shm", "ptmx"} <= set(" ".join(lines[6:]).split())
    assert lines[-1] == "data"
    assert runtime(root, "delete", "c1").returncode == 0
    assert not (root / "c1").exists()

    # The same root again: restored from the image base c1 saved (root mounted, busybox
    # cached), on a copy of the disk as it was then: c1's writes are not there.
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["args"] = ["sh", "-c", "cat /work/file 2>&1; echo second"]
    (bundle / "config.json").write_text(json.dumps(config))
    status, output, log = _run_container(root, bundle, "c1b", tmp_path / "out-b")
    assert (status, output) == (0, "cat: can't open '/work/file': No such file or directory\nsecond\n")
    assert "restoring the image base" in log, log
    base = snapshot_cache_dir() / log.split("restoring the image base ")[1].split()[0]

    # An image base whose disk was written is refused (its guest caches the old blocks):
    # the container still runs, and a new base is made.
    with open(base / "disk0.img", "r+b") as disk:
        disk.write(disk.read(1))
    status, output, log = _run_container(root, bundle, "c1c", tmp_path / "out-c")
    assert status == 0 and output.endswith("second\n")
    assert "the image base cannot be used" in log and "was written since" in log, log
    assert "image base: snapshot saved" in log, log


def _run_container(root: Path, bundle: Path, container_id: str, out: Path) -> tuple[int, str, str]:
    """create, start, wait, delete: (the process's status, its output, the VMM's log)."""
    create(root, bundle, container_id, out, out.with_name(out.name + ".pid"))
    pid = int(out.with_name(out.name + ".pid").read_text())
    assert runtime(root, "start", container_id).returncode == 0
    status = _wait(pid, 120)
    log = (root / container_id / "vmm.log").read_text()
    assert runtime(root, "delete", container_id).returncode == 0
    return status, out.read_text(), log


@pytest.mark.boot
@pytest.mark.kvm
def test_kill_stops_a_running_container_with_the_signals_status(tmp_path):
    set_child_subreaper()  # as containerd's shim: we wait for the VMM
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", "echo up; sleep 600"])
    root, out = tmp_path / "state", tmp_path / "stdout"
    create(root, bundle, "c2", out, tmp_path / "pid")
    pid = int((tmp_path / "pid").read_text())
    assert runtime(root, "start", "c2").returncode == 0
    deadline = time.monotonic() + 60
    while b"up" not in out.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(root, "c2")["status"] == "running"
    refused = runtime(root, "delete", "c2")
    assert refused.returncode == 1 and b"not stopped: running" in refused.stderr
    listed = json.loads(runtime(root, "list", "--format", "json").stdout)
    assert [(c["id"], c["status"]) for c in listed] == [("c2", "running")]
    assert json.loads(runtime(root, "ps", "--format", "json", "c2").stdout) == [pid]
    assert runtime(root, "pause", "c2").returncode == 0
    assert _state(root, "c2")["status"] == "paused" and _proc_state(pid) == "T"  # stopped
    assert runtime(root, "pause", "c2").returncode == 1  # not running
    assert runtime(root, "resume", "c2").returncode == 0
    assert _state(root, "c2")["status"] == "running" and _proc_state(pid) != "T"
    assert runtime(root, "kill", "c2", "TERM").returncode == 0
    assert _wait(pid, 60) == 128 + 15
    record = Store(root).load("c2")
    assert record.status is Status.STOPPED and record.exit_status == 143
    assert runtime(root, "delete", "c2").returncode == 0 and not (root / "c2").exists()

    # The container base exists now (this test's create made it, or an earlier one):
    # the next create restores it instead of booting, and delete kills a created one.
    create(root, bundle, "c3", tmp_path / "stdout3", tmp_path / "pid3")
    assert "restoring the image base" in (root / "c3" / "vmm.log").read_text()  # c2's root
    pid = int((tmp_path / "pid3").read_text())
    assert _state(root, "c3")["status"] == "created"
    assert runtime(root, "delete", "c3").returncode == 0
    assert _wait(pid, 30) == -9 and not (root / "c3").exists()  # SIGKILL


@pytest.mark.boot
@pytest.mark.kvm
def test_a_hostile_images_links_keep_volumes_and_mounts_inside_its_root(tmp_path):
    """An image whose links aim at the host: the volumes land where runc puts them, inside.

    ``data -> CANARY`` under a bind at /data/x, ``etc/hosts -> CANARY/hosts`` under a
    file bind, and ``run -> /elsewhere`` under config.json's tmpfs at /run (made by
    the guest's /init: it must follow the link inside the container's root too).
    """
    from tests.test_oci_inroot import listing

    set_child_subreaper()
    canary = tmp_path / "canary"
    (canary / "keep").mkdir(parents=True)
    (canary / "keep" / "file").write_text("host data\n")
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "payload").write_text("the user's volume\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 box\n")
    script = "cat /data/x/payload /etc/hosts; grep -c '^tmpfs /elsewhere ' /proc/mounts"
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", script])
    rootfs = bundle / "rootfs"
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "data").symlink_to(canary)
    (rootfs / "etc" / "hosts").symlink_to(canary / "hosts")
    (rootfs / "run").symlink_to("/elsewhere")
    config = json.loads((bundle / "config.json").read_text())
    config["mounts"] += [
        {"destination": "/data/x", "type": "bind", "source": str(volume), "options": ["rbind"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["rbind"]}]
    (bundle / "config.json").write_text(json.dumps(config))
    before = listing(canary)
    status, output, log = _run_container(tmp_path / "state", bundle, "hostile", tmp_path / "out")
    assert (status, output) == (0, "the user's volume\n127.0.0.1 box\n1\n"), log
    assert listing(canary) == before


def test_record_round_trips(tmp_path):
    store = Store(tmp_path)
    _, record = store.reserve("x", tmp_path)
    record.annotations = {"a": "b"}
    store.save(record)
    assert isinstance(store.load("x"), Record) and store.load("x").annotations == {"a": "b"}


@pytest.mark.parametrize("argv, parsed", [
    (["start", "c1"], ({"--root": DEFAULT_ROOT, "--log": None, "--log-format": "text"}, "start", ["c1"])),
    (["--root", "/r", "--log", "/l.json", "--log-format", "json", "--systemd-cgroup", "delete", "-f", "c1"],
     ({"--root": "/r", "--log": "/l.json", "--log-format": "json"}, "delete", ["--force", "c1"])),
    (["kill", "c1", "KILL"], ({"--root": DEFAULT_ROOT, "--log": None, "--log-format": "text"}, "kill",
                               ["c1", "KILL"])),
    (["--log-format", "json", "create", "--bundle", "/b", "--pid-file", "/p", "c1"],
     ({"--root": DEFAULT_ROOT, "--log": None, "--log-format": "json", "bundle": "/b",
       "pid_file": "/p", "console_socket": None}, "create", ["c1"])),
    (["create", "--no-pivot", "-b", "/b", "--console-socket", "/s", "c1"],
     ({"--root": DEFAULT_ROOT, "--log": None, "--log-format": "text", "bundle": "/b",
       "pid_file": None, "console_socket": "/s"}, "create", ["c1"])),
    (["create", "--preserve-fds", "1", "c1"], None),  # the full command line
    (["create", "--bundle", "/b"], None),
    (["run", "c1"], None),
    (["start", "--help"], None),
    (["--root=/r", "start", "c1"], None),  # another spelling: click reads it
    (["delete", "c1", "c2"], None),
    (["kill", "c1", "-9"], None),
    (["--log-format", "xml", "start", "c1"], None),
    ([], None),
])
def test_the_shims_hot_calls_are_read_without_click(argv, parsed):
    from vmm.oci.entry import parse_fast

    assert parse_fast(argv) == parsed


def test_fast_and_full_command_lines_answer_alike(tmp_path):
    """An unknown ID through the fast path (start) and through click (state): runc's words."""
    root, log = tmp_path / "state", tmp_path / "log.json"
    for args in (["start", "nope"], ["state", "nope"], ["delete", "nope"], ["kill", "nope", "KILL"]):
        result = runtime(root, *args, log=log)
        assert result.returncode == 1, args
        assert result.stderr.decode() == "vmm-runtime: container does not exist: nope\n", args
    assert [json.loads(line)["msg"] for line in log.read_text().splitlines()] == [
        "container does not exist: nope"] * 4
    assert runtime(root, "delete", "--force", "nope").returncode == 0  # as runc
