"""An OCI bundle's config.json, read and checked: what vmm can run of it, or one clear error.

The OCI runtime specification (opencontainers/runtime-spec, config.md and
config-linux.md) describes a container as a root file system and a process,
plus the namespaces, cgroups and mounts that runc turns into an isolated
process. vmm runs the same bundle as a VM: the process runs in the guest (its
args, env, cwd, user, hostname, rlimits), the root file system becomes the
guest's root, the mounts are made by our /init, and the resources become the
VM's size (memory limit -> guest RAM, CPU quota or cpuset -> vCPUs). The
namespaces and cgroups are not needed: the VM is the boundary.

A config.json is hostile input: every field is type-checked here, and every
problem is one ``BundleError`` naming the file and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from vmm.errors import VmmError

CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 4 << 20  # containerd's specs are a few KiB
SUPPORTED_MAJOR = 1  # the spec keeps compatibility within a major version
MiB = 1 << 20
DEFAULT_MEM = 128 * MiB  # vmm's default guest, as for `vmm run`
MIN_MEM = 64 * MiB  # below this our guest kernel and /init do not fit comfortably
MAX_CPUS = 8  # vmm's limit (the MP table, the guest kernel's NR_CPUS)


class BundleError(VmmError):
    """A bundle vmm cannot run: no config.json, a bad field, a missing rootfs."""

    exit_status = 1


class MountKind(StrEnum):
    """What our /init does with a mount of config.json (see MOUNT_KINDS)."""

    KERNEL = "kernel"  # a file system the guest kernel provides: proc, sysfs, tmpfs, devpts
    BIND = "bind"  # a host file or directory: copied into the guest's root at create
    SKIPPED = "skipped"  # meaningful for a process, not for a VM (cgroup: the VM is the boundary)


# type -> kind. Anything else is refused by name.
MOUNT_KINDS = {
    "proc": MountKind.KERNEL,
    "sysfs": MountKind.KERNEL,
    "tmpfs": MountKind.KERNEL,
    "devpts": MountKind.KERNEL,
    "bind": MountKind.BIND,
    "rbind": MountKind.BIND,
    "none": MountKind.BIND,  # runc's spelling of "type: bind" (options say bind)
    "cgroup": MountKind.SKIPPED,
    "cgroup2": MountKind.SKIPPED,
    "mqueue": MountKind.SKIPPED,  # our guest kernel has no POSIX message queues
}


@dataclass(frozen=True)
class Mount:
    destination: str
    type: str
    source: str
    options: tuple[str, ...]
    kind: MountKind


@dataclass(frozen=True)
class Rlimit:
    type: str  # RLIMIT_NOFILE, ...
    soft: int
    hard: int


@dataclass(frozen=True)
class ContainerSpec:
    """What vmm runs of a bundle."""

    bundle: Path
    oci_version: str
    root: Path  # absolute: root.path resolved against the bundle
    root_readonly: bool
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    terminal: bool
    hostname: str
    mounts: tuple[Mount, ...]
    rlimits: tuple[Rlimit, ...]
    mem: int  # guest RAM, bytes
    cpus: int
    annotations: dict[str, str] = field(default_factory=dict)


class _Fields:
    """Typed access to one JSON object, every error naming the file and the field path."""

    def __init__(self, where: str, path: str, value) -> None:
        if not isinstance(value, dict):
            raise BundleError(f"{where}: {path or 'the document'} must be an object")
        self.where, self.path, self.value = where, path, value

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> BundleError:
        return BundleError(f"{self.where}: {self._name(key)}: {problem}")

    def get(self, key: str, kind, default=None, required: bool = False):
        if key not in self.value or self.value[key] is None:
            if required:
                raise self.fail(key, "missing")
            return default
        value = self.value[key]
        # JSON booleans are ints in Python: an int field must not take true/false.
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            names = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
                     dict: "an object"}
            raise self.fail(key, f"must be {names.get(kind, kind.__name__)}")
        return value

    def obj(self, key: str, required: bool = False) -> "_Fields":
        value = self.get(key, dict, None, required)
        return _Fields(self.where, self._name(key), value if value is not None else {})

    def strings(self, key: str) -> tuple[str, ...]:
        values = self.get(key, list, [])
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise self.fail(f"{key}[{i}]", "must be a string")
            if "\0" in value:
                raise self.fail(f"{key}[{i}]", "holds a NUL byte")
        return tuple(values)

    def uint(self, key: str, default: int, limit: int = 0xFFFFFFFF) -> int:
        value = self.get(key, int, default)
        if not 0 <= value <= limit:
            raise self.fail(key, f"{value} is out of range (0..{limit})")
        return value


def load_bundle(bundle: str | Path) -> ContainerSpec:
    """Read ``BUNDLE/config.json`` and check everything vmm will use."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory")
    path = bundle / CONFIG_NAME
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise BundleError(f"{where}: no such file (a bundle holds config.json)") from None
    except OSError as e:
        raise BundleError(f"{where}: cannot read: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise BundleError(f"{where}: larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{where}: not valid JSON: {e}") from None
    return parse_config(document, bundle, where)


def parse_config(document, bundle: Path, where: str) -> ContainerSpec:
    top = _Fields(where, "", document)
    version = top.get("ociVersion", str, required=True)
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:[-+][0-9A-Za-z.+-]*)?", version)
    if not match:
        raise top.fail("ociVersion", f"{version!r} is not a version (MAJOR.MINOR.PATCH)")
    if int(match[1]) != SUPPORTED_MAJOR:
        raise top.fail("ociVersion", f"{version}: vmm supports version {SUPPORTED_MAJOR}.x.y")

    root = top.obj("root", required=True)
    root_path = Path(root.get("path", str, required=True))
    root_path = root_path if root_path.is_absolute() else bundle / root_path
    if not root_path.is_dir():
        raise root.fail("path", f"{root_path}: no such directory (the container's root file system)")

    process = top.obj("process", required=True)
    args = process.strings("args")
    if not args:
        raise process.fail("args", "empty: there is no program to run")
    cwd = process.get("cwd", str, required=True)
    if not cwd.startswith("/"):
        raise process.fail("cwd", f"{cwd!r} is not an absolute path")
    env = process.strings("env")
    for i, entry in enumerate(env):
        if "=" not in entry:
            raise process.fail(f"env[{i}]", f"{entry!r} is not NAME=VALUE")
    user = process.obj("user")
    if user.get("username", str) is not None:
        raise user.fail("username", "not supported on Linux (give uid and gid)")
    additional = user.get("additionalGids", list, [])
    for i, gid in enumerate(additional):
        if isinstance(gid, bool) or not isinstance(gid, int) or not 0 <= gid <= 0xFFFFFFFF:
            raise user.fail(f"additionalGids[{i}]", "must be an integer 0..4294967295")
    hostname = top.get("hostname", str, "")
    if len(hostname) > 64 or any(c in hostname for c in "\0/ "):
        raise top.fail("hostname", f"{hostname!r} is not a host name")

    return ContainerSpec(
        bundle=bundle.resolve(),
        oci_version=version,
        root=root_path.resolve(),
        root_readonly=root.get("readonly", bool, False),
        args=args,
        env=env,
        cwd=cwd,
        uid=user.uint("uid", 0),
        gid=user.uint("gid", 0),
        additional_gids=tuple(additional),
        terminal=process.get("terminal", bool, False),
        hostname=hostname,
        mounts=_mounts(top, bundle),
        rlimits=_rlimits(process),
        mem=_memory(top),
        cpus=_cpus(top),
        annotations=_annotations(top),
    )


