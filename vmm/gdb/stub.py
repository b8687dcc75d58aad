"""A GDB remote stub on KVM's guest-debug interface: `vmm run --gdb [HOST:]PORT`.

How a stop works. The stub never stops a vCPU by itself: it asks the runner
to *pause* (vmm/runner.py, the same mechanism a snapshot uses), and while
every vCPU is parked outside KVM_RUN the main thread runs :meth:`GdbStub.session`,
which talks to GDB until GDB resumes the guest (``c``, ``s``, ``vCont``),
detaches (``D``: the guest runs on) or kills it (``k``: the VM ends). Only
those move a stopped guest: a connection that closes without them (a port
check, a scanner, a client that sends junk and leaves, a GDB that crashed)
leaves it stopped, and the stub waits for the next debugger, as QEMU's ``-S``
does. Four things pause the guest:

* the start: the VM is created stopped (every vCPU's first KVM_RUN returns at
  once) and the first session waits for GDB to connect;
* a debugger connecting while the guest runs (it stops for it, as at the start);
* Ctrl-C: a 0x03 byte from GDB while the guest runs (the socket's reader
  thread asks for the pause);
* KVM_EXIT_DEBUG from a vCPU: a single step done, a breakpoint or watchpoint
  hit (the dispatcher hands it to :meth:`GdbStub.on_debug`).

Resuming sets each vCPU's guest debug state (``KVM_SET_GUEST_DEBUG``):
single-step for the stepping vCPU, and the breakpoints for all. Software
breakpoints (``Z0``) are ``int3`` bytes written into guest memory (hidden
from GDB's memory reads); where KVM cannot take an ``int3`` in guest kernel
code (PVM's instruction emulator), ``Z0`` uses a debug register, as ``Z1``
does. Watchpoints (``Z2`` write, ``Z4`` access) use the other debug
registers: four in all; on PVM they are reported unsupported (the emulator
does not check data breakpoints), and GDB can fall back to its own
single-stepping watchpoints. Every resume resumes every vCPU (all-stop mode).

Addresses are guest *virtual*: translated through the stopped vCPU's page
tables (4-level, 4K/2M/1G pages, vmm/arch/x86_64/paging.py), or taken as
physical while paging is off.

One client at a time: a second connection is told so and closed. A client
that goes away while the guest runs leaves it running, its breakpoints removed.
"""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from vmm.gdb import packets, registers
from vmm.gdb.packets import Event, Packet

SIGINT, SIGTRAP = 2, 5
DR6_SINGLE_STEP = 1 << 14
DR7_LENGTH = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
DR7_KIND = {"exec": 0b00, "write": 0b01, "access": 0b11}
EFER_LMA = 1 << 10
CR0_PG = 1 << 31
INT3 = 0xCC
DISCONNECTED = "disconnected"


@dataclass
class SoftwareBreakpoint:
    address: int  # guest virtual
    physical: int
    original: int


@dataclass(frozen=True)
class HardwareSlot:
    kind: str  # exec, write, access
    address: int
    length: int


@dataclass
class Stop:
    """Why the guest is stopped, as GDB's stop reply says it."""

    signal: int
    vcpu: int  # index
    detail: str = ""  # "swbreak:;", "hwbreak:;", "watch:ADDR;", ...
    gone: object = None  # the client whose connection closed while the guest ran

    def reply(self) -> bytes:
        return f"T{self.signal:02x}thread:{self.vcpu + 1:x};{self.detail}".encode()


