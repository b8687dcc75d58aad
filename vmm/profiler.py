"""A guest profiler from the outside: sample vCPU RIPs, name them with System.map.

How it works (see docs/profiling.md):

* a sampler thread wakes every 1/HZ s and sends :data:`vmm.runner.KICK_SIGNAL`
  to each vCPU thread; the signal makes the vCPU's ``KVM_RUN`` return EINTR
  (the handler itself does nothing);
* the runner then calls :meth:`Profiler.tick` in that vCPU thread, with the
  guest stopped: one ``KVM_GET_REGS`` gives RIP and RBP; the guest kernel keeps
  frame pointers, so ``[RBP+8]`` is the return address into the caller and
  ``[RBP]`` the caller's frame: we follow that chain a few frames up, reading
  guest RAM directly (kernel text/data and the direct map translate to
  physical addresses by subtracting a constant; anything else, such as the
  per-cpu IRQ stacks when per-cpu memory is vmalloc'ed, by walking the guest's
  own page tables from CR3, read once per sample with ``KVM_GET_SREGS``);
* at exit, samples are symbolized (:class:`vmm.loader.symbols.SymbolTable`)
  into a top list with shares and callers, and optionally written as folded
  stacks (``root;...;caller;func count``, what flamegraph.pl and speedscope read).

User-mode samples (RIP below the canonical hole) count as ``[user]``; a vCPU
halted in the guest's idle loop shows as the idle function (the signal wakes
the halted vCPU too).

Nothing here needs KVM for the report: :class:`Samples` is plain data, so the
report and folded output are unit-tested with fake samples and symbols.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TextIO

# x86_64 Linux virtual memory layout (4-level paging, no KASLR: our guest kernel
# is built non-relocatable, so these bases are fixed).
USER_TOP = 0x0000_8000_0000_0000  # below: user space
KERNEL_TEXT_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map: maps physical 0
DIRECT_MAP = 0xFFFF_8880_0000_0000  # page_offset_base without KASLR
DIRECT_MAP_END = 0xFFFF_C880_0000_0000  # 64 TiB of direct map
USER_NAME = "[user]"
UNKNOWN_NAME = "[unknown]"
DEFAULT_HZ = 100
DEFAULT_DEPTH = 12  # frames followed above the sampled function


def guest_virt_to_phys(va: int) -> int | None:
    """Kernel text/data and direct-map addresses → guest physical; else None."""
    if va >= KERNEL_TEXT_MAP:
        return va - KERNEL_TEXT_MAP
    if DIRECT_MAP <= va < DIRECT_MAP_END:
        return va - DIRECT_MAP
    return None


from vmm.arch.x86_64.paging import page_walk  # noqa: E402 (shared with the snapshot mailbox)

MAX_STACK_SWITCHES = 2  # IRQ stack → task stack (→ another exception stack)


def walk_frames(read_u64: Callable[[int], int | None], rbp: int, depth: int) -> list[int]:
    """Return addresses from the RBP chain, innermost first (at most ``depth``).

    ``read_u64(va)`` returns the guest quadword at a kernel virtual address, or
    None where it cannot be read. The walk stops at anything implausible: a
    frame outside the kernel, a return address that is not kernel text, a frame
    pointer that does not move up the stack, except for a few jumps to another
    stack (an interrupt handler runs on the per-cpu IRQ stack, and its outermost
    frame links back to the interrupted task's stack).
    """
    chain: list[int] = []
    switches = 0
    while len(chain) < depth and rbp >= USER_TOP and rbp % 8 == 0:
        ret = read_u64(rbp + 8)
        if ret is None or ret < KERNEL_TEXT_MAP:
            break
        chain.append(ret)
        up = read_u64(rbp)
        if up is None or up == rbp:
            break
        if up < rbp or up - rbp > 0x10000:  # not up the same (16 KiB) stack
            if switches == MAX_STACK_SWITCHES:
                break
            switches += 1
        rbp = up
    return chain


def follows_call(code: bytes) -> bool:
    """True when ``code`` (the 8 bytes before an address) ends with a call instruction.

    Recognizes ``call rel32`` (E8 xx xx xx xx) and the indirect ``call`` forms
    (FF /2) with a register, disp8 or disp32/RIP-relative operand: what a
    return address on the stack is preceded by.
    """
    if len(code) < 8:
        return False
    if code[-5] == 0xE8:
        return True
    for length, mod in ((2, 3), (3, 1), (6, 2), (6, 0)):
        op, modrm = code[-length], code[-length + 1]
        if op == 0xFF and (modrm & 0x38) == 0x10 and (modrm >> 6) == mod:
            if mod != 0 or (modrm & 7) == 5:  # mod 0: only the RIP-relative form is 6 bytes
                return True
    return False


def leaf_caller(read_u64: Callable[[int], int | None], read_code: Callable[[int], bytes | None],
                rsp: int, frame_caller: int | None) -> int | None:
    """The caller of a function that has not set up a frame (asm leaves such as
    memset/memcpy/clear_page, or a function at its first instruction): the
    return address at [RSP], when it is one and the RBP chain missed it."""
    ret = read_u64(rsp) if rsp >= USER_TOP else None
    if ret is None or ret < KERNEL_TEXT_MAP or ret == frame_caller:
        return None
    code = read_code(ret - 8)
    return ret if code is not None and follows_call(code) else None


@dataclass
class Samples:
    """Raw samples: (stack, count), the stack innermost first as addresses."""

    counts: Counter = field(default_factory=Counter)  # tuple[int, ...] → count
    user: int = 0
    total: int = 0

    def add(self, stack: tuple[int, ...]) -> None:
        self.total += 1
        if not stack or stack[0] < USER_TOP:
            self.user += 1
            self.counts[(0,)] += 1
        else:
            self.counts[stack] += 1


class Symbolizer:
    """Address → function name, memoized, with [user]/[unknown] for the rest."""

    def __init__(self, symbols) -> None:  # a SymbolTable, or anything with lookup()
        self.symbols = symbols
        self._cache: dict[int, str] = {}

    def name(self, address: int) -> str:
        if address < USER_TOP:
            return USER_NAME
        name = self._cache.get(address)
        if name is None:
            found = self.symbols.lookup(address) if self.symbols is not None else None
            name = found[0] if found else f"{UNKNOWN_NAME}"
            self._cache[address] = name
        return name


@dataclass
class Report:
    total: int
    functions: list[tuple[str, int]]  # (function, samples), hottest first
    callers: dict[str, list[tuple[str, int]]]  # function → [(caller, samples)]
    folded: list[tuple[str, int]]  # ("root;...;func", samples)


def build_report(samples: Samples, symbolizer: Symbolizer) -> Report:
    functions: Counter = Counter()
    callers: dict[str, Counter] = {}
    folded: Counter = Counter()
    for stack, count in samples.counts.items():
        names = [symbolizer.name(a) for a in stack] if stack != (0,) else [USER_NAME]
        func = names[0]
        functions[func] += count
        caller = names[1] if len(names) > 1 else ""
        if caller:
            callers.setdefault(func, Counter())[caller] += count
        folded[";".join(reversed(names))] += count
    return Report(
        total=samples.total,
        functions=functions.most_common(),
        callers={f: c.most_common() for f, c in callers.items()},
        folded=sorted(folded.items(), key=lambda kv: (-kv[1], kv[0])),
    )


def format_report(report: Report, *, top: int = 20, callers: int = 2, hz: float | None = None,
                  elapsed: float | None = None) -> str:
    lines = []
    head = f"vmm: profile: {report.total} samples"
    if hz:
        head += f" at {hz:g} Hz"
    if elapsed:
        head += f" over {elapsed:.1f} s"
    lines.append(head)
    if not report.total:
        return "\n".join(lines)
    lines.append(f"{'share':>7} {'samples':>8}  function  (top callers)")
    for func, count in report.functions[:top]:
        share = 100.0 * count / report.total
        line = f"{share:6.1f}% {count:8d}  {func}"
        who = report.callers.get(func, [])[:callers]
        if who:
            line += "  <- " + ", ".join(f"{c} {100.0 * n / count:.0f}%" for c, n in who)
        lines.append(line)
    rest = report.total - sum(c for _, c in report.functions[:top])
    if rest > 0:
        lines.append(f"{100.0 * rest / report.total:6.1f}% {rest:8d}  (other)")
    return "\n".join(lines)


def write_folded(report: Report, path: str | Path) -> None:
    with open(path, "w") as f:
        for stack, count in report.folded:
            f.write(f"{stack} {count}\n")


class _KernelView:
    """Reads guest kernel memory by virtual address during one sample.

    Kernel text and the direct map translate by a constant; any other kernel
    address (vmalloc: per-cpu IRQ stacks, vmap'ed task stacks) goes through
    the guest's page tables, with CR3 read from the vCPU at the first need.
    """

    def __init__(self, memory, vcpu) -> None:
        self.memory = memory
        self.vcpu = vcpu
        self.cr3: int | None = None

    def _phys(self, va: int) -> int | None:
        pa = guest_virt_to_phys(va)
        if pa is None and va >= USER_TOP:
            if self.cr3 is None:
                self.cr3 = self.vcpu.get_sregs().cr3
            pa = page_walk(self._read_phys_u64, self.cr3, va)
        if pa is None or not self.memory.is_valid(pa, 8):
            return None
        return pa

    def _read_phys_u64(self, pa: int) -> int | None:
        return self.memory.read_u64(pa) if self.memory.is_valid(pa, 8) else None

    def read_u64(self, va: int) -> int | None:
        pa = self._phys(va)
        return None if pa is None else self.memory.read_u64(pa)

    def read_code(self, va: int) -> bytes | None:
        pa = self._phys(va)
        return None if pa is None else self.memory.read(pa, 8)


class Profiler:
    """Samples the vCPUs of a Runner at ``hz`` while it runs.

    Use: ``runner.tick = profiler.tick``, ``profiler.start(lambda:
    runner.vcpu_threads)`` right before ``runner.run()`` (the sampler kicks
    whatever threads exist at each period), ``profiler.stop()`` after it.
    """

    def __init__(self, memory, *, hz: float = DEFAULT_HZ, depth: int = DEFAULT_DEPTH) -> None:
        if not 1 <= hz <= 10000:
            raise ValueError(f"profile rate {hz!r} Hz: must be within 1..10000")
        self.memory = memory
        self.hz = hz
        self.depth = depth
        self.samples = Samples()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_ns = 0
        self.stopped_ns = 0
        self.tick_ns = 0  # time spent in tick(), all vCPUs together

    # --- in the vCPU thread, guest stopped -----------------------------------------
    def tick(self, vcpu) -> None:
        t0 = time.perf_counter_ns()
        regs = vcpu.get_regs()
        rip = regs.rip
        if rip >= USER_TOP:
            view = _KernelView(self.memory, vcpu)  # per sample: vCPU threads sample concurrently
            chain = walk_frames(view.read_u64, regs.rbp, self.depth)
            leaf = leaf_caller(view.read_u64, view.read_code, regs.rsp, chain[0] if chain else None)
            stack = (rip, leaf, *chain) if leaf is not None else (rip, *chain)
        else:
            stack = (rip,)
        with self._lock:
            self.samples.add(stack)
        self.tick_ns += time.perf_counter_ns() - t0


    # --- the sampler thread ------------------------------------------------------------
    def start(self, threads: Callable[[], Iterable[threading.Thread]]) -> None:
        """Kick every thread ``threads()`` returns, every 1/hz s, until stop()."""
        from vmm.runner import KICK_SIGNAL
        import signal

        period = 1.0 / self.hz

        def sample() -> None:
            next_at = time.monotonic()
            while not self._stop.is_set():
                next_at += period
                delay = next_at - time.monotonic()
                if delay < 0:  # fell behind (host busy): do not burst to catch up
                    next_at = time.monotonic()
                    delay = 0
                if self._stop.wait(delay):
                    break
                for thread in list(threads()):
                    if thread.is_alive() and thread.ident is not None:
                        try:
                            signal.pthread_kill(thread.ident, KICK_SIGNAL)
                        except ProcessLookupError:
                            pass

        self.started_ns = time.monotonic_ns()
        self._thread = threading.Thread(target=sample, name="profiler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        self.stopped_ns = time.monotonic_ns()

    def report(self, symbols) -> Report:
        with self._lock:
            return build_report(self.samples, Symbolizer(symbols))

    def summary(self, symbols, *, top: int = 20, out: TextIO, folded: str | Path | None = None) -> None:
        report = self.report(symbols)
        elapsed = (self.stopped_ns - self.started_ns) / 1e9 if self.stopped_ns else None
        print(format_report(report, top=top, hz=self.hz, elapsed=elapsed), file=out)
        if symbols is None:
            print("vmm: profile: no symbols (pass --symbols System.map)", file=out)
        if report.total:
            print(f"vmm: profile: {self.tick_ns / report.total / 1000:.0f} us per sample "
                  "in the vCPU thread", file=out)
        if folded is not None:
            write_folded(report, folded)
            print(f"vmm: profile: folded stacks written to {folded}", file=out)


@dataclass(frozen=True)
class ProfileOptions:
    """What `vmm run --profile[=HZ] --profile-out F --symbols F` asked for."""

    hz: float = DEFAULT_HZ
    out: str | None = None  # folded stacks
    symbols: str | None = None  # System.map for kernels other than ours
    top: int = 20


def parse_hz(text: str | None) -> float:
    """--profile[=HZ]: '' or None → the default rate."""
    if text in (None, "", "default"):
        return DEFAULT_HZ
    try:
        hz = float(text)
    except ValueError:
        raise ValueError(f"--profile={text}: not a rate in Hz") from None
    if not 1 <= hz <= 10000:
        raise ValueError(f"--profile={text}: rate must be within 1..10000 Hz")
    return hz


# --- initcall_debug summary ------------------------------------------------------------

class InitcallWatcher:
    """Collects ``initcall X returned N after U usecs`` lines from the console stream."""

    import re as _re

    PATTERN = _re.compile(rb"initcall (\S+) returned (-?\d+) after (\d+) usecs")

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []  # (name, usecs, ret)
        self._partial = b""

    def __call__(self, data: bytes) -> None:
        buf = self._partial + data
        *lines, self._partial = buf.split(b"\n")
        if len(self._partial) > 4096:
            self._partial = self._partial[-4096:]
        for line in lines:
            m = self.PATTERN.search(line)
            if m:
                name = m.group(1).decode(errors="replace").split("+")[0]
                self.calls.append((name, int(m.group(3)), int(m.group(2))))

    def format(self, top: int = 20) -> str:
        if not self.calls:
            return "vmm: initcalls: none seen (needs initcall_debug and the kernel log)"
        total = sum(u for _, u, _ in self.calls)
        lines = [f"vmm: initcalls: {len(self.calls)} calls, {total / 1e6:.2f} s in all (guest time)"]
        for name, usecs, ret in sorted(self.calls, key=lambda c: -c[1])[:top]:
            share = 100.0 * usecs / total if total else 0.0
            lines.append(f"{usecs / 1e6:9.3f} s {share:5.1f}%  {name}"
                         + (f"  (returned {ret})" if ret else ""))
        return "\n".join(lines)


__all__ = [
    "Profiler", "Samples", "Symbolizer", "Report", "build_report", "format_report",
    "write_folded", "walk_frames", "ProfileOptions", "follows_call", "leaf_caller", "guest_virt_to_phys", "parse_hz", "InitcallWatcher",
]
