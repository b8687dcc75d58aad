"""The ACPI tables vmm gives a Linux guest: one function per table, bytes out, no KVM.

What a distribution's kernel reads of them (ACPI 6.4):

* RSDP: where the XSDT is. Handed over in ``boot_params.acpi_rsdp_addr`` (the
  64-bit boot protocol), ``hvm_start_info.rsdp_paddr`` (PVH), and placed in the
  BIOS area a kernel scans (0xE0000-0xFFFFF) for anything else.
* XSDT: the list of the other tables (the DSDT is reached through the FADT).
* FADT: a *hardware-reduced* machine (no PM timer, no SCI, no fixed events):
  the sleep control and status registers (how the guest powers off: it writes
  SLP_TYP of ``\\_S5`` with SLP_EN there), the reset register (the i8042's
  0xFE on port 0x64, which vmm already treats as a reset), the DSDT's address.
* MADT: a local APIC per vCPU, the IOAPIC (ISA IRQ n on pin n, as vmm's MP
  table says: no overrides), LINT1 as NMI.
* DSDT: every device vmm gives the guest, in AML (vmm/acpi/aml.py): the UARTs,
  the RTC, the virtio-mmio transports (``LNRO0005``: what Debian's
  ``virtio_mmio`` module is loaded for), and a power button (``PNP0C0C``)
  notified through a Generic Event Device (``ACPI0013``) when vmm asks the
  guest to shut down. The devices come from the device model
  (vmm/devices/model.py): each one's spec says what it is.

Every table ends up with a zero byte sum (its checksum field), and iasl
(acpica-tools) disassembles each without a warning in the tests.
"""

from __future__ import annotations

import struct

from vmm.acpi import aml

OEM_ID = b"VMM   "  # 6 bytes
OEM_TABLE_ID = b"VMMACPI "  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"VMM "
CREATOR_REVISION = 1
HEADER = struct.Struct("<4sIBB6s8sI4sI")  # the 36-byte System Description Table header

# FADT flags (5.2.9, table 5.10)
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button (ours is a device)
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
# IA-PC boot architecture flags (5.2.9.3)
IAPC_LEGACY_DEVICES = 1 << 0  # ISA devices such as the UARTs and the RTC
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
# Generic Address Structure address spaces
SYSTEM_MEMORY, SYSTEM_IO = 0, 1
# Sleep control register (4.8.3.7): SLP_TYP in bits 4:2, SLP_EN bit 5.
SLP_TYP_SHIFT, SLP_EN = 2, 1 << 5
S5_SLP_TYP = 5  # the value \_S5 names, and the guest writes to power off
POWER_BUTTON_NOTIFY = 0x80  # "button pressed" (Notify values for PNP0C0C)


def checksum(data: bytes) -> int:
    """The byte that makes ``data``'s sum zero modulo 256."""
    return -sum(data) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the header, ``body``, the checksum filled in."""
    length = HEADER.size + len(body)
    header = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION,
                         CREATOR_ID, CREATOR_REVISION)
    data = bytearray(header + body)
    data[9] = checksum(bytes(data))
    return bytes(data)


def rsdp(xsdt_address: int) -> bytes:
    """The Root System Description Pointer, ACPI 2.0+ (36 bytes, two checksums)."""
    first = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, 0))
    first[8] = checksum(bytes(first))
    rest = bytearray(struct.pack("<IQB3x", 36, xsdt_address, 0))
    whole = bytes(first) + bytes(rest)
    rest[12] = checksum(whole)
    return bytes(first) + bytes(rest)


def xsdt(addresses: list[int]) -> bytes:
    return table(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in addresses))


def gas(space: int, bit_width: int, address: int, access_size: int = 1) -> bytes:
    """A Generic Address Structure (5.2.3.2): 12 bytes. Access size 1 = byte."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def fadt(dsdt_address: int, *, sleep_control_port: int, sleep_status_port: int,
         reset_port: int, reset_value: int, legacy: bool = True) -> bytes:
    """A hardware-reduced FADT, revision 6 (276 bytes)."""
    body = bytearray(276 - HEADER.size)

    def put(offset: int, data: bytes) -> None:  # offsets as the spec gives them (from 0)
        body[offset - HEADER.size:offset - HEADER.size + len(data)] = data

    put(40, struct.pack("<I", dsdt_address))  # DSDT (32-bit)
    put(45, bytes([0]))  # Preferred_PM_Profile: unspecified
    boot_flags = IAPC_VGA_NOT_PRESENT | (IAPC_LEGACY_DEVICES | IAPC_8042 if legacy else 0)
    put(109, struct.pack("<H", boot_flags))
    flags = FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP | FADT_PWR_BUTTON | FADT_SLP_BUTTON
    put(112, struct.pack("<I", flags))
    put(116, gas(SYSTEM_IO, 8, reset_port))  # RESET_REG
    put(128, bytes([reset_value]))  # RESET_VALUE
    put(129, struct.pack("<H", 0))  # ARM boot flags
    put(131, bytes([4]))  # FADT minor version: 6.4
    put(140, struct.pack("<Q", dsdt_address))  # X_DSDT
    put(244, gas(SYSTEM_IO, 8, sleep_control_port))  # SLEEP_CONTROL_REG
    put(256, gas(SYSTEM_IO, 8, sleep_status_port))  # SLEEP_STATUS_REG
    put(268, b"VMM     ")  # Hypervisor Vendor Identity
    return table(b"FACP", 6, bytes(body))


def madt(cpus: int, *, lapic_address: int, ioapic_address: int, ioapic_id: int) -> bytes:
    """Local APIC n for vCPU n (ACPI processor id n), the IOAPIC at GSI 0, LINT1 = NMI."""
    entries = b""
    for cpu in range(cpus):
        entries += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)  # Processor Local APIC, enabled
    entries += struct.pack("<BBBBII", 1, 12, ioapic_id, 0, ioapic_address, 0)  # I/O APIC
    entries += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # Local APIC NMI: all CPUs, LINT1
    PCAT_COMPAT = 1  # the 8259 PICs are there (KVM's irqchip): the OS masks them
    return table(b"APIC", 5, struct.pack("<II", lapic_address, PCAT_COMPAT) + entries)


def dsdt(devices: list[bytes], *, ged_irq: int) -> bytes:
    """The DSDT: ``devices`` (aml.device terms) under \\_SB, the power button and the
    Generic Event Device that notifies it, and \\_S5 (power off)."""
    power = [
        aml.device("PWRB", aml.name("_HID", aml.eisa_id("PNP0C0C")), aml.name("_UID", 0)),
        aml.device(
            "GED", aml.name("_HID", "ACPI0013"), aml.name("_UID", 0),
            aml.name("_CRS", aml.resources(aml.interrupt(ged_irq))),
            # The GED's interrupt: the guest's driver evaluates _EVT with its number.
            aml.method("_EVT", 1, aml.if_equal(aml.ARG0, aml.integer(ged_irq),
                                               aml.notify("\\_SB.PWRB", POWER_BUTTON_NOTIFY))),
        ),
    ]
    body = (aml.scope("\\_SB", *devices, *power)
            + aml.name("\\_S5", aml.package(S5_SLP_TYP, 0)))
    return table(b"DSDT", 2, body)
