"""Little-endian C structures on the boot path, as named fields over ``struct``.

construct (used for the bzImage setup header and the zero page, where a
validated, self-describing layout is worth it) costs ~25 ms to import here:
a quarter of vmm's start-up before the first KVM_RUN. The structures every
boot writes (PVH start info, MP table) are fixed layouts, so they are declared
with this: the same "name / type" reading order, packed by the struct module.
"""

from __future__ import annotations

import struct


class Packed:
    """A packed little-endian structure: ``Packed(("magic", "I"), ("addr", "Q"), ...)``.

    Formats are the struct module's (``B`` u8, ``H`` u16, ``I`` u32, ``Q`` u64,
    ``4s`` 4 bytes).
    """

    def __init__(self, *fields: tuple[str, str]) -> None:
        self.names = tuple(name for name, _ in fields)
        self._struct = struct.Struct("<" + "".join(fmt for _, fmt in fields))

    def sizeof(self) -> int:
        return self._struct.size

    def build(self, **values) -> bytes:
        """Every field by name; a missing or unexpected name is an error."""
        unknown = set(values) - set(self.names)
        if unknown:
            raise TypeError(f"unknown fields: {', '.join(sorted(unknown))}")
        return self._struct.pack(*(values[name] for name in self.names))

    def parse(self, data: bytes, offset: int = 0) -> dict:
        return dict(zip(self.names, self._struct.unpack_from(data, offset)))
