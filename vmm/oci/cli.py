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
from vmm.oci.lifecycle import (Runtime, create_container, delete_container, kill_container,
                                set_child_subreaper, start_container)
from vmm.oci.store import DEFAULT_ROOT, ContainerError, Status, Store, oci_state



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
    create_container(_runtime(), Path(bundle), pid_file, console_socket, container_id)


@main.command()
@click.argument("container_id")
def start(container_id: str) -> None:
    """Release the container's process (it waits at the guest's ready point)."""
    start_container(_runtime().store, container_id)


@main.command()
@click.argument("container_id")
def state(container_id: str) -> None:
    """Print the container's state as OCI state JSON."""
    click.echo(json.dumps(oci_state(_runtime().store.load(container_id)), indent=2))


@main.command()
@click.option("--all", "-a", "all_processes", is_flag=True, help="Accepted: the VM is one process.")
@click.argument("container_id")
@click.argument("signal_name", default="SIGTERM")
def kill(all_processes: bool, container_id: str, signal_name: str) -> None:
    """Send a signal to the container: to its VMM, which stops the VM (status 128+signal)."""
    kill_container(_runtime().store, container_id, signal_name)


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
    """The signal, then the wait until the VMM is in the state asked for: the status is the
    process's own (store.py), so nothing is written here and nothing can race the VMM."""
    record = store.load(container_id)
    if record.status is not before:
        raise ContainerError(f"container {container_id} is {record.status}, not {before}")
    os.kill(record.pid, sig)
    deadline = time.monotonic() + 5
    while store.load(container_id).status is not after:
        if time.monotonic() > deadline:
            raise ContainerError(f"container {container_id}: its VMM did not become {after}")
        time.sleep(0.005)


@main.command()
@click.option("--force", "-f", is_flag=True, help="Kill a running container first.")
@click.argument("container_id")
def delete(force: bool, container_id: str) -> None:
    """Remove a stopped (or, with --force, any) container."""
    delete_container(_runtime().store, container_id, force)


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
    pid = create_container(runtime, Path(bundle), pid_file, console_socket, container_id)
    start_container(runtime.store, container_id)
    if detach:
        return
    _, status = os.waitpid(pid, 0)
    runtime.store.remove(container_id)
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else
             128 + os.WTERMSIG(status))


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
