"""The guest profiler: symbolization, frame walking, report and folded output
with fake symbols and fake samples (no KVM), then one real profiled boot."""

from __future__ import annotations

import re
import struct
from types import SimpleNamespace

import pytest

from vmm.loader.symbols import SymbolTable
from vmm.memory import GuestMemory
from vmm.profiler import (
    DIRECT_MAP, KERNEL_TEXT_MAP, USER_NAME, InitcallWatcher, Profiler, Samples, Symbolizer,
    MAX_STACK_SWITCHES, build_report, follows_call, format_report, guest_virt_to_phys, leaf_caller,
    page_walk, parse_hz, walk_frames, write_folded,
)

K = KERNEL_TEXT_MAP + 0x100_0000  # our kernel's text starts at 16 MiB
SYMBOLS = SymbolTable([
    (K + 0x000, "start_kernel"),
    (K + 0x100, "rest_init"),
    (K + 0x200, "memset_orig"),
    (K + 0x300, "clear_page"),
    (K + 0x400, "do_idle"),
])


def test_guest_virt_to_phys() -> None:
    assert guest_virt_to_phys(KERNEL_TEXT_MAP + 0x1234) == 0x1234
    assert guest_virt_to_phys(DIRECT_MAP + 0x5000) == 0x5000
    assert guest_virt_to_phys(0xFFFF_C900_0000_0000) is None  # vmalloc: not translated
    assert guest_virt_to_phys(0x40_0000) is None  # user


def test_symbolizer_names_kernel_user_and_unknown() -> None:
    sym = Symbolizer(SYMBOLS)
    assert sym.name(K + 0x105) == "rest_init"
    assert sym.name(K + 0x200) == "memset_orig"
    assert sym.name(0x40_1000) == USER_NAME
    assert sym.name(KERNEL_TEXT_MAP) == "[unknown]"  # below the first symbol
    assert Symbolizer(None).name(K) == "[unknown]"


def fake_samples() -> Samples:
    samples = Samples()
    for _ in range(6):  # memset_orig called from rest_init, from start_kernel
        samples.add((K + 0x210, K + 0x120, K + 0x10))
    for _ in range(3):  # memset_orig called straight from start_kernel
        samples.add((K + 0x208, K + 0x20))
    samples.add((K + 0x410,))  # idle, no frames
    for _ in range(2):
        samples.add((0x40_1000,))  # user mode
    return samples


def test_report_shares_callers_and_folded_stacks() -> None:
    report = build_report(fake_samples(), Symbolizer(SYMBOLS))
    assert report.total == 12
    assert report.functions[0] == ("memset_orig", 9)
    assert dict(report.functions) == {"memset_orig": 9, USER_NAME: 2, "do_idle": 1}
    assert report.callers["memset_orig"] == [("rest_init", 6), ("start_kernel", 3)]
    assert report.folded == [
        ("start_kernel;rest_init;memset_orig", 6),
        ("start_kernel;memset_orig", 3),
        (USER_NAME, 2),
        ("do_idle", 1),
    ]
    text = format_report(report, top=2, hz=100, elapsed=0.12)
    assert "12 samples at 100 Hz over 0.1 s" in text
    assert re.search(r"75\.0%\s+9\s+memset_orig\s+<- rest_init 67%, start_kernel 33%", text)
    assert re.search(r"16\.7%\s+2\s+\[user\]", text)
    assert re.search(r"8\.3%\s+1\s+\(other\)", text)  # do_idle is past the top 2


def test_folded_file_is_flamegraph_input(tmp_path) -> None:
    path = tmp_path / "out.folded"
    write_folded(build_report(fake_samples(), Symbolizer(SYMBOLS)), path)
    lines = path.read_text().splitlines()
    assert lines[0] == "start_kernel;rest_init;memset_orig 6"
    for line in lines:  # "frame;frame;... count", no spaces inside frames
        stack, count = line.rsplit(" ", 1)
        assert int(count) > 0 and " " not in stack


def test_empty_report() -> None:
    report = build_report(Samples(), Symbolizer(SYMBOLS))
    assert report.total == 0 and report.folded == []
    assert "0 samples" in format_report(report)


def stack_reader(words: dict[int, int]):
    return lambda va: words.get(va)


def test_walk_frames_follows_rbp_chain_and_stops_on_nonsense() -> None:
    s = DIRECT_MAP + 0x10_0000
    words = {
        s + 8: K + 0x120, s: s + 0x40,  # frame 1: return into rest_init, next frame up
        s + 0x48: K + 0x20, s + 0x40: s + 0x40,  # frame 2: next rbp is itself: stop after it
    }
    assert walk_frames(stack_reader(words), s, depth=8) == [K + 0x120, K + 0x20]
    assert walk_frames(stack_reader(words), s, depth=1) == [K + 0x120]
    assert walk_frames(stack_reader({s + 8: 0x40_1000}), s, 8) == []  # user return: stop
    assert walk_frames(stack_reader(words), 0x7FFF_0000, 8) == []  # user rbp: no walk
    assert walk_frames(stack_reader({}), s, 8) == []  # unreadable


