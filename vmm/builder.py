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
from typing import Callable, cast

from vmm.arch.x86_64 import cpu, layout
from vmm.config import VmConfig, check_argv
from vmm.devices.legacy import DebugExit, Sink
from vmm.devices.model import DeviceKind, DeviceManager, Wiring
from vmm.devices.serial import Serial16550
from vmm.errors import LoaderError, UsageError, unreadable
from vmm.kvm.capabilities import FIRMWARE, LINUX, require
from vmm.kvm.flavour import Flavour, detect_flavour
from vmm.kvm.system import Kvm
from vmm.loader.files import check_guest_files
from vmm.loader.symbols import addresses_of
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
                # Read as bytes are: its slices are bytes (the loader only slices it).
                return cast(bytes, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
        data = path.read_bytes()
    except OSError as e:
        raise LoaderError(unreadable(path, e)) from None
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

    # 1. KVM and the VM; whatever is created is released again if a later step fails.
    with contextlib.ExitStack() as undo:
        kvm = Kvm()
        undo.callback(kvm.close)
        require(kvm, FIRMWARE)
        vm = kvm.create_vm()
        undo.callback(vm.close)
        # 2. Guest RAM, split around the 3-4 GiB gap as a PC's is; in the gap the
        #    pages Intel's real-mode emulation needs (KVM_SET_TSS_ADDR, identity map).
        ram = layout.ram_ranges(config.mem)
        tss, identity_map = layout.kvm_private_pages(ram)
        vm.set_tss_addr(tss)
        vm.set_identity_map_addr(identity_map)
        machine = Machine(kvm, vm, GuestMemory(ram), flavour=detect_flavour())
        undo.pop_all()
        undo.callback(machine.close)  # from here the Machine owns kvm, vm and memory
        machine.register_memory()
        # 3. The payload, ending at 1 MiB like a BIOS ROM.
        machine.memory.write(layout.FIRMWARE_END - len(image), image)
        # 4. Devices: console, exit port, POST codes, the benchmark port.
        machine.pio.register(layout.COM1_PORT, 8, Serial16550(output), "com1")
        machine.pio.register(layout.EXIT_PORT, 1, DebugExit(on_exit), "debug-exit")
        machine.pio.register(layout.POST_PORT, 1, Sink(0xFF), "post")
        machine.pio.register(layout.BENCH_PORT, layout.BENCH_PORT_SIZE, Sink(bench_count), "bench")
        # 5. One vCPU at the reset vector.
        vcpu = vm.create_vcpu(0)
        machine.vcpus.append(vcpu)
        # KVM checks its own CPUID table before letting the guest set EFER.LME:
        # without it the longmode payload's wrmsr takes a #GP (measured here).
        cpu.setup_cpuid(vcpu, kvm.get_supported_cpuid(),
                        cpu.guest_cpus(kvm, vcpu, 1, machine.flavour)[0])
        cpu.setup_reset_vector(vcpu)
        machine.phases["kvm_ready"] = time.monotonic_ns()
        undo.pop_all()
    return machine


# --- Linux ----------------------------------------------------------------------------

# Every Linux guest gets these; the comments say why.
BASE_CMDLINE = (
    "console=ttyS0",  # our 16550 at 0x3f8
    "reboot=k",  # reboot through the i8042 (we end the VM on its reset command)
    "panic=-1",  # reboot at once on panic instead of hanging
    "pci=off",  # there is no PCI bus: skip probing it
    "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",  # no mouse, no PnP scan
    "tsc=reliable",  # skip the TSC stability watchdog
    "8250.nr_uarts=1",  # one UART: do not probe COM2-4
    # Keep the SMP lock prefixes instead of patching them out one text_poke at a
    # time on a 1-CPU boot: alternatives_smp_module_add was 6.4% of the boot's
    # profile samples on PVM (vmm run --profile, docs/profiling.md), 0 with this.
    "noreplace-smp",
)
QUIET_CMDLINE = ("quiet", "loglevel=1")  # only emergencies (a panic) besides the command
# Our kernel has every driver built in; a distribution's loads virtio_mmio as a module.
OUR_KERNEL_CMDLINE = ("nomodule",)
# With our initramfs: unpack it into ramfs, not tmpfs. ramfs pages are
# unevictable, so when a process exits the kernel skips the LRU bookkeeping for
# every page it had mapped from there (folio_activate: a third of a busybox exit
# in `vmm run --profile`; `true` after a restore 700 -> 610 ms on PVM, glibc
# busybox). Our /init accepts either.
DEFAULT_INITRAMFS_CMDLINE = ("rootfstype=ramfs",)


def encode_argv(argv: tuple[str, ...]) -> str:
    """vmm.argv=...: each argument percent-encoded, separated by %00 (see images/init.c)."""
    check_argv(argv)

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
    devices: DeviceManager
    entry: object  # vmm.loader.linux.BootEntry; None for a VM restored from a snapshot
    cmdline: str
    kernel_path: Path
    system_map: Path | None
    initrd_path: Path | None = None

    @property
    def serial(self) -> Serial16550:
        return self.devices.serial

    @property
    def boot_timer(self):
        return self.devices.boot_timer


@dataclass
class GuestEvents:
    """What the devices report to whoever runs the VM."""

    on_exit: Callable[[int], None]  # the guest wrote its status to the exit port
    on_reset: Callable[[], None]  # the guest reset the machine (reboot, panic)
    on_ready: Callable[[int, int], None] | None = None  # /init reached its ready point
    on_error_output: Callable[[bytes], None] | None = None  # bytes on ttyS1 (stderr_uart)
    on_poweroff: Callable[[], None] | None = None  # an ACPI guest powered off (S5)


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


def _decompressed_kernel(kernel: Path, progress) -> Path:
    """A bzImage's vmlinux, decompressed on the host (vmm/loader/decompress.py) and cached
    by content; any other kernel as it is. (A compressed initrd: plain_initrd.)"""
    from vmm.loader.decompress import vmlinux_of

    with open(kernel, "rb") as f:
        header = f.read(0x206)
    if header[0x202:0x206] == b"HdrS":
        kernel = vmlinux_of(kernel, progress) or kernel
    return kernel


def _is_stub_map(path: Path) -> bool:
    """Debian's /boot/System.map holds one line: "ffffffffffffffff B The real System.map
    is in the linux-image-<version>-dbg package". No function: the kernel's own
    kallsyms tables are the symbols then."""
    with open(path, errors="replace") as f:
        for line, _ in zip(f, range(1000)):
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tT":
                return False
    return True


def _is_elf(path: Path) -> bool:
    from vmm.loader.elf import is_elf

    with open(path, "rb") as f:
        return is_elf(f.read(4))


def build_linux_vm(
    config: VmConfig,
    output: Callable[[bytes], None],
    events: GuestEvents,
    progress: Callable[[str], None],
    *,
    mailbox: bool = False,
) -> LinuxGuest:
    """The boot recipe for a Linux guest, step by step.

    With ``mailbox`` the command is not put on the kernel command line: /init
    stops at its ready point instead (vmm/devices/mailbox.py), where the VM
    can be saved and a request delivered.
    """
    from vmm.arch.x86_64.layout import ram_ranges

    # 0. The guest's files, checked and read before KVM is touched.
    check_guest_files(config, disks=False)  # the devices open the disks (step 4)
    kernel_path, system_map = resolve_kernel(config, progress)
    if config.decompress:
        kernel_path = _decompressed_kernel(kernel_path, progress)
    if (system_map is None or _is_stub_map(system_map)) and _is_elf(kernel_path):
        from vmm.loader.kallsyms import system_map_for  # a distribution's stripped kernel

        system_map = system_map_for(kernel_path)
    if config.acpi_enabled and system_map is not None \
            and not addresses_of(system_map, ["acpi_os_initialize"]):
        raise LoaderError(f"{kernel_path}: --acpi on, but this kernel has no ACPI support "
                          "(no acpi_os_initialize among its symbols: CONFIG_ACPI is off)")
    initrd_path = resolve_initrd(config, progress)
    if config.decompress and initrd_path is not None:
        from vmm.loader.decompress import plain_initrd

        initrd_path = plain_initrd(initrd_path, progress)
    kernel = _read_image(kernel_path, "kernel", mapped=True)
    initrd = _read_image(initrd_path, "initrd") if initrd_path else None

    # 1-2. KVM, the VM, its in-kernel platform and its RAM; released again if a later step fails.
    with contextlib.ExitStack() as undo:
        machine = create_linux_machine(config, GuestMemory(ram_ranges(config.mem)))
        undo.callback(machine.close)
        guest = _load_and_wire(machine, config, kernel, kernel_path, system_map, initrd,
                               initrd_path, output, events, mailbox)
        _name_new_tap_devices(guest.devices, progress)
        undo.pop_all()  # success: the caller closes the machine
        return guest


def _name_new_tap_devices(devices: DeviceManager, progress) -> None:
    """``--net tap`` without a name: the kernel chose one, which the user needs (ip addr ...)."""
    for attached in devices:
        net = attached.spec.source
        if attached.spec.kind is DeviceKind.VIRTIO_NET and net.backend == "tap" and not net.name:
            index = attached.spec.id.removeprefix("net")
            progress(f"--net tap: eth{index} is on the host's TAP device "
                     f"{attached.device.device.backend.name}")


def create_linux_machine(config: VmConfig, memory: GuestMemory) -> Machine:
    """KVM, the VM and the platform KVM emulates for us (PIC, IOAPIC, LAPICs, PIT), and RAM.

    Takes ownership of ``memory`` (fresh for a boot, a snapshot's file for a restore).
    """
    from vmm.kvm.ioctl import lib

    flavour = detect_flavour()
    with contextlib.ExitStack() as undo:
        undo.callback(memory.close)
        kvm = Kvm()
        undo.callback(kvm.close)
        require(kvm, LINUX)
        if config.cpus > min(kvm.max_vcpus(), mptable_max_cpus()):
            raise UsageError(f"--cpus {config.cpus}: this host's KVM and vmm allow at most "
                             f"{min(kvm.max_vcpus(), mptable_max_cpus())}")
        vm = kvm.create_vm()
        undo.callback(vm.close)
        tss, identity_map = layout.kvm_private_pages([(r.start, r.size) for r in memory])
        vm.set_tss_addr(tss)
        vm.set_identity_map_addr(identity_map)
        vm.create_irqchip()
        # The PIT with its speaker port (0x61) in the kernel: a guest that calibrates
        # its TSC or LAPIC timer against the PIT gates channel 2 and polls its output
        # there (before, our i8042 answered 0xFF: "output high" at once, a failed
        # calibration). On PVM the calibration fails either way (emulated code is too
        # slow for its timing windows) and the real answer makes that attempt 40 ms
        # longer (guest log, cold boot); on hardware KVM kvmclock and the TSC-deadline
        # timer make the guest skip it.
        vm.create_pit2(lib.KVM_PIT_SPEAKER_DUMMY)
        machine = Machine(kvm, vm, memory, flavour=flavour)
        undo.pop_all()
        undo.callback(machine.close)  # from here the Machine owns kvm, vm and memory
        machine.register_memory()
        undo.pop_all()
    return machine


def add_linux_devices(machine: Machine, config: VmConfig, output, events: GuestEvents) -> DeviceManager:
    """Every device a Linux guest gets (vmm/devices/platform.py): made, wired, on its bus.

    The same for a boot and a restore: a snapshot holds the devices' states,
    not the devices.
    """
    from vmm.devices.platform import LINUX_DEVICES

    wiring = Wiring(machine, config, output, events, trace=_stderr_line if config.trace else None)
    return DeviceManager.build(LINUX_DEVICES, wiring)


def linux_cmdline(config: VmConfig, machine: Machine, devices: DeviceManager, limit: int,
                  mailbox: bool):
    """The kernel command line: vmm's own options, the devices', the user's, the command."""
    from vmm.arch.x86_64 import pvm
    from vmm.loader.cmdline import Cmdline

    cmdline = Cmdline(limit)
    cmdline.add(*BASE_CMDLINE)
    if config.kernel is None:
        cmdline.add(*OUR_KERNEL_CMDLINE)
    if config.init_is_ours:
        cmdline.add(*DEFAULT_INITRAMFS_CMDLINE)
        if not config.console_log:  # (the guest's own init: its console is the machine's)
            cmdline.add(*QUIET_CMDLINE)
    cmdline.add(*devices.cmdline(config.acpi_enabled))
    if config.pvm_time_scale != 1 and machine.flavour is not Flavour.PVM:
        from vmm.errors import UsageError

        raise UsageError(f"--pvm-time-scale {config.pvm_time_scale}: only on PVM hosts (this "
                         f"KVM is {machine.flavour}, where the guest's timer tick is cheap)")
    segmentation = any(net.offload and net.backend == "tap" for net in config.nets)
    cmdline.add(*pvm.cmdline_options(machine.flavour, our_kernel=config.kernel is None,
                                     segmentation_offload=segmentation,
                                     tsc_khz=_vm_tsc_khz(machine),
                                     time_scale=config.pvm_time_scale))
    cmdline.add(config.cmdline)
    if mailbox:
        cmdline.add("vmm.mailbox")  # /init waits at its ready point for the command
    elif config.command:
        cmdline.add(encode_argv(config.command))
    return cmdline


def _finish_syscalls_on_pvm(machine: Machine, loaded, name: str, system_map: Path | None) -> None:
    """A kernel not ours on PVM: its user programs' system calls arrive as page faults
    (vmm/arch/x86_64/pvm_syscall.py); put our guest patch's fix into its memory."""

    if machine.flavour is not Flavour.PVM:
        return
    from vmm.arch.x86_64 import pvm_syscall

    why = None
    if not loaded.segments:
        why = "a bzImage decompresses itself in the guest (boot its vmlinux, the default)"
    elif system_map is None:
        why = "no symbols found in it"
    else:
        try:
            pvm_syscall.install(machine.memory, loaded.segments, system_map)
        except pvm_syscall.NotApplicable as e:
            why = str(e)
    if why is not None:
        import sys

        print(f"vmm: warning: {name}: its user programs' system calls will fault on PVM "
              f"(vmm/arch/x86_64/pvm_syscall.py): {why}", file=sys.stderr)


def _vm_tsc_khz(machine: Machine) -> int | None:
    """The vCPUs' TSC frequency, or None where KVM answers only per vCPU (before 5.17)."""
    from vmm.errors import KvmError

    try:
        return machine.vm.get_tsc_khz() or None
    except KvmError:
        return None


def _load_and_wire(machine: Machine, config: VmConfig, kernel: bytes, kernel_path: Path,
                   system_map: Path | None, initrd: bytes | None, initrd_path: Path | None,
                   output, events: GuestEvents, mailbox: bool) -> LinuxGuest:
    """Steps 3-5 of the recipe, on a machine with KVM, a VM and RAM."""
    from vmm.arch.x86_64 import mptable
    from vmm.loader import linux

    memory = machine.memory

    # 3. The kernel, the initrd.
    name = str(kernel_path)
    loaded = linux.load_kernel(memory, kernel, name)
    if config.kernel is not None:
        _finish_syscalls_on_pvm(machine, loaded, name, system_map)
    initrd_place = None
    if initrd is not None:
        initrd_place = linux.place_initrd(memory, initrd, loaded.end, loaded.initrd_max_address,
                                          str(initrd_path))
    machine.phases["loaded"] = time.monotonic_ns()

    # 4. Devices, then the boot structures that describe them and the command line: the MP
    #    table always, the ACPI tables for a guest that takes them (vmm/acpi/).
    devices = add_linux_devices(machine, config, output, events)
    cmdline = linux_cmdline(config, machine, devices, loaded.cmdline_limit, mailbox)
    rsdp = None
    if config.acpi_enabled:
        from vmm.acpi import write_tables

        rsdp = write_tables(memory, devices.dsdt_entries(), config.cpus)
    boot_info = linux.write_boot_info(memory, loaded, cmdline, config.mem, initrd_place, rsdp)
    memory.write(layout.MPTABLE, mptable.build_mptable(config.cpus))
    memory.write(layout.BOOT_GDT, cpu.gdt_bytes())
    memory.write(layout.BOOT_IDT, bytes(8))
    for address, page in cpu.identity_page_tables().items():
        memory.write(address, page)

    # 5. vCPUs: CPUID (vmm/arch/x86_64/cpuid.py: own APIC id each, the VM's topology,
    #    timers), MSRs, FPU, LAPIC wiring; the BSP at the entry.
    supported = machine.kvm.get_supported_cpuid()
    models = None
    for vcpu_id in range(config.cpus):
        vcpu = machine.vm.create_vcpu(vcpu_id)
        models = models or cpu.guest_cpus(machine.kvm, vcpu, config.cpus, machine.flavour)
        cpu.setup_cpuid(vcpu, supported, models[vcpu_id])
        cpu.setup_msrs(vcpu)  # raises naming an MSR KVM refused
        cpu.setup_fpu(vcpu)
        cpu.setup_lint(vcpu)
        machine.vcpus.append(vcpu)
    bsp = machine.vcpus[0]
    if loaded.protocol is linux.EntryProtocol.PVH:
        cpu.setup_protected_mode(bsp, loaded.entry, boot_info)
    else:
        cpu.setup_long_mode(bsp, loaded.entry, boot_info)
    # The application processors wait for the guest's INIT/SIPI in the LAPIC.
    machine.phases["kvm_ready"] = time.monotonic_ns()
    entry_info = linux.BootEntry(loaded.protocol, loaded.entry, boot_info, loaded.format, loaded.end)
    return LinuxGuest(machine, devices, entry_info, str(cmdline), kernel_path, system_map,
                      initrd_path)


def _stderr_line(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def mptable_max_cpus() -> int:
    """As many CPUs as the MP table's room in the EBDA holds (and our kernel's NR_CPUS)."""
    return 8
