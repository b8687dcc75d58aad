"""Where vmm-runtime keeps its containers: one directory per container under --root.

    ROOT/ID/state.json    the record (written whole, atomically: never half a file)
    ROOT/ID/config.json   the bundle's config.json as it was at create (the spec
                          says later changes to the bundle must not affect the container)
    ROOT/ID/root.img      the container's root disk (vmm/oci/guest.py)
    ROOT/ID/start.fifo    `start` writes a byte here; the VMM waiting at the guest's
                          ready point reads it (runc's exec.fifo, turned around)

The status follows the OCI runtime spec (runtime.md): creating -> created ->
running -> stopped, and runc's paused. The VMM process (vmm/oci/monitor.py) is
the file's one writer (created, running, stopped); paused is what a stopped VMM
process means (`pause` sends it SIGSTOP; runc reads its cgroup freezer the same
way), and stopped what a dead one means, whatever the file says.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from vmm.errors import VmmError

DEFAULT_ROOT = "/run/vmm-runtime"
OCI_VERSION = "1.0.2"  # the runtime-spec version whose state vmm reports
ID_PATTERN = re.compile(r"[\w+\-.]+")  # runc's rule: no slashes, no "..", printable


class ContainerError(VmmError):
    """An operation the container's state does not allow, or an unknown ID."""

    exit_status = 1


class Status(StrEnum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"  # runc's addition to the spec's four: `pause` until `resume`
    STOPPED = "stopped"


@dataclass
class Record:
    id: str
    bundle: str
    rootfs: str = ""  # root.path, resolved
    pid: int = 0  # the VMM process: the one the shim waits on
    pid_start: int = 0  # its start time (/proc/PID/stat field 22): a reused pid is not ours
    status: Status = Status.CREATING
    created: str = ""  # RFC 3339, as runc prints it
    annotations: dict[str, str] = field(default_factory=dict)
    exit_status: int | None = None


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` whole: readers see the old file or the new one, never half of either.

    The partial file is this process's own: the VMM and a `pause` may save at once.
    """
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def check_id(container_id: str) -> str:
    if not ID_PATTERN.fullmatch(container_id) or container_id in (".", ".."):
        raise ContainerError(f"invalid container ID {container_id!r}: letters, digits, "
                             "'_', '+', '-' and '.' only")
    return container_id


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after "pid (comm) ": state, ppid, ... (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if there is no such process."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":  # a zombie has finished: its status awaits its parent
        return None
    return int(fields[19])


def process_stopped(pid: int) -> bool:
    """The process is stopped by a signal (state T): a paused container's VMM."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] == "T"


class Store:
    """The containers under one --root."""

    def __init__(self, root: str | Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)

    def directory(self, container_id: str) -> Path:
        return self.root / check_id(container_id)

    def reserve(self, container_id: str, bundle: Path, rootfs: Path | None = None,
                annotations: dict[str, str] | None = None) -> tuple[Path, Record]:
        """A new container's directory; refuses an ID that exists (atomically: mkdir)."""
        directory = self.directory(container_id)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerError(f"container with id exists: {container_id}") from None
        record = Record(container_id, str(bundle), str(rootfs or ""),
                        annotations=dict(annotations or {}),
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.save(record)
        return directory, record

    def save(self, record: Record) -> None:
        write_atomically(self.directory(record.id) / "state.json", json.dumps(asdict(record)))

    def load(self, container_id: str) -> Record:
        path = self.directory(container_id) / "state.json"
        try:
            data = json.loads(path.read_text())
            record = Record(**data)
            record.status = Status(record.status)
        except FileNotFoundError:
            raise ContainerError(f"container does not exist: {container_id}") from None
        except (ValueError, TypeError) as e:
            raise ContainerError(f"{path}: damaged state: {e}") from None
        if record.status is not Status.STOPPED and not self.alive(record):
            record.status = Status.STOPPED
        elif record.status is Status.RUNNING and process_stopped(record.pid):
            record.status = Status.PAUSED
        return record

    @staticmethod
    def alive(record: Record) -> bool:
        return bool(record.pid) and process_start_time(record.pid) == record.pid_start

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "state.json").exists())

    def remove(self, container_id: str) -> None:
        import shutil

        shutil.rmtree(self.directory(container_id), ignore_errors=True)


def oci_state(record: Record) -> dict:
    """The state `vmm-runtime state` prints (runtime.md "State")."""
    state: dict[str, object] = {"ociVersion": OCI_VERSION, "id": record.id,
                                "status": str(record.status),
             "bundle": record.bundle, "rootfs": record.rootfs,
             "created": record.created, "owner": ""}
    if record.status in (Status.CREATED, Status.RUNNING, Status.PAUSED):
        state["pid"] = record.pid
    else:
        state["pid"] = 0
    if record.annotations:
        state["annotations"] = record.annotations
    return state
