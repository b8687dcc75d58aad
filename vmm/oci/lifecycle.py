"""What the shim asks of a container, without a command-line library: create, start, kill, delete.

The shim runs the runtime for each of these, a new Python process every
time; vmm/oci/entry.py reads their arguments by hand and calls these
functions without importing click (~12 ms of every call). vmm/oci/cli.py
has the whole command line and calls the same functions.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from vmm.oci.store import ContainerError, Status, Store, write_atomically

READY_TIMEOUT_S = 900  # a cold boot on a PVM host takes ~11 s; a first one builds the kernel


class Runtime:
    """The global options: where containers live, where errors are logged."""

    def __init__(self, root: str, log: str | None, log_format: str) -> None:
        self.store = Store(root)
        self.log, self.log_format = log, log_format

    def error(self, message: str) -> None:
        """Report as runc does: a line on stderr, and an entry in --log when given."""
        print(f"vmm-runtime: {message}", file=sys.stderr)
        if self.log:
            try:
                with open(self.log, "a") as f:
                    if self.log_format == "json":
                        f.write(json.dumps({"level": "error", "msg": message,
                                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime())}) + "\n")
                    else:
                        f.write(f"error: {message}\n")
            except OSError:
                pass


def create_container(runtime: Runtime, bundle: Path, pid_file: str | None, console_socket: str | None,
                     container_id: str) -> int:
    """Check the bundle, reserve the ID, fork the VMM; its pid once the VM is ready."""
    from vmm.oci import monitor  # the VMM's code, imported before it is forked
    from vmm.oci.guest import check_limits
    from vmm.oci.spec import load_bundle

    store = runtime.store
    spec = load_bundle(bundle)  # before anything is made: a bad bundle leaves nothing behind
    check_limits(spec)
    if spec.terminal and not console_socket:
        raise ContainerError("process.terminal needs --console-socket (where to send the pty)")
    socket_path = console_socket or ""
    directory, _record = store.reserve(container_id, spec.bundle, spec.root, spec.annotations)
    try:
        (directory / "config.json").write_bytes((bundle / "config.json").read_bytes())
        os.mkfifo(directory / "start.fifo", 0o600)
        tty = _console(socket_path) if spec.terminal else None
        pid, read_fd = monitor.spawn(directory, tty)
        if tty is not None:
            os.close(tty)
        with os.fdopen(read_fd) as ready:
            answer = _read_line(ready, READY_TIMEOUT_S)
        if answer != "ok":
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise ContainerError(answer.removeprefix("error: ") if answer else
                                 f"the VM did not reach its ready point (see {directory}/vmm.log)")
        if pid_file:
            write_atomically(Path(pid_file), f"{pid}")
        return pid
    except BaseException:
        store.remove(container_id)
        raise


def _console(console_socket: str) -> int:
    """A pty for process.terminal: its master goes to --console-socket, its slave is returned.

    As runc does (utils.SendFd): the slave's name as the message, the master's fd
    as SCM_RIGHTS; containerd's shim then copies between the master and the client.
    """
    import socket

    master, slave = os.openpty()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(console_socket)
            socket.send_fds(sock, [os.ttyname(slave).encode()], [master])
    except OSError as e:
        os.close(slave)
        raise ContainerError(f"--console-socket {console_socket}: {e.strerror or e}") from None
    finally:
        os.close(master)
    return slave


def _read_line(stream, timeout: float) -> str:
    import select

    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline().strip() if ready else ""


def start_container(store: Store, container_id: str) -> None:
    record = store.load(container_id)
    if record.status is not Status.CREATED:
        raise ContainerError(f"cannot start a container in the {record.status} state")
    fifo = store.directory(container_id) / "start.fifo"
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        raise ContainerError(f"cannot start container {container_id}: its VMM is not waiting") from None
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)
    fifo.unlink(missing_ok=True)  # a second start finds no fifo: one start per container


SIGNALS = {s.name.removeprefix("SIG"): s for s in signal.Signals}


def parse_signal(text: str) -> signal.Signals:
    name = text.upper().removeprefix("SIG")
    if name in SIGNALS:
        return SIGNALS[name]
    try:
        return signal.Signals(int(text))
    except ValueError:
        raise ContainerError(f"unknown signal {text!r}") from None


def kill_container(store: Store, container_id: str, signal_name: str) -> None:
    sig = parse_signal(signal_name)
    record = store.load(container_id)
    if record.status not in (Status.CREATED, Status.RUNNING, Status.PAUSED):
        raise ContainerError(f"container {container_id} is not running ({record.status})")
    os.kill(record.pid, sig)
    if record.status is Status.PAUSED:
        os.kill(record.pid, signal.SIGCONT)  # a stopped VMM would hold the signal until resumed


def delete_container(store: Store, container_id: str, force: bool) -> None:
    try:
        record = store.load(container_id)
    except ContainerError:
        if force and not (store.directory(container_id) / "state.json").exists():
            store.remove(container_id)  # as runc: --force on an unknown ID is no error
            return
        raise
    if record.status is Status.RUNNING and not force:
        raise ContainerError(f"cannot delete container {container_id} that is not stopped: "
                             f"{record.status}")
    if record.status is Status.PAUSED and not force:
        raise ContainerError(f"cannot delete container {container_id} that is not stopped: paused")
    if record.status is not Status.STOPPED and store.alive(record):
        os.kill(record.pid, signal.SIGKILL)  # a created one is killed, as runc does
        for _ in range(500):
            if not store.alive(record):
                break
            time.sleep(0.01)
    store.remove(container_id)


def set_child_subreaper() -> None:
    """Become what containerd's shim is: the parent of orphans below us (the VMM outlives create)."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
