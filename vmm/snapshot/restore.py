"""Start a VM from a snapshot: check it, map its RAM, rebuild its devices, put the state back.

The recipe, beside the cold boot's (vmm/builder.py):

1. read and check ``vm.state`` (format, checksum, every field's type) and
   that this host and these options can run it: the same KVM flavour and
   CPUID, the same memory size and vCPU count, disks unchanged since;
2. KVM, the VM and its in-kernel platform, exactly as for a boot;
3. guest RAM: the memory file mapped ``MAP_PRIVATE`` (nothing is read or
   copied: the guest faults pages in from the page cache as it touches them,
   and writes to private copies), so the time does not grow with ``--mem``;
4. the devices, wired as for a boot, then their saved states;
5. the VM's state (PIC, IOAPIC, PIT, clock), then each vCPU's.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path

from vmm.config import DiskConfig, VmConfig
from vmm.errors import SnapshotError
from vmm.snapshot.state import MEMORY_FILE, STATE_FILE, HostIdentity, Snapshot
from vmm.snapshot.statefile import read_state_file


def load_snapshot(directory: Path) -> Snapshot:
    """The snapshot's state, read and checked (format, checksum, types): no KVM yet."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "no such directory" if not directory.exists() else "not a directory"
        raise SnapshotError(f"{directory}: {what} (a snapshot is a directory: vmm snapshot create)")
    path = directory / STATE_FILE
    return Snapshot.from_sections(read_state_file(path), str(path))


def restore_config(snapshot: Snapshot, config: VmConfig, *, mem_given: bool, cpus_given: bool,
                   disks_given: bool, name: str = "the snapshot") -> VmConfig:
    """The run's configuration: the snapshot's machine, the user's run options.

    Options that shape the machine (memory, vCPUs, disks) come from the
    snapshot; given on the command line, they must say the same. The devices
    the configuration makes must be the snapshot's, field by field (their id,
    kind, resources, and what the guest saw: a NIC's MAC, MTU and features).
    """
    from vmm.devices.model import check_same_devices, plan_devices
    from vmm.devices.platform import LINUX_DEVICES

    meta = snapshot.meta
    if mem_given and config.mem != meta.mem:
        raise SnapshotError(f"--mem {config.mem >> 20}M: the snapshot's VM has "
                            f"{meta.mem >> 20}M (a snapshot's memory size cannot change)")
    if cpus_given and config.cpus != meta.cpus:
        raise SnapshotError(f"--cpus {config.cpus}: the snapshot's VM has {meta.cpus} vCPUs")
    disks = tuple(DiskConfig(d.file.path, d.read_only, d.serial) for d in meta.disks)
    if disks_given:
        given = [(str(Path(d.path).resolve()), d.read_only, d.serial) for d in config.disks]
        if given != [(d.path, d.read_only, d.serial) for d in disks]:
            saved = ", ".join(d.path + (",ro" if d.read_only else "") for d in disks) or "none"
            raise SnapshotError(f"--disk: the snapshot's VM has these disks: {saved}")
    restored = replace(config, mem=meta.mem, cpus=meta.cpus, disks=disks,
                       virtio_notify=meta.virtio_notify,
                       stderr_uart=any(r.id == "com2" for r in meta.devices))
    planned = tuple(spec.record() for spec in plan_devices(LINUX_DEVICES, restored))
    check_same_devices(meta.devices, planned, name)
    return restored


def check_host(snapshot: Snapshot, host: HostIdentity, name: str) -> None:
    saved = snapshot.meta.host
    if saved.flavour != host.flavour:
        raise SnapshotError(f"{name}: taken on KVM {saved.flavour}, this host's KVM is {host.flavour}")
    if saved.cpuid_digest != host.cpuid_digest:
        raise SnapshotError(
            f"{name}: taken on another CPU ({saved.cpu_model}; this host: {host.cpu_model}, "
            "with different CPUID features): the guest kernel chose code for that CPU's features")


