"""Decoding the few x86-64 instructions vmm completes for a guest, and their memory operands.

PVM's instruction emulator stops at some instructions a distribution's kernel
runs (vmm/arch/x86_64/pvm.py); vmm finishes them itself, and for those with a
memory operand it must know the operand's address. This module decodes one
instruction's bytes, in 64-bit mode: legacy and REX prefixes, the opcode,
ModRM, SIB and displacement, and says how to compute the effective address
from the registers (``MemoryOperand.address``). Pure: no KVM, no guest memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
OTHER_PREFIXES = {0x66, 0x67, 0xF0, 0xF2, 0xF3}
# The general registers in encoding order: what ModRM, SIB and REX number.
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
MAX_LENGTH = 15  # the CPU's limit on one instruction


class Operation(StrEnum):
    LDMXCSR = "ldmxcsr"  # 0F AE /2 m32: MXCSR from memory
    STMXCSR = "stmxcsr"  # 0F AE /3 m32: MXCSR to memory


@dataclass(frozen=True)
class MemoryOperand:
    base: str | None  # a register name, "rip", or None
    index: str | None
    scale: int
    displacement: int  # signed
    segment: str | None  # "fs" or "gs" add their base in 64-bit mode; the rest do not
    address_size: int  # 64, or 32 with the 0x67 prefix

    def address(self, registers: dict[str, int], next_rip: int,
                segment_bases: dict[str, int]) -> int:
        """The linear address, given the registers (rip: the *next* instruction's)."""
        total = self.displacement
        if self.base == "rip":
            total += next_rip
        elif self.base is not None:
            total += registers[self.base]
        if self.index is not None:
            total += registers[self.index] * self.scale
        total &= (1 << self.address_size) - 1
        if self.segment in ("fs", "gs"):
            total += segment_bases[self.segment]
        return total & ((1 << 64) - 1)


@dataclass(frozen=True)
class Instruction:
    operation: Operation
    length: int
    operand: MemoryOperand


class DecodeError(ValueError):
    """Bytes that are not one of the instructions vmm completes."""


def decode(code: bytes) -> Instruction:
    """One instruction in 64-bit mode; DecodeError if it is not one vmm completes."""
    position, segment, rex, address_size = 0, None, 0, 64
    while position < len(code) and (code[position] in SEGMENT_PREFIXES
                                    or code[position] in OTHER_PREFIXES):
        byte = code[position]
        if byte in SEGMENT_PREFIXES:
            segment = SEGMENT_PREFIXES[byte]
        elif byte == 0x67:
            address_size = 32
        position += 1
    if position < len(code) and 0x40 <= code[position] <= 0x4F:
        rex = code[position]
        position += 1
    if code[position:position + 2] != b"\x0f\xae" or len(code) < position + 3:
        raise DecodeError(f"not 0F AE: {code[:MAX_LENGTH].hex(' ')}")
    position += 2
    modrm = code[position]
    position += 1
    mod, reg, rm = modrm >> 6, modrm >> 3 & 7, modrm & 7
    operations = {2: Operation.LDMXCSR, 3: Operation.STMXCSR}
    if mod == 3 or reg not in operations:  # a fence, or fxsave/fxrstor/xsave...
        raise DecodeError(f"0F AE with ModRM {modrm:#04x}: not ldmxcsr/stmxcsr m32")
    base: str | None
    index: str | None = None
    scale = 1
    if rm == 4:  # a SIB byte follows
        if len(code) <= position:
            raise DecodeError("cut short in its SIB byte")
        sib = code[position]
        position += 1
        scale, index_number, base_number = 1 << (sib >> 6), sib >> 3 & 7, sib & 7
        index_number |= 8 if rex & 0x02 else 0  # REX.X
        index = None if index_number == 4 else GPRS[index_number]  # rsp cannot be an index
        if base_number == 5 and mod == 0:
            base, displacement_size = None, 4  # disp32, no base
        else:
            base, displacement_size = GPRS[base_number | (8 if rex & 0x01 else 0)], 0
    elif rm == 5 and mod == 0:
        base, displacement_size = "rip", 4  # RIP-relative
    else:
        base, displacement_size = GPRS[rm | (8 if rex & 0x01 else 0)], 0
    displacement_size = {0: displacement_size, 1: 1, 2: 4}[mod]
    if len(code) < position + displacement_size:
        raise DecodeError("cut short in its displacement")
    displacement = int.from_bytes(code[position:position + displacement_size], "little",
                                  signed=True)
    position += displacement_size
    return Instruction(operations[reg], position,
                       MemoryOperand(base, index, scale, displacement, segment, address_size))
