"""Every guest-physical address, I/O port and IRQ number vmm uses, in one place.

Read this file to know what the guest sees. Nothing else in vmm spells out a
guest address or port number: builders and devices import them from here.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --- Memory map -----------------------------------------------------------------
# Real-mode world: the zero page and friends live in the low 640 KiB, which the
# PC reserves from the EBDA (0x9fc00) up to 1 MiB for the BIOS and VGA.
ZERO_PAGE = 0x7000  # struct boot_params (Linux boot protocol "zero page")
CMDLINE = 0x20000  # kernel command line, NUL terminated
CMDLINE_MAX = 0x10000  # room we reserve for it (the kernel states its own limit)
BOOT_GDT = 0x500  # GDT used for the first instruction (5 entries: 0x500-0x527)
BOOT_GDT_SIZE = 0x28
BOOT_IDT = 0x540  # an empty IDT: any exception before Linux sets its own is fatal
PML4 = 0x9000  # identity-mapped page tables, 2 MiB pages
PDPTE = 0xA000
PDE = 0xB000  # 4 pages of page directories: identity map of the first 4 GiB
PDE_PAGES = 4
BOOT_STACK = 0x8FF0  # initial RSP for the 64-bit boot protocol
PVH_START_INFO = 0x6000  # struct hvm_start_info for the PVH entry
PVH_MEMMAP = 0x6100  # hvm_memmap_table_entry array that start info points at
MPTABLE = 0x9FC00  # MP floating pointer + table, in the EBDA where Linux scans
EBDA_START = 0x9FC00
BIOS_START = 0xA0000  # 640 KiB: VGA + BIOS area, reserved in e820
HIGH_MEMORY = 0x100000  # 1 MiB: where protected-mode kernels are loaded
# ACPI tables (vmm/acpi/): the RSDP first, where a kernel that is told nothing scans
# (0xE0000-0xFFFFF, reserved in e820), the other tables after it.
ACPI_START = 0xE0000
ACPI_SIZE = 0x10000

# What vmm itself writes below 1 MiB for a Linux guest: (name, start, size).
# A kernel segment may not land on any of it (the loader refuses one below
# 1 MiB), and none overlaps another (tests/test_loader.py).
BOOT_STRUCTURES = (
    ("boot GDT", BOOT_GDT, BOOT_GDT_SIZE),
    ("boot IDT", BOOT_IDT, 8),
    ("PVH start info", PVH_START_INFO, PVH_MEMMAP - PVH_START_INFO),
    ("PVH memory map and module list", PVH_MEMMAP, ZERO_PAGE - PVH_MEMMAP),
    ("zero page", ZERO_PAGE, 0x1000),
    ("boot stack", 0x8000, BOOT_STACK + 0x10 - 0x8000),
    ("page tables", PML4, PDE + PDE_PAGES * 0x1000 - PML4),
    ("ACPI tables", ACPI_START, ACPI_SIZE),
    ("kernel command line", CMDLINE, CMDLINE_MAX),
    ("MP table", MPTABLE, BIOS_START - MPTABLE),
)
KERNEL_LOAD = 0x1000000  # 16 MiB: default bzImage/vmlinux load address

# The 32-bit MMIO gap below 4 GiB: RAM that would overlap it moves above 4 GiB.
MMIO_GAP_START = 0xC000_0000  # 3 GiB
MMIO_GAP_END = 0x1_0000_0000  # 4 GiB
# Intel CPUs without "unrestricted guest" run a guest's real mode as vm86
# under a TSS (3 pages) and an identity-map page table (1 page) that KVM keeps
# in guest-physical space, as memory slots of its own: they must not overlap
# RAM or any MMIO window. They sit in the gap, below the IOAPIC and LAPIC;
# kvm_private_pages() places them once the RAM is known and checks that.
KVM_TSS_ADDRESS = 0xFFFB_D000
KVM_TSS_SIZE = 3 * 0x1000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000
KVM_IDENTITY_MAP_SIZE = 0x1000
LAPIC_BASE = 0xFEE0_0000
LAPIC_SIZE = 0x1000
IOAPIC_BASE = 0xFEC0_0000
IOAPIC_SIZE = 0x1000

# virtio-mmio devices: one 4 KiB window each, from the bottom of the gap.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_MMIO_IRQ_BASE = 5  # IRQ 5, 6, 7, ... one per device, in order
VIRTIO_MMIO_MAX_DEVICES = 8


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """(start, size) of guest RAM for a VM of ``mem_size`` bytes: split around the gap."""
    below = min(mem_size, MMIO_GAP_START)
    ranges = [(0, below)]
    if mem_size > below:
        ranges.append((MMIO_GAP_END, mem_size - below))
    return ranges


def gap_windows() -> list[tuple[str, int, int]]:
    """(name, start, size) of everything vmm and KVM place in the gap below 4 GiB."""
    return [
        ("virtio-mmio windows", VIRTIO_MMIO_BASE, VIRTIO_MMIO_MAX_DEVICES * VIRTIO_MMIO_SIZE),
        ("KVM identity map", KVM_IDENTITY_MAP_ADDRESS, KVM_IDENTITY_MAP_SIZE),
        ("KVM TSS", KVM_TSS_ADDRESS, KVM_TSS_SIZE),
        ("IOAPIC", IOAPIC_BASE, IOAPIC_SIZE),
        ("LAPIC", LAPIC_BASE, LAPIC_SIZE),
    ]


def kvm_private_pages(ram: list[tuple[int, int]]) -> tuple[int, int]:
    """(TSS address, identity-map address) for a VM with this RAM, checked to be free.

    Called with the VM's RAM ranges before KVM_SET_TSS_ADDR: a RAM slot over
    these pages would make KVM's own slots fail (EEXIST) on Intel hosts that
    need them, and only there: the mistake would go unseen on AMD and PVM.
    """
    for name, start, size in gap_windows():
        for ram_start, ram_size in ram:
            if start < ram_start + ram_size and ram_start < start + size:
                raise ValueError(f"guest RAM {ram_start:#x}+{ram_size:#x} overlaps the {name} "
                                 f"at {start:#x}")
    return KVM_TSS_ADDRESS, KVM_IDENTITY_MAP_ADDRESS

# --- Firmware (our own assembly payloads) ----------------------------------------
# Like a PC's BIOS ROM: the image ends at 1 MiB and the vCPU starts at the reset
# vector CS=F000 IP=FFF0 (physical 0xFFFF0) in 16-bit real mode.
FIRMWARE_END = 0x100000
FIRMWARE_MAX_SIZE = 64 * KiB
RESET_CS_SELECTOR = 0xF000
RESET_CS_BASE = 0xF0000
RESET_IP = 0xFFF0

# --- I/O ports --------------------------------------------------------------------
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
RTC_PORT = 0x70  # index at 0x70, data at 0x71
POST_PORT = 0x80  # BIOS POST codes: written often, meaningless to us
COM1_PORT = 0x3F8  # the 16550A console (8 registers)
COM1_IRQ = 4
COM2_PORT = 0x2F8  # a second 16550A (VmConfig.stderr_uart): the guest's ttyS1, a command's stderr
COM2_IRQ = 3
EXIT_PORT = 0x501  # a byte written here ends the VM; vmm exits with that status
BENCH_PORT = 0x502  # 4 ports (a 32-bit IN reads the count): writes discarded, reads a constant
BENCH_PORT_SIZE = 4
BOOT_TIMER_PORT = 0x510  # the guest says "I reached init" / "I am done"
MAILBOX_PORT = 0x520  # /init's ready point: where its request buffer is (16 ports, one byte each)
ACPI_PM_PORT = 0x600  # an ACPI guest's sleep control (0x600) and status (0x601) registers
GED_IRQ = 16  # the power button's Generic Event Device: a GSI above the ISA ones (IOAPIC pin 16)
MAILBOX_PORT_SIZE = 16

# --- Guest RAM limits ---------------------------------------------------------------
# 128 MiB (Firecracker's default too): plenty for the default guest. Boot time
# grows with RAM on PVM hosts (one emulated page-descriptor set-up per 4 KiB:
# ~20 % of boot samples at 512M). Boot-to-init measured here: 512M 25.8 s,
# 256M 17.4 s, 128M 15.7 s; 96M and 64M no faster (fixed costs dominate).
DEFAULT_MEM = 128 * MiB
MIN_MEM_FIRMWARE = 1 * MiB
