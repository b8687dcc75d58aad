"""The GDB stub without KVM: the packet framing, and the stub's answers on a fake vCPU.

The framing is hostile-input code (bad checksums, junk, oversized packets,
escapes); the stub's packet handling runs here against guest memory of our
own and a vCPU whose registers are plain KVM structs, so every reply can be
checked byte for byte. tests/test_gdb.py drives the real GDB against real VMs.
"""

from __future__ import annotations

import xml.dom.minidom

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.gdb import packets, registers
from vmm.gdb.packets import Event, Packet, PacketReader
from vmm.gdb.stub import GdbStub, parse_address
from vmm.kvm.ioctl import ffi
from vmm.memory import GuestMemory


# --- framing -------------------------------------------------------------------------------
def test_a_packet_is_data_between_dollar_and_hash_with_its_checksum():
    assert packets.frame(b"OK") == b"$OK#9a"
    assert PacketReader().feed(b"$g#67") == [Packet(b"g")]


def test_bad_checksums_junk_acks_and_ctrl_c():
    events = PacketReader().feed(b"+noise$g#00-\x03$m0,4#fd")
    assert events == [Event.ACK, Event.BAD_PACKET, Event.NACK, Event.INTERRUPT, Packet(b"m0,4")]
    assert PacketReader().feed(b"$g#zz") == [Event.BAD_PACKET]  # not hex


def test_a_packet_may_arrive_in_pieces_and_a_restart_drops_the_cut_one():
    reader = PacketReader()
    assert reader.feed(b"$qSupp") == []
    assert reader.feed(b"orted#3") == []
    assert reader.feed(b"7") == [Packet(b"qSupported")]
    assert reader.feed(b"$gar$g#67") == [Packet(b"g")]


def test_an_oversized_packet_is_refused_whole_and_the_next_one_is_read():
    reader = PacketReader(max_packet=16)
    assert reader.feed(packets.frame(b"M0,40:" + b"00" * 64) + b"$g#67") == [
        Event.BAD_PACKET, Packet(b"g")]


