"""The x86-64 registers as GDB numbers them, read from and written to a vCPU.

GDB learns the layout from the target description we send (``TARGET_XML``,
``qXfer:features:read``): the features GDB requires of an amd64 target
(``org.gnu.gdb.i386.core`` with the x87 registers, ``org.gnu.gdb.i386.sse``),
the segment bases, and the control registers and EFER under a feature of our
own, so ``p/x $cr0`` shows a mode switch. The ``g`` packet is every register
in this order, each little-endian at its size. The layout is the same whatever
mode the CPU is in (as QEMU's): in real mode ``set architecture i8086`` only
changes how GDB disassembles.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str  # GDB's type name in the target description
    feature: str


CORE, SSE, SEGMENTS, SYSTEM = ("org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse",
                               "org.gnu.gdb.i386.segments", "org.vmm.x86.system")

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_NAMES = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")

REGISTERS: tuple[Register, ...] = (
    *(Register(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", CORE) for n in GPRS),
    Register("rip", 64, "code_ptr", CORE),
    Register("eflags", 32, "i386_eflags", CORE),
    *(Register(n, 32, "int32", CORE) for n in SEGMENT_NAMES),
    *(Register(f"st{i}", 80, "i387_ext", CORE) for i in range(8)),
    *(Register(n, 32, "int", CORE) for n in X87_CONTROL),
    *(Register(f"xmm{i}", 128, "vec128", SSE) for i in range(16)),
    Register("mxcsr", 32, "i386_mxcsr", SSE),
    Register("fs_base", 64, "int", SEGMENTS),
    Register("gs_base", 64, "int", SEGMENTS),
    *(Register(n, 64, "int64", SYSTEM) for n in CONTROL),
)
BY_NAME = {r.name: i for i, r in enumerate(REGISTERS)}


def target_xml() -> str:
    """The target description: the features, their registers in ``g`` order."""
    # Types belong to the feature that uses them (GDB scopes them so).
    core_types = """
    <flags id="i386_eflags" size="4">
      <field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
      <field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
      <field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
      <field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
      <field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
      <field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
      <field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
      <field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
      <field name="ID" start="21" end="21"/>
    </flags>"""
    sse_types = """
    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v16i8" type="int8" count="16"/>
    <vector id="v8i16" type="int16" count="8"/>
    <vector id="v4i32" type="int32" count="4"/>
    <vector id="v2i64" type="int64" count="2"/>
    <union id="vec128">
      <field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
      <field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
      <field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
      <field name="uint128" type="uint128"/>
    </union>
    <flags id="i386_mxcsr" size="4">
      <field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
      <field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
      <field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
      <field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
      <field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
      <field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
      <field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
    </flags>"""
    parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
             "<target>", "  <architecture>i386:x86-64</architecture>"]
    feature = None
    for number, register in enumerate(REGISTERS):
        if register.feature != feature:
            if feature is not None:
                parts.append("  </feature>")
            feature = register.feature
            parts.append(f'  <feature name="{feature}">')
            parts.append({CORE: core_types, SSE: sse_types}.get(feature, ""))
        parts.append(f'    <reg name="{register.name}" bitsize="{register.bits}" '
                     f'type="{register.type}" regnum="{number}"/>')
    parts += ["  </feature>", "</target>"]
    return "\n".join(parts) + "\n"


def _tag_word(abridged: int) -> int:
    """The full x87 tag word from KVM's abridged one (1 bit a register: valid or empty)."""
    return sum((0 if abridged >> i & 1 else 3) << (2 * i) for i in range(8))


def read_all(vcpu) -> list[int]:
    """Every register's value, in REGISTERS order."""
    regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
    values = [getattr(regs, n) for n in GPRS]
    values += [regs.rip, regs.rflags & 0xFFFFFFFF]
    values += [getattr(sregs, n).selector for n in SEGMENT_NAMES]
    values += [int.from_bytes(bytes(fpu.fpr[i])[:10], "little") for i in range(8)]
    values += [fpu.fcw, fpu.fsw, _tag_word(fpu.ftwx), 0, fpu.last_ip & 0xFFFFFFFF, 0,
               fpu.last_dp & 0xFFFFFFFF, fpu.last_opcode]
    values += [int.from_bytes(bytes(fpu.xmm[i]), "little") for i in range(16)]
    values += [fpu.mxcsr, sregs.fs.base, sregs.gs.base]
    values += [getattr(sregs, n) for n in CONTROL]
    return values


def encode(values: list[int]) -> bytes:
    """The ``g`` reply: each register little-endian at its size, in hex."""
    return b"".join(
        (value & ((1 << r.bits) - 1)).to_bytes(r.bits // 8, "little").hex().encode()
        for r, value in zip(REGISTERS, values))


def decode(hex_text: bytes) -> list[int]:
    """A ``G`` packet's registers (ValueError if it is not exactly the layout's size)."""
    raw = bytes.fromhex(hex_text.decode("ascii"))
    if len(raw) != sum(r.bits // 8 for r in REGISTERS):
        raise ValueError(f"{len(raw)} bytes of registers, the layout has "
                         f"{sum(r.bits // 8 for r in REGISTERS)}")
    values, offset = [], 0
    for r in REGISTERS:
        values.append(int.from_bytes(raw[offset:offset + r.bits // 8], "little"))
        offset += r.bits // 8
    return values


WRITABLE = frozenset((*GPRS, "rip", "eflags"))


def write(vcpu, changes: dict[str, int]) -> None:
    """Set general registers, rip and eflags (KVM_SET_REGS). Others are refused by the stub:
    a segment or control register written alone would leave the CPU in no consistent mode."""
    regs = vcpu.get_regs()
    for name, value in changes.items():
        if name == "eflags":
            regs.rflags = (regs.rflags & ~0xFFFFFFFF) | (value & 0xFFFFFFFF) | 0x2
        else:
            setattr(regs, name, value & ((1 << 64) - 1))
    vcpu.set_regs(regs)
