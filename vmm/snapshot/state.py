"""Everything that is a VM's state, besides its RAM: the values a snapshot holds.

A snapshot directory has two files:

* ``memory``: guest RAM, the regions one after the other, sparse (pages the
  guest never touched, or that hold only zeros, are holes);
* ``vm.state``: the state file (vmm/snapshot/statefile.py), whose sections are

  ========== ============================================================
  meta        what the snapshot is of, and what must match to restore it:
              the host (KVM flavour, CPU, CPUID digest), memory size and
              layout, vCPU count, the kernel command line, the disks'
              identities, the mailbox's pages, and the device table: each
              device's id, kind, resources and what the guest saw of it
              (vmm/devices/model.py)
  devices     each device's state value, by id (com1, rtc, blk0, net0...)
  vm          KVM's PIC master/slave, IOAPIC, PIT and clock
  vcpu0 ...   one per vCPU: CPUID, registers, FPU, MSRs, LAPIC, events
  ========== ============================================================

All JSON, with the KVM structures as hex of their bytes
(vmm/kvm/state.py). ``vmm snapshot show DIR`` prints it all, decoded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from typing import Any

from vmm.devices.model import DeviceRecord
from vmm.digest import hexdigest
from vmm.errors import SnapshotError
from vmm.kvm.state import Capabilities, VcpuState, VmState
from vmm.snapshot import codec

STATE_FILE = "vm.state"
MEMORY_FILE = "memory"


@dataclass(frozen=True)
class HostIdentity:
    """What a snapshot's guest has seen of its host, and a restore must see again."""

    flavour: str  # a vmm.kvm.flavour.Flavour value: "pvm", "intel", "amd"
    cpu_model: str  # /proc/cpuinfo's model name, for messages
    cpuid_digest: str  # SHA-256 of KVM_GET_SUPPORTED_CPUID: the features the guest kernel chose from

    @classmethod
    def of(cls, kvm, flavour: str) -> "HostIdentity":
        from vmm.kvm.flavour import cpu_model

        return cls(flavour, cpu_model(), cpuid_digest(kvm))


def cpuid_digest(kvm) -> str:
    from vmm.arch.x86_64.cpuid import cpuid_features

    return hexdigest(repr(cpuid_features(kvm.get_supported_cpuid())).encode())


@dataclass(frozen=True)
class FileIdentity:
    """A file by identity: any write changes ctime, which no one can set back."""

    path: str
    size: int
    device: int
    inode: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> "FileIdentity":
        info = os.stat(path)
        return cls(str(Path(path).resolve()), info.st_size, info.st_dev, info.st_ino,
                   info.st_mtime_ns, info.st_ctime_ns)

    def changed(self) -> str | None:
        """None if the file is still the one identified; else what is different."""
        try:
            now = FileIdentity.of(self.path)
        except FileNotFoundError:
            return "it no longer exists"
        except OSError as e:
            return f"it cannot be read: {e.strerror}"
        if (now.device, now.inode) != (self.device, self.inode):
            return "it is another file now (replaced)"
        if now.size != self.size:
            return f"its size changed ({self.size} -> {now.size} bytes)"
        if (now.mtime_ns, now.ctime_ns) != (self.mtime_ns, self.ctime_ns):
            return "it was written since"
        return None


@dataclass(frozen=True)
class DiskRecord:
    file: FileIdentity
    read_only: bool
    serial: str


@dataclass(frozen=True)
class SnapshotMeta:
    vmm_version: str
    created_ns: int  # host CLOCK_REALTIME when saved
    host: HostIdentity
    mem: int
    regions: tuple[tuple[int, int], ...]  # (guest-physical start, size), in the memory file's order
    cpus: int
    cmdline: str
    kernel: str
    initrd: str | None
    system_map: str | None
    memory_size: int  # the memory file's size: the sum of the regions
    memory_stored: int  # bytes of it that are data, not holes
    disks: tuple[DiskRecord, ...]  # the host files behind blk0, blk1... (identity, not content)
    devices: tuple[DeviceRecord, ...]  # every device: id, kind, resources, what the guest saw
    virtio_notify: str
    mailbox: tuple[tuple[int, int], ...]  # the request buffer: (guest-physical address, length)
    capabilities: Capabilities


@dataclass(frozen=True)
class Snapshot:
    meta: SnapshotMeta
    vm: VmState
    vcpus: tuple[VcpuState, ...]
    devices: dict[str, Any]  # device id -> its state value (the kind's state type)

    def to_sections(self) -> dict[str, bytes]:
        def dump(value) -> bytes:
            return json.dumps(codec.encode(value), separators=(",", ":")).encode()

        sections = {"meta": dump(self.meta), "devices": dump(self.devices), "vm": dump(self.vm)}
        for vcpu in self.vcpus:
            sections[f"vcpu{vcpu.vcpu_id}"] = dump(vcpu)
        return sections

    @classmethod
    def from_sections(cls, sections: dict[str, bytes], name: str) -> "Snapshot":
        def parse(section: str):
            if section not in sections:
                raise SnapshotError(f"{name}: no {section!r} section")
            try:
                return json.loads(sections[section])
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SnapshotError(f"{name}: section {section!r} is not JSON: {e}") from None

        def load(section: str, hint):
            data = parse(section)
            try:
                return codec.decode(hint, data, section)
            except SnapshotError as e:
                raise SnapshotError(f"{name}: {e}") from None

        meta = load("meta", SnapshotMeta)
        if not 0 < meta.cpus <= 64:
            raise SnapshotError(f"{name}: meta.cpus {meta.cpus} makes no sense")
        vcpus = tuple(load(f"vcpu{i}", VcpuState) for i in range(meta.cpus))
        for i, vcpu in enumerate(vcpus):
            if vcpu.vcpu_id != i:
                raise SnapshotError(f"{name}: section vcpu{i} holds vCPU {vcpu.vcpu_id}")
        known = {"meta", "devices", "vm", *(f"vcpu{i}" for i in range(meta.cpus))}
        unknown = sorted(set(sections) - known)
        if unknown:
            raise SnapshotError(f"{name}: unexpected section {unknown[0]!r}")
        return cls(meta, load("vm", VmState), vcpus, _device_states(meta, parse("devices"), name))


def _device_states(meta: SnapshotMeta, data, name: str) -> dict[str, Any]:
    """The devices section: a state for each device of the table whose kind keeps one,
    decoded as that kind's state type (vmm/devices/platform.py), nothing else."""
    from vmm.devices.platform import LINUX_DEVICES

    state_types = {t.kind.value: t.state_type for t in LINUX_DEVICES}
    if not isinstance(data, dict):
        raise SnapshotError(f"{name}: devices: expected an object")
    states, ids = {}, set()
    for record in meta.devices:
        if record.id in ids:
            raise SnapshotError(f"{name}: meta.devices: {record.id} twice")
        ids.add(record.id)
        if record.kind not in state_types:
            raise SnapshotError(f"{name}: meta.devices: {record.id} is a {record.kind!r}, "
                                "a kind of device this vmm does not have")
        state_type = state_types[record.kind]
        if state_type is None:
            continue
        if record.id not in data:
            raise SnapshotError(f"{name}: devices: no state for {record.id}")
        try:
            states[record.id] = codec.decode(state_type, data[record.id], f"devices.{record.id}")
        except SnapshotError as e:
            raise SnapshotError(f"{name}: {e}") from None
    extra = sorted(set(data) - set(states))
    if extra:
        raise SnapshotError(f"{name}: devices: {extra[0]!r} is not a device of meta.devices "
                            "that keeps a state")
    return states
