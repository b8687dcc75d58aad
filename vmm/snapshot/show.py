"""`vmm snapshot show DIR`: a snapshot's state, section by section, in words.

The tutorial chapter docs/snapshots.md walks this output. KVM structures are
decoded through the same cffi declarations the VMM uses to make them.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from vmm.kvm.state import from_bytes
from vmm.snapshot.state import MEMORY_FILE, STATE_FILE, Snapshot

MSR_NAMES = {
    0x10: "IA32_TSC (the guest's time stamp counter)",
    0x3B: "IA32_TSC_ADJUST",
    0x6E0: "IA32_TSC_DEADLINE (next LAPIC timer event)",
    0x174: "SYSENTER_CS", 0x175: "SYSENTER_ESP", 0x176: "SYSENTER_EIP",
    0x1A0: "IA32_MISC_ENABLE",
    0x277: "IA32_PAT (memory types)",
    0xC0000081: "STAR (syscall segments)", 0xC0000082: "LSTAR (64-bit syscall entry)",
    0xC0000083: "CSTAR", 0xC0000084: "SFMASK (flags cleared on syscall)",
    0xC0000102: "KERNEL_GS_BASE (swapgs)",
}
MP_STATES = {0: "RUNNABLE", 1: "UNINITIALIZED (waiting for INIT/SIPI)", 2: "INIT_RECEIVED",
             3: "HALTED", 4: "SIPI_RECEIVED"}
# LAPIC registers (offsets into the 1 KiB page KVM_GET_LAPIC returns).
LAPIC_REGISTERS = {0x20: "ID", 0x80: "TPR", 0xF0: "SVR", 0x320: "LVT timer", 0x380: "timer initial count",
                   0x390: "timer current count", 0x3E0: "timer divide"}


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _resources(resources) -> str:
    parts = [f"ports {w.base:#x}+{w.length}" for w in resources.ports]
    parts += [f"mmio {base:#x}+{size:#x}" for base, size in resources.mmio]
    parts += [f"irq {irq}" for irq in resources.irqs]
    return ", ".join(parts) or "no resources"


def _state(kind: str, state) -> str:
    """One line of a device's state, in the words of its kind; any other kind: its fields."""
    if kind == "serial":
        return (f"IER={state.ier:#04x} LCR={state.lcr:#04x} MCR={state.mcr:#04x} "
                f"LSR={state.lsr:#04x} FCR={state.fcr:#04x} divisor={state.dlm << 8 | state.dll} "
                f"rx FIFO {len(state.rx_fifo)} bytes")
    if kind == "rtc":
        return (f"index {state.index:#04x}, CMOS RAM {len(state.ram)} bytes "
                f"(status A={state.ram[0xA]:#04x} B={state.ram[0xB]:#04x})")
    if kind == "i8042":
        return f"command byte {state.ctr:#04x}, output " + (
            "empty" if state.output is None else f"{state.output:#04x}")
    if kind == "mailbox":
        return f"{len(state.received)} descriptor bytes pending"
    if kind.startswith("virtio-"):
        queues = "; ".join(
            f"queue {n}: size {q.size}, {'ready' if q.ready else 'not ready'}, "
            f"avail {q.next_avail} used {q.next_used}" for n, q in enumerate(state.queues))
        return (f"status {state.status:#04x}, driver features {state.driver_features:#x}, "
                f"interrupt status {state.interrupt_status}; {queues}")
    return ", ".join(f"{f.name}={getattr(state, f.name)!r}"[:60] for f in dataclasses.fields(state))


