"""The VMM process of one container: what `create` starts and the shim waits on.

`create` forks it (``spawn``); ``python3 -m vmm.oci.monitor STATE_DIR READY_FD``
runs the same ``main`` in a new interpreter.

1. gets the container's VM to /init's ready point with its root ready: restores
   the *image base* of this root (vmm/oci/imagebase.py) on a copy of its disk;
   without one, restores the cached *container base* for this memory size and
   vCPU count (or boots one cold and saves it on the way: the first container
   of that size only), whose one disk is an empty placeholder (``base_disk``),
   puts the container's root image (``mkfs.ext4 -d``) behind that disk
   (``VirtioBlock.replace_backend`` + a configuration-change interrupt: the
   guest driver reads the new size), sends /init the root's request, and
   saves the image base when /init is back at its ready point;
2. marks the container created and tells `create` so on READY_FD ("ok", or
   "error: ..." and exit 1), then waits for `start` (a byte in start.fifo);
3. marks it running and delivers the process (argv and the process's settings
   of vmm/oci/guest.py) through the mailbox;
4. exits with the container process's exit status (a signal that stops the VM:
   128 + its number, as a shell reports a process killed by it).

Its stdin, stdout and stderr are `create`'s: the container's stdio (containerd's
shim passes FIFOs). The guest's console (ttyS0) carries the process's stdout, a
second UART (ttyS1, ``VmConfig.stderr_uart``) its stderr; with a terminal both
are the console, as with runc. vmm's own messages go to STATE_DIR/vmm.log,
never into the container's stderr.
"""

from __future__ import annotations

import errno
import json
import os
import select
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from vmm.config import DiskConfig
from vmm.errors import VmmError
from vmm.oci.guest import process_request
from vmm.oci.store import Record, Status, Store, process_start_time, write_atomically
from vmm.outcome import EXIT_VMM_ERROR
from vmm.session import BootToReady, LinuxRun, SaveAtReady

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


def base_disk() -> Path:
    """The container base's disk: an empty image, never written (its identity is in the key)."""
    from vmm.cache import cache_dir

    path = cache_dir() / "oci" / "empty-disk.img"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, "")
    return path


class ContainerRun(LinuxRun):
    """A LinuxRun that prepares the root, waits at the ready point for `start`, runs the process.

    Every ready point goes through ``deliver`` (the first one of a restored VM
    comes from ``execute``): the first one with the root not ready gets the
    root's request; the one with the root ready saves the image base if asked,
    tells `create`, and waits there for `start`.
    """

    def __init__(self, config, start, *, store: Store, record: Record, spec, root: "RootPlan",
                 channel: StartChannel, ready: ReadyPipe, **options) -> None:
        super().__init__(config, start, **options)
        self.spec, self.root = spec, root
        self.store, self.record = store, record
        self.channel, self.ready = channel, ready
        self.root_requested = root.prepared  # restored from an image base: nothing to ask
        self.started_ns = self.delivered_ns = 0  # `start` seen; the process handed to /init

    def used_once_running(self) -> tuple[str, ...]:
        return super().used_once_running() + ("vmm.snapshot.save",)  # the image base

    def at_ready(self, extents) -> None:
        if self.root_requested:  # back at the ready point with the root ready
            self.deliver(extents)
        else:
            super().at_ready(extents)  # the container base saved on the way, if booting one

    def deliver(self, extents) -> None:
        from vmm.devices.mailbox import deliver

        if not self.root_requested:
            self.root_requested = True
            on_placeholder = not isinstance(self.start, BootToReady)
            if on_placeholder:
                self.insert_root_disk()
            request = self.root.request(self.spec, wait_root=on_placeholder)
            deliver(self.machine.memory, extents, request)
            return
        self.machine.phases["root_ready"] = time.monotonic_ns()
        self.save_image_base(extents)
        self.record.status = Status.CREATED
        self.store.save(self.record)
        self.ready.tell("ok")
        if not self.channel.wait(lambda: self.runner.outcome is not None):
            return  # stopped (killed) before start: the run ends with the signal's status
        self.started_ns = time.monotonic_ns()
        self.record.status = Status.RUNNING
        self.store.save(self.record)
        deliver(self.machine.memory, extents, process_request(self.spec))
        self.delivered_ns = time.monotonic_ns()

    def save_image_base(self, extents) -> None:
        """The VM with the root ready, and a copy of the disk, into the cache (once)."""
        target, self.root.save_to = self.root.save_to, None
        if target is None:
            return
        from vmm.errors import SnapshotError
        from vmm.snapshot import cache
        from vmm.snapshot.save import save_snapshot

        config = replace(self.config, disks=(DiskConfig(str(self.root.image)),))
        try:
            saved = save_snapshot(target, self.guest, config, extents, replace=True,
                                  carry_disks=True)
        except SnapshotError as e:
            self.progress(f"warning: the image base was not saved: {e}")
            return
        self.machine.phases["image_base_saved"] = time.monotonic_ns()
        self.progress(f"image base: {saved.summary()}")
        cache.prune()

    def execute(self, stdin):
        """With a terminal, what is typed on the pty goes to the guest's console."""
        if not self.spec.terminal:
            return super().execute(stdin)
        from vmm.console import InteractiveConsole

        with InteractiveConsole(self.guest.serial.enqueue_input, lambda: None, fd=0, escape=False):
            return super().execute(stdin)

    def insert_root_disk(self) -> None:
        """The container's root behind the disk the guest saw empty; tell its driver.

        A restored base was given the root image in place of the placeholder when
        its devices were made (the guest still believes the disk is empty); a base
        just booted has the placeholder open: swap it, and close it, so that the
        next container can boot one too (a writable image is locked by one VM).
        """
        from vmm.devices.disk import RawDiskImage

        transport = self.guest.devices["blk0"]
        if isinstance(self.start, SaveAtReady):
            backend = RawDiskImage(str(self.root.image), transport.device.read_only)
            self.machine.closers.append(backend.close)
            with transport.paused():  # no request in flight on the old image meanwhile
                placeholder = transport.device.replace_backend(backend)
            placeholder.close()
        transport.config_changed()


