"""The syscall fix-up vmm puts into a distribution's kernel on PVM (vmm/arch/x86_64/pvm_syscall.py).

Without KVM: a miniature kernel laid out as Linux 6.1's (the page-fault entry's call
of exc_page_fault, padding after _etext) in guest memory; install() must write a stub
that the real disassembler (objdump, binutils) reads as patch 0001's logic with the
right targets, redirect exactly that call, and leave a kernel it does not recognise
alone. What the stub does in a running guest, the Debian boot of test_distro.py shows
(every user program there makes system calls).
"""

from __future__ import annotations

import re
import struct
import subprocess

import pytest

from tests.packages import require
from vmm.arch.x86_64 import pvm_syscall
from vmm.loader.elf import Segment
from vmm.memory import GuestMemory

MiB = 1 << 20
TEXT_VIRT, TEXT_PHYS = 0xFFFFFFFF81000000, 0x1000000
SYMS = {  # Debian 12's cloud kernel's addresses
    "entry_SYSCALL_64": 0xFFFFFFFF81C00080, "do_syscall_64": 0xFFFFFFFF81A03EF0,
    "exc_page_fault": 0xFFFFFFFF81A06E80, "asm_exc_page_fault": 0xFFFFFFFF81C00BE0,
    "_etext": 0xFFFFFFFF81E01EF2,
}
CALL_AT = 0x1D  # the call's offset in asm_exc_page_fault


def kernel(tmp_path, symbols=SYMS, call_target=None, padding=b"\x00"):
    memory = GuestMemory([(0, 64 * MiB)])
    segments = (Segment(TEXT_PHYS, b"", 0x1000000, TEXT_VIRT),)
    entry = symbols.get("asm_exc_page_fault", SYMS["asm_exc_page_fault"])
    site = entry + CALL_AT
    target = call_target if call_target is not None else SYMS["exc_page_fault"]
    memory.write(site - TEXT_VIRT + TEXT_PHYS, b"\xe8" + struct.pack("<i", target - (site + 5)))
    etext = SYMS["_etext"]
    memory.write(etext - TEXT_VIRT + TEXT_PHYS, padding * (0x1000 - (etext & 0xFFF)))
    system_map = tmp_path / "System.map"
    system_map.write_text("".join(f"{address:016x} T {name}\n" for name, address in symbols.items()))
    return memory, segments, system_map


def disassemble(code: bytes, at: int, tmp_path) -> list[str]:
    objdump = require("objdump")
    path = tmp_path / "code.bin"
    path.write_bytes(code)
    out = subprocess.run([objdump, "-D", "-b", "binary", "-mi386:x86-64", "-Mintel",
                          f"--adjust-vma={at:#x}", str(path)], capture_output=True, text=True,
                         check=True).stdout
    lines = [line.split("\t") for line in out.splitlines() if re.match(r"\s*[0-9a-f]+:\t", line)]
    return [fields[2].strip() for fields in lines if len(fields) == 3]  # (not a long one's tail)


def test_the_stub_is_patch_0001_in_machine_code(tmp_path):
    memory, segments, system_map = kernel(tmp_path)
    fixup = pvm_syscall.install(memory, segments, system_map)
    assert fixup.stub_address == 0xFFFFFFFF81E01F00  # _etext rounded up to 16
    stub = memory.read(fixup.stub_address - TEXT_VIRT + TEXT_PHYS, fixup.stub_size)
    code = disassemble(stub, fixup.stub_address, tmp_path)
    text = "\n".join(code)
    assert code[0] == "mov    rax,cr2"
    assert "# 0xffffffff81c00080" in code[1]  # lea rdx, entry_SYSCALL_64
    assert "cmp    QWORD PTR [rdi+0x80],rax" in text  # regs->ip == address
    assert "and    eax,0x14" in text and "cmp    eax,0x14" in text  # user instruction fetch
    assert "test   BYTE PTR [rdi+0x88],0x3" in text  # from user mode
    assert "test   DWORD PTR [rdi+0x90],0x200" in text  # IF clear: the syscall mask applied
    assert "mov    rax,QWORD PTR [rdi+0x58]" in text  # RIP from RCX
    assert "and    eax,0x240dd5" in text and "or     eax,0x202" in text  # RFLAGS from R11
    assert "mov    QWORD PTR [rdi+0x88],0x33" in text and "mov    QWORD PTR [rdi+0xa0],0x2b" in text
    assert "mov    QWORD PTR [rdi+0x78],rax" in text  # orig_ax = nr
    assert "mov    QWORD PTR [rdi+0x50],0xffffffffffffffda" in text  # ax = -ENOSYS
    assert code[-2] == "jmp    0xffffffff81a03ef0"  # do_syscall_64(regs, nr)
    assert code[-1] == "jmp    0xffffffff81a06e80"  # anything else: exc_page_fault
    # every early exit goes to the last instruction
    tail = fixup.stub_address + fixup.stub_size - 5
    branches = [line for line in code if line.startswith(("jne", "je "))]
    assert len(branches) == 5 and all(line.endswith(f"{tail:#x}") for line in branches)
    # and the page-fault entry now calls the stub
    site = SYMS["asm_exc_page_fault"] + CALL_AT
    assert fixup.call_site == site
    call = memory.read(site - TEXT_VIRT + TEXT_PHYS, 5)
    assert disassemble(call, site, tmp_path) == [f"call   {fixup.stub_address:#x}"]


@pytest.mark.parametrize("change, says", [
    ({"symbols": {k: v for k, v in SYMS.items() if k != "do_syscall_64"}}, "no do_syscall_64"),
    ({"call_target": SYMS["do_syscall_64"]}, "0 calls of exc_page_fault"),
    ({"padding": b"\x90"}, "not padding"),
    ({"symbols": {**SYMS, "_etext": 0xFFFFFFFF81E01FA0}}, "bytes after _etext"),
])
def test_a_kernel_not_shaped_as_expected_is_left_alone(tmp_path, change, says):
    memory, segments, system_map = kernel(tmp_path, **change)
    before = memory.read(TEXT_PHYS, 16 * MiB)
    with pytest.raises(pvm_syscall.NotApplicable, match=says):
        pvm_syscall.install(memory, segments, system_map)
    assert memory.read(TEXT_PHYS, 16 * MiB) == before
