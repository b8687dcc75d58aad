"""vmm/arch/x86_64/insn.py: the instructions vmm completes for a PVM guest, decoded (no KVM).

Each encoding below is what GNU as makes of the instruction in the comment (checked
when the test was written: ``as --64`` and ``objdump -d``).
"""

from __future__ import annotations

import pytest

from vmm.arch.x86_64 import insn

REGISTERS = {name: 0x1000 * (number + 1) for number, name in enumerate(insn.GPRS)}


@pytest.mark.parametrize("code, operation, length, address", [
    ("0f ae 54 24 04", "ldmxcsr", 5, REGISTERS["rsp"] + 4),  # ldmxcsr 0x4(%rsp): Debian's
    ("0f ae 15 10 00 00 00", "ldmxcsr", 7, 0x7777 + 0x10),  # ldmxcsr 0x10(%rip)
    ("41 0f ae 59 f8", "stmxcsr", 5, REGISTERS["r9"] - 8),  # stmxcsr -0x8(%r9)
    ("0f ae 54 88 10", "ldmxcsr", 5, REGISTERS["rax"] + 4 * REGISTERS["rcx"] + 0x10),
    ("64 0f ae 14 25 00 10 00 00", "ldmxcsr", 9, 0xF0000 + 0x1000),  # %fs:0x1000
    ("41 0f ae 5d 00", "stmxcsr", 5, REGISTERS["r13"]),  # (%r13): mod 01, disp8 0
    ("42 0f ae 14 e0", "ldmxcsr", 5, REGISTERS["rax"] + 8 * REGISTERS["r12"]),
    ("0f ae 93 78 56 34 12", "ldmxcsr", 7, REGISTERS["rbx"] + 0x12345678),
    ("67 0f ae 54 24 04", "ldmxcsr", 6, (REGISTERS["rsp"] + 4) & 0xFFFFFFFF),  # 0x4(%esp)
])
def test_the_memory_operand_of_every_addressing_form(code, operation, length, address):
    instruction = insn.decode(bytes.fromhex(code) + b"\x90" * 8)  # what follows is not read
    assert instruction.operation == operation and instruction.length == length
    # The next instruction at 0x7777: only the RIP-relative form adds it.
    assert instruction.operand.address(REGISTERS, 0x7777, {"fs": 0xF0000, "gs": 0}) == address


@pytest.mark.parametrize("code", [
    "0f ae e8",  # lfence (mod 3)
    "0f ae 00",  # fxsave (%rax): /0
    "0f ae 28",  # xrstor (%rax): /5
    "0f 01 c1",  # vmcall
    "0f ae",  # cut short
    "0f ae 54 24",  # cut short in the displacement
    "",
])
def test_anything_else_is_not_decoded(code):
    with pytest.raises(insn.DecodeError):
        insn.decode(bytes.fromhex(code))
