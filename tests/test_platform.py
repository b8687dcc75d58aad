"""The PC platform a Linux guest gets from KVM and vmm: the PIT's speaker port, i8042 windows."""

from __future__ import annotations

import time

import pytest

from vmm.arch.x86_64 import layout
from vmm.config import VmConfig
from vmm.errors import UsageError
from vmm.kvm.exits import IoExit, decode_exit
from vmm.memory import GuestMemory

MiB = 1 << 20
CODE = 0x1000

# Real mode at 0000:1000: gate PIT channel 2 through port 0x61, read 0x61 back,
# then show what was read on the POST port (an exit to vmm).
#   mov al, 1 ; out 0x61, al ; in al, 0x61 ; out 0x80, al ; hlt
SPEAKER_PROBE = bytes.fromhex("b001" "e661" "e461" "e680" "f4")


@pytest.mark.kvm
def test_port_0x61_is_the_pit_speaker_port_in_the_kernel():
    """KVM_PIT_SPEAKER_DUMMY: 0x61 is answered by KVM (no exit), with the gate we set."""
    from vmm.builder import create_linux_machine

    machine = create_linux_machine(VmConfig(mem=2 * MiB), GuestMemory([(0, 2 * MiB)]))
    try:
        machine.memory.write(CODE, SPEAKER_PROBE)
        vcpu = machine.vm.create_vcpu(0)
        machine.vcpus.append(vcpu)
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = CODE, 0x2
        vcpu.set_regs(regs)
        vcpu.run()
        exit = decode_exit(vcpu.run_struct)
    finally:
        machine.close()
    assert isinstance(exit, IoExit), exit
    assert (exit.port, exit.is_write) == (layout.POST_PORT, True)  # 0x61 never left KVM
    value = exit.data[0]
    assert value & 0x01  # the channel-2 gate we wrote reads back
    assert value != 0xFF  # not an absent port


def test_i8042_is_two_windows_around_port_0x61():
    from vmm.devices.bus import Bus
    from vmm.devices.i8042 import COMMAND, DATA, I8042, STATUS_OUTPUT_FULL

    bus = Bus("pio")
    i8042 = I8042(lambda: None)
    bus.register(layout.I8042_DATA_PORT, 1, i8042, "i8042", offset=DATA)
    bus.register(layout.I8042_COMMAND_PORT, 1, i8042, "i8042", offset=COMMAND)
    bus.write(layout.I8042_COMMAND_PORT, b"\xaa")  # self-test
    assert bus.read(layout.I8042_COMMAND_PORT, 1)[0] & STATUS_OUTPUT_FULL
    assert bus.read(layout.I8042_DATA_PORT, 1) == b"\x55"
    assert bus.find(0x61) is None and bus.find(0x62) is None


# --- only PVM gets PVM's options ----------------------------------------------------------
def _machine(flavour):
    from types import SimpleNamespace

    return SimpleNamespace(flavour=flavour, vm=SimpleNamespace(get_tsc_khz=lambda: 2_445_430))


def linux_cmdline_for(config: VmConfig, machine):
    from types import SimpleNamespace

    from vmm.builder import linux_cmdline

    devices = SimpleNamespace(cmdline=lambda acpi: ["virtio_mmio.device=4K@0xd0000000:5"])
    return linux_cmdline(config, machine, devices, 4096, mailbox=False)


def _cmdline(flavour, kernel=None) -> list[str]:
    return str(linux_cmdline_for(VmConfig(kernel=kernel, command=("true",)), _machine(flavour))).split()


@pytest.mark.parametrize("flavour", ["intel", "amd", "unknown"])
@pytest.mark.parametrize("kernel", [None, "/boot/vmlinuz-other"])
def test_no_pvm_option_reaches_a_non_pvm_command_line(flavour, kernel):
    from vmm.arch.x86_64 import pvm
    from vmm.kvm.flavour import Flavour

    options = _cmdline(Flavour(flavour), kernel)
    names = {option.split("=", 1)[0] for option in options}
    for option in (*pvm.PVM_CMDLINE, *pvm.PVM_OUR_KERNEL_OPTIONS, *pvm.PVM_FOREIGN_KERNEL_OPTIONS):
        assert option.split("=", 1)[0] not in names, option
    assert "hypervisor" not in " ".join(options)
    ours = kernel is None
    # Our kernel's PVM patches: off, explicitly; another kernel never hears of them.
    assert ("pvm_syscall_fixup=0" in options) == ours
    assert ("pvm_brk_populate=0" in options) == ours
    if not ours:
        assert not any(option.startswith("pvm_") for option in options)


