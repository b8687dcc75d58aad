"""`vmm-runtime`: a runc-compatible command line that runs each OCI container as a VM.

containerd's runc shim (and anything else that drives runc) calls it as it
calls runc: global options first (--root, --log, --log-format json,
--systemd-cgroup), then create / start / state / kill / delete, with the
container's stdio on create's stdio. The lifecycle is the OCI runtime spec's
(runtime.md): create boots the VM to its ready point (the container exists,
its process does not run), start releases the process, the VMM process whose
pid create writes to --pid-file exits with the process's status.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import click

from vmm.errors import VmmError
from vmm.oci.store import DEFAULT_ROOT, ContainerError, Status, Store, oci_state, write_atomically

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


class RuntimeGroup(click.Group):
    """Every VmmError becomes one line (and a log entry) and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VmmError as e:
            runtime = ctx.obj if isinstance(ctx.obj, Runtime) else Runtime(DEFAULT_ROOT, None, "text")
            runtime.error(str(e))
            sys.exit(1)


@click.group(cls=RuntimeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", default=DEFAULT_ROOT, show_default=True,
              help="Where container state is kept.")
@click.option("--log", type=click.Path(dir_okay=False), help="Append errors to this file.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--systemd-cgroup", is_flag=True, help="Accepted for runc compatibility (no cgroups: "
              "the VM is the boundary).")
@click.option("--debug", is_flag=True, help="Accepted for runc compatibility.")
@click.pass_context
def main(ctx: click.Context, root: str, log: str | None, log_format: str, systemd_cgroup: bool,
         debug: bool) -> None:
    """Run OCI bundles as vmm VMs, with runc's command line."""
    ctx.obj = Runtime(root, log, log_format)


def _runtime() -> Runtime:
    return click.get_current_context().obj


@main.command()
@click.option("--bundle", "-b", default=".", show_default=True, help="The bundle directory.")
@click.option("--pid-file", type=click.Path(dir_okay=False), help="Write the VMM's pid here.")
@click.option("--console-socket", help="With process.terminal: where to send the pty's master.")
@click.option("--no-pivot", is_flag=True, hidden=True)
@click.option("--no-new-keyring", is_flag=True, hidden=True)
@click.option("--preserve-fds", type=int, default=0, hidden=True)
@click.argument("container_id")
def create(bundle: str, pid_file: str | None, console_socket: str | None, no_pivot: bool,
           no_new_keyring: bool, preserve_fds: int, container_id: str) -> None:
    """Boot the container's VM to its ready point; the process waits for `start`."""
    _create(_runtime(), Path(bundle), pid_file, console_socket, container_id)


def _create(runtime: Runtime, bundle: Path, pid_file: str | None, console_socket: str | None,
            container_id: str) -> int:
    from vmm.oci import monitor  # the VMM's code, imported before it is forked
    from vmm.oci.guest import check_limits
    from vmm.oci.spec import load_bundle

    store = runtime.store
    spec = load_bundle(bundle)  # before anything is made: a bad bundle leaves nothing behind
    check_limits(spec)
    if spec.terminal and not console_socket:
        raise ContainerError("process.terminal needs --console-socket (where to send the pty)")
    directory, _record = store.reserve(container_id, spec.bundle, spec.root, spec.annotations)
    try:
        (directory / "config.json").write_bytes((bundle / "config.json").read_bytes())
        os.mkfifo(directory / "start.fifo", 0o600)
        tty = _console(console_socket) if spec.terminal else None
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


@main.command()
@click.argument("container_id")
def start(container_id: str) -> None:
    """Release the container's process (it waits at the guest's ready point)."""
    _start(_runtime().store, container_id)


def _start(store: Store, container_id: str) -> None:
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


@main.command()
@click.argument("container_id")
def state(container_id: str) -> None:
    """Print the container's state as OCI state JSON."""
    click.echo(json.dumps(oci_state(_runtime().store.load(container_id)), indent=2))


SIGNALS = {s.name.removeprefix("SIG"): s for s in signal.Signals}


def parse_signal(text: str) -> signal.Signals:
    name = text.upper().removeprefix("SIG")
    if name in SIGNALS:
        return SIGNALS[name]
    try:
        return signal.Signals(int(text))
    except ValueError:
        raise ContainerError(f"unknown signal {text!r}") from None


@main.command()
@click.option("--all", "-a", "all_processes", is_flag=True, help="Accepted: the VM is one process.")
@click.argument("container_id")
@click.argument("signal_name", default="SIGTERM")
def kill(all_processes: bool, container_id: str, signal_name: str) -> None:
    """Send a signal to the container: to its VMM, which stops the VM (status 128+signal)."""
    sig = parse_signal(signal_name)
    record = _runtime().store.load(container_id)
    if record.status not in (Status.CREATED, Status.RUNNING, Status.PAUSED):
        raise ContainerError(f"container {container_id} is not running ({record.status})")
    os.kill(record.pid, sig)
    if record.status is Status.PAUSED:
        os.kill(record.pid, signal.SIGCONT)  # a stopped VMM would hold the signal until resumed


