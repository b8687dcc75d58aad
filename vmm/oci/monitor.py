"""The VMM process of one container: what `create` starts and the shim waits on.

    python3 -m vmm.oci.monitor STATE_DIR READY_FD

1. boots the container's VM (our kernel and initramfs, the container's root
   disk, the bundle's memory and vCPUs) to /init's ready point;
2. marks the container created and tells `create` so on READY_FD ("ok", or
   "error: ..." and exit 1), then waits for `start` (a byte in start.fifo);
3. marks it running and delivers the process (argv and the settings of
   vmm/oci/guest.py) through the mailbox;
4. exits with the container process's exit status (a signal that stops the VM:
   128 + its number, as a shell reports a process killed by it).

Its stdin, stdout and stderr are `create`'s: the container's stdio (containerd's
shim passes FIFOs). The guest's console carries the process's output; vmm's
own messages go to STATE_DIR/vmm.log, never into the container's stderr.
"""

from __future__ import annotations

import errno
import json
import os
import select
import sys
from pathlib import Path

from vmm.errors import VmmError
from vmm.oci.store import Record, Status, Store, process_start_time
from vmm.outcome import EXIT_VMM_ERROR
from vmm.session import BootToReady, LinuxRun

START_POLL_S = 0.2  # how often a wait for `start` looks whether the VM was stopped meanwhile


class StartChannel:
    """The read end of start.fifo, with a write end of our own so that it never reads EOF."""

    def __init__(self, path: Path) -> None:
        self.read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.keep_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)

    def wait(self, stopped) -> bool:
        """True once `start` wrote its byte; False if ``stopped()`` turned true first."""
        while not stopped():
            ready, _, _ = select.select([self.read_fd], [], [], START_POLL_S)
            if ready:
                try:
                    if os.read(self.read_fd, 1):
                        return True
                except BlockingIOError:
                    pass
        return False

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.keep_fd)


class ContainerRun(LinuxRun):
    """A LinuxRun that stops at the ready point until `start`, then runs the container's process."""

    def __init__(self, config, store: Store, record: Record, settings: tuple[str, ...],
                 channel: StartChannel, ready_fd: int, **options) -> None:
        super().__init__(config, BootToReady(), **options)
        self.store, self.record, self.settings = store, record, settings
        self.channel, self.ready_fd = channel, ready_fd

    def at_ready(self, extents) -> None:
        self.record.status = Status.CREATED
        self.store.save(self.record)
        _tell(self.ready_fd, "ok")
        self.ready_fd = -1
        if not self.channel.wait(lambda: self.runner.outcome is not None):
            return  # stopped (killed) before start: the run ends with the signal's status
        self.record.status = Status.RUNNING
        self.store.save(self.record)
        super().at_ready(extents)

    def deliver(self, extents) -> None:
        from vmm.devices.mailbox import deliver, encode_request

        deliver(self.machine.memory, extents,
                encode_request(self.config.command, settings=self.settings))


def _tell(fd: int, line: str) -> None:
    if fd >= 0:
        try:
            os.write(fd, (line + "\n").encode())
        except OSError:
            pass
        os.close(fd)


def main(argv: list[str]) -> int:
    from vmm.config import DiskConfig, VmConfig
    from vmm.oci.guest import settings as guest_settings
    from vmm.oci.spec import parse_config
    from vmm.runner import install_stop_signals

    directory, ready_fd = Path(argv[0]), int(argv[1])
    store = Store(directory.parent)
    log = open(directory / "vmm.log", "a", buffering=1)
    record = None
    try:
        record = store.load(directory.name)
        record.pid, record.pid_start = os.getpid(), process_start_time(os.getpid()) or 0
        store.save(record)
        config_path = directory / "config.json"
        spec = parse_config(json.loads(config_path.read_text()), Path(record.bundle),
                            str(config_path))
        config = VmConfig(mem=spec.mem, cpus=spec.cpus, command=spec.args,
                          disks=(DiskConfig(str(directory / "root.img"), spec.root_readonly),))
        channel = StartChannel(directory / "start.fifo")
        run = ContainerRun(config, store, record, guest_settings(spec), channel, ready_fd,
                           stdout=sys.stdout.buffer, stderr=log)
        run.build()
        try:
            install_stop_signals(run.runner)
            outcome = run.execute(None)
            status = run.finish(outcome).status
        finally:
            run.machine.close()
            channel.close()
    except VmmError as e:
        print(f"vmm-runtime: {e}", file=log)
        _tell(ready_fd, f"error: {e}")
        status = EXIT_VMM_ERROR
    except OSError as e:
        message = f"{e.filename or ''}: {os.strerror(e.errno or errno.EIO)}".lstrip(": ")
        print(f"vmm-runtime: {message}", file=log)
        _tell(ready_fd, f"error: {message}")
        status = EXIT_VMM_ERROR
    if record is not None:
        record.status, record.exit_status = Status.STOPPED, status
        try:
            store.save(record)
        except OSError:
            pass  # deleted meanwhile (delete --force)
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
