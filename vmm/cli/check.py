"""`vmm check`: can this host run VMs, and what kind of KVM is it?"""

from __future__ import annotations

import sys

import click

# (capability constant name, why vmm cares, needed?)
CAPABILITIES = [
    ("KVM_CAP_USER_MEMORY", "guest RAM from our own mmap", True),
    ("KVM_CAP_SET_TSS_ADDR", "real mode on Intel", True),
    ("KVM_CAP_EXT_CPUID", "KVM_GET_SUPPORTED_CPUID", True),
    ("KVM_CAP_IRQCHIP", "in-kernel PIC/IOAPIC/LAPIC for Linux guests", True),
    ("KVM_CAP_PIT2", "in-kernel timer for Linux guests", True),
    ("KVM_CAP_IMMEDIATE_EXIT", "stopping a vCPU promptly", True),
    ("KVM_CAP_IRQFD", "device interrupts without an ioctl per IRQ", False),
    ("KVM_CAP_IOEVENTFD", "virtio notifications without a round trip to Python", False),
    ("KVM_CAP_VCPU_EVENTS", "injecting exceptions (PVM workarounds)", False),
    ("KVM_CAP_MP_STATE", "SMP start-up state", False),
    ("KVM_CAP_COALESCED_PIO", "batched port writes", False),
    ("KVM_CAP_READONLY_MEM", "read-only memory slots", False),
]


@click.command()
def check() -> None:
    """Report /dev/kvm, its API version, flavour and capabilities. Exit 0 if a VM can run."""
    from vmm.errors import VmmError
    from vmm.kvm.flavour import DESCRIPTIONS, Flavour, detect_flavour
    from vmm.kvm.ioctl import lib
    from vmm.kvm.system import Kvm

    flavour = detect_flavour()
    click.echo(f"kvm: {flavour}  ({DESCRIPTIONS[flavour]})")
    try:
        kvm = Kvm()
    except VmmError as e:
        click.echo(f"/dev/kvm: NOT USABLE: {e}")
        sys.exit(1)
    missing = []
    with kvm:
        click.echo(f"/dev/kvm: usable, API version {kvm.get_api_version()}")
        click.echo(f"vcpus: recommended {kvm.recommended_vcpus()}, max {kvm.max_vcpus()}")
        for name, why, needed in CAPABILITIES:
            value = kvm.check_extension(getattr(lib, name))
            mark = "yes" if value else ("MISSING" if needed else "no")
            click.echo(f"  {name.removeprefix('KVM_CAP_').lower():<16} {mark:<8} {why}")
            if needed and not value:
                missing.append(name)
        try:
            kvm.create_vm().close()
            click.echo("create VM: ok")
        except VmmError as e:
            click.echo(f"create VM: FAILED: {e}")
            missing.append("KVM_CREATE_VM")
    if flavour is Flavour.PVM:
        click.echo("note: PVM runs guest kernel code in KVM's instruction emulator: Linux boots take "
                   "tens of seconds; vmm applies its PVM workarounds (vmm/arch/x86_64/pvm.py)")
    if missing:
        click.echo(f"cannot run VMs: missing {', '.join(missing)} (a newer host kernel may have them)")
        sys.exit(1)
    click.echo("ready: this host can run vmm guests")