def _mounts(top: _Fields, bundle: Path) -> tuple[Mount, ...]:
    mounts = []
    for i, value in enumerate(top.get("mounts", list, [])):
        entry = _Fields(top.where, f"mounts[{i}]", value)
        destination = entry.get("destination", str, required=True)
        if not destination.startswith("/") or "\0" in destination:
            raise entry.fail("destination", f"{destination!r} is not an absolute path")
        options = entry.strings("options")
        kind_name = entry.get("type", str, "")
        if not kind_name and {"bind", "rbind"} & set(options):
            kind_name = "bind"
        if kind_name not in MOUNT_KINDS:
            supported = ", ".join(sorted(MOUNT_KINDS))
            raise entry.fail("type", f"{kind_name or '(none)'!r} is not a mount vmm supports "
                                     f"({supported})")
        kind = MOUNT_KINDS[kind_name]
        if kind_name == "none" and not {"bind", "rbind"} & set(options):
            raise entry.fail("type", "'none' without a bind option is not a mount vmm supports")
        source = entry.get("source", str, "")
        if kind is MountKind.BIND:
            source_path = Path(source) if source.startswith("/") else bundle / source
            if not source or not source_path.exists():
                raise entry.fail("source", f"{source!r}: no such file or directory on the host")
            source = str(source_path)
        mounts.append(Mount(destination, kind_name, source, options, kind))
    return tuple(mounts)


