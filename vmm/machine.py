"""A built VM: the KVM objects, guest memory, buses and devices, ready to run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vmm.devices.bus import Bus
from vmm.kvm.flavour import Flavour
from vmm.kvm.system import Kvm
from vmm.kvm.vcpu import Vcpu
from vmm.kvm.vm import Vm
from vmm.memory import GuestMemory


@dataclass
class Machine:
    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    vcpus: list[Vcpu] = field(default_factory=list)
    pio: Bus = field(default_factory=lambda: Bus("pio"))
    mmio: Bus = field(default_factory=lambda: Bus("mmio"))
    flavour: Flavour = Flavour.UNKNOWN
    phases: dict[str, int] = field(default_factory=dict)  # name → monotonic ns
    closers: list[Callable[[], None]] = field(default_factory=list)

    def register_memory(self) -> None:
        """Tell KVM about every RAM region, one memory slot each."""
        for slot, region in enumerate(self.memory):
            self.vm.set_user_memory_region(slot, region.start, region.size, region.host_address)

    def close(self) -> None:
        """Every step runs, whichever fails (the first failure is raised at the end), and
        a second call does nothing: the devices' closers (in reverse: I/O threads before
        the files they use), the vCPUs, the VM, guest RAM, /dev/kvm."""
        steps = [*reversed(self.closers), *(v.close for v in self.vcpus), self.vm.close,
                 self.memory.close, self.kvm.close]
        self.closers, self.vcpus = [], []
        first: BaseException | None = None
        for step in steps:
            try:
                step()
            except BaseException as e:  # noqa: BLE001 - the rest must still run
                first = first or e
        if first is not None:
            raise first