def test_escapes_round_trip_the_four_special_bytes():
    data = b"a#b$c}d*e\x03"
    framed = packets.frame(data)
    assert b"}\x03" in framed and b"}\x04" in framed and b"}]" in framed and b"}\n" in framed
    assert PacketReader().feed(framed) == [Packet(data)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_survive_framing(data):
    assert PacketReader().feed(packets.frame(data)) == [Packet(data)]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789abcdef", max_size=400))
def test_run_length_encoding_decodes_back_and_never_makes_a_frame_byte(text):
    encoded = packets.run_length_encode(text.encode())
    assert packets.run_length_decode(encoded) == text.encode()
    assert b"#" not in encoded and b"$" not in encoded
    assert len(encoded) <= len(text)


def test_register_replies_are_compressed():
    framed = packets.frame(b"0" * 40, compress=True)
    body = framed[1:framed.index(b"#")]
    assert packets.run_length_decode(body) == b"0" * 40 and len(body) < 10


# --- the stub's answers --------------------------------------------------------------------
class FakeVcpu:
    id = 0

    def __init__(self) -> None:
        self.regs = ffi.new("struct kvm_regs *")
        self.sregs = ffi.new("struct kvm_sregs *")
        self.fpu = ffi.new("struct kvm_fpu *")
        self.regs.rip, self.regs.rflags, self.regs.rax = 0x1000, 0x2, 0x1122334455667788
        self.sregs.cs.selector, self.sregs.cr0 = 0x8, 0x11  # paging off
        self.fpu.fcw, self.fpu.mxcsr = 0x37F, 0x1F80
        self.debug: list[tuple[int, tuple[int, ...]]] = []

    def get_regs(self):
        return self.regs[0]

    def set_regs(self, regs):
        self.regs[0] = regs

    def get_sregs(self):
        return self.sregs[0]

    def get_fpu(self):
        return self.fpu[0]

    def set_guest_debug(self, control, debugreg=(0,) * 8):
        self.debug.append((control, tuple(debugreg)))

    def request_immediate_exit(self):
        pass


class FakeMachine:
    def __init__(self) -> None:
        self.memory = GuestMemory([(0, 0x10000)])
        self.vcpus = [FakeVcpu()]


class FakeRunner:
    stopping = False

    def __init__(self) -> None:
        self.stopped = None

    def stop(self, *args):
        self.stopped = args

    def pause(self, action):
        pass


@pytest.fixture
def stub():
    machine = FakeMachine()
    machine.memory.write(0x1000, bytes(range(16)))
    stub = GdbStub(("127.0.0.1", 0), machine, FakeRunner())
    sent: list[bytes] = []
    stub._send = lambda data, compress=False: sent.append(data)
    stub.sent = sent
    yield stub
    stub.close()


def ask(stub, packet: bytes) -> bytes:
    stub.sent.clear()
    stub.handle(packet)
    return stub.sent[-1] if stub.sent else None


def test_qsupported_offers_what_the_stub_does(stub):
    reply = ask(stub, b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386")
    assert b"qXfer:features:read+" in reply and b"PacketSize=4000" in reply
    assert b"QStartNoAckMode+" in reply and b"swbreak+" in reply


def test_the_target_description_arrives_in_pieces_and_parses():
    xml_text = registers.target_xml()
    document = xml.dom.minidom.parseString(xml_text)
    names = [r.getAttribute("name") for r in document.getElementsByTagName("reg")]
    assert names[:17] == [*registers.GPRS, "rip"] and "cr3" in names and "efer" in names
    assert {f.getAttribute("name") for f in document.getElementsByTagName("feature")} >= {
        "org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse"}  # what GDB requires of amd64


def test_qxfer_pages_through_the_description(stub):
    first = ask(stub, b"qXfer:features:read:target.xml:0,100")
    assert first.startswith(b"m") and len(first) == 0x101
    whole = registers.target_xml().encode()
    last = ask(stub, f"qXfer:features:read:target.xml:{len(whole) - 10:x},100".encode())
    assert last == b"l" + whole[-10:]


def test_g_reads_every_register_and_p_one(stub):
    values = registers.decode(ask(stub, b"g"))
    assert values[registers.BY_NAME["rax"]] == 0x1122334455667788
    assert values[registers.BY_NAME["rip"]] == 0x1000 and values[registers.BY_NAME["cs"]] == 8
    assert values[registers.BY_NAME["cr0"]] == 0x11 and values[registers.BY_NAME["fctrl"]] == 0x37F
    assert ask(stub, f"p{registers.BY_NAME['rip']:x}".encode()) == (0x1000).to_bytes(8, "little").hex().encode()
    assert ask(stub, b"p999") == b"E00"


def test_p_writes_general_registers_only(stub):
    rax = registers.BY_NAME["rax"]
    assert ask(stub, f"P{rax:x}={(42).to_bytes(8, 'little').hex()}".encode()) == b"OK"
    assert stub.machine.vcpus[0].regs.rax == 42
    assert ask(stub, f"P{registers.BY_NAME['cr0']:x}=0000000000000000".encode()) == b"E00"
    assert stub.machine.vcpus[0].sregs.cr0 == 0x11


def test_big_g_writes_back_what_g_read(stub):
    values = registers.decode(ask(stub, b"g"))
    values[registers.BY_NAME["rbx"]] = 7
    assert ask(stub, b"G" + registers.encode(values)) == b"OK"
    assert stub.machine.vcpus[0].regs.rbx == 7
    assert ask(stub, b"G00") == b"E01"  # the wrong size: an error, not a traceback


def test_memory_reads_writes_and_unmapped_addresses(stub):
    assert ask(stub, b"m1000,4") == b"00010203"
    assert ask(stub, b"M1000,2:abcd") == b"OK" and ask(stub, b"m1000,2") == b"abcd"
    assert ask(stub, b"X1002,2:#z") == b"OK"  # binary (the reader has undone the escapes)
    assert ask(stub, b"m1002,2") == b"237a"
    assert ask(stub, b"mfffe,4") == b"0000"  # what is readable, up to the end of RAM
    assert ask(stub, b"m20000,4") == b"E14"
    assert ask(stub, b"M20000,1:00") == b"E14"
    assert ask(stub, b"mzz") == b"E01"


def test_software_breakpoints_patch_int3_and_hide_it(stub):
    assert ask(stub, b"Z0,1004,1") == b"OK"
    assert stub.machine.memory.read_u8(0x1004) == 0xCC
    assert ask(stub, b"m1003,3") == b"030405"  # GDB sees the original byte
    assert ask(stub, b"z0,1004,1") == b"OK" and stub.machine.memory.read_u8(0x1004) == 4
    assert ask(stub, b"Z0,30000,1") == b"E14"


def test_hardware_slots_watchpoints_and_the_limit_of_four(stub):
    from vmm.kvm.ioctl import lib

    for i in range(3):
        assert ask(stub, f"Z1,{0x2000 + i:x},1".encode()) == b"OK"
    assert ask(stub, b"Z2,3000,4") == b"OK"
    assert ask(stub, b"Z1,4000,1") == b"E28"  # a fifth
    assert ask(stub, b"Z2,3001,4") == b"E22"  # unaligned
    assert ask(stub, b"Z3,3000,4") == b""  # read watchpoints: x86 has none
    assert stub.handle(b"c") is True
    control, debugreg = stub.machine.vcpus[0].debug[-1]
    assert control & lib.KVM_GUESTDBG_USE_HW_BP and debugreg[:4] == (0x2000, 0x2001, 0x2002, 0x3000)
    assert debugreg[7] & 0xFF == 0b01010101  # L0-L3
    assert debugreg[7] >> 28 == 0b1101  # slot 3: write (01), 4 bytes (11)


def test_step_sets_single_step_on_the_selected_vcpu(stub):
    from vmm.kvm.ioctl import lib

    assert stub.handle(b"vCont;s:1;c") is True
    control, _ = stub.machine.vcpus[0].debug[-1]
    assert control & lib.KVM_GUESTDBG_SINGLESTEP
    assert stub.handle(b"c") is True and stub.machine.vcpus[0].debug[-1][0] == 0  # all off


def test_threads_stop_reason_and_unknown_packets(stub):
    assert ask(stub, b"qfThreadInfo") == b"m1" and ask(stub, b"qsThreadInfo") == b"l"
    assert ask(stub, b"Hg1") == b"OK" and ask(stub, b"Hg5") == b"E01"
    assert ask(stub, b"T1") == b"OK" and ask(stub, b"T2") == b"E01"
    assert ask(stub, b"?") == b"T05thread:1;"
    assert ask(stub, b"qThreadExtraInfo,1") == b"vCPU 0".hex().encode()
    assert ask(stub, b"vMustReplyEmpty") == b""
    assert ask(stub, b"\xff\xfe") == b""


def test_kill_stops_the_vm(stub):
    assert stub.handle(b"k") is True and stub.runner.stopped[1].value == "killed by the debugger"


@pytest.mark.parametrize("text, address", [("1234", ("127.0.0.1", 1234)),
                                           ("0.0.0.0:9", ("0.0.0.0", 9))])
def test_gdb_address(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["x", "localhost:70000", ":"])
def test_bad_gdb_address(text):
    with pytest.raises(ValueError, match="--gdb"):
        parse_address(text)


def test_on_pvm_z0_takes_a_debug_register_and_watchpoints_are_unsupported():
    """What KVM PVM's instruction emulator cannot do (docs/gdb.md): no int3 in kernel code,
    no data breakpoints. GDB hears "unsupported" and can single-step its own watchpoints."""
    machine = FakeMachine()
    stub = GdbStub(("127.0.0.1", 0), machine, FakeRunner(), software_breakpoints=False,
                   watchpoints=False)
    sent = []
    stub._send = lambda data, compress=False: sent.append(data)
    try:
        stub.handle(b"Z0,1004,1")
        assert sent[-1] == b"OK" and machine.memory.read_u8(0x1004) == 0  # memory untouched
        assert stub.hardware[0].kind == "exec" and stub.hardware[0].address == 0x1004
        stub.handle(b"Z2,3000,4")
        assert sent[-1] == b""
    finally:
        stub.close()


def test_on_pvm_a_step_in_user_code_is_refused_not_done():
    machine = FakeMachine()
    stub = GdbStub(("127.0.0.1", 0), machine, FakeRunner(), user_steps=False)
    sent = []
    stub._send = lambda data, compress=False: sent.append(data)
    try:
        machine.vcpus[0].sregs.cs.selector = 0x33  # CPL 3
        assert stub.handle(b"vCont;s:1") is False and sent[-1].startswith(b"E.single-stepping")
        assert machine.vcpus[0].debug == []  # nothing set: the guest stays stopped
        machine.vcpus[0].sregs.cs.selector = 0x10
        assert stub.handle(b"s") is True  # kernel code: stepped
    finally:
        stub.close()
