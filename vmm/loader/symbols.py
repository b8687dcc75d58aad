"""Guest kernel symbols from System.map: address → "function+0xoff".

Used to name the instruction in an emulation failure and, by the profiler, to
name every RIP sample.
"""

from __future__ import annotations

import bisect
from pathlib import Path

TEXT_TYPES = set("tTwW")


class SymbolTable:
    def __init__(self, symbols: list[tuple[int, str]]) -> None:
        symbols.sort()
        self._addresses = [a for a, _ in symbols]
        self._names = [n for _, n in symbols]

    @classmethod
    def from_system_map(cls, path: str | Path) -> "SymbolTable":
        symbols = []
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in TEXT_TYPES:
                    try:
                        symbols.append((int(parts[0], 16), parts[2]))
                    except ValueError:
                        continue
        return cls(symbols)

    def lookup(self, address: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self._addresses, address) - 1
        if i < 0:
            return None
        return self._names[i], address - self._addresses[i]

    def describe(self, address: int) -> str:
        found = self.lookup(address)
        if found is None:
            return f"{address:#x}"
        name, offset = found
        return f"{name}+{offset:#x}"

    def __len__(self) -> int:
        return len(self._names)


def addresses_of(system_map: str | Path, names) -> dict[str, int]:
    """The addresses of ``names`` (any symbol type) in a System.map, by name: one pass,
    stopping when all are found; a name the map lacks is absent from the answer."""
    wanted, found = set(names), {}
    with open(system_map, errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] in wanted and parts[2] not in found:
                try:
                    found[parts[2]] = int(parts[0], 16)
                except ValueError:
                    continue
                if len(found) == len(wanted):
                    break
    return found