@main.command()
@click.argument("container_id")
def pause(container_id: str) -> None:
    """Freeze the container: SIGSTOP to its VMM stops every vCPU thread (the VM stands still)."""
    _pause(_runtime().store, container_id, Status.RUNNING, Status.PAUSED, signal.SIGSTOP)


@main.command()
@click.argument("container_id")
def resume(container_id: str) -> None:
    """Thaw a paused container (SIGCONT to its VMM)."""
    _pause(_runtime().store, container_id, Status.PAUSED, Status.RUNNING, signal.SIGCONT)


def _pause(store: Store, container_id: str, before: Status, after: Status, sig) -> None:
    record = store.load(container_id)
    if record.status is not before:
        raise ContainerError(f"container {container_id} is {record.status}, not {before}")
    os.kill(record.pid, sig)
    record.status = after
    store.save(record)


@main.command()
@click.option("--force", "-f", is_flag=True, help="Kill a running container first.")
@click.argument("container_id")
def delete(force: bool, container_id: str) -> None:
    """Remove a stopped (or, with --force, any) container."""
    _delete(_runtime().store, container_id, force)


def _delete(store: Store, container_id: str, force: bool) -> None:
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


@main.command(name="list")
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--quiet", "-q", is_flag=True, help="IDs only.")
def list_(fmt: str, quiet: bool) -> None:
    """The containers under --root."""
    store = _runtime().store
    states = [oci_state(store.load(i)) for i in store.ids()]
    if quiet:
        for s in states:
            click.echo(s["id"])
    elif fmt == "json":
        click.echo(json.dumps(states))
    else:
        click.echo(f"{'ID':<20} {'PID':<8} {'STATUS':<10} {'BUNDLE':<40} CREATED")
        for s in states:
            click.echo(f"{s['id']:<20} {s['pid']:<8} {s['status']:<10} {s['bundle']:<40} "
                       f"{s['created']}")


@main.command()
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.argument("container_id")
def ps(fmt: str, container_id: str) -> None:
    """The host processes of the container: its VMM (the guest's processes are inside it)."""
    record = _runtime().store.load(container_id)
    pids = [record.pid] if record.status in (Status.CREATED, Status.RUNNING, Status.PAUSED) else []
    if fmt == "json":
        click.echo(json.dumps(pids))
    else:
        click.echo("PID")
        for pid in pids:
            click.echo(pid)


@main.command()
@click.option("--bundle", "-b", default=".", show_default=True)
@click.option("--pid-file", type=click.Path(dir_okay=False))
@click.option("--detach", "-d", is_flag=True, help="Return once started.")
@click.option("--console-socket")
@click.argument("container_id")
def run(bundle: str, pid_file: str | None, detach: bool, console_socket: str | None,
        container_id: str) -> None:
    """create + start; without --detach wait, delete, and exit with the process's status."""
    runtime = _runtime()
    set_child_subreaper()  # the VMM outlives create's child: we must be able to wait for it
    pid = _create(runtime, Path(bundle), pid_file, console_socket, container_id)
    _start(runtime.store, container_id)
    if detach:
        return
    _, status = os.waitpid(pid, 0)
    runtime.store.remove(container_id)
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else
             128 + os.WTERMSIG(status))


def set_child_subreaper() -> None:
    """Become what containerd's shim is: the parent of orphans below us (the VMM outlives create)."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@main.command()
def features() -> None:
    """What this runtime supports, as runc's `features` JSON."""
    from vmm.oci.guest import MOUNT_FLAGS, PROPAGATION
    from vmm.oci.spec import MOUNT_KINDS

    click.echo(json.dumps({
        "ociVersionMin": "1.0.0", "ociVersionMax": "1.2.0",
        "hooks": [],
        "mountOptions": sorted(set(MOUNT_FLAGS) | PROPAGATION | {"bind", "rbind"}),
        "linux": {"namespaces": [], "capabilities": [], "cgroup": {"v1": False, "v2": False},
                  "mountTypes": sorted(MOUNT_KINDS)},
        "annotations": {"io.github.vmm.runtime": "each container is a KVM virtual machine"},
    }, indent=2))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def exec(args) -> None:  # noqa: A001 - runc's command name
    """Not supported yet: the guest has no channel for a second process."""
    raise ContainerError("exec is not supported: a vmm container runs one process "
                         "(the guest has no channel for a second one yet)")