RLIMITS = {"RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE",
           "RLIMIT_LOCKS", "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE",
           "RLIMIT_NPROC", "RLIMIT_RSS", "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING",
           "RLIMIT_STACK"}


def _rlimits(process: _Fields) -> tuple[Rlimit, ...]:
    limits = []
    for i, value in enumerate(process.get("rlimits", list, [])):
        entry = _Fields(process.where, f"{process.path}.rlimits[{i}]", value)
        kind = entry.get("type", str, required=True)
        if kind not in RLIMITS:
            raise entry.fail("type", f"{kind!r} is not a Linux resource limit")
        soft = entry.uint("soft", 0, (1 << 64) - 1)
        hard = entry.uint("hard", 0, (1 << 64) - 1)
        if soft > hard:
            raise entry.fail("soft", f"{soft} is above the hard limit {hard}")
        limits.append(Rlimit(kind, soft, hard))
    return tuple(limits)


def _memory(top: _Fields) -> int:
    """linux.resources.memory.limit -> guest RAM, rounded up to 2 MiB; vmm's default otherwise.

    A limit below 64 MiB gets 64 MiB (the guest kernel's own share), said in docs.
    """
    limit = top.obj("linux").obj("resources").obj("memory").get("limit", int, None)
    if limit is None or limit <= 0:  # -1: unlimited
        return DEFAULT_MEM
    if limit > 64 << 30:
        raise top.fail("linux.resources.memory.limit", f"{limit} bytes: vmm allows at most 64G")
    rounded = -(-limit // (2 * MiB)) * 2 * MiB
    return max(rounded, MIN_MEM)


def _cpus(top: _Fields) -> int:
    """linux.resources.cpu: a cpuset's size, else quota/period rounded up; 1 otherwise."""
    cpu = top.obj("linux").obj("resources").obj("cpu")
    cpuset = cpu.get("cpus", str, "")
    count = 0
    if cpuset:
        try:
            for part in cpuset.split(","):
                low, _, high = part.strip().partition("-")
                count += int(high or low) - int(low) + 1
        except ValueError:
            raise cpu.fail("cpus", f"{cpuset!r} is not a CPU list like 0-3,6") from None
    else:
        quota, period = cpu.get("quota", int, 0), cpu.get("period", int, 0)
        if quota > 0 and period > 0:
            count = -(-quota // period)
    count = count or 1
    if count > MAX_CPUS:
        raise cpu.fail("cpus" if cpuset else "quota", f"{count} CPUs: vmm allows at most {MAX_CPUS}")
    return count


def _annotations(top: _Fields) -> dict[str, str]:
    annotations = top.get("annotations", dict, {})
    for key, value in annotations.items():
        if not isinstance(value, str):
            raise top.fail(f"annotations.{key}", "must be a string")
    return dict(annotations)
