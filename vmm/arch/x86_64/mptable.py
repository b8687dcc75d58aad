"""The Intel MultiProcessor table: how a guest without ACPI finds its CPUs.

Linux (CONFIG_X86_MPPARSE) scans the EBDA for the 16-byte floating pointer
``_MP_``, follows it to the ``PCMP`` configuration table and reads one
processor entry per CPU, the I/O APIC, the ISA bus and how each ISA IRQ is
wired. That is what makes ``--cpus N`` give the guest N CPUs: the guest boots
the others itself through the in-kernel local APICs (INIT/SIPI).
(Intel MultiProcessor Specification 1.4, chapter 4.)
"""

from __future__ import annotations

from vmm.arch.x86_64 import layout
from vmm.packed import Packed

SPEC_REVISION = 4  # 1.4
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED = 1
CPU_BOOTSTRAP = 2
CPU_SIGNATURE = (6 << 8) | (1 << 4) | 1  # family 6, model 1, stepping 1: any modern x86
CPU_FEATURES = (1 << 9) | (1 << 0)  # APIC and FPU on chip
ISA_IRQS = 16
IOAPIC_PINS = 24

MP_INT = 0  # vectored interrupt from the I/O APIC
MP_NMI = 1
MP_EXTINT = 3

FloatingPointer = Packed(
    ("signature", "4s"), ("physptr", "I"), ("length", "B"), ("specification", "B"),
    ("checksum", "B"), ("feature1", "B"), ("feature2", "B"), ("feature3", "B"),
    ("feature4", "B"), ("feature5", "B"),
)
ConfigHeader = Packed(
    ("signature", "4s"), ("length", "H"), ("spec", "B"), ("checksum", "B"),
    ("oem", "8s"), ("product", "12s"), ("oem_table", "I"), ("oem_table_size", "H"),
    ("entry_count", "H"), ("lapic", "I"), ("ext_table_length", "H"),
    ("ext_table_checksum", "B"), ("reserved", "B"),
)
Processor = Packed(
    ("type", "B"), ("apic_id", "B"), ("apic_version", "B"), ("flags", "B"),
    ("signature", "I"), ("features", "I"), ("reserved", "8s"),
)
Bus = Packed(("type", "B"), ("bus_id", "B"), ("bus_type", "6s"))
IoApic = Packed(("type", "B"), ("apic_id", "B"), ("version", "B"), ("flags", "B"),
                ("address", "I"))
Interrupt = Packed(
    ("type", "B"), ("irq_type", "B"), ("flags", "H"), ("src_bus", "B"),
    ("src_irq", "B"), ("dst_apic", "B"), ("dst_pin", "B"),
)

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INTERRUPT, ENTRY_LOCAL_INTERRUPT = range(5)


def checksum_byte(data: bytes) -> int:
    """The byte that makes ``data`` sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def build_mptable(cpus: int, address: int = layout.MPTABLE) -> bytes:
    """The floating pointer followed by the configuration table, for ``cpus`` CPUs."""
    if not 1 <= cpus <= 254:
        raise ValueError(f"{cpus} CPUs: the MP table's 8-bit APIC ids allow 1-254")
    ioapic_id = cpus  # the next APIC id after the CPUs'
    entries = [
        Processor.build(
            type=ENTRY_PROCESSOR, apic_id=cpu, apic_version=APIC_VERSION,
            flags=CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0),
            signature=CPU_SIGNATURE, features=CPU_FEATURES, reserved=bytes(8),
        )
        for cpu in range(cpus)
    ]
    entries.append(Bus.build(type=ENTRY_BUS, bus_id=0, bus_type=b"ISA   "))
    entries.append(IoApic.build(type=ENTRY_IOAPIC, apic_id=ioapic_id, version=IOAPIC_VERSION,
                                flags=1, address=layout.IOAPIC_BASE))
    # ISA IRQ n → I/O APIC pin n: KVM's default routing wires GSI n to pin n.
    for irq in range(ISA_IRQS):
        entries.append(Interrupt.build(
            type=ENTRY_IO_INTERRUPT, irq_type=MP_INT, flags=0, src_bus=0, src_irq=irq,
            dst_apic=ioapic_id, dst_pin=irq,
        ))
    entries.append(Interrupt.build(type=ENTRY_LOCAL_INTERRUPT, irq_type=MP_EXTINT, flags=0,
                                   src_bus=0, src_irq=0, dst_apic=0xFF, dst_pin=0))
    entries.append(Interrupt.build(type=ENTRY_LOCAL_INTERRUPT, irq_type=MP_NMI, flags=0,
                                   src_bus=0, src_irq=0, dst_apic=0xFF, dst_pin=1))
    body = b"".join(entries)
    header = dict(
        signature=b"PCMP", length=ConfigHeader.sizeof() + len(body), spec=SPEC_REVISION,
        checksum=0, oem=b"VMM     ", product=b"VMM MPTABLE ", oem_table=0, oem_table_size=0,
        entry_count=len(entries), lapic=layout.LAPIC_BASE, ext_table_length=0,
        ext_table_checksum=0, reserved=0,
    )
    header["checksum"] = checksum_byte(ConfigHeader.build(**header) + body)
    config = ConfigHeader.build(**header) + body
    pointer = dict(signature=b"_MP_", physptr=address + FloatingPointer.sizeof(), length=1,
                   specification=SPEC_REVISION, checksum=0, feature1=0, feature2=0,
                   feature3=0, feature4=0, feature5=0)
    pointer["checksum"] = checksum_byte(FloatingPointer.build(**pointer))
    return FloatingPointer.build(**pointer) + config