def describe(snapshot: Snapshot, directory: Path) -> str:
    meta = snapshot.meta
    created = datetime.datetime.fromtimestamp(meta.created_ns / 1e9, datetime.timezone.utc)
    out = [f"{directory}: vmm {meta.vmm_version} snapshot, taken {created:%Y-%m-%d %H:%M:%S} UTC"]
    memory_file = directory / MEMORY_FILE
    stored = memory_file.stat().st_blocks * 512 if memory_file.exists() else 0
    out += [
        "",
        "meta: what it is, and what must match to restore it",
        f"  host              KVM {meta.host.flavour} on {meta.host.cpu_model}, "
        f"CPUID features {meta.host.cpuid_digest}",
        f"  guest RAM         {meta.mem >> 20} MiB in {len(meta.regions)} region(s): "
        + ", ".join(f"{start:#x}+{size >> 20}M" for start, size in meta.regions),
        f"  {MEMORY_FILE:<17} {_size(meta.memory_size)} sparse file, {_size(meta.memory_stored)} of it data "
        f"({_size(stored)} on disk)",
        f"  vcpus             {meta.cpus}",
        f"  kernel            {meta.kernel}",
        f"  initrd            {meta.initrd or 'none'}",
        f"  cmdline           {meta.cmdline}",
        "  disks             " + (", ".join(
            f"{d.file.path} ({d.file.size} bytes{', read-only' if d.read_only else ''})"
            for d in meta.disks) or "none"),
        f"  mailbox           /init's request buffer: {sum(n for _, n in meta.mailbox)} bytes in "
        f"{len(meta.mailbox)} guest-physical piece(s), first at {meta.mailbox[0][0]:#x}"
        if meta.mailbox else "  mailbox           none",
        "  KVM capabilities  " + ", ".join(f"{k}={'yes' if v else 'no'}"
                                            for k, v in vars(meta.capabilities).items()),
    ]
    out += ["", "devices: the device table (what the guest saw) and each device's own state value"]
    for record in meta.devices:
        out.append(f"  {record.id:<11} {record.kind:<11} {_resources(record.resources)}"
                   + "".join(f", {key}={value}" for key, value in record.guest.items()))
        if record.id in snapshot.devices:
            out.append(f"  {'':<11} {_state(record.kind, snapshot.devices[record.id])}")
    pit = from_bytes("struct kvm_pit_state2", snapshot.vm.pit2, "pit2")
    out += [
        "",
        "vm: what KVM emulates in the kernel for the whole VM",
        f"  PIC master, PIC slave, IOAPIC   {len(snapshot.vm.pic_master)} bytes each (struct kvm_irqchip)",
        f"  PIT                             {len(snapshot.vm.pit2)} bytes (struct kvm_pit_state2), "
        f"flags {pit.flags:#x}",
        "  kvmclock                        "
        + (f"{from_bytes('struct kvm_clock_data', snapshot.vm.clock, 'clock').clock / 1e9:.3f} s"
           if snapshot.vm.clock else "not saved"),
    ]
    for vcpu in snapshot.vcpus:
        out += ["", *_describe_vcpu(vcpu)]
    out += ["", f"({directory / STATE_FILE}: format and checksum verified)"]
    return "\n".join(out)


def _describe_vcpu(vcpu) -> list[str]:
    regs = from_bytes("struct kvm_regs", vcpu.regs, "regs")
    sregs = from_bytes("struct kvm_sregs", vcpu.sregs, "sregs")
    lapic_bytes = vcpu.lapic  # struct kvm_lapic_state: the LAPIC's 1 KiB register page
    events = from_bytes("struct kvm_vcpu_events", vcpu.events, "events")
    mode = "64-bit" if sregs.efer & (1 << 10) else "protected" if sregs.cr0 & 1 else "real"
    lines = [
        f"vcpu{vcpu.vcpu_id}: {MP_STATES.get(vcpu.mp_state, vcpu.mp_state)}, {mode} mode, "
        f"CPL {sregs.cs.selector & 3} ({'kernel' if sregs.cs.selector & 3 == 0 else 'user'})",
        f"  regs       rip={regs.rip:#x} rsp={regs.rsp:#x} rflags={regs.rflags:#x} "
        f"rax={regs.rax:#x}",
        f"  sregs      cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} efer={sregs.efer:#x} "
        f"cs={sregs.cs.selector:#x} apic_base={sregs.apic_base:#x}",
        "  fpu        " + (f"XSAVE area, {len(vcpu.xsave)} bytes" if vcpu.xsave is not None
                            else f"struct kvm_fpu, {len(vcpu.fpu or b'')} bytes")
        + (", XCRs" if vcpu.xcrs is not None else "")
        + (", debug registers" if vcpu.debugregs is not None else ""),
        "  lapic      " + " ".join(
            f"{name}={int.from_bytes(lapic_bytes[off:off + 4], 'little'):#x}"
            for off, name in LAPIC_REGISTERS.items()),
        f"  events     exception {'pending ' + str(events.exception.nr) if events.exception.injected else 'none'}, "
        f"interrupt {'injected ' + str(events.interrupt.nr) if events.interrupt.injected else 'none'}, "
        f"NMI {'pending' if events.nmi.pending else 'none'}",
        f"  cpuid      {len(vcpu.cpuid)} leaves",
        f"  msrs       {len(vcpu.msrs)}:",
    ]
    for index, value in vcpu.msrs:
        lines.append(f"    {index:#010x} = {value:#018x}  {MSR_NAMES.get(index, '')}".rstrip())
    return lines
