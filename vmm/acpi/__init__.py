"""ACPI for Linux guests: the tables (tables.py) from the AML terms (aml.py), laid out in RAM.

:func:`write_tables` puts them at ``layout.ACPI_START``: the RSDP first (16-byte
aligned in the 0xE0000-0xFFFFF area a kernel scans when nobody tells it where),
then the DSDT, the FADT, the MADT and the XSDT that lists the last two. The
DSDT's devices come from the device model (each device type's ``acpi``).
"""

from __future__ import annotations

from vmm.acpi import tables
from vmm.arch.x86_64 import layout


def write_tables(memory, dsdt_entries: list[bytes], cpus: int) -> int:
    """The tables into guest RAM; returns the RSDP's guest-physical address."""
    address = layout.ACPI_START
    pieces: list[tuple[int, bytes]] = []

    def place(name: str, data: bytes) -> int:
        nonlocal address
        here = address
        pieces.append((here, data))
        address = -(-(here + len(data)) // 16) * 16  # each table 16-byte aligned
        return here

    rsdp_address = layout.ACPI_START
    address += 64  # the RSDP's room (36 bytes), written last: it needs the XSDT's address
    dsdt = place("DSDT", tables.dsdt(dsdt_entries, ged_irq=layout.GED_IRQ))
    fadt = place("FACP", tables.fadt(dsdt, sleep_control_port=layout.ACPI_PM_PORT,
                                     sleep_status_port=layout.ACPI_PM_PORT + 1,
                                     reset_port=layout.I8042_COMMAND_PORT, reset_value=0xFE))
    madt = place("APIC", tables.madt(cpus, lapic_address=layout.LAPIC_BASE,
                                     ioapic_address=layout.IOAPIC_BASE, ioapic_id=cpus))
    xsdt = place("XSDT", tables.xsdt([fadt, madt]))
    pieces.append((rsdp_address, tables.rsdp(xsdt)))
    if address > layout.ACPI_START + layout.ACPI_SIZE:
        raise ValueError(f"the ACPI tables take {address - layout.ACPI_START} bytes, "
                         f"more than the {layout.ACPI_SIZE} vmm sets aside")
    for where, data in pieces:
        memory.write(where, data)
    return rsdp_address
