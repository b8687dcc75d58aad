"""Save a paused VM: its state values and its RAM, into a snapshot directory.

Called with every vCPU stopped (:meth:`vmm.runner.Runner.pause`), at /init's
ready point. The directory is written under a temporary name beside the
target and renamed into place at the end, so a reader never sees half a
snapshot, and two vmm processes making the same snapshot at once do not mix
their files (the second rename fails and that copy is dropped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmm import __version__
from vmm.config import VmConfig
from vmm.errors import SnapshotError
from vmm.kvm.state import Capabilities, capture_vcpu, capture_vm
from vmm.snapshot.state import (
    MEMORY_FILE, STATE_FILE, DiskRecord, FileIdentity, HostIdentity, Snapshot,
    SnapshotMeta,
)
from vmm.snapshot.statefile import write_state_file


@dataclass(frozen=True)
class SaveResult:
    directory: Path
    state_bytes: int
    memory_size: int
    memory_stored: int
    seconds: float

    def summary(self) -> str:
        return (f"snapshot saved to {self.directory} in {self.seconds:.2f} s: "
                f"{self.memory_stored / 2**20:.1f} MiB of {self.memory_size / 2**20:.0f} MiB RAM "
                f"stored, state {self.state_bytes / 1024:.0f} KiB")


def check_target(directory: Path) -> None:
    """A snapshot goes into a new or empty directory: never over someone's files."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise SnapshotError(f"{directory}: exists and is not empty; "
                            "name a new directory or remove this one")


def capture(guest, config: VmConfig, mailbox: list[tuple[int, int]], memory_stored: int,
            disks: tuple[DiskRecord, ...] | None = None) -> Snapshot:
    """The state values of a paused Linux guest (vmm.builder.LinuxGuest).

    ``disks``: the disks to record, when not the config's own (carried copies).

    Paused means no vCPU in KVM_RUN and no virtio I/O thread at work
    (:func:`save_snapshot` holds the transports).
    """
    from vmm.snapshot.restore import snapshot_support

    machine = guest.machine
    snapshot_support(machine.kvm, "snapshot")
    caps = Capabilities.of(machine.vm)
    msr_indices = machine.kvm.get_msr_index_list()
    vcpus = tuple(capture_vcpu(v, v.get_cpuid2(), msr_indices, caps) for v in machine.vcpus)
    meta = SnapshotMeta(
        vmm_version=__version__,
        created_ns=time.time_ns(),
        host=HostIdentity.of(machine.kvm, machine.flavour),
        mem=config.mem,
        regions=tuple((r.start, r.size) for r in machine.memory),
        cpus=len(machine.vcpus),
        cmdline=guest.cmdline,
        kernel=str(guest.kernel_path),
        initrd=str(guest.initrd_path) if guest.initrd_path else None,
        system_map=str(guest.system_map) if guest.system_map else None,
        memory_size=machine.memory.size,
        memory_stored=memory_stored,
        disks=disks if disks is not None else tuple(
            DiskRecord(FileIdentity.of(d.path), d.read_only, d.serial) for d in config.disks),
        devices=guest.devices.records(),
        virtio_notify=config.virtio_notify,
        mailbox=tuple(mailbox),
        capabilities=caps,
    )
    return Snapshot(meta, capture_vm(machine.vm, caps), vcpus, guest.devices.states())


def carried_disk_name(index: int) -> str:
    return f"disk{index}.img"


def _carry_disks(config: VmConfig, staging: Path, directory: Path) -> tuple[DiskRecord, ...]:
    """Copy each disk into the snapshot; records naming the copies where they will be.

    The copy is the disk at the instant of the snapshot (the vCPUs and the
    I/O threads stand still), so the guest's page cache and the blocks agree.
    The rename of the directory keeps each file's inode and times: the
    identity taken here is still true of the final path.
    """
    from vmm.devices.disk import copy_image

    final = directory.parent.resolve() / directory.name
    records = []
    for index, disk in enumerate(config.disks):
        name = carried_disk_name(index)
        copy_image(disk.path, staging / name)
        identity = dataclasses.replace(FileIdentity.of(staging / name), path=str(final / name))
        records.append(DiskRecord(identity, disk.read_only, disk.serial))
    return tuple(records)


def save_snapshot(directory: Path, guest, config: VmConfig, mailbox: list[tuple[int, int]],
                  *, replace: bool = False, carry_disks: bool = False) -> SaveResult:
    """Write the snapshot of a paused guest to ``directory`` (which must not exist, or be empty).

    ``replace``: a directory already there is left alone and this copy
    dropped (the warm-start cache: whoever renames first wins).
    ``carry_disks``: the snapshot holds a copy of each disk as it is now
    (``disk0.img``...), and names those: a VM whose disk is written can be
    restored on a copy of the copy (vmm/oci/imagebase.py).
    """
    start = time.perf_counter()
    directory = Path(directory)
    if not replace:
        check_target(directory)
        if directory.exists():
            directory.rmdir()  # empty: the rename below puts the snapshot there
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with contextlib.ExitStack() as quiet:  # an I/O thread could write RAM or a ring meanwhile
            for transport in guest.devices.virtio:
                quiet.enter_context(transport.paused())
            fd = os.open(staging / MEMORY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o600)
            try:
                stored = guest.machine.memory.save(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            disks = _carry_disks(config, staging, directory) if carry_disks else None
            snapshot = capture(guest, config, mailbox, stored, disks)
        state_bytes = write_state_file(staging / STATE_FILE, snapshot.to_sections())
        try:
            os.rename(staging, directory)
        except OSError:
            if not replace or not (directory / STATE_FILE).exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another vmm saved it first
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise SnapshotError(f"{directory}: cannot save the snapshot: {e.strerror or e}") from None
        raise
    return SaveResult(directory, state_bytes, snapshot.meta.memory_size, stored,
                      time.perf_counter() - start)
