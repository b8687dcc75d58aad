"""The few AML terms vmm's DSDT needs, as bytes (ACPI 6.4, chapter 20).

AML is the bytecode of ACPI's namespace: a DSDT is a list of terms that
declare objects (a ``Device`` with its ``_HID`` and ``_CRS``, a ``Method``
the kernel evaluates). Each builder here returns the bytes of one term, so a
table reads as the ASL it encodes::

    device("COM1", name("_HID", eisa_id("PNP0501")), name("_UID", 1),
           name("_CRS", resources(io(0x3F8, 8), irq(4))))

Written here rather than taken from a library: the DSDT needs a dozen terms,
Python has no well-kept AML encoder, and iasl (acpica-tools) disassembles
every table vmm makes in the tests, which is the check that matters.
"""

from __future__ import annotations

ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, QWORD_PREFIX, STRING_PREFIX = 0x0A, 0x0B, 0x0C, 0x0E, 0x0D
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP, METHOD_OP = 0x08, 0x10, 0x11, 0x12, 0x14
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
NOTIFY_OP, IF_OP, LEQUAL_OP, ARG0_OP = 0x86, 0xA0, 0x93, 0x68
ROOT_PREFIX, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x2E, 0x2F


def pkg_length(body_length: int) -> bytes:
    """The PkgLength of a term whose content (after it) is ``body_length`` bytes; the
    encoding counts its own bytes (20.2.4)."""
    for count in range(1, 5):
        total = body_length + count
        if count == 1 and total < 0x40:
            return bytes([total])
        if count > 1 and total < 1 << (4 + 8 * (count - 1)):
            first = (count - 1) << 6 | (total & 0x0F)
            return bytes([first]) + (total >> 4).to_bytes(count - 1, "little")
    raise ValueError(f"an AML package of {body_length} bytes is too long")


def name_string(path: str) -> bytes:
    """``\\_SB_.COM1``, ``PWRB``, ``_S5_``: segments of four characters, padded with '_'."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_PREFIX]), path[1:]
    segments = [s.ljust(4, "_").encode("ascii") for s in path.split(".")] if path else []
    for segment in segments:
        if len(segment) != 4 or not (segment[:1].isupper() or segment[:1] == b"_"):
            raise ValueError(f"{path!r}: not an AML name (1-4 characters, A-Z _ first)")
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


def integer(value: int) -> bytes:
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"{value:#x}: wider than an AML QWord")


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\0"


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0501"): three letters of five bits each and four hex digits, as a DWord."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"{text!r}: not an EISA id (three capitals, four hex digits)")
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | int(text[3:], 16)
    return integer(int.from_bytes(value.to_bytes(4, "big"), "little"))


def _data(value: bytes | int | str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return integer(value)
    return string(value)


def name(path: str, value: bytes | int | str) -> bytes:
    """Name(path, value): an object holding a constant."""
    return bytes([NAME_OP]) + name_string(path) + _data(value)


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, args: int, *terms: bytes, serialized: bool = False) -> bytes:
    body = name_string(path) + bytes([args & 7 | (0x08 if serialized else 0)]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def package(*elements: bytes | int | str) -> bytes:
    body = bytes([len(elements)]) + b"".join(_data(e) for e in elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def notify(path: str, value: int) -> bytes:
    return bytes([NOTIFY_OP]) + name_string(path) + integer(value)


def if_equal(left: bytes, right: bytes, *terms: bytes) -> bytes:
    """If (LEqual (left, right)) { terms }."""
    body = bytes([LEQUAL_OP]) + left + right + b"".join(terms)
    return bytes([IF_OP]) + pkg_length(len(body)) + body


ARG0 = bytes([ARG0_OP])


# --- resource descriptors: what a _CRS buffer holds (6.4) ----------------------------------------
def io(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length): a fixed port range."""
    return (bytes([0x47, 0x01]) + base.to_bytes(2, "little") + base.to_bytes(2, "little")
            + bytes([0x01, length]))


def irq(*numbers: int) -> bytes:
    """IRQNoFlags () {numbers}: ISA interrupts, edge-triggered, active high."""
    mask = sum(1 << n for n in numbers)
    return bytes([0x22]) + mask.to_bytes(2, "little")


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    return (bytes([0x86, 0x09, 0x00, 0x01 if writable else 0x00]) + base.to_bytes(4, "little")
            + length.to_bytes(4, "little"))


def interrupt(*gsis: int, edge: bool = True, active_low: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|Low, Exclusive) {gsis}."""
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0)
    body = bytes([flags, len(gsis)]) + b"".join(g.to_bytes(4, "little") for g in gsis)
    return bytes([0x89]) + len(body).to_bytes(2, "little") + body


def resources(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {descriptors}: a buffer ending with the End Tag (checksum 0:
    "treat as valid")."""
    return buffer(b"".join(descriptors) + bytes([0x79, 0x00]))
