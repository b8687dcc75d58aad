"""`vmm check`: can this host run VMs, and what kind of KVM is it?"""

from __future__ import annotations

import sys

import click

@click.command()
def check() -> None:
    """Report /dev/kvm, its API version, flavour and capabilities. Exit 0 if a VM can run."""
    from vmm.errors import VmmError
    from vmm.kvm.capabilities import CAPABILITIES, FIRMWARE, LINUX, SNAPSHOT
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
    missing: list[str] = []
    no_snapshots: list[str] = []
    with kvm:
        click.echo(f"/dev/kvm: usable, API version {kvm.get_api_version()}")
        click.echo(f"vcpus: recommended {kvm.recommended_vcpus()}, max {kvm.max_vcpus()}")
        for capability in CAPABILITIES:
            value = kvm.check_extension(getattr(lib, capability.name))
            needed = bool(capability.needed_for & {FIRMWARE, LINUX})
            mark = "yes" if value else ("MISSING" if needed else "no")
            click.echo(f"  {capability.name.removeprefix('KVM_CAP_').lower():<16} {mark:<8} "
                       f"{capability.why}")
            if needed and not value:
                missing.append(capability.name)
            elif SNAPSHOT in capability.needed_for and not value:
                no_snapshots.append(capability.name)
        try:
            kvm.create_vm().close()
            click.echo("create VM: ok")
        except VmmError as e:
            click.echo(f"create VM: FAILED: {e}")
            missing.append("KVM_CREATE_VM")
    if flavour is Flavour.PVM:
        click.echo("note: PVM runs guest kernel code in KVM's instruction emulator: Linux boots take "
                   "tens of seconds; vmm applies its PVM workarounds (vmm/arch/x86_64/pvm.py)")
    if no_snapshots:
        click.echo(f"note: no snapshots on this host (missing {', '.join(no_snapshots)}): "
                   "vmm run boots every guest")
    if missing:
        click.echo(f"cannot run VMs: missing {', '.join(missing)} (a newer host kernel may have them)")
        sys.exit(1)
    click.echo("ready: this host can run vmm guests")