def test_pvm_command_line_has_the_workarounds_and_keeps_the_patches_on():
    from vmm.arch.x86_64 import pvm
    from vmm.kvm.flavour import Flavour

    options = _cmdline(Flavour.PVM)
    assert all(option in options for option in pvm.PVM_CMDLINE)
    assert not any(option.startswith("pvm_") for option in options)  # patches default on


def test_on_pvm_our_kernel_and_a_distributions_get_their_own_options():
    """Ours: no ASLR, patch 0007's option. A distribution's keeps ASLR and goes on the
    command-line diet (mitigations off in the emulated kernel, no ftrace scans)."""
    from vmm.arch.x86_64 import pvm
    from vmm.kvm.flavour import Flavour

    ours, theirs = _cmdline(Flavour.PVM), _cmdline(Flavour.PVM, "/boot/vmlinuz-other")
    assert {"norandmaps", "fault_around_bytes=4096"} <= set(ours)
    assert not {"norandmaps", "fault_around_bytes=4096"} & set(theirs)
    assert set(pvm.PVM_FOREIGN_KERNEL_OPTIONS) <= set(theirs)
    assert not set(pvm.PVM_FOREIGN_KERNEL_OPTIONS) & set(ours)
    assert "noxsave" not in ours + theirs  # Linux 6.1 knows it no more
    # The TSC's frequency from KVM (no PIT calibration, which fails in the emulator).
    assert "tsc_early_khz=2445430" in ours and "tsc_early_khz=2445430" in theirs
    assert not any(o.startswith("tsc_early_khz") for o in _cmdline(Flavour.AMD))


@pytest.mark.boot
def test_on_pvm_the_guest_kernel_sees_none_of_the_hidden_features():
    """clearcpuid= names xsave, and the kernel clears what depends on it (avx*, pku, xsave*):
    the list stays short enough for the kernel's 128-byte buffer and still hides them all."""
    import subprocess
    import sys

    from vmm.kvm.flavour import Flavour, detect_flavour

    if detect_flavour() is not Flavour.PVM:
        pytest.skip("the features are hidden on PVM only")
    result = subprocess.run([sys.executable, "-m", "vmm", "run", "--", "grep", "-m1", "flags",
                             "/proc/cpuinfo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    flags = set(result.stdout.split(":", 1)[1].split())
    assert "fpu" in flags and "sse2" in flags
    gone = {"xsave", "xsaveopt", "xsavec", "xsaves", "avx", "avx2", "avx512f", "pku", "ospke",
            "ssse3", "sse4_1", "sse4_2", "aes", "pclmulqdq", "sha_ni", "erms", "fsrm", "popcnt"}
    assert not flags & gone, flags & gone


def test_pvm_time_scale_multiplies_the_tsc_frequency_the_guest_is_told():
    from vmm.kvm.flavour import Flavour

    machine = _machine(Flavour.PVM)
    config = VmConfig(command=("true",), pvm_time_scale=4)
    options = str(linux_cmdline_for(config, machine)).split()
    assert "tsc_early_khz=9781720" in options  # 4 x 2,445,430
    with pytest.raises(UsageError, match="only on PVM hosts"):
        linux_cmdline_for(config, _machine(Flavour.AMD))
    with pytest.raises(UsageError, match="1 to 16"):
        VmConfig(pvm_time_scale=0)


@pytest.mark.boot
def test_a_guest_told_a_4x_tsc_lives_4x_slower():
    """--pvm-time-scale 4: the guest's uptime when the command runs is a quarter of what
    it would be (its clock runs slow; what the option trades for fewer ticks)."""
    import subprocess
    import sys

    from vmm.kvm.flavour import Flavour, detect_flavour

    if detect_flavour() is not Flavour.PVM:
        pytest.skip("--pvm-time-scale is for PVM hosts")
    uptimes = {}
    for scale in ("1", "4"):
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "vmm", "run", "--cold", "--pvm-time-scale",
                                 scale, "--", "cat", "/proc/uptime"],
                                capture_output=True, text=True, timeout=300)
        wall = time.monotonic() - start
        assert result.returncode == 0, result.stderr
        uptimes[scale] = float(result.stdout.split()[0]) / wall
    assert uptimes["1"] > 0.6  # the guest's clock keeps up with the host's (boot to command)
    assert uptimes["4"] < uptimes["1"] / 2.5, uptimes
