"""`vmm check`: can this host run VMs, and what kind of KVM is it?"""

from __future__ import annotations

import sys

import click

@click.command()
@click.option("--cpuid", "show_cpuid", is_flag=True,
              help="Print the CPUID table a guest's vCPU gets, leaf by leaf, with vmm's changes.")
@click.option("--cpus", default=1, show_default=True, type=click.IntRange(1, 8),
              help="With --cpuid: the VM's vCPU count.")
@click.option("--vcpu", default=0, show_default=True, type=click.IntRange(0, 7),
              help="With --cpuid: which vCPU's table.")
def check(show_cpuid: bool, cpus: int, vcpu: int) -> None:
    """Report /dev/kvm, its API version, flavour and capabilities. Exit 0 if a VM can run."""
    from vmm.errors import VmmError
    from vmm.kvm.capabilities import CAPABILITIES, FIRMWARE, LINUX, SNAPSHOT
    from vmm.kvm.flavour import DESCRIPTIONS, Flavour, flavour_evidence
    from vmm.kvm.ioctl import lib
    from vmm.kvm.system import Kvm

    evidence = flavour_evidence()
    flavour = evidence.flavour
    if show_cpuid and vcpu >= cpus:
        raise click.UsageError(f"--vcpu {vcpu}: a {cpus}-vCPU guest has vCPUs 0-{cpus - 1}")
    click.echo(f"kvm: {flavour}  ({DESCRIPTIONS[flavour]})")
    click.echo(f"  modules: {', '.join(evidence.modules) or 'none'}; {evidence.why}")
    for reason in evidence.ruled_out:
        click.echo(f"  ruled out: {reason}")
    try:
        kvm = Kvm()
    except VmmError as e:
        click.echo(f"/dev/kvm: NOT USABLE: {e}")
        sys.exit(1)
    if show_cpuid:
        with kvm:
            _print_cpuid(kvm, flavour, cpus, vcpu)
        return
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
    if flavour is Flavour.PVM:
        click.echo("note: gdb on PVM: single-step and 4 debug-register breakpoints work; an int3 "
                   "in guest kernel code stops the emulator (software breakpoints use debug "
                   "registers) and it ignores data breakpoints (no hardware watchpoints; "
                   "docs/gdb.md)")
    if no_snapshots:
        click.echo(f"note: no snapshots on this host (missing {', '.join(no_snapshots)}): "
                   "vmm run boots every guest")
    if missing:
        click.echo(f"cannot run VMs: missing {', '.join(missing)} (a newer host kernel may have them)")
        sys.exit(1)
    click.echo("ready: this host can run vmm guests")


def _print_cpuid(kvm, flavour, cpus: int, vcpu: int) -> None:
    from vmm.arch.x86_64 import cpu, cpuid
    from vmm.kvm.flavour import Flavour

    model, table = cpu.guest_table(kvm, flavour, cpus, vcpu)
    click.echo(f"CPUID of vCPU {vcpu} of a {cpus}-vCPU guest: KVM_GET_SUPPORTED_CPUID with vmm's "
               f"changes (vmm/arch/x86_64/cpuid.py); TSC {model.tsc_khz or '?'} kHz, "
               f"TSC-deadline {'yes' if model.tsc_deadline else 'no'}")
    if flavour is Flavour.PVM:
        click.echo("note: on PVM the guest kernel reads this table (its cpuid runs in KVM's "
                   "emulator), user code the host's own CPUID; clearcpuid= hides what the emulator "
                   "cannot run")
    for line in cpuid.describe(table):
        click.echo(line)
    click.echo(f"{len(table.entries)} leaves, {len(table.changes)} changed by vmm")
