"""Finish an unmodified kernel's system calls on PVM, as our guest kernel's patch 0001 does.

On this host's KVM (PVM) a 64-bit user ``syscall`` jumps to the guest's MSR_LSTAR
(``entry_SYSCALL_64``) but leaves the vCPU at user privilege: the guest kernel takes
a user instruction-fetch page fault at its own syscall entry and kills the process
(Debian 12's kernel on an AMD host: "modprobe[37]: segfault at ffffffff81c00080 ip
ffffffff81c00080 ... error 15", with page-table isolation on or off). No exit
reaches vmm, so the fix must run in the guest, and a distribution's kernel does not
carry ours (guest-kernel/patches/0001-x86-pvm-finish-syscall-in-page-fault.patch).

So vmm puts the same fix into the kernel's memory when it loads a vmlinux (its
bytes on disk stay untouched): a stub of 29 instructions in the padding after
``_etext`` (mapped executable, and never freed: the kernel frees the text/rodata gap
only from the next page on), and the page-fault entry's ``call exc_page_fault``
(in ``asm_exc_page_fault``) pointed at the stub. The stub recognises exactly the
fault PVM produces (address and RIP both ``entry_SYSCALL_64``, a user instruction
fetch, a user CS, IF clear: the syscall mask applied, which user code can never
do) and completes the syscall as the entry code would: RIP from RCX, user-settable
RFLAGS bits from R11 plus IF, 64-bit user CS and SS, ``orig_ax`` = nr, ``ax`` =
-ENOSYS, then a tail call of the kernel's own ``do_syscall_64(regs, nr)`` (entry
work, dispatch, signals, exit work); ``asm_exc_page_fault`` then returns to user
mode through ``error_return`` with IRET. Any other fault goes on to
``exc_page_fault`` unchanged. Only the kernel's symbols (kallsyms, vmm/loader/
kallsyms.py) and ``struct pt_regs`` (x86-64 ABI, unchanged since 2.6) are assumed;
each precondition is checked and a kernel that does not meet them is left alone,
with a one-line warning.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from vmm.loader.symbols import addresses_of

# struct pt_regs offsets (arch/x86/include/asm/ptrace.h)
R11, RAX, RCX, ORIG_AX, RIP, CS, EFLAGS, SS = 48, 80, 88, 120, 128, 136, 144, 160
USER_CS, USER_SS = 0x33, 0x2B
ENOSYS = 38
X86_PF_USER_INSTR = 0x4 | 0x10
EFLAGS_IF, EFLAGS_FIXED = 0x200, 0x2
# RFLAGS bits user code may set (CF PF AF ZF SF TF DF OF AC ID), as patch 0001 keeps
USER_FLAGS = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800 | 0x40000 | 0x200000
CALL = 0xE8
PAGE = 4096
SYMBOLS = ("entry_SYSCALL_64", "do_syscall_64", "exc_page_fault", "asm_exc_page_fault", "_etext")
CALL_SEARCH = 96  # bytes of asm_exc_page_fault searched for the call (it is at +0x1d in 6.1)


def _d32(value: int) -> bytes:
    return struct.pack("<i", value)


def stub(at: int, entry_syscall: int, do_syscall: int, exc_page_fault: int) -> bytes:
    """The stub's bytes, for its virtual address ``at``. On entry (from
    asm_exc_page_fault): RDI = pt_regs, RSI = error code; RAX, RCX, RDX are free (the
    registers are saved in pt_regs, and the C function it replaces may clobber them)."""
    code = bytearray()
    not_ours: list[int] = []  # where a jne's rel32 to the tail goes

    def jne_to_tail() -> None:
        code.extend(b"\x0f\x85")
        not_ours.append(len(code))
        code.extend(bytes(4))

    code += b"\x0f\x20\xd0"  # mov rax, cr2: the faulting address
    code += b"\x48\x8d\x15" + _d32(entry_syscall - (at + len(code) + 7))  # lea rdx, [entry]
    code += b"\x48\x39\xd0"  # cmp rax, rdx
    jne_to_tail()
    code += b"\x48\x39\x87" + _d32(RIP)  # cmp [rdi+RIP], rax: RIP is there too
    jne_to_tail()
    code += b"\x89\xf0"  # mov eax, esi: the error code
    code += b"\x83\xe0" + bytes([X86_PF_USER_INSTR])  # and eax, USER|INSTR
    code += b"\x83\xf8" + bytes([X86_PF_USER_INSTR])  # cmp eax, USER|INSTR
    jne_to_tail()
    code += b"\xf6\x87" + _d32(CS) + b"\x03"  # test byte [rdi+CS], 3: from user mode
    code += b"\x0f\x84"  # jz: not from user mode
    not_ours.append(len(code))
    code += bytes(4)
    code += b"\xf7\x87" + _d32(EFLAGS) + struct.pack("<I", EFLAGS_IF)  # test [rdi+EFLAGS], IF
    jne_to_tail()  # IF set: a user jump to entry_SYSCALL_64, a real fault
    code += b"\x48\x8b\x47" + bytes([RCX])  # mov rax, [rdi+RCX]: the return address
    code += b"\x48\x89\x87" + _d32(RIP)  # mov [rdi+RIP], rax
    code += b"\x48\x8b\x47" + bytes([R11])  # mov rax, [rdi+R11]: the user's RFLAGS
    code += b"\x25" + struct.pack("<I", USER_FLAGS)  # and eax, USER_FLAGS
    code += b"\x0d" + struct.pack("<I", EFLAGS_IF | EFLAGS_FIXED)  # or eax, IF|FIXED
    code += b"\x48\x89\x87" + _d32(EFLAGS)  # mov [rdi+EFLAGS], rax
    code += b"\x48\xc7\x87" + _d32(CS) + _d32(USER_CS)  # mov qword [rdi+CS], __USER_CS
    code += b"\x48\xc7\x87" + _d32(SS) + _d32(USER_SS)  # mov qword [rdi+SS], __USER_DS
    code += b"\x48\x8b\x47" + bytes([RAX])  # mov rax, [rdi+RAX]: the syscall number
    code += b"\x48\x89\x47" + bytes([ORIG_AX])  # mov [rdi+ORIG_AX], rax
    code += b"\x48\xc7\x47" + bytes([RAX]) + _d32(-ENOSYS)  # mov qword [rdi+RAX], -ENOSYS
    code += b"\x89\xc6"  # mov esi, eax: do_syscall_64(regs, nr)
    code += b"\xe9" + _d32(do_syscall - (at + len(code) + 5))  # jmp do_syscall_64
    tail = len(code)
    code += b"\xe9" + _d32(exc_page_fault - (at + len(code) + 5))  # jmp exc_page_fault
    for field in not_ours:
        code[field:field + 4] = _d32(tail - (field + 4))
    return bytes(code)


@dataclass(frozen=True)
class Fixup:
    """What install() changed, in guest-virtual addresses."""

    stub_address: int
    stub_size: int
    call_site: int


class NotApplicable(Exception):
    """The kernel is not shaped as the fix-up expects: leave it alone (the message says why)."""


def install(memory, segments, system_map: Path) -> Fixup:
    """Write the stub and redirect the call, in guest RAM holding a loaded vmlinux whose
    ELF ``segments`` (vaddr, paddr, memsz) are given."""
    symbols = addresses_of(system_map, SYMBOLS)
    missing = [name for name in SYMBOLS if name not in symbols]
    if missing:
        raise NotApplicable(f"no {', '.join(missing)} in its symbols")

    def physical(virtual: int, size: int) -> int:
        for segment in segments:
            if segment.vaddr <= virtual and virtual + size <= segment.vaddr + segment.memsz:
                return segment.paddr + (virtual - segment.vaddr)
        raise NotApplicable(f"{virtual:#x} is in none of its segments")

    # The call in the page-fault entry: e8 rel32 with exc_page_fault as its target.
    entry = symbols["asm_exc_page_fault"]
    code = memory.read(physical(entry, CALL_SEARCH), CALL_SEARCH)
    sites = [entry + i for i in range(len(code) - 4) if code[i] == CALL
             and entry + i + 5 + struct.unpack_from("<i", code, i + 1)[0] == symbols["exc_page_fault"]]
    if len(sites) != 1:
        raise NotApplicable(f"{len(sites)} calls of exc_page_fault in asm_exc_page_fault")
    call_site = sites[0]

    at = (symbols["_etext"] + 15) & ~15
    body = stub(at, symbols["entry_SYSCALL_64"], symbols["do_syscall_64"],
                symbols["exc_page_fault"])
    room = (at | (PAGE - 1)) + 1 - at  # up to the page the kernel keeps
    if len(body) > room:
        raise NotApplicable(f"{room} bytes after _etext, the stub needs {len(body)}")
    padding = memory.read(physical(at, len(body)), len(body))
    if any(byte not in (0x00, 0xCC) for byte in padding):
        raise NotApplicable("the bytes after _etext are not padding")

    memory.write(physical(at, len(body)), body)
    memory.write(physical(call_site + 1, 4), _d32(at - (call_site + 5)))
    return Fixup(at, len(body), call_site)
