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
        for close in reversed(self.closers):
            close()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        self.memory.close()
        self.kvm.close()
