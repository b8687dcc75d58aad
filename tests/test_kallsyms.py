"""Symbols from a kernel's own kallsyms tables (vmm/loader/kallsyms.py), judged by the
linker's System.map of our guest kernel: every name at its address."""

from __future__ import annotations

import os

from vmm.loader.kallsyms import kallsyms_of, parse_kallsyms, system_map_for

from guest import guest_kernel


def system_map(path) -> dict[str, set[int]]:
    names: dict[str, set[int]] = {}
    with open(path) as f:
        for line in f:
            address, _kind, name = line.split()[:3]
            names.setdefault(name, set()).add(int(address, 16))
    return names


def test_our_kernels_kallsyms_agree_with_its_system_map():
    kernel = guest_kernel()
    symbols = kallsyms_of(kernel.vmlinux)
    assert symbols is not None and len(symbols) > 10_000
    reference = system_map(kernel.system_map)
    wrong = [(name, hex(address)) for address, _kind, name in symbols
             if address not in reference.get(name, ())]
    assert wrong == []
    kinds = {name: kind for _address, kind, name in symbols}
    assert kinds["start_kernel"] == "T" and kinds["jiffies"] in "Dd"


def test_a_stripped_kernel_gets_a_system_map_made_once(tmp_path, monkeypatch):
    kernel = guest_kernel()  # (from the real cache: before VMM_CACHE_DIR moves it)
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    vmlinux = tmp_path / "vmlinux"
    # (objcopy --strip-all: what a distribution ships, symbols gone, kallsyms kept)
    assert os.system(f"objcopy --strip-all {kernel.vmlinux} {vmlinux}") == 0
    made = system_map_for(vmlinux)
    assert made is not None and made.parent == tmp_path / "cache/decompressed/symbols"
    assert system_map(made)["start_kernel"] == system_map(kernel.system_map)["start_kernel"]
    made.write_text("0000000000000000 T cached\n")  # the second call reads the cache
    assert system_map_for(vmlinux) == made and made.read_text().endswith("cached\n")


def test_bytes_without_the_tables_give_no_symbols(tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    assert parse_kallsyms(os.urandom(1 << 20)) is None
    digits_only = bytes(4096) + b"".join(bytes([c]) + b"\0" for c in b"0123456789") + bytes(4096)
    assert parse_kallsyms(digits_only) is None
    not_elf = tmp_path / "vmlinux"
    not_elf.write_bytes(b"\x7fELF" + bytes(100))
    assert system_map_for(not_elf) is None and system_map_for(not_elf) is None


def test_a_damaged_table_gives_no_symbols_rather_than_wrong_ones():
    from elftools.elf.elffile import ELFFile

    with open(guest_kernel().vmlinux, "rb") as f:
        text = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD").data()
    assert parse_kallsyms(text)
    table = text.find(b"".join(bytes([c]) + b"\0" for c in b"0123456789"))
    # the token index no longer points at the table's strings
    assert parse_kallsyms(text[:table] + b"00" + text[table + 2:]) is None