@dataclass
class RootPlan:
    """The container's root: its image, whether the VM has it ready, where to save that VM."""

    image: Path  # the container's root.img
    preload: tuple[str, ...] = ()
    prepared: bool = False  # restored from an image base: mounted, its programs cached
    save_to: Path | None = None  # the image base to save once the root is ready

    def request(self, spec, *, wait_root: bool) -> bytes:
        from vmm.oci.guest import root_request

        return root_request(spec, self.preload, wait_root=wait_root)


def _start_for(config, spec, image: Path, log):
    """(config, start, RootPlan): how this container's VM comes to be, its root ready or not.

    Restored from its image base, the root is ready on a copy of the base's
    disk; otherwise ``mkfs.ext4`` makes the root image and the VM starts from
    the container base (restored, or booted and saved: only that boot runs on
    the placeholder disk), or boots plainly on the root.
    """
    from vmm.errors import SnapshotError
    from vmm.oci import imagebase
    from vmm.oci.guest import build_root_image, fit_preload, root_settings
    from vmm.session import FromSnapshot, warm_snapshot
    from vmm.snapshot import cache
    from vmm.snapshot.restore import check_disks, load_snapshot, restore_config

    def progress(line: str) -> None:
        print(f"vmm: {line}", file=log)

    root_disk = DiskConfig(str(image))
    directory, key = warm_snapshot(config, progress)
    if key is None:
        build_root_image(spec, image)
        return replace(config, disks=(root_disk,)), BootToReady(), RootPlan(image)
    content = imagebase.scan(spec, config.mem)
    preload = fit_preload(spec, content.preload)
    image_key = imagebase.image_base_key(key, content, root_settings(spec, preload))
    plan = RootPlan(image, preload, save_to=cache.snapshot_cache_dir() / image_key)
    base = cache.lookup(image_key)
    if base is not None:
        from vmm.devices.disk import copy_image

        try:
            snapshot = load_snapshot(base)
            restored = restore_config(snapshot, config, mem_given=True, cpus_given=True,
                                      disks_given=False, name=str(base))
            copy_image(imagebase.carried_disk(base), image)
            check_disks(snapshot, str(base))  # unchanged, before and during the copy
            progress(f"restoring the image base {image_key}")
            return (replace(restored, disks=(root_disk,)), FromSnapshot(base, snapshot),
                    RootPlan(image, preload, prepared=True))
        except (SnapshotError, OSError) as e:
            progress(f"the image base cannot be used ({e}); making a new one")
            image.unlink(missing_ok=True)
            cache.discard(base)
    build_root_image(spec, image)
    if directory is not None:
        try:
            snapshot = load_snapshot(directory)
            restored = restore_config(snapshot, config, mem_given=True, cpus_given=True,
                                      disks_given=True, name=str(directory))
            return replace(restored, disks=(root_disk,)), FromSnapshot(directory, snapshot), plan
        except SnapshotError as e:
            progress(f"the cached container base cannot be used ({e}); booting a new one")
            cache.discard(directory)
    if not claim_base_build(key):
        # Its placeholder disk is locked by that VMM (one writer per image): boot on our own root.
        progress("another container is saving the container base: booting without saving")
        return replace(config, disks=(root_disk,)), BootToReady(), plan
    progress("first container of this size: booting, saving the container base")
    return config, SaveAtReady(cache.snapshot_cache_dir() / key, then_run=True, replace=True), plan