def test_walk_frames_crosses_a_few_stack_switches_only() -> None:
    """An IRQ handler's outermost frame links to the interrupted task's stack (lower or
    higher, anywhere): followed; a chain that keeps jumping is garbage: cut."""
    irq, task = 0xFFFF_C900_0000_8000, DIRECT_MAP + 0x10_0000
    words = {irq + 8: K + 0x320, irq: task,  # __sysvec... on the IRQ stack → task stack
             task + 8: K + 0x120, task: task + 0x40,
             task + 0x48: K + 0x20, task + 0x40: 0}
    assert walk_frames(stack_reader(words), irq, 8) == [K + 0x320, K + 0x120, K + 0x20]
    frames = [DIRECT_MAP + 0x10_0000 - 0x1000 * i for i in range(MAX_STACK_SWITCHES + 3)]
    jumping = {}
    for here, down in zip(frames, frames[1:]):  # every frame pointer goes down a page
        jumping[here + 8], jumping[here] = K + 0x120, down
    assert len(walk_frames(stack_reader(jumping), frames[0], 12)) == MAX_STACK_SWITCHES + 1


def test_page_walk_4k_2m_1g_and_not_present() -> None:
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    memory = {}
    def entry(table, index, value):
        memory[table + index * 8] = value
    va = 0xFFFF_C900_1234_5678  # PML4 402, PDPT 0, PD 0x91, PT 0x145
    entry(pml4, 402, pdpt | 0x63)
    entry(pdpt, 0, pd | 0x63)
    entry(pd, 0x91, pt | 0x63)
    entry(pt, 0x145, 0x8000_0000_0ABC_D063)  # NX set: not part of the address
    read = memory.get
    assert page_walk(read, pml4 | 0x18, va) == 0xABCD678  # CR3's low flag bits ignored
    entry(pd, 0x91, 0x0060_0000 | 0xE3)  # a 2 MiB page
    assert page_walk(read, pml4, va) == 0x0060_0000 | (va & 0x1F_FFFF)
    entry(pdpt, 0, 0x4000_0000 | 0xE3)  # a 1 GiB page
    assert page_walk(read, pml4, va) == 0x4000_0000 | (va & 0x3FFF_FFFF)
    entry(pdpt, 0, pd | 0x62)  # not present
    assert page_walk(read, pml4, va) is None
    assert page_walk(read, pml4, 0xFFFF_C980_0000_0000) is None  # empty PML4 slot
    assert page_walk(lambda pa: None, pml4, va) is None  # tables outside RAM


def test_follows_call_recognizes_call_forms() -> None:
    pad = b"\x90" * 8
    assert follows_call((pad + b"\xe8\x01\x02\x03\x04")[-8:])  # call rel32
    assert follows_call((pad + b"\xff\xd0")[-8:])  # call *%rax
    assert follows_call((pad + b"\x41\xff\xd3")[-8:])  # call *%r11
    assert follows_call((pad + b"\xff\x50\x08")[-8:])  # call *0x8(%rax)
    assert follows_call((pad + b"\xff\x15\x00\x10\x00\x00")[-8:])  # call *rip-rel
    assert not follows_call(pad)
    assert not follows_call((pad + b"\xff\xe0")[-8:])  # jmp *%rax is not a call
    assert not follows_call(b"\xe8")  # too short


def test_leaf_caller_from_return_address_at_rsp() -> None:
    rsp = DIRECT_MAP + 0x2000
    ret = K + 0x130
    code = {ret - 8: b"\x90\x90\x90\xe8\x00\x00\x00\x00"}
    read_code = code.get
    assert leaf_caller(stack_reader({rsp: ret}), read_code, rsp, K + 0x20) == ret
    assert leaf_caller(stack_reader({rsp: ret}), read_code, rsp, ret) is None  # chain has it
    assert leaf_caller(stack_reader({rsp: K + 0x140}), read_code, rsp, None) is None  # no call
    assert leaf_caller(stack_reader({rsp: rsp + 8}), read_code, rsp, None) is None  # a saved rbp


def test_profiler_tick_reads_regs_and_guest_stack() -> None:
    memory = GuestMemory([(0, 4 << 20)])
    try:
        frame = 0x20_0000  # guest physical; the guest sees it at DIRECT_MAP + frame
        memory.write(frame, struct.pack("<QQ", DIRECT_MAP + frame + 0x40, K + 0x120))
        memory.write(frame + 0x40, struct.pack("<QQ", 0, K + 0x20))
        profiler = Profiler(memory, hz=100)
        kernel = SimpleNamespace(rip=K + 0x210, rbp=DIRECT_MAP + frame, rsp=DIRECT_MAP + frame - 0x20)
        user = SimpleNamespace(rip=0x40_1000, rbp=0, rsp=0x7FFF_F000)
        for regs in (kernel, kernel, user):
            profiler.tick(SimpleNamespace(get_regs=lambda regs=regs: regs))
        report = profiler.report(SYMBOLS)
        assert report.total == 3
        assert report.folded == [("start_kernel;rest_init;memset_orig", 2), (USER_NAME, 1)]
    finally:
        memory.close()