def check_disks(snapshot: Snapshot, name: str) -> None:
    """A disk's content is part of the VM: the guest's page cache holds blocks it read."""
    for disk in snapshot.meta.disks:
        change = disk.file.changed()
        if change:
            raise SnapshotError(
                f"{name}: disk {disk.file.path} changed since the snapshot ({change}); "
                "the saved guest may cache its old blocks: make a new snapshot")


def check_memory_file(snapshot: Snapshot, directory: Path) -> int:
    """Open the memory file; its size must be the regions' (a truncated copy is refused)."""
    path = directory / MEMORY_FILE
    meta = snapshot.meta
    if sum(size for _, size in meta.regions) != meta.memory_size:
        raise SnapshotError(f"{directory / STATE_FILE}: memory regions do not add up to its size")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no such file (the snapshot's RAM is missing)") from None
    except OSError as e:
        raise SnapshotError(f"{path}: cannot open: {e.strerror}") from None
    size = os.fstat(fd).st_size
    if size != meta.memory_size:
        os.close(fd)
        raise SnapshotError(f"{path}: {size} bytes, the snapshot's RAM is {meta.memory_size}: "
                            "truncated or not this snapshot's")
    return fd


def snapshot_support(kvm, name: str) -> None:
    """This KVM can save and restore what a snapshot holds (SnapshotError naming what it lacks)."""
    from vmm.kvm.capabilities import SNAPSHOT, missing

    absent = missing(kvm, SNAPSHOT)
    if absent:
        raise SnapshotError(f"{name}: this host's KVM cannot restore snapshots: it lacks "
                            + ", ".join(c.name for c in absent))


def restore_linux_vm(directory: Path, snapshot: Snapshot, config: VmConfig, output, events):
    """Steps 2-5: a LinuxGuest ready to run from where the snapshot left it.

    ``config`` comes from :func:`restore_config`; ``events`` are the devices'
    callbacks, as for a boot.
    """
    from vmm.builder import LinuxGuest, add_linux_devices, create_linux_machine
    from vmm.kvm.state import restore_vcpu, restore_vm
    from vmm.arch.x86_64.layout import ram_ranges
    from vmm.memory import GuestMemory

    directory = Path(directory)
    meta = snapshot.meta
    name = str(directory / STATE_FILE)
    if tuple(ram_ranges(meta.mem)) != meta.regions:
        raise SnapshotError(f"{name}: memory layout {meta.regions} is not what this vmm "
                            f"builds for {meta.mem >> 20}M")
    check_disks(snapshot, name)
    fd = check_memory_file(snapshot, directory)
    try:
        memory = GuestMemory(list(meta.regions), backing_fd=fd)
    finally:
        os.close(fd)  # the mappings keep the file
    with contextlib.ExitStack() as undo:
        machine = create_linux_machine(config, memory)
        undo.callback(machine.close)
        snapshot_support(machine.kvm, name)
        check_host(snapshot, HostIdentity.of(machine.kvm, machine.flavour), name)
        devices = add_linux_devices(machine, config, output, events)
        for vcpu_state in snapshot.vcpus:
            machine.vcpus.append(machine.vm.create_vcpu(vcpu_state.vcpu_id))
        try:
            restore_vm(machine.vm, snapshot.vm)
            for vcpu, vcpu_state in zip(machine.vcpus, snapshot.vcpus):
                restore_vcpu(vcpu, vcpu_state)
            devices.restore(snapshot.devices)
        except ValueError as e:  # a device refused its state
            raise SnapshotError(f"{name}: {e}") from None
        machine.phases["kvm_ready"] = time.monotonic_ns()
        undo.pop_all()
    system_map = Path(meta.system_map) if meta.system_map else None
    return LinuxGuest(machine, devices, None, meta.cmdline, Path(meta.kernel),
                      system_map if system_map and system_map.exists() else None,
                      Path(meta.initrd) if meta.initrd else None)
