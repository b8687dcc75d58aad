"""A VM's configuration: frozen dataclasses, validated, no I/O.

The CLI turns options into a :class:`VmConfig`; the builder turns a VmConfig
into a running VM. Validation that needs no files or KVM lives here, so bad
input is refused before anything is opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from vmm.arch.x86_64.layout import DEFAULT_MEM, GiB, KiB, MiB
from vmm.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": MiB, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}

# How long SIGTERM's power button has before vmm stops a machine hard (--stop-timeout).
# Debian 12's shutdown, `poweroff` to power-off, took 1.8 s under QEMU's TCG on our CI host
# (benchmarks/bench_distro.py), about as long as on hardware KVM; systemd gives a unit 90 s
# and `docker stop` 10 s before they kill. 60 s leaves a slow unit room and a user no long
# wait. (On PVM a distribution's kernel runs ~200x slower than under TCG: docs/distro.md.)
DEFAULT_STOP_TIMEOUT = 60.0

MAX_MEM = 64 * GiB  # far beyond what a test VM needs; guards typos like 512G
MIN_MEM = 1 * MiB


def size_in_bytes(text: str) -> int | None:
    """'512M', '1G', '64K', '2GiB'; a bare number means MiB (as QEMU's -m); None if not a size."""
    match = _SIZE.match(str(text))
    return int(match.group(1)) * _UNITS[match.group(2).upper()] if match else None


def parse_size(text: str, option: str = "--mem") -> int:
    """A guest's RAM size (size_in_bytes), within what vmm can give a guest."""
    size = size_in_bytes(text)
    if size is None:
        raise UsageError(f"{option} {text!r}: not a size (examples: 512M, 1G, 2048)")
    if size < MIN_MEM:
        raise UsageError(f"{option} {text!r}: too small, at least 1M")
    if size > MAX_MEM:
        raise UsageError(f"{option} {text!r}: too large, at most {MAX_MEM // GiB}G")
    if size % (4 * KiB):
        raise UsageError(f"{option} {text!r}: must be a multiple of 4K")
    return size


class NotifyPath(StrEnum):
    """How a virtio queue notification reaches the device (docs/virtio.md measures both)."""

    EXIT = "exit"  # an MMIO exit, handled in the vCPU thread; interrupt by KVM_IRQ_LINE
    IOEVENTFD = "ioeventfd"  # KVM signals an eventfd, an I/O thread serves it; interrupt by irqfd


def parse_notify_paths(text: str) -> tuple[NotifyPath, ...]:
    """'ioeventfd', 'exit' or one per disk: 'exit,ioeventfd' (the last holds for the rest)."""
    try:
        paths = tuple(NotifyPath(path) for path in text.split(","))
    except ValueError:
        paths = ()
    if not paths:
        raise UsageError(f"--virtio-notify {text!r}: 'exit' or 'ioeventfd', "
                         "or one per disk separated by commas")
    return paths


def check_argv(argv: tuple[str, ...]) -> None:
    """An argv the guest's /init can be given, whichever way it travels (command line or mailbox)."""
    if any("\0" in arg for arg in argv):
        raise UsageError("a command argument contains a NUL byte, which no argv can hold")


@dataclass(frozen=True)
class DiskConfig:
    path: str
    read_only: bool = False
    serial: str = ""

    @staticmethod
    def parse(text: str) -> "DiskConfig":
        """PATH[,ro][,serial=ID]"""
        path, *options = text.split(",")
        if not path:
            raise UsageError(f"--disk {text!r}: no path")
        read_only, serial = False, ""
        for option in options:
            if option in ("ro", "readonly"):
                read_only = True
            elif option == "rw":
                read_only = False
            elif option.startswith("serial="):
                serial = option.removeprefix("serial=")
                if len(serial.encode()) > 20:
                    raise UsageError(f"--disk {text!r}: serial longer than 20 bytes")
            else:
                raise UsageError(f"--disk {text!r}: unknown option {option!r} (ro, serial=ID)")
        return DiskConfig(path, read_only, serial)


IFNAMSIZ = 16  # <net/if.h>: an interface name and its NUL


def is_interface_name(name: str) -> bool:
    """What the kernel takes as a network interface's name (dev_valid_name)."""
    return (0 < len(name.encode()) < IFNAMSIZ and name not in (".", "..")
            and not any(c in name for c in "/:") and not any(c.isspace() for c in name))


@dataclass(frozen=True)
class NetConfig:
    """One NIC: ``--net tap[=NAME][,ip=ADDR/PREFIX][,gw=ADDR][,dns=ADDR][,mac=MAC][,offload=off]`` or
    ``--net user[,hostfwd=tcp:HOSTPORT:GUESTPORT]...[,mac=MAC][,offload=off]``."""

    backend: str  # "tap" or "user" (passt)
    name: str = ""  # the TAP interface
    ip: str | None = None  # the guest's address/prefix: eth0 configured by the kernel (ip=)
    gateway: str | None = None
    mac: str | None = None  # default: 52:54:00:12:34:56 + the NIC's index
    forwards: tuple[tuple[int, int], ...] = ()  # user: (host port on 127.0.0.1, guest port)
    offload: bool = True  # offer checksum (and with TAP, segmentation) offloads to the driver
    dns: str | None = None  # the guest's nameserver (/etc/resolv.conf -> the kernel's /proc/net/pnp)

    @staticmethod
    def parse(text: str) -> "NetConfig | None":
        """``none`` (no NIC), ``user[,...]`` or ``tap[=NAME][,...]`` (class docstring)."""
        import ipaddress

        if text == "none":
            return None
        kind, _, rest = text.partition(",")
        backend, equals, name = kind.partition("=")
        if backend == "user" and not equals:
            return NetConfig._parse_user(text, rest)
        if backend != "tap":
            raise UsageError(f"--net {text!r}: expected none, user[,hostfwd=tcp:HOSTPORT:GUESTPORT] "
                             "or tap[=NAME][,ip=ADDR/PREFIX,gw=ADDR]")
        if equals and not name:
            raise UsageError(f"--net {text!r}: tap=NAME: name the TAP interface (or give "
                             "tap alone: the kernel names it vmmtapN)")
        if name and not is_interface_name(name):
            raise UsageError(f"--net tap={name}: not an interface name (1-15 characters)")
        options = dict(option.partition("=")[::2] for option in rest.split(",") if option)
        unknown = set(options) - {"ip", "gw", "dns", "mac", "offload"}
        if unknown:
            raise UsageError(f"--net {text!r}: unknown option {sorted(unknown)[0]!r} "
                             "(ip, gw, dns, mac, offload)")
        try:
            if "ip" in options:
                if "/" not in options["ip"]:
                    raise ValueError(f"ip={options['ip']}: give ADDR/PREFIX, e.g. 10.0.0.2/24")
                ipaddress.IPv4Interface(options["ip"])
            for key in ("gw", "dns"):
                if key in options:
                    ipaddress.IPv4Address(options[key])
            if "mac" in options:
                from vmm.devices.virtio.net import parse_mac

                parse_mac(options["mac"])
            offload = NetConfig._parse_offload(options.get("offload", "on"))
        except ValueError as e:
            raise UsageError(f"--net {text!r}: {e}") from None
        for key in ("gw", "dns"):
            if key in options and "ip" not in options:
                raise UsageError(f"--net {text!r}: {key}= without ip=")
        return NetConfig("tap", name, options.get("ip"), options.get("gw"), options.get("mac"),
                         offload=offload, dns=options.get("dns"))

    @staticmethod
    def _parse_offload(value: str) -> bool:
        if value not in ("on", "off"):
            raise ValueError(f"offload={value}: on or off")
        return value == "on"

    @staticmethod
    def _parse_user(text: str, rest: str) -> "NetConfig":
        """user: passt's fixed addresses (10.0.2.15/24, gateway 10.0.2.2), port forwards, mac."""
        from vmm.devices.netbackend import DNS_ADDRESS, GATEWAY, GUEST_ADDRESS, PREFIX

        forwards, mac, offload = [], None, True
        for option in (o for o in rest.split(",") if o):
            key, _, value = option.partition("=")
            if key == "hostfwd":
                parts = value.split(":")
                try:
                    if len(parts) != 3 or parts[0] != "tcp":
                        raise ValueError
                    host, guest = int(parts[1]), int(parts[2])
                    if not (0 < host < 65536 and 0 < guest < 65536):
                        raise ValueError
                except ValueError:
                    raise UsageError(f"--net {text!r}: hostfwd=tcp:HOSTPORT:GUESTPORT") from None
                forwards.append((host, guest))
            elif key in ("mac", "offload"):
                from vmm.devices.virtio.net import parse_mac

                try:
                    if key == "mac":
                        parse_mac(value)
                        mac = value
                    else:
                        offload = NetConfig._parse_offload(value)
                except ValueError as e:
                    raise UsageError(f"--net {text!r}: {e}") from None
            else:
                raise UsageError(f"--net {text!r}: unknown option {key!r} (hostfwd, mac, offload)")
        return NetConfig("user", "", f"{GUEST_ADDRESS}/{PREFIX}", GATEWAY, mac, tuple(forwards),
                         offload, DNS_ADDRESS)

    def kernel_ip_option(self, index: int) -> str | None:
        """The kernel's ip= for this NIC (CONFIG_IP_PNP: eth<index> configured at boot)."""
        import ipaddress

        if self.ip is None:
            return None
        interface = ipaddress.IPv4Interface(self.ip)
        # client:server:gateway:netmask:hostname:device:autoconf:dns0
        option = f"ip={interface.ip}::{self.gateway or ''}:{interface.netmask}::eth{index}:off"
        return option + (f":{self.dns}" if self.dns else "")


@dataclass(frozen=True)
class VmConfig:
    mem: int = DEFAULT_MEM
    cpus: int = 1
    firmware: str | None = None  # a built-in payload name or a raw binary's path
    kernel: str | None = None  # bzImage or vmlinux; None: our guest kernel
    initrd: str | None = None  # path, "none", or None: our default initramfs
    cmdline: str = ""  # extra kernel command-line arguments
    command: tuple[str, ...] = ()  # run in the guest by our /init
    disks: tuple[DiskConfig, ...] = field(default_factory=tuple)
    nets: tuple[NetConfig, ...] = field(default_factory=tuple)  # virtio-net NICs, after the disks
    runloop: str = "c"
    trace: bool = False
    stats: bool = False
    timeout: float | None = None
    console_log: bool = False  # show the kernel's log, not only the command's output
    interactive: bool = False  # stdin is a terminal: raw mode, Ctrl-A x to quit
    # virtio queue notifications: "ioeventfd" (+ I/O thread, irqfd; as fast as exits on PVM, one
    # MMIO exit fewer per request: docs/virtio.md)
    # or "exit" (an MMIO exit handled in the vCPU thread); "exit,ioeventfd": one per disk, in
    # order, the last one for the rest (benchmarks compare both paths in one boot)
    virtio_notify: str = "ioeventfd"
    # A second UART (ttyS1 at COM2) whose output is the command's stderr, apart from the
    # console's stdout (OCI containers: vmm/oci/monitor.py; /init sends the process's fd 2 there)
    stderr_uart: bool = False
    # ACPI tables (vmm/acpi/): True, False, or None for the default: a kernel that is not
    # ours gets them (a distribution's finds its virtio devices only through them); ours
    # finds its devices on the command line, which costs less of PVM's emulated time.
    acpi: bool | None = None
    # A bzImage's payload and a compressed initrd decompressed on the host (vmm/loader/
    # decompress.py): the guest's own decompressor runs emulated on PVM. False: as they are.
    decompress: bool = True
    # A guest whose own init runs (init_is_ours False) is a machine: a reboot restarts it
    # (False: vmm exits 0 instead), and SIGTERM presses its power button, then stops it
    # hard if it has not powered off within stop_timeout seconds.
    reboot: bool = True
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    # PVM only: the guest is told its TSC runs this many times faster than it does. Its
    # clocks then run that many times slower and its timer ticks that much less often
    # per real second: the tick was 59 % of Debian's emulated boot (docs/distro.md).
    pvm_time_scale: int = 1

    @property
    def notify_paths(self) -> tuple[NotifyPath, ...]:
        return parse_notify_paths(self.virtio_notify)

    @property
    def init_is_ours(self) -> bool:
        """vmm's /init (our initramfs) runs the command. With --initrd the guest's own init
        runs (a distribution's initramfs, or with --initrd none the root's /sbin/init):
        the VM is a machine that boots, runs and powers off by itself."""
        return self.initrd is None

    @property
    def acpi_enabled(self) -> bool:
        return self.acpi if self.acpi is not None else self.kernel is not None

    def __post_init__(self) -> None:
        if self.cpus < 1:
            raise UsageError(f"--cpus {self.cpus}: at least 1")
        if self.runloop not in ("c", "python"):
            raise UsageError(f"--runloop {self.runloop!r}: 'c' or 'python'")
        parse_notify_paths(self.virtio_notify)
        if self.command and not self.init_is_ours:
            raise UsageError("-- COMMAND is run by vmm's /init, and --initrd replaces it: the "
                             "guest's own init runs (leave out the command: the console is the "
                             "machine's terminal)")
        if not 1 <= self.pvm_time_scale <= 16:
            raise UsageError(f"--pvm-time-scale {self.pvm_time_scale}: 1 to 16")
        if self.stop_timeout < 0:
            raise UsageError(f"--stop-timeout {self.stop_timeout:g}: must not be negative")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError(f"--timeout {self.timeout}: must be positive")
        if self.firmware is not None and (self.kernel or self.command or self.disks or self.nets):
            raise UsageError("--firmware runs a bare payload: no --kernel, --disk, --net or command")
