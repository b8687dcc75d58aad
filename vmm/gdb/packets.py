"""GDB's remote serial protocol, the framing only: bytes in, packets out, and back.

A packet is ``$`` data ``#`` and two hex digits, the sum of the data bytes
modulo 256 (GDB manual, "Overview" of the remote protocol). The receiver
answers ``+`` (good) or ``-`` (send it again). Inside data, ``#``, ``$``,
``}`` and ``*`` are escaped as ``}`` and the byte XOR 0x20; a stub may
compress a reply with run-length encoding, ``X*N``: X repeated N - 29 more
times. Outside a packet, a lone 0x03 byte is Ctrl-C: stop the target.

Everything a client sends is hostile: a bad checksum is answered ``-``, junk
between packets is skipped, and a packet longer than MAX_PACKET is dropped
whole (with ``-``) instead of growing without bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

MAX_PACKET = 16 * 1024  # what qSupported offers (PacketSize); GDB's 'M'/'X' stay under it
INTERRUPT = 0x03
ESCAPED = frozenset(b"#$}*")


class Event(Enum):
    ACK = "+"
    NACK = "-"
    INTERRUPT = "^C"
    BAD_PACKET = "bad"  # checksum wrong, or too long: answer "-"


@dataclass(frozen=True)
class Packet:
    data: bytes  # unescaped


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in ESCAPED:
            out += bytes((0x7D, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo escapes. GDB never run-length encodes what it sends, and escapes a
    literal ``*`` in binary data, so ``*`` here is just a byte."""
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i] == 0x7D and i + 1 < len(data):  # '}'
            out.append(data[i + 1] ^ 0x20)
            i += 2
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def run_length_encode(text: bytes) -> bytes:
    """Compress a reply (hex digits: registers are mostly zeros) as GDB reads it.

    A run of 4 or more is the byte, ``*`` and chr(29 + repeats); repeat counts
    whose character would be ``#`` or ``$`` (6, 7) are cut to 5, and a count
    never exceeds 97 (``~``).
    """
    out = bytearray()
    i = 0
    while i < len(text):
        byte = text[i]
        run = 1
        while i + run < len(text) and text[i + run] == byte and run < 98:
            run += 1
        repeats = run - 1
        if repeats in (6, 7):
            repeats = 5
        if repeats >= 3 and byte not in ESCAPED:
            out += bytes((byte, 0x2A, 29 + repeats))
            i += repeats + 1
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def run_length_decode(data: bytes) -> bytes:
    """What GDB makes of a run-length encoded reply (for tests and clients)."""
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i] == 0x2A and out and i + 1 < len(data):
            out += bytes((out[-1],)) * (data[i + 1] - 29)
            i += 2
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def frame(data: bytes, *, compress: bool = False) -> bytes:
    """One packet on the wire: $, the escaped data (run-length encoded if asked), #, checksum."""
    body = escape(data)
    if compress and body == data:  # a run must not begin on an escaped byte: plain text only
        body = run_length_encode(body)
    return b"$" + body + b"#" + f"{checksum(body):02x}".encode()


class PacketReader:
    """Feed it the bytes a client sends; it gives back packets and single-byte events."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._body: bytearray | None = None  # inside $...# (None: between packets)
        self._sum: bytearray | None = None  # the checksum digits after '#'
        self._too_long = False

    def feed(self, data: bytes) -> list[Packet | Event]:
        events: list[Packet | Event] = []
        for byte in data:
            if self._sum is not None:
                self._sum.append(byte)
                if len(self._sum) == 2:
                    events.append(self._finish(self._body or bytearray(), self._sum))
            elif self._body is not None:
                if byte == 0x23:  # '#'
                    self._sum = bytearray()
                elif byte == 0x24:  # '$' again: the last one was cut short; start over
                    self._body, self._too_long = bytearray(), False
                elif len(self._body) >= self.max_packet:
                    self._too_long = True
                else:
                    self._body.append(byte)
            elif byte == 0x24:  # '$'
                self._body, self._too_long = bytearray(), False
            elif byte == 0x2B:  # '+'
                events.append(Event.ACK)
            elif byte == 0x2D:  # '-'
                events.append(Event.NACK)
            elif byte == INTERRUPT:
                events.append(Event.INTERRUPT)
            # anything else between packets is line noise: skipped
        return events

    def _finish(self, body_bytes: bytearray, digits_bytes: bytearray) -> Packet | Event:
        body, digits, too_long = bytes(body_bytes), bytes(digits_bytes), self._too_long
        self._body = self._sum = None
        self._too_long = False
        try:
            given = int(digits, 16)
        except ValueError:
            return Event.BAD_PACKET
        if too_long or given != checksum(body):
            return Event.BAD_PACKET
        return Packet(unescape(body))
