"""build_vm(config): the boot recipe, step by step.

Read top to bottom, each builder is what a VMM does before the first
instruction: open KVM, create the VM, give it memory, load the guest, add the
devices (create, wire the IRQ, register on the bus), create and set up the
vCPUs. Linux guests add boot structures (vmm/loader) and the platform pieces
(irqchip, PIT, MP table); firmware payloads need none of that.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
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


def _read_image(path: Path, what: str, *, mapped: bool = False) -> bytes:
    """The file's bytes, or with ``mapped`` a read-only mmap of it.

    A kernel is mapped, not read: its segments are copied from the page cache
    straight into guest RAM, without a 17 MB bytes object in between (that
    copy was a third of vmm's peak memory).
    """
    try:
        if mapped:
            import mmap

            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise LoaderError(f"{path}: empty file, not a {what}")
                return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        data = path.read_bytes()
    except FileNotFoundError:
        raise LoaderError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoaderError(f"{path}: is a directory") from None
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


# --- Linux ----------------------------------------------------------------------------

# Every Linux guest gets these; the comments say why.
BASE_CMDLINE = (
    "console=ttyS0",  # our 16550 at 0x3f8
    "reboot=k",  # reboot through the i8042 (we end the VM on its reset command)
    "panic=-1",  # reboot at once on panic instead of hanging
    "pci=off",  # there is no PCI bus: skip probing it
    "nomodule",  # everything is built in
    "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",  # no mouse, no PnP scan
    "tsc=reliable",  # skip the TSC stability watchdog
    "8250.nr_uarts=1",  # one UART: do not probe COM2-4
    # Keep the SMP lock prefixes instead of patching them out one text_poke at a
    # time on a 1-CPU boot: alternatives_smp_module_add was 6.4% of the boot's
    # profile samples on PVM (vmm run --profile, docs/profiling.md), 0 with this.
    "noreplace-smp",
)
QUIET_CMDLINE = ("quiet", "loglevel=1")  # only emergencies (a panic) besides the command


def encode_argv(argv: tuple[str, ...]) -> str:
    """vmm.argv=...: each argument percent-encoded, separated by %00 (see images/init.c)."""
    if any("\0" in arg for arg in argv):
        raise UsageError("a command argument contains a NUL byte, which no argv can hold")
    def encode(arg: str) -> str:
        out = []
        for byte in os.fsencode(arg):  # argv may hold undecodable bytes (surrogateescape)
            ch = chr(byte)
            if ch.isascii() and (ch.isalnum() or ch in "-_.,/:=+@^"):
                out.append(ch)
            else:
                out.append(f"%{byte:02x}")
        return "".join(out)

    return "vmm.argv=" + "%00".join(encode(a) for a in argv)


@dataclass
class LinuxGuest:
    """What run_linux needs beyond the Machine: devices it reads from, and how it booted."""

    machine: Machine
    serial: Serial16550
    boot_timer: object  # vmm.devices.legacy.BootTimer
    entry: object  # vmm.loader.linux.BootEntry
    cmdline: str
    kernel_path: Path
    system_map: Path | None


def resolve_kernel(config: VmConfig, progress: Callable[[str], None]) -> tuple[Path, Path | None]:
    """The kernel to boot and its System.map (our guest kernel unless --kernel)."""
    if config.kernel:
        path = Path(config.kernel)
        system_map = path.with_name("System.map")
        return path, system_map if system_map.exists() else None
    from vmm.images.kernel import build_kernel, cached_kernel

    artifacts = cached_kernel()
    if artifacts is None:
        progress("building the guest kernel (first use only; a few minutes)")
        artifacts = build_kernel(progress)
    # vmlinux boots through PVH: no decompressor, which runs emulated on PVM hosts.
    return artifacts.vmlinux, artifacts.system_map


def resolve_initrd(config: VmConfig, progress: Callable[[str], None]) -> Path | None:
    if config.initrd == "none":
        return None
    if config.initrd:
        return Path(config.initrd)
    from vmm.images.initramfs import default_initramfs

    return default_initramfs(progress)


def build_linux_vm(
    config: VmConfig,
    output: Callable[[bytes], None],
    on_exit: Callable[[int], None],
    on_reset: Callable[[], None],
    progress: Callable[[str], None],
) -> LinuxGuest:
    """The boot recipe for a Linux guest, step by step."""
    from vmm.loader.e820 import ram_ranges

    # 0. The guest's files, read and checked before KVM is touched.
    kernel_path, system_map = resolve_kernel(config, progress)
    kernel = _read_image(kernel_path, "kernel", mapped=True)
    initrd_path = resolve_initrd(config, progress)
    initrd = _read_image(initrd_path, "initrd") if initrd_path else None
    flavour = detect_flavour()

    # 1. KVM, the VM and the platform KVM emulates for us: PIC, IOAPIC, LAPICs, PIT.
    #    Whatever is created is released again if a later step fails.
    with contextlib.ExitStack() as undo:
        kvm = Kvm()
        undo.callback(kvm.close)
        if config.cpus > min(kvm.max_vcpus(), mptable_max_cpus()):
            raise UsageError(f"--cpus {config.cpus}: this host's KVM and vmm allow at most "
                             f"{min(kvm.max_vcpus(), mptable_max_cpus())}")
        vm = kvm.create_vm()
        undo.callback(vm.close)
        vm.set_tss_addr(layout.KVM_TSS_ADDRESS)
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDRESS)
        vm.create_irqchip()
        vm.create_pit2()

        # 2. Guest RAM, split around the 32-bit MMIO gap.
        memory = GuestMemory(ram_ranges(config.mem))
        undo.pop_all()  # from here the Machine owns kvm, vm and memory
        machine = Machine(kvm, vm, memory, flavour=flavour)
        undo.callback(machine.close)
        guest = _load_and_wire(machine, config, kernel, kernel_path, system_map, initrd,
                               initrd_path, output, on_exit, on_reset)
        undo.pop_all()  # success: the caller closes the machine
        return guest


def _load_and_wire(machine: Machine, config: VmConfig, kernel: bytes, kernel_path: Path,
                   system_map: Path | None, initrd: bytes | None, initrd_path: Path | None,
                   output, on_exit, on_reset) -> LinuxGuest:
    """Steps 3-5 of the recipe, on a machine with KVM, a VM and RAM."""
    from vmm.arch.x86_64 import mptable, pvm
    from vmm.devices.i8042 import I8042
    from vmm.devices.irq import IrqLine
    from vmm.devices.legacy import BootTimer
    from vmm.devices.rtc import CmosRtc
    from vmm.loader import linux
    from vmm.loader.cmdline import Cmdline

    kvm, vm, memory = machine.kvm, machine.vm, machine.memory
    machine.register_memory()

    # 3. The kernel, the initrd, the boot structures.
    name = str(kernel_path)
    fmt, entry, kernel_end, parsed = linux.load_kernel(memory, kernel, name)
    initrd_place = None
    if initrd is not None:
        max_address = parsed.initrd_addr_max if fmt == "bzImage" else layout.MMIO_GAP_START - 1
        initrd_place = linux.place_initrd(memory, initrd, kernel_end, max_address, str(initrd_path))
    machine.phases["loaded"] = time.monotonic_ns()

    # 4. Devices: create, wire the IRQ, register on the bus, extend the command line.
    cmdline = Cmdline(linux.cmdline_limit(fmt, parsed))
    cmdline.add(*BASE_CMDLINE)
    if not config.console_log:
        cmdline.add(*QUIET_CMDLINE)
    serial = Serial16550(output, IrqLine(vm.irq_line, layout.COM1_IRQ))
    machine.pio.register(layout.COM1_PORT, 8, serial, "serial")
    machine.pio.register(layout.I8042_DATA_PORT, 5, I8042(on_reset), "i8042")
    machine.pio.register(layout.RTC_PORT, 2, CmosRtc(), "rtc")
    machine.pio.register(layout.POST_PORT, 1, Sink(0xFF), "post")
    machine.pio.register(layout.EXIT_PORT, 1, DebugExit(on_exit), "debug-exit")
    boot_timer = BootTimer()
    machine.pio.register(layout.BOOT_TIMER_PORT, 1, boot_timer, "boot-timer")
    if config.disks:
        from vmm.devices.virtio.attach import attach_block_devices

        cmdline.add(*attach_block_devices(
            machine, config.disks, lambda irq: IrqLine(vm.irq_line, irq),
            notify=config.virtio_notify,
            trace=_stderr_line if config.trace else None))
    if machine.flavour == "pvm":
        cmdline.add(*pvm.cmdline_options())
    cmdline.add(config.cmdline)
    if config.command:
        cmdline.add(encode_argv(config.command))
    boot_info = linux.write_boot_info(memory, fmt, parsed, cmdline, config.mem, initrd_place)
    memory.write(layout.MPTABLE, mptable.build_mptable(config.cpus))
    memory.write(layout.BOOT_GDT, cpu.gdt_bytes())
    memory.write(layout.BOOT_IDT, bytes(8))
    for address, page in cpu.identity_page_tables().items():
        memory.write(address, page)

    # 5. vCPUs: CPUID (own APIC id each), MSRs, FPU, LAPIC wiring; the BSP at the entry.
    for vcpu_id in range(config.cpus):
        vcpu = vm.create_vcpu(vcpu_id)
        vcpu.set_cpuid2(cpu.supported_cpuid(kvm, vcpu_id, config.cpus))
        cpu.setup_msrs(vcpu)
        cpu.setup_fpu(vcpu)
        cpu.setup_lint(vcpu)
        machine.vcpus.append(vcpu)
    bsp = machine.vcpus[0]
    if fmt == "vmlinux (PVH)":
        cpu.setup_protected_mode(bsp, entry, boot_info)
    else:
        cpu.setup_long_mode(bsp, entry, boot_info)
    # The application processors wait for the guest's INIT/SIPI in the LAPIC.
    machine.phases["kvm_ready"] = time.monotonic_ns()
    entry_info = linux.BootEntry("pvh" if fmt == "vmlinux (PVH)" else "linux64", entry,
                                 boot_info, fmt, kernel_end)
    return LinuxGuest(machine, serial, boot_timer, entry_info, str(cmdline), kernel_path, system_map)


def _stderr_line(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def mptable_max_cpus() -> int:
    """As many CPUs as the MP table's room in the EBDA holds (and our kernel's NR_CPUS)."""
    return 8
