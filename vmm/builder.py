"""build_vm(config): the boot recipe, step by step.

Read top to bottom, each builder is what a VMM does before the first
instruction: open KVM, create the VM, give it memory, load the guest, add the
devices (create, wire the IRQ, register on the bus), create and set up the
vCPUs. Linux guests add boot structures (vmm/loader) and the platform pieces
(irqchip, PIT, MP table); firmware payloads need none of that.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from vmm.arch.x86_64 import cpu, layout
from vmm.config import VmConfig
from vmm.devices.legacy import DebugExit, Sink
from vmm.devices.serial import Serial16550
from vmm.errors import LoaderError, UsageError
from vmm.kvm.flavour import detect_flavour
from vmm.kvm.system import Kvm
from vmm.machine import Machine
from vmm.memory import GuestMemory


def _read_image(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LoaderError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoaderError(f"{path}: is a directory, not a {what}") from None
    except PermissionError:
        raise LoaderError(f"{path}: permission denied") from None
    except OSError as e:
        raise LoaderError(f"{path}: cannot read: {e.strerror}") from None
    if not data:
        raise LoaderError(f"{path}: empty file, not a {what}")
    return data


def build_firmware_vm(
    config: VmConfig,
    output: Callable[[bytes], None],
    on_exit: Callable[[int], None],
    bench_count: int = 0,
) -> Machine:
    """A bare x86 machine for our firmware: RAM, a UART, the exit and bench ports.

    No irqchip, no boot structures: the payload starts at the reset vector in
    real mode, like a PC's BIOS, and does the rest itself.
    """
    from vmm.firmware import firmware_path

    image_path = firmware_path(config.firmware or "")
    image = _read_image(image_path, "firmware image")
    if len(image) > layout.FIRMWARE_MAX_SIZE:
        raise LoaderError(
            f"{image_path}: {len(image)} bytes, larger than the {layout.FIRMWARE_MAX_SIZE // 1024} KiB "
            "a firmware image may have (it must fit below 1 MiB in segment F000)"
        )
    if config.mem < layout.MIN_MEM_FIRMWARE:
        raise UsageError("--mem: firmware needs at least 1M (it is loaded to end at 1 MiB)")

    # 1. KVM and the VM.
    kvm = Kvm()
    vm = kvm.create_vm()
    # Intel needs a 3-page TSS area for real mode (KVM_SET_TSS_ADDR); harmless elsewhere.
    vm.set_tss_addr(layout.KVM_TSS_ADDRESS)
    # 2. Guest RAM.
    memory = GuestMemory([(0, config.mem)])
    machine = Machine(kvm, vm, memory, flavour=detect_flavour())
    machine.register_memory()
    # 3. The payload, ending at 1 MiB like a BIOS ROM.
    memory.write(layout.FIRMWARE_END - len(image), image)
    # 4. Devices: console, exit port, POST codes, the benchmark port.
    machine.pio.register(layout.COM1_PORT, 8, Serial16550(output), "serial")
    machine.pio.register(layout.EXIT_PORT, 1, DebugExit(on_exit), "debug-exit")
    machine.pio.register(layout.POST_PORT, 1, Sink(0xFF), "post")
    machine.pio.register(layout.BENCH_PORT, layout.BENCH_PORT_SIZE, Sink(bench_count), "bench")
    # 5. One vCPU at the reset vector.
    vcpu = vm.create_vcpu(0)
    # KVM checks its own CPUID table before letting the guest set EFER.LME:
    # without it the longmode payload's wrmsr takes a #GP (measured here).
    vcpu.set_cpuid2(cpu.supported_cpuid(kvm, vcpu_id=0, cpus=1))
    cpu.setup_reset_vector(vcpu)
    machine.vcpus.append(vcpu)
    machine.phases["kvm_ready"] = time.monotonic_ns()
    return machine
