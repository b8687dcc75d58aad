"""Exit statistics: what the guest made the VMM do, counted and timed.

``vmm run --stats`` prints this at the end; benchmarks read it. Counts come
from two places: exits Python handled (counted here as they are dispatched)
and exits the C loop completed by itself (its per-rule hit counters, merged in
by the run loop when it stops).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ExitStats:
    by_reason: Counter = field(default_factory=Counter)  # "io" → n
    by_place: Counter = field(default_factory=Counter)  # ("io", "out", 0x3f8) → n
    completed: Counter = field(default_factory=Counter)  # "ldmxcsr" → n: finished by vmm
    exits_in_c: int = 0
    ns_in_guest: int = 0  # wall time inside KVM_RUN, all vCPUs summed
    ns_in_vmm: int = 0  # wall time between KVM_RUNs, all vCPUs summed
    wall_ns: int = 0  # first KVM_RUN → last vCPU stopped
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def count(self, reason: str, place: tuple | None = None, n: int = 1) -> None:
        with self._lock:
            self.by_reason[reason] += n
            if place is not None:
                self.by_place[(reason, *place)] += n

    def complete(self, instruction: str) -> None:
        """An instruction the host's KVM stopped at and vmm finished (PVM's emulator:
        vmm/arch/x86_64/pvm.py); its exit is counted by reason like any other."""
        with self._lock:
            self.completed[instruction] += 1

    def add_times(self, in_guest: int, in_vmm: int, in_c: int = 0) -> None:
        with self._lock:
            self.ns_in_guest += in_guest
            self.ns_in_vmm += in_vmm
            self.exits_in_c += in_c

    def as_dict(self) -> dict:
        return {
            "exits_total": self.total,
            "exits_in_c": self.exits_in_c,
            "by_reason": dict(self.by_reason),
            "by_place": {
                " ".join(_place_text(p)): n for p, n in self.by_place.most_common()
            },
            "completed_by_vmm": dict(self.completed),
            "seconds_in_guest": self.ns_in_guest / 1e9,
            "seconds_in_vmm": self.ns_in_vmm / 1e9,
            "seconds_wall": self.wall_ns / 1e9,
        }

    def report(self, port_names: dict[int, str] | None = None) -> str:
        names = port_names or {}
        wall = self.wall_ns / 1e9
        lines = [f"exits: {self.total} total, {self.exits_in_c} completed in the C loop"]
        for reason, n in self.by_reason.most_common():
            lines.append(f"  {reason:<16}{n:>12}")
        if self.by_place:
            lines.append("by port / address:")
            for place, n in self.by_place.most_common(20):
                label = " ".join(_place_text(place))
                name = names.get(place[-1], "") if len(place) >= 3 else ""
                lines.append(f"  {label:<28}{n:>12}  {name}")
        if self.completed:
            lines.append("instructions completed by vmm: " + ", ".join(
                f"{name} {n}" for name, n in self.completed.most_common()))
        if wall > 0:
            lines.append(f"exits per second: {self.total / wall:,.0f}")
        lines.append(
            f"time: {wall:.3f} s wall; in guest (KVM_RUN) {self.ns_in_guest / 1e9:.3f} s, "
            f"in VMM {self.ns_in_vmm / 1e9:.3f} s"
        )
        if self.total:
            lines.append(f"VMM time per exit: {self.ns_in_vmm / self.total / 1e3:.2f} us")
        return "\n".join(lines)


def _place_text(place: tuple) -> list[str]:
    return [f"{p:#x}" if isinstance(p, int) else str(p) for p in place]