class GdbStub:
    def __init__(self, address: tuple[str, int], machine, runner, *, log: TextIO | None = None,
                 software_breakpoints: bool = True, watchpoints: bool = True,
                 user_steps: bool = True) -> None:
        self.machine, self.runner = machine, runner
        self.log = log or sys.stderr
        # Both False on PVM: KVM's instruction emulator, which runs guest kernel code there,
        # fails on an int3 and does not check data breakpoints (measured: docs/gdb.md).
        self.int3 = software_breakpoints
        self.watchpoints = watchpoints
        # False on PVM: a single-step in guest user code (which runs natively) raises #DB in
        # the guest, whose kernel sends the process SIGTRAP: refused rather than done.
        self.user_steps = user_steps
        # A step must not take the vCPU into an interrupt handler (the next stop would be
        # there, and the trap flag would leak into the interrupt's saved RFLAGS):
        # KVM_GUESTDBG_BLOCKIRQ, where this KVM has it (KVM_CAP_SET_GUEST_DEBUG2's bits).
        self.block_irq = 0
        kvm = getattr(machine, "kvm", None)
        if kvm is not None:
            from vmm.kvm.ioctl import lib

            if kvm.check_extension(lib.KVM_CAP_SET_GUEST_DEBUG2) & lib.KVM_GUESTDBG_BLOCKIRQ:
                self.block_irq = lib.KVM_GUESTDBG_BLOCKIRQ
        self.listener = socket.create_server(address, backlog=2)
        self.address = self.listener.getsockname()[:2]
        self.client: socket.socket | None = None
        self.events: queue.Queue = queue.Queue()
        self.no_ack = False
        self.last_frame = b""
        self.software: dict[int, SoftwareBreakpoint] = {}
        self.hardware: list[HardwareSlot] = []
        self.selected = 0  # vCPU index for g/p/m (Hg)
        self.stop: Stop | None = Stop(SIGTRAP, 0)  # created stopped
        self.owes_stop_reply = False  # the client resumed the guest: it waits for a T packet
        self.detached: socket.socket | None = None  # the client let go by D or k
        self._pending = False  # a session is queued or running
        self._lock = threading.Lock()
        self._accept_thread = threading.Thread(target=self._accept, daemon=True,
                                               name="gdb-accept")

    # --- wiring -------------------------------------------------------------------------
    def install(self) -> None:
        """Before runner.run(): start stopped, take the debug exits, accept debuggers."""
        self.runner.on_debug = self.on_debug
        for vcpu in self.machine.vcpus:
            vcpu.request_immediate_exit()  # the first KVM_RUN returns before any instruction
        self._pending = True
        self.runner.pause(self.session)
        self._accept_thread.start()
        print(f"vmm: gdb: waiting for a debugger on {self.address[0]}:{self.address[1]} "
              "(target remote ...); the guest is stopped before its first instruction",
              file=self.log, flush=True)

    def close(self, outcome=None) -> None:
        """The VM is over: GDB hears how it ended (``W`` and the exit status), then the end."""
        if self.client is not None and outcome is not None:
            self._send(f"W{outcome.status & 0xFF:02x}".encode())
        for sock in (self.client, self.listener):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    def on_debug(self, vcpu, exit) -> bool:
        """A vCPU's KVM_EXIT_DEBUG (its thread): pause everything, tell GDB why."""
        index = self.machine.vcpus.index(vcpu)
        if exit.exception == 3:
            stop = Stop(SIGTRAP, index, "swbreak:;")
        elif exit.dr6 & 0xF:
            slot = self.hardware[(exit.dr6 & 0xF).bit_length() - 1] \
                if (exit.dr6 & 0xF).bit_length() - 1 < len(self.hardware) else None
            if slot is None or slot.kind == "exec":
                stop = Stop(SIGTRAP, index, "hwbreak:;")
            else:
                word = "watch" if slot.kind == "write" else "awatch"
                stop = Stop(SIGTRAP, index, f"{word}:{slot.address:x};")
        else:
            stop = Stop(SIGTRAP, index)  # a single step
        self._request_stop(stop)
        return False  # the vCPU parks at its next KVM_RUN (the pause set immediate_exit)

    def _request_stop(self, stop: Stop) -> None:
        with self._lock:
            if self._pending:
                return  # one stop at a time (all-stop): the session reports the first
            self._pending = True
            self.stop = stop
        self.runner.pause(self.session)

    # --- the connection --------------------------------------------------------------------
    def _adopt(self, client: socket.socket, peer) -> None:
        client.settimeout(None)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client, self.no_ack, self.owes_stop_reply = client, False, False
        print(f"vmm: gdb: debugger connected from {peer[0]}:{peer[1]}", file=self.log, flush=True)
        threading.Thread(target=self._read_client, args=(client,), daemon=True,
                         name="gdb-reader").start()

    def _accept(self) -> None:
        """Every connection: with no debugger attached it becomes the debugger (a running
        guest stops for it, as at the start); with one attached it is told so and closed."""
        while True:
            try:
                other, peer = self.listener.accept()
            except OSError:
                return
            self._wait_if_leaving(self.client)
            with self._lock:
                free = self.client is None
                if free:
                    self._adopt(other, peer)
            if free:
                self._request_stop(Stop(SIGINT, self.selected))
                continue
            try:
                other.sendall(packets.frame(b"E.a debugger is already attached to this vmm"))
            except OSError:
                pass
            other.close()
            print(f"vmm: gdb: refused a second debugger from {peer[0]}:{peer[1]}", file=self.log,
                  flush=True)

    def _wait_if_leaving(self, current: socket.socket | None, timeout: float = 5) -> None:
        """A debugger whose connection has closed but whose reader has not yet seen it (a port
        check, then GDB): wait for the reader to free its place instead of refusing GDB."""
        if current is None:
            return
        try:
            if current.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return  # attached: it has sent something not yet read
        except BlockingIOError:
            return  # attached and quiet
        except OSError:
            pass  # closed: its reader is on its way out
        deadline = time.monotonic() + timeout
        while self.client is current and time.monotonic() < deadline:
            time.sleep(0.01)

    def _read_client(self, client: socket.socket) -> None:
        reader = packets.PacketReader()
        while True:
            try:
                data = client.recv(4096)
            except OSError:
                data = b""
            if not data:
                if client is self.detached:
                    return  # D or k: dealt with already
                # Queued before the slot is freed: nothing of the next debugger's comes first.
                self.events.put((client, DISCONNECTED))
                with self._lock:
                    if self.client is client:
                        self.client = None
                client.close()
                # If the guest runs, stop it a moment to take the breakpoints out of it.
                self._request_stop(Stop(SIGINT, self.selected, gone=client))
                return
            for event in reader.feed(data):
                if event is Event.INTERRUPT:
                    self._request_stop(Stop(SIGINT, self.selected))
                self.events.put((client, event))

    def _send(self, data: bytes, *, compress: bool = False) -> None:
        frame = packets.frame(data, compress=compress)
        self.last_frame = frame
        if self.client is not None:
            try:
                self.client.sendall(frame)
            except OSError:
                pass  # the reader thread sees the connection go

    def _drop_client(self, why: str) -> None:
        """D or k: the debugger is let go (its reader then ends quietly)."""
        print(f"vmm: gdb: {why}", file=self.log, flush=True)
        self.detached = self.client
        if self.client is not None:
            try:
                self.client.close()
            except OSError:
                pass
        self.client = None
        self.remove_all_breakpoints()

    # --- a stop ------------------------------------------------------------------------------
    def session(self) -> None:
        """Main thread, every vCPU parked: serve GDB until it resumes, detaches or kills."""
        try:
            if self.stop is not None:
                self.selected = self.stop.vcpu  # g, m... now read the vCPU that stopped
                if self.client is not None and self.owes_stop_reply:
                    self._send(self.stop.reply())  # GDB waits for it after c/s
                    self.owes_stop_reply = False
            self._serve()
        finally:
            with self._lock:
                self._pending = False

    def _serve(self) -> None:
        while not self.runner.stopping:
            try:
                client, event = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if event == DISCONNECTED:  # without D or k: the guest stays as it was
                self.remove_all_breakpoints()
                if self.stop is not None and self.stop.gone is client and self.client is None:
                    print("vmm: gdb: the debugger disconnected; the guest runs on",
                          file=self.log, flush=True)
                    self.stop = None
                    return  # it ran when its debugger left
                print("vmm: gdb: the debugger disconnected; the guest stays stopped, waiting "
                      "for the next one", file=self.log, flush=True)
                if self.stop is not None and self.stop.gone is not None:
                    self.stop = Stop(SIGINT, self.selected)  # what the next debugger hears
                continue  # the accept thread adopts the next debugger
            if client is not self.client:
                continue  # an earlier connection's, answered to no one
            if event is Event.BAD_PACKET:
                self._reply_raw(b"-")
                continue
            if event is Event.NACK:
                self._reply_raw(self.last_frame)
                continue
            if not isinstance(event, Packet):
                continue  # acks, a Ctrl-C while already stopped
            if not self.no_ack:
                self._reply_raw(b"+")
            if self.handle(event.data):
                return

    def _reply_raw(self, data: bytes) -> None:
        if self.client is not None and data:
            try:
                self.client.sendall(data)
            except OSError:
                pass

    # --- the packets -------------------------------------------------------------------------
    def handle(self, data: bytes) -> bool:
        """Answer one packet; True when the guest goes on (resumed, detached or killed)."""
        try:
            command = data.decode("latin-1")
        except UnicodeDecodeError:
            self._send(b"")
            return False
        try:
            return self._dispatch(command, data)
        except (ValueError, IndexError, KeyError):
            self._send(b"E01")  # a malformed packet: an error, never a traceback
            return False

    def _dispatch(self, command: str, data: bytes) -> bool:
        head = command[:1]
        if command.startswith("qSupported"):
            self._send(f"PacketSize={packets.MAX_PACKET:x};qXfer:features:read+;swbreak+;hwbreak+;"
                       "QStartNoAckMode+;vContSupported+".encode())
        elif command == "QStartNoAckMode":
            self._send(b"OK")
            self.no_ack = True
        elif command.startswith("qXfer:features:read:target.xml:"):
            offset, length = (int(x, 16) for x in command.rsplit(":", 1)[1].split(","))
            xml = registers.target_xml().encode()
            chunk = xml[offset:offset + length]
            self._send((b"l" if offset + length >= len(xml) else b"m") + chunk)
        elif command.startswith("qXfer:"):
            self._send(b"E00")
        elif command == "?":
            self._send((self.stop or Stop(SIGTRAP, self.selected)).reply())
        elif command in ("qfThreadInfo",):
            self._send(b"m" + ",".join(f"{i + 1:x}" for i in range(len(self.machine.vcpus))).encode())
        elif command == "qsThreadInfo":
            self._send(b"l")
        elif command == "qC":
            self._send(f"QC{self.selected + 1:x}".encode())
        elif command == "qAttached":
            self._send(b"1")
        elif command.startswith("qThreadExtraInfo,"):
            index = self._thread(command.split(",", 1)[1])
            self._send(f"vCPU {index}".encode().hex().encode())
        elif head == "H":
            thread = command[2:]
            if thread not in ("0", "-1", ""):
                self.selected = self._thread(thread)
            self._send(b"OK")
        elif head == "T":
            self._thread(command[1:])
            self._send(b"OK")
        elif head == "g":
            self._send(registers.encode(registers.read_all(self._vcpu())), compress=True)
        elif head == "G":
            return self._write_registers(registers.decode(data[1:]))
        elif head == "p":
            number = int(command[1:], 16)
            if number >= len(registers.REGISTERS):
                self._send(b"E00")
            else:
                values = registers.read_all(self._vcpu())
                register = registers.REGISTERS[number]
                self._send((values[number] & ((1 << register.bits) - 1))
                           .to_bytes(register.bits // 8, "little").hex().encode())
        elif head == "P":
            number_text, value_text = command[1:].split("=", 1)
            register = registers.REGISTERS[int(number_text, 16)]
            if register.name not in registers.WRITABLE:
                self._send(b"E00")
            else:
                registers.write(self._vcpu(),
                                {register.name: int.from_bytes(bytes.fromhex(value_text), "little")})
                self._send(b"OK")
        elif head == "m":
            address, length = (int(x, 16) for x in command[1:].split(","))
            memory = self.read_memory(address, min(length, packets.MAX_PACKET // 2 - 16))
            self._send(memory.hex().encode() if memory else b"E14")
        elif head == "M":
            where, value = command[1:].split(":", 1)
            address, length = (int(x, 16) for x in where.split(","))
            payload = bytes.fromhex(value)
            self._send(b"OK" if len(payload) == length and self.write_memory(address, payload)
                       else b"E14")
        elif head == "X":
            location, _, binary = data[1:].partition(b":")
            address, length = (int(x, 16) for x in location.decode().split(","))
            self._send(b"OK" if len(binary) == length and self.write_memory(address, binary)
                       else b"E14")
        elif head in ("Z", "z"):
            self._send(self._breakpoint(head == "Z", command[1:]))
        elif command == "vCont?":
            self._send(b"vCont;c;C;s;S")
        elif command.startswith("vCont;"):
            return self._vcont(command[6:])
        elif head in ("c", "C"):
            return self.resume(step=None)
        elif head in ("s", "S"):
            return self.resume(step=self.selected)
        elif head == "D":
            self._send(b"OK")
            self._drop_client("the debugger detached; the guest runs on")
            return True
        elif head == "k":
            from vmm.outcome import EXIT_NO_STATUS, StopReason

            self._drop_client("the debugger killed the VM")
            self.runner.stop(EXIT_NO_STATUS, StopReason.DEBUGGER_KILL, "GDB sent k")
            return True
        else:
            self._send(b"")  # not supported: GDB falls back or says so
        return False

    def _thread(self, text: str) -> int:
        """A thread id (1-based vCPU), also p<pid>.<tid>; ValueError if there is no such vCPU."""
        tid = text.rsplit(".", 1)[-1]
        index = int(tid, 16) - 1
        if not 0 <= index < len(self.machine.vcpus):
            raise ValueError(f"no thread {text}")
        return index

    def _vcpu(self):
        return self.machine.vcpus[self.selected]

    def _write_registers(self, values: list[int]) -> bool:
        names = [r.name for r in registers.REGISTERS]
        registers.write(self._vcpu(), {n: v for n, v in zip(names, values)
                                       if n in registers.WRITABLE})
        self._send(b"OK")
        return False

    def _vcont(self, actions: str) -> bool:
        step = None
        for action in actions.split(";"):
            verb, _, thread = action.partition(":")
            if verb[:1] in ("s", "S"):
                step = self._thread(thread) if thread and thread != "-1" else self.selected
            elif verb[:1] not in ("c", "C"):
                self._send(b"")
                return False
        return self.resume(step=step)

    # --- resuming ----------------------------------------------------------------------------
    def resume(self, *, step: int | None) -> bool:
        """Every vCPU's guest-debug state for the run to come; the session then ends."""
        from vmm.kvm.ioctl import lib

        if step is not None and not self.user_steps and \
                self.machine.vcpus[step].get_sregs().cs.selector & 3 == 3:
            self._send(b"E.single-stepping guest user code is not supported on KVM PVM "
                       b"(its #DB goes to the guest kernel)")
            return False

        hardware = list(self.hardware)
        debugreg = [0] * 8
        dr7 = 0
        for i, slot in enumerate(hardware[:4]):
            debugreg[i] = slot.address
            dr7 |= 1 << (2 * i)  # local enable
            dr7 |= (DR7_KIND[slot.kind] | DR7_LENGTH[slot.length] << 2) << (16 + 4 * i)
        debugreg[7] = dr7
        base = 0
        if self.software:
            base |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_SW_BP
        if hardware:
            base |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP
        for index, vcpu in enumerate(self.machine.vcpus):
            control = base
            if index == step:
                control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP | self.block_irq
            vcpu.set_guest_debug(control, tuple(debugreg))
        self.stop = None
        self.owes_stop_reply = True
        return True

    # --- memory ------------------------------------------------------------------------------
    def translate(self, address: int) -> int | None:
        """Guest virtual -> physical for the selected vCPU (None: not mapped)."""
        from vmm.arch.x86_64.paging import translator

        sregs = self._vcpu().get_sregs()
        if not sregs.cr0 & CR0_PG:
            return address
        if not sregs.efer & EFER_LMA:
            return None  # 32-bit paging: not walked (our guests go from no paging to 4-level)
        return translator(self.machine.memory, sregs.cr3)(address)

    def read_memory(self, address: int, length: int) -> bytes:
        """As much as is readable from ``address``, breakpoints' int3 bytes shown as the originals."""
        memory, out = self.machine.memory, bytearray()
        while len(out) < length:
            virtual = address + len(out)
            chunk = min(length - len(out), 0x1000 - (virtual & 0xFFF))
            physical = self.translate(virtual)
            if physical is None or not memory.is_valid(physical, chunk):
                break
            out += memory.read(physical, chunk)
        for bp in self.software.values():
            if address <= bp.address < address + len(out):
                out[bp.address - address] = bp.original
        return bytes(out)

    def write_memory(self, address: int, data: bytes) -> bool:
        memory, done = self.machine.memory, 0
        while done < len(data):
            virtual = address + done
            chunk = min(len(data) - done, 0x1000 - (virtual & 0xFFF))
            physical = self.translate(virtual)
            if physical is None or not memory.is_valid(physical, chunk):
                return False
            memory.write(physical, data[done:done + chunk])
            done += chunk
        return True

    # --- breakpoints -------------------------------------------------------------------------
    def _breakpoint(self, insert: bool, spec: str) -> bytes:
        kind_text, address_text, length_text = spec.split(",")[:3]
        kind, address, length = int(kind_text), int(address_text, 16), int(length_text, 16)
        if kind == 0 and self.int3:
            return self._software(insert, address)
        if kind in (0, 1):
            return self._hardware(insert, HardwareSlot("exec", address, 1))
        if kind in (2, 4) and self.watchpoints:
            if length not in DR7_LENGTH or address % length:
                return b"E22"  # x86 watches 1, 2, 4 or 8 aligned bytes
            return self._hardware(insert, HardwareSlot("write" if kind == 2 else "access",
                                                       address, length))
        return b""  # Z3, read watchpoints: x86 has none (only write, or read/write)

    def _software(self, insert: bool, address: int) -> bytes:
        if not insert:
            bp = self.software.pop(address, None)
            if bp is not None:
                self.machine.memory.write_u8(bp.physical, bp.original)
            return b"OK"
        if address in self.software:
            return b"OK"
        physical = self.translate(address)
        if physical is None or not self.machine.memory.is_valid(physical, 1):
            return b"E14"
        original = self.machine.memory.read_u8(physical)
        self.machine.memory.write_u8(physical, INT3)
        self.software[address] = SoftwareBreakpoint(address, physical, original)
        return b"OK"

    def _hardware(self, insert: bool, slot: HardwareSlot) -> bytes:
        if not insert:
            if slot in self.hardware:
                self.hardware.remove(slot)
            return b"OK"
        if slot in self.hardware:
            return b"OK"
        if len(self.hardware) >= 4:
            return b"E28"  # four debug registers: GDB says it cannot insert more
        self.hardware.append(slot)
        return b"OK"

    def remove_all_breakpoints(self) -> None:
        for address in list(self.software):
            self._software(False, address)
        self.hardware.clear()
        try:
            for vcpu in self.machine.vcpus:
                vcpu.set_guest_debug(0)
        except Exception:  # the VM may be going away
            pass


def parse_address(text: str) -> tuple[str, int]:
    """--gdb [HOST:]PORT -> (host, port); 127.0.0.1 unless a host is given."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--gdb {text}: PORT must be a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"--gdb {text}: PORT must be 0-65535")
    return (host or "127.0.0.1"), number


__all__ = ["GdbStub", "parse_address"]
