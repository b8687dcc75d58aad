"""The PC a Linux guest gets: every device type, one registration each, in the order made.

A new device is its own module (a register model with a plain state value,
knowing nothing of KVM or its address) and one entry here: its id, its
resources from vmm/arch/x86_64/layout.py, how it is made from the run's
wiring, and the type of its saved state. Everything else (the bus, the
kernel command line, snapshots and their checks, `vmm snapshot show`,
--metrics) iterates the DeviceManager built from this table
(vmm/devices/model.py). docs/devices.md walks through the RTC's entry.
"""

from __future__ import annotations

from vmm.arch.x86_64 import layout
from vmm.devices import i8042 as i8042_registers
from vmm.devices.i8042 import I8042, I8042State
from vmm.devices.legacy import BootTimer, DebugExit, Sink
from vmm.devices.mailbox import Mailbox, MailboxState
from vmm.devices.model import (
    Attached,
    DeviceKind,
    DeviceSpec,
    DeviceType,
    PortWindow,
    Wiring,
    fixed,
)
from vmm.devices.power import AcpiPower
from vmm.devices.rtc import CmosRtc, RtcState
from vmm.devices.serial import Serial16550, SerialState
from vmm.devices.virtio.attach import VIRTIO_BLK, VIRTIO_NET


def _console(spec: DeviceSpec, wiring: Wiring) -> Attached:
    uart = Serial16550(wiring.output, wiring.irq_line(layout.COM1_IRQ))
    return Attached(spec, uart, saved=uart)


def _stderr_console(spec: DeviceSpec, wiring: Wiring) -> Attached:
    """ttyS1, a container's stderr (VmConfig.stderr_uart): probed only when told."""
    uart = Serial16550(wiring.events.on_error_output or (lambda data: None),
                       wiring.irq_line(layout.COM2_IRQ))
    return Attached(spec, uart, saved=uart, cmdline=("8250.nr_uarts=2",))


def _i8042(spec: DeviceSpec, wiring: Wiring) -> Attached:
    controller = I8042(wiring.events.on_reset)
    return Attached(spec, controller, saved=controller)


def _rtc(spec: DeviceSpec, wiring: Wiring) -> Attached:
    rtc = CmosRtc()
    return Attached(spec, rtc, saved=rtc)


def _post(spec: DeviceSpec, wiring: Wiring) -> Attached:
    return Attached(spec, Sink(0xFF))


def _debug_exit(spec: DeviceSpec, wiring: Wiring) -> Attached:
    return Attached(spec, DebugExit(wiring.events.on_exit))


def _boot_timer(spec: DeviceSpec, wiring: Wiring) -> Attached:
    return Attached(spec, BootTimer())


def _mailbox(spec: DeviceSpec, wiring: Wiring) -> Attached:
    mailbox = Mailbox(wiring.events.on_ready or (lambda address, length: None))
    return Attached(spec, mailbox, saved=mailbox)


def _power(spec: DeviceSpec, wiring: Wiring) -> Attached:
    power = AcpiPower(wiring.events.on_poweroff or (lambda: None), wiring.irq_line(layout.GED_IRQ))
    return Attached(spec, power)


def _port(base: int, length: int = 1, offset: int = 0) -> tuple[PortWindow, ...]:
    return (PortWindow(base, length, offset),)


# --- how an ACPI guest sees them (the DSDT's entries, vmm/acpi/) ----------------------------
def _uart_aml(spec: DeviceSpec) -> bytes:
    from vmm.acpi import aml

    window = spec.resources.ports[0]
    return aml.device(spec.id.upper(), aml.name("_HID", aml.eisa_id("PNP0501")),
                      aml.name("_UID", int(spec.id.removeprefix("com"))),
                      aml.name("_CRS", aml.resources(aml.io(window.base, window.length),
                                                     aml.irq(*spec.resources.irqs))))


def _rtc_aml(spec: DeviceSpec) -> bytes:
    from vmm.acpi import aml

    window = spec.resources.ports[0]  # no interrupt: this RTC raises none
    return aml.device("RTC", aml.name("_HID", aml.eisa_id("PNP0B00")),
                      aml.name("_CRS", aml.resources(aml.io(window.base, window.length))))


LINUX_DEVICES: tuple[DeviceType, ...] = (
    fixed(DeviceKind.SERIAL, "com1", _console, ports=_port(layout.COM1_PORT, 8),
          irqs=(layout.COM1_IRQ,), state_type=SerialState, acpi=_uart_aml),
    fixed(DeviceKind.SERIAL, "com2", _stderr_console, ports=_port(layout.COM2_PORT, 8),
          irqs=(layout.COM2_IRQ,), state_type=SerialState, acpi=_uart_aml,
          when=lambda c: c.stderr_uart),
    # Two one-port windows: 0x61 between them is the PC's system control port B,
    # which KVM's PIT answers in the kernel (KVM_PIT_SPEAKER_DUMMY).
    fixed(DeviceKind.I8042, "i8042", _i8042,
          ports=(PortWindow(layout.I8042_DATA_PORT, 1, i8042_registers.DATA),
                 PortWindow(layout.I8042_COMMAND_PORT, 1, i8042_registers.COMMAND)),
          state_type=I8042State),
    fixed(DeviceKind.RTC, "rtc", _rtc, ports=_port(layout.RTC_PORT, 2), state_type=RtcState,
          acpi=_rtc_aml),
    fixed(DeviceKind.POST, "post", _post, ports=_port(layout.POST_PORT)),
    fixed(DeviceKind.DEBUG_EXIT, "debug-exit", _debug_exit, ports=_port(layout.EXIT_PORT)),
    fixed(DeviceKind.BOOT_TIMER, "boot-timer", _boot_timer, ports=_port(layout.BOOT_TIMER_PORT)),
    fixed(DeviceKind.MAILBOX, "mailbox", _mailbox,
          ports=_port(layout.MAILBOX_PORT, layout.MAILBOX_PORT_SIZE), state_type=MailboxState),
    # The DSDT's power button and the FADT's sleep registers (vmm/acpi/tables.py).
    fixed(DeviceKind.POWER, "power", _power, ports=_port(layout.ACPI_PM_PORT, 2),
          irqs=(layout.GED_IRQ,), when=lambda c: c.acpi_enabled),
    VIRTIO_BLK,  # one per --disk: blk0, blk1... (/dev/vda, /dev/vdb...)
    VIRTIO_NET,  # one per --net after the disks: net0, net1... (eth0, eth1...)
)