_claims: list[int] = []  # lock fds held for this process's life


def claim_base_build(key: str) -> bool:
    """True if this process may boot and save the base ``key`` (no other one is doing it)."""
    import fcntl

    from vmm.cache import cache_dir

    path = cache_dir() / "oci" / f"{key}.building"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _claims.append(fd)
    return True


def _profile():
    """VMM_OCI_PROFILE=HZ: sample the guest's RIP, the hottest functions into vmm.log."""
    hz = os.environ.get("VMM_OCI_PROFILE")
    if not hz:
        return None
    from vmm.profiler import ProfileOptions

    return ProfileOptions(hz=float(hz), top=40)


def _log_phases(log, phases: dict[str, int], run: "ContainerRun") -> None:
    """Where the container's time went, for vmm.log (ms from the VMM process's start)."""
    marks = dict(phases, started=run.started_ns, delivered=run.delivered_ns)
    base = marks.get("process_start") or min(v for v in marks.values() if v)
    order = sorted((v, k) for k, v in marks.items() if v)
    print("phases: " + ", ".join(f"{k} {(v - base) / 1e6:.1f}" for v, k in order), file=log)


class ReadyPipe:
    """The pipe `create` waits on: told once ("ok" or "error: ..."), then closed.

    Once: after "ok" the pipe is closed and its number may name another file,
    so a later error must not be written there.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def tell(self, line: str) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, (line + "\n").encode())
        except OSError:
            pass  # create is gone: nobody to tell
        os.close(self.fd)
        self.fd = -1


def spawn(directory: Path, tty: int | None) -> tuple[int, int]:
    """Fork the container's VMM process: (its pid, the read end of its ready pipe).

    A fork, not a new Python: the VMM starts with this module imported, ~30 ms
    sooner than ``python3 -m vmm.oci.monitor`` (interpreter and site start-up)
    on every `create`. The caller has no threads, so the child is a whole copy.
    Its stdio are the caller's (the container's), or ``tty`` for a terminal.
    """
    from vmm.bench.phases import SPAWN_ENV

    spawned_ns = time.monotonic_ns()
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return pid, read_fd
    status = EXIT_VMM_ERROR
    try:
        os.close(read_fd)
        os.setsid()  # out of the caller's session: a signal to its group is not ours
        if tty is not None:
            for fd in (0, 1, 2):
                os.dup2(tty, fd)
            os.close(tty)
        os.environ[SPAWN_ENV] = str(spawned_ns)
        status = main([str(directory), str(write_fd)])
    except BaseException:  # a bug: into the log, not the container's stderr
        import traceback

        with open(directory / "vmm.log", "a") as log:
            traceback.print_exc(file=log)
    finally:
        os._exit(status)


def main(argv: list[str]) -> int:
    from vmm.config import VmConfig
    from vmm.oci.spec import parse_config
    from vmm.runner import install_stop_signals

    from vmm.bench.phases import process_start

    marks = {"main": time.monotonic_ns(), "process_start": process_start()[0] or 0}
    directory, ready = Path(argv[0]), ReadyPipe(int(argv[1]))
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
                          disks=(DiskConfig(str(base_disk())),), stderr_uart=True)
        config, start, root = _start_for(config, spec, directory / "root.img", log)
        channel = StartChannel(directory / "start.fifo")
        run = ContainerRun(config, start, store=store, record=record, spec=spec, root=root,
                           channel=channel, ready=ready, stdout=sys.stdout.buffer,
                           error_stream=sys.stderr.buffer, stderr=log, profile=_profile())
        run.build()
        try:
            install_stop_signals(run.runner)
            outcome = run.execute(None)
            result = run.finish(outcome)
            status = result.status
            _log_phases(log, {**marks, **result.phases}, run)
        finally:
            run.machine.close()
            channel.close()
    except VmmError as e:
        print(f"vmm-runtime: {e}", file=log)
        ready.tell(f"error: {e}")
        status = EXIT_VMM_ERROR
    except OSError as e:
        message = f"{e.filename or ''}: {os.strerror(e.errno or errno.EIO)}".lstrip(": ")
        print(f"vmm-runtime: {message}", file=log)
        ready.tell(f"error: {message}")
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
