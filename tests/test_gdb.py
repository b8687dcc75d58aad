"""`vmm run --gdb`: Debian's real GDB, in batch mode, against real VMs.

Our longmode firmware (break where long mode begins, step through it, read
its bytes, change a register and see the guest's exit status change) and our
Linux guest (break at start_kernel, a backtrace, a variable, then the command
runs as if nothing happened), plus the clients a stub must survive: one that
sends garbage, a second one while it is attached, one that leaves.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from tests.guest import BOOT_TIMEOUT, read_line
from tests.packages import require

pytestmark = pytest.mark.kvm

RESET_CS_BASE = 0xF0000  # firmware/layout.inc: the firmware's segment F000 starts here


def gdb_binary() -> str:
    return require("gdb")


@contextmanager
def vmm_under_gdb(*args: str):
    """`vmm run --gdb 127.0.0.1:0 ARGS`: (the process, the port it listens on)."""
    process = subprocess.Popen([sys.executable, "-m", "vmm", "run", "--gdb", "127.0.0.1:0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port, seen = None, []
        while port is None:
            line = read_line(process.stderr, 60).decode()
            seen.append(line)
            assert line, f"vmm ended before listening: {''.join(seen)}"
            match = re.search(r"waiting for a debugger on 127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def gdb(port: int, *commands: str, symbols: str | None = None, timeout: float = 60) -> str:
    argv = [gdb_binary(), "-nx", "-batch"]
    if symbols:
        argv += ["-ex", f"file {symbols}"]
    argv += ["-ex", f"target remote 127.0.0.1:{port}"]
    for command in commands:
        argv += ["-ex", command]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return result.stdout + result.stderr


def finish(process, timeout: float = 60) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out.decode(), err.decode()


# --- firmware ------------------------------------------------------------------------------
def firmware_listing() -> tuple[dict[str, int], list[int], bytes]:
    """longmode's symbols (linear addresses), the instruction addresses from start64 on
    (objdump of the ELF kept beside the image), and the image."""
    from vmm.firmware import firmware_path

    image = firmware_path("longmode")
    elf = image.with_suffix(".elf")
    nm = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    symbols = {name: int(value, 16) + RESET_CS_BASE
               for value, kind, name in (line.split() for line in nm.splitlines()) if kind == "t"}
    dump = subprocess.run(["objdump", "-d", "-j", ".text", "-M", "x86-64", "--start-address",
                           hex(symbols["start64"] - RESET_CS_BASE), str(elf)],
                          capture_output=True, text=True, check=True).stdout
    addresses = [int(m.group(1), 16) + RESET_CS_BASE
                 for m in re.finditer(r"^\s+([0-9a-f]+):\t", dump, re.M)]
    return symbols, addresses, image.read_bytes()


def test_break_where_long_mode_begins_step_and_read_the_payload():
    symbols, addresses, image = firmware_listing()
    start64 = symbols["start64"]
    with vmm_under_gdb("--firmware", "longmode") as (process, port):
        out = gdb(port, f"break *{start64:#x}", "continue", "p/x $cr0", "p/x $efer",
                  *["stepi"] * 5, "p/x $pc", f"x/8xb {start64:#x}",
                  "continue")
        status, stdout, _ = finish(process)
    assert f"Breakpoint 1, {start64:#018x}" in out, out
    cr0, efer = (int(v, 16) for v in re.findall(r"^\$[12] = (0x[0-9a-f]+)$", out, re.M))
    assert cr0 & 1 << 31 and cr0 & 1 and efer & 1 << 10  # paging, protection, long mode active
    # the five steps land on the next five instructions of the listing (straight-line code)
    stepped = [int(m, 16) for m in re.findall(r"^(0x[0-9a-f]+) in \?\? \(\)$", out, re.M)]
    assert stepped[-5:] == addresses[1:6], (stepped, addresses[:7])
    offset = start64 - (RESET_CS_BASE + 0x10000 - len(image))
    expected = " ".join(f"0x{b:02x}" for b in image[offset:offset + 8])
    assert expected in re.sub(r"\s+", " ", out), out
    assert "exited normally" in out
    assert (status, stdout) == (0, "real mode\nprotected mode\nlong mode\n")


def test_setting_a_register_changes_what_the_guest_does():
    symbols, addresses, _ = firmware_listing()
    exit64 = symbols["exit64"]  # after `xor %eax,%eax`: the status goes out of %al
    with vmm_under_gdb("--firmware", "longmode") as (process, port):
        out = gdb(port, f"hbreak *{exit64:#x}", "continue", "set $rax = 7", "continue")
        status, stdout, _ = finish(process)
    assert "exited with code 07" in out, out
    assert status == 7 and stdout.endswith("long mode\n")


def test_hostile_clients_never_kill_vmm_nor_release_the_guest():
    """A port check, junk and a second client: the guest stays stopped for the real GDB,
    which then steps from the very first instruction (the reset vector)."""
    with vmm_under_gdb("--firmware", "longmode") as (process, port):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()  # a port check
        first = socket.create_connection(("127.0.0.1", port), timeout=10)
        first.sendall(b"$garbage#00" + b"\xff" * 100 + b"$" + b"M0,1:" * 5000 + b"#00")
        first.sendall(b"$qSupported#37")
        reply = b""
        deadline = time.monotonic() + 20
        while b"qXfer" not in reply and time.monotonic() < deadline:
            reply += first.recv(4096)
        assert reply.startswith(b"-") and b"PacketSize" in reply  # bad ones NACKed, then answered
        second = socket.create_connection(("127.0.0.1", port), timeout=10)
        refused = second.recv(4096)
        assert b"already attached" in refused
        second.close()
        first.close()  # gone without D or k: the guest stays stopped
        time.sleep(0.5)
        assert process.poll() is None  # still waiting, not run to its end
        out = gdb(port, "p/x $pc", "p/x $cs", "stepi", "p/x $pc", "continue")
        status, stdout, stderr = finish(process)
    # The reset vector: CS base 0xffff0000 (selector f000), IP fff0; one step later IP moved.
    pcs = [int(v, 16) for v in re.findall(r"^\$[13] = (0x[0-9a-f]+)$", out, re.M)]
    assert pcs[0] == 0xFFF0 and pcs[1] != 0xFFF0, out
    assert re.search(r"^\$2 = 0xf000$", out, re.M), out
    assert "exited normally" in out
    assert status == 0 and stdout == "real mode\nprotected mode\nlong mode\n", stderr
    assert stderr.count("the guest stays stopped") == 2  # the port check's and the junk's
    assert "refused a second debugger" in stderr and "Traceback" not in stderr


def test_a_debugger_that_leaves_a_running_guest_leaves_it_running():
    from vmm.gdb import packets

    with vmm_under_gdb("--firmware", "longmode") as (process, port):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(packets.frame(b"c"))  # spoke the protocol: the guest goes on
        time.sleep(0.2)
        sock.close()
        status, stdout, stderr = finish(process)
    assert (status, stdout) == (0, "real mode\nprotected mode\nlong mode\n"), stderr


# --- Linux ---------------------------------------------------------------------------------
@pytest.mark.boot
def test_linux_break_at_start_kernel_then_the_command_runs_unchanged():
    from vmm.images.kernel import build_kernel

    kernel = build_kernel(lambda line: None)  # the cached one (.ci/run built it)
    with vmm_under_gdb("--", "sh", "-c", "echo hello from the guest; exit 3") as (process, port):
        out = gdb(port, "break start_kernel", "continue", "bt", "p init_task.comm",
                  "break rest_init", "continue", "p init_task.comm", "continue",
                  symbols=str(kernel.vmlinux), timeout=BOOT_TIMEOUT)
        status, stdout, _ = finish(process, BOOT_TIMEOUT)
    assert "Breakpoint 1, " in out and "start_kernel" in out, out
    assert "x86_64_start_kernel" in out  # bt: the caller (startup_64 -> x86_64_start_kernel)
    # the task_struct's comm, through the kernel's DWARF: "swapper" until sched_init names it
    assert '$1 = "swapper\\000' in out and '$2 = "swapper/0\\000' in out, out
    assert "exited with code 03" in out
    assert (status, stdout) == (3, "hello from the guest\n")


def test_ctrl_c_stops_a_running_guest_and_detach_lets_it_finish():
    """exitbench with 2**32 - 1 exits cannot finish before the 0x03 byte on any host; after
    the detach the guest's counter is set to 1 (its last exit), and it finishes."""
    from vmm.gdb import packets, registers

    def ask(sock, reader, data: bytes) -> bytes:
        sock.sendall(packets.frame(data))
        return next_packet(sock, reader)

    def next_packet(sock, reader) -> bytes:
        pending: list = []
        while True:
            for event in pending:
                if isinstance(event, packets.Packet):
                    return packets.run_length_decode(event.data)
            data = sock.recv(65536)
            assert data, "the stub closed the connection"
            pending += reader.feed(data)

    with vmm_under_gdb("--firmware", "exitbench", "--exits", str(0xFFFFFFFF)) as (process, port):
        sock, reader = socket.create_connection(("127.0.0.1", port)), packets.PacketReader()
        sock.settimeout(30)
        assert ask(sock, reader, b"QStartNoAckMode") == b"OK"
        sock.sendall(packets.frame(b"c"))
        time.sleep(0.2)
        sock.sendall(b"\x03")
        assert next_packet(sock, reader) == b"T02thread:1;"  # SIGINT
        values = registers.decode(ask(sock, reader, b"g"))
        assert 0xF0000 <= values[registers.BY_NAME["cs"]] * 16 + values[registers.BY_NAME["rip"]] < 0x100000
        rcx = registers.BY_NAME["rcx"]  # what is left to do: one more exit, then the end
        assert ask(sock, reader, f"P{rcx:x}={(1).to_bytes(8, 'little').hex()}".encode()) == b"OK"
        assert ask(sock, reader, b"D") == b"OK"
        sock.close()
        status, stdout, stderr = finish(process)
    assert (status, stdout) == (0, "exitbench: done\n"), stderr
    assert "the debugger detached" in stderr