def test_profiler_tick_walks_page_tables_for_a_vmalloc_irq_stack() -> None:
    """Per-cpu IRQ stacks are vmalloc'ed with percpu_alloc=page: the frames there are
    read through the guest's page tables (CR3 from KVM_GET_SREGS, once per sample)."""
    memory = GuestMemory([(0, 4 << 20)])
    try:
        pml4, pdpt, pd, pt, irq_page = 0x1000, 0x2000, 0x3000, 0x4000, 0x30_0000
        irq = 0xFFFF_C900_0000_0000  # PML4 402, PDPT 0, PD 0, PT 0
        for table, value in ((pml4 + 402 * 8, pdpt), (pdpt, pd), (pd, pt), (pt, irq_page)):
            memory.write(table, struct.pack("<Q", value | 0x63))
        task = 0x20_0000
        memory.write(irq_page + 0x100, struct.pack("<QQ", DIRECT_MAP + task, K + 0x120))
        memory.write(task, struct.pack("<QQ", 0, K + 0x20))
        sregs_reads = []
        vcpu = SimpleNamespace(
            get_regs=lambda: SimpleNamespace(rip=K + 0x330, rbp=irq + 0x100, rsp=irq + 0xF0),
            get_sregs=lambda: sregs_reads.append(1) or SimpleNamespace(cr3=pml4))
        profiler = Profiler(memory, hz=100)
        profiler.tick(vcpu)
        assert profiler.report(SYMBOLS).folded == [("start_kernel;rest_init;clear_page", 1)]
        assert sregs_reads == [1]
    finally:
        memory.close()


def test_parse_hz() -> None:
    assert parse_hz(None) == 100 and parse_hz("") == 100
    assert parse_hz("250") == 250
    for bad in ("0", "fast", "100000"):
        with pytest.raises(ValueError):
            parse_hz(bad)


def test_initcall_watcher_across_chunks() -> None:
    watch = InitcallWatcher()
    log = (b"[    1.000000] calling  pty_init+0x0/0x40 @ 1\r\n"
           b"[    1.500000] initcall pty_init+0x0/0x40 returned 0 after 500000 usecs\r\n"
           b"[    1.600000] initcall inet_init+0x0/0x2a0 returned 0 after 1100000 usecs\r\n"
           b"[    1.700000] initcall bad_init+0x0/0x10 returned -19 after 7 usecs\r\n")
    for i in range(0, len(log), 17):  # the console delivers arbitrary pieces
        watch(log[i:i + 17])
    assert watch.calls == [("pty_init", 500000, 0), ("inet_init", 1100000, 0), ("bad_init", 7, -19)]
    text = watch.format(top=2)
    lines = text.splitlines()
    assert "3 calls, 1.60 s" in lines[0]
    assert "inet_init" in lines[1] and "pty_init" in lines[2] and len(lines) == 3
    assert "none seen" in InitcallWatcher().format()


def test_cli_refuses_profile_for_firmware() -> None:
    from click.testing import CliRunner

    from vmm.cli import main

    result = CliRunner().invoke(main, ["run", "--firmware", "hello", "--profile"])
    assert result.exit_code == 125
    assert "only for Linux guests" in result.output
    result = CliRunner().invoke(main, ["run", "--profile=fast", "--", "true"])
    assert result.exit_code == 125 and "not a rate" in result.output


@pytest.mark.boot
@pytest.mark.kvm
def test_profiled_boot_writes_folded_stacks_of_real_functions(tmp_path) -> None:
    import subprocess
    import sys

    from tests.guest import BOOT_TIMEOUT, guest_kernel

    out = tmp_path / "boot.folded"
    result = subprocess.run(
        [sys.executable, "-m", "vmm", "run", "--profile", "--profile-out", str(out), "--", "true"],
        capture_output=True, timeout=BOOT_TIMEOUT,
    )
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert re.search(r"vmm: profile: \d+ samples at 100 Hz", err), err
    top = [l for l in err.splitlines() if re.match(r"\s*\d+\.\d%\s+\d+\s+\S", l)]
    assert len(top) >= 5, err
    known = {line.split()[2] for line in guest_kernel().system_map.read_text().splitlines()
             if len(line.split()) >= 3}
    lines = out.read_text().splitlines()
    assert lines
    kernel_frames = 0
    for line in lines:
        stack, count = line.rsplit(" ", 1)
        assert int(count) > 0
        for frame in stack.split(";"):
            assert frame in known or frame in ("[user]", "[unknown]"), frame
            kernel_frames += frame in known
    assert kernel_frames > 0


def test_pvm_clearcpuid_fits_the_kernels_buffer() -> None:
    """cpu_parse_early_param() reads clearcpuid= into char arg[128]: longer is cut silently."""
    from vmm.arch.x86_64.pvm import PVM_CMDLINE

    (option,) = [o for o in PVM_CMDLINE if o.startswith("clearcpuid=")]
    assert len(option.removeprefix("clearcpuid=")) <= 127
    assert "erms" in option.split("=")[1].split(",")  # the diet: no byte-wise rep movsb/stosb
