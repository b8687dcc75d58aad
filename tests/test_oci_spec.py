"""OCI bundles: config.json read and checked (vmm/oci/spec.py), no KVM needed."""

from __future__ import annotations

import json

import pytest

from vmm.oci.spec import DEFAULT_MEM, BundleError, MountKind, load_bundle

MiB = 1 << 20

# What `ctr run` (containerd 1.6's default spec) gives a runtime, trimmed to what we read.
CONTAINERD_LIKE = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": ["echo", "hello"],
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "cwd": "/",
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    },
    "root": {"path": "rootfs"},
    "hostname": "box",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    ],
    "linux": {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                       {"type": "network"}],
    },
}


def bundle(tmp_path, config=None, rootfs=True, raw: bytes | None = None):
    directory = tmp_path / "bundle"
    directory.mkdir()
    if rootfs:
        (directory / "rootfs").mkdir()
    if raw is not None:
        (directory / "config.json").write_bytes(raw)
    elif config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def edited(**changes):
    """CONTAINERD_LIKE with dotted-path changes; None deletes the key."""
    config = json.loads(json.dumps(CONTAINERD_LIKE))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return config


def test_containerd_default_spec_is_accepted(tmp_path):
    spec = load_bundle(bundle(tmp_path, CONTAINERD_LIKE))
    assert spec.args == ("echo", "hello")
    assert spec.cwd == "/" and (spec.uid, spec.gid) == (0, 0)
    assert spec.root == (tmp_path / "bundle" / "rootfs").resolve() and not spec.root_readonly
    assert spec.hostname == "box" and not spec.terminal
    assert spec.mem == DEFAULT_MEM and spec.cpus == 1
    kinds = {m.destination: m.kind for m in spec.mounts}
    assert kinds["/proc"] is MountKind.KERNEL and kinds["/dev/mqueue"] is MountKind.SKIPPED
    assert spec.rlimits[0].type == "RLIMIT_NOFILE" and spec.rlimits[0].soft == 1024


@pytest.mark.parametrize("limit, mem", [
    (256 * MiB, 256 * MiB), (100 * MiB + 1, 102 * MiB), (16 * MiB, 64 * MiB), (-1, DEFAULT_MEM),
])
def test_memory_limit_becomes_guest_ram(tmp_path, limit, mem):
    config = edited(linux__resources__memory={"limit": limit})
    assert load_bundle(bundle(tmp_path, config)).mem == mem


@pytest.mark.parametrize("cpu, cpus", [
    ({"quota": 150000, "period": 100000}, 2), ({"cpus": "0-3"}, 4), ({"cpus": "1,3,5-6"}, 4),
    ({"shares": 1024}, 1),
])
def test_cpu_resources_become_vcpus(tmp_path, cpu, cpus):
    config = edited(linux__resources__cpu=cpu)
    assert load_bundle(bundle(tmp_path, config)).cpus == cpus


def test_bind_mount_sources_resolve_on_the_host(tmp_path):
    host_file = tmp_path / "hosts"
    host_file.write_text("127.0.0.1 localhost\n")
    config = edited(mounts=[{"destination": "/etc/hosts", "type": "bind",
                             "source": str(host_file), "options": ["rbind", "ro"]}])
    (mount,) = load_bundle(bundle(tmp_path, config)).mounts
    assert mount.kind is MountKind.BIND and mount.source == str(host_file)


@pytest.mark.parametrize("config, raw, rootfs, message", [
    (None, None, True, "config.json: no such file"),
    (None, b"{not json", True, "config.json: not valid JSON"),
    (None, b"[]", True, "config.json: the document must be an object"),
    (edited(ociVersion="2.0.0"), None, True, "ociVersion: 2.0.0: vmm supports version 1.x.y"),
    (edited(ociVersion="one"), None, True, "ociVersion: 'one' is not a version"),
    (edited(ociVersion=None), None, True, "ociVersion: missing"),
    (edited(process__args=[]), None, True, "process.args: empty: there is no program to run"),
    (edited(process__args=["a", 3]), None, True, "process.args[1]: must be a string"),
    (edited(process__cwd="tmp"), None, True, "process.cwd: 'tmp' is not an absolute path"),
    (edited(process__env=["PATH"]), None, True, "process.env[0]: 'PATH' is not NAME=VALUE"),
    (edited(process__user={"uid": -1}), None, True, "process.user.uid: -1 is out of range"),
    (edited(process__user={"uid": True}), None, True, "process.user.uid: must be an integer"),
    (edited(process=None), None, True, "process: missing"),
    (edited(root=None), None, True, "root: missing"),
    (CONTAINERD_LIKE, None, False, "root.path: "),
    (edited(mounts=[{"destination": "/mnt", "type": "nfs", "source": "x:/y"}]), None, True,
     "mounts[0].type: 'nfs' is not a mount vmm supports"),
    (edited(mounts=[{"destination": "mnt", "type": "tmpfs"}]), None, True,
     "mounts[0].destination: 'mnt' is not an absolute path"),
    (edited(mounts=[{"destination": "/x", "type": "bind", "source": "/no/such/path"}]), None, True,
     "mounts[0].source: '/no/such/path': no such file or directory on the host"),
    (edited(process__rlimits=[{"type": "RLIMIT_FOO", "soft": 1, "hard": 1}]), None, True,
     "process.rlimits[0].type: 'RLIMIT_FOO' is not a Linux resource limit"),
    (edited(process__rlimits=[{"type": "RLIMIT_NOFILE", "soft": 9, "hard": 1}]), None, True,
     "process.rlimits[0].soft: 9 is above the hard limit 1"),
    (edited(linux__resources__cpu={"cpus": "0-99"}), None, True,
     "linux.resources.cpu.cpus: 100 CPUs: vmm allows at most 8"),
    (edited(hostname="a/b"), None, True, "hostname: 'a/b' is not a host name"),
])
def test_bad_bundles_get_one_line_naming_file_and_field(tmp_path, config, raw, rootfs, message):
    directory = bundle(tmp_path, config, rootfs=rootfs, raw=raw)
    with pytest.raises(BundleError) as error:
        load_bundle(directory)
    text = str(error.value)
    assert message in text, text
    assert "\n" not in text
    assert str(directory) in text  # names the file


def test_a_bundle_that_is_not_a_directory(tmp_path):
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(tmp_path / "absent")
