"""ACPI tables (vmm/acpi/): every byte checked by iasl, the real disassembler (acpica-tools).

Without KVM: the AML terms' encodings, the tables of a VM with disks, NICs and a
second UART written into guest memory as the builder writes them, each one
disassembled by ``iasl -d`` with no error or warning, and the DSDT saying what a
distribution's kernel looks for (LNRO0005 for virtio-mmio, PNP0501, ACPI0013...).
"""

from __future__ import annotations

import re
import struct
import subprocess

import pytest

from tests.packages import require
from vmm.acpi import aml, tables, write_tables
from vmm.arch.x86_64 import layout
from vmm.config import DiskConfig, NetConfig, VmConfig
from vmm.devices.model import planned
from vmm.devices.platform import LINUX_DEVICES
from vmm.memory import GuestMemory

MiB = 1 << 20


@pytest.mark.parametrize("length, encoded", [
    # 63 bytes of content + 2 of PkgLength = 65 = 0x41: one more byte (bits 7-6 = 01),
    # the low nibble 1 in the first, 0x41 >> 4 = 4 in the second
    (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"), (4093, b"\x4f\xff"), (4094, b"\x81\x00\x01"),
])
def test_pkg_length_counts_its_own_bytes(length, encoded):
    assert aml.pkg_length(length) == encoded


def test_eisa_ids_names_and_integers_encode_as_the_spec_says():
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"  # DWord 0x0105D041
    assert aml.name_string("\\_SB.PWRB") == b"\\\x2e_SB_PWRB"
    assert aml.name_string("\\A.B.C") == b"\\\x2f\x03A___B___C___"
    assert [aml.integer(v) for v in (0, 1, 5, 0x1234, 0x12345678)] == [
        b"\x00", b"\x01", b"\x0a\x05", b"\x0b\x34\x12", b"\x0c\x78\x56\x34\x12"]
    for bad in ("lower", "9ABC", "TOOLONG"):
        with pytest.raises(ValueError):
            aml.name_string(bad)


def built_tables(config: VmConfig) -> dict[str, bytes]:
    """The tables as the builder lays them out in RAM, by signature (the RSDP as RSDP)."""
    entries = [device_type.acpi(spec) for device_type, spec in planned(LINUX_DEVICES, config)
               if device_type.acpi is not None]
    memory = GuestMemory([(0, 2 * MiB)])
    try:
        rsdp_address = write_tables(memory, entries, config.cpus)
        rsdp = memory.read(rsdp_address, 36)
        found = {"RSDP": rsdp}
        xsdt_address = struct.unpack_from("<Q", rsdp, 24)[0]
        pending = [xsdt_address]
        while pending:
            address = pending.pop()
            signature, length = struct.unpack("<4sI", memory.read(address, 8))
            data = memory.read(address, length)
            found[signature.decode()] = data
            if signature == b"XSDT":
                pending += list(struct.unpack_from(f"<{(length - 36) // 8}Q", data, 36))
            if signature == b"FACP":
                pending.append(struct.unpack_from("<Q", data, 140)[0])  # X_DSDT
        return found
    finally:
        memory.close()


CONFIG = VmConfig(cpus=2, kernel="/boot/vmlinuz", stderr_uart=True,
                  disks=(DiskConfig("a.img"), DiskConfig("b.img", read_only=True)),
                  nets=(NetConfig.parse("user"),))


def test_every_table_sums_to_zero_and_the_rsdp_has_both_checksums():
    found = built_tables(CONFIG)
    assert sorted(found) == ["APIC", "DSDT", "FACP", "RSDP", "XSDT"]
    rsdp = found["RSDP"]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    assert rsdp[15] == 2 and struct.unpack_from("<I", rsdp, 20)[0] == 36  # ACPI 2.0+, 36 bytes
    for signature, data in found.items():
        if signature != "RSDP":
            assert sum(data) % 256 == 0, signature
            assert struct.unpack_from("<I", data, 4)[0] == len(data), signature


@pytest.fixture(scope="module")
def disassembled(tmp_path_factory):
    """Each table through ``iasl -d``: (its ASL text, iasl's own output)."""
    iasl = require("iasl")
    work = tmp_path_factory.mktemp("acpi")
    out = {}
    for signature, data in built_tables(CONFIG).items():
        if signature == "RSDP":
            continue  # no table header: iasl has no way in (the guest kernel validates it)
        path = work / f"{signature.lower()}.dat"
        path.write_bytes(data)
        result = subprocess.run([iasl, "-d", str(path)], capture_output=True, text=True,
                                timeout=60, cwd=work)
        assert result.returncode == 0, result.stdout + result.stderr
        out[signature] = (path.with_suffix(".dsl").read_text(), result.stdout + result.stderr)
    return out


@pytest.mark.parametrize("signature", ["DSDT", "FACP", "APIC", "XSDT"])
def test_iasl_disassembles_every_table_without_an_error_or_warning(disassembled, signature):
    text, log = disassembled[signature]
    assert not re.search(r"(?i)\b(error|warning)", log), log
    assert not re.search(r"(?i)\b(error|warning)", text), text


def test_the_dsdt_shows_every_device_a_distribution_looks_for(disassembled):
    text, _ = disassembled["DSDT"]
    hids = re.findall(r'_HID, (?:EisaId \()?"([A-Z0-9]+)"', text)
    assert sorted(hids) == sorted(["PNP0501", "PNP0501", "PNP0B00", "LNRO0005", "LNRO0005",
                                   "LNRO0005", "PNP0C0C", "ACPI0013"])
    for device, window, irq in (("BLK0", "0xD0000000", "0x00000005"),
                                ("BLK1", "0xD0001000", "0x00000006"),
                                ("NET0", "0xD0002000", "0x00000007")):
        block = text[text.index(f"Device ({device})"):]
        block = block[:block.index("Device (", 10)] if "Device (" in block[10:] else block
        assert window in block and irq in block, block
    assert "0x03F8" in text and "0x02F8" in text and "{4}" in text and "{3}" in text  # the UARTs
    assert "Notify (\\_SB.PWRB, 0x80)" in text and f"0x{layout.GED_IRQ:08X}" in text
    assert re.search(r"Name \(\\_S5, Package \(0x02\).*?0x05", text, re.S)


def test_the_fadt_is_hardware_reduced_with_our_sleep_and_reset_registers(disassembled):
    text, _ = disassembled["FACP"]
    assert re.search(r"Hardware Reduced \(V5\) : 1", text)
    assert re.search(r"Reset Register Supported \(V2\) : 1", text)
    assert re.search(r"Value to cause reset : FE", text)
    sleep = text[text.index("Sleep Control Register"):]
    assert f"Address : {layout.ACPI_PM_PORT:016X}" in sleep[:600], sleep[:600]


def test_the_madt_has_a_local_apic_per_vcpu_and_the_ioapic(disassembled):
    text, _ = disassembled["APIC"]
    assert text.count("[Processor Local APIC]") == 2
    assert re.search(r"I/O Apic ID : 02", text) and "FEC00000" in text
    assert "[Local APIC NMI]" in text


def test_our_kernel_gets_no_acpi_unless_asked_and_any_other_kernel_does():
    assert not VmConfig().acpi_enabled and VmConfig(acpi=True).acpi_enabled
    assert VmConfig(kernel="/boot/vmlinuz").acpi_enabled
    assert not VmConfig(kernel="/boot/vmlinuz", acpi=False).acpi_enabled
    ids = [spec.id for _, spec in planned(LINUX_DEVICES, VmConfig(acpi=True))]
    assert "power" in ids and "power" not in [s.id for _, s in planned(LINUX_DEVICES, VmConfig())]
