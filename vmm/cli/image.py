"""`vmm image`: build the default guest's userspace images."""

from __future__ import annotations

import click


@click.group()
def image() -> None:
    """Guest images: the default initramfs, an ext4 root file system, firmware payloads."""


@image.command()
@click.argument("output", required=False, type=click.Path(dir_okay=False))
def initramfs(output: str | None) -> None:
    """Build the default initramfs (busybox + our /init); copy it to OUTPUT if given."""
    import os
    import shutil
    from pathlib import Path

    from vmm.images.initramfs import default_initramfs

    path = default_initramfs(lambda line: click.echo(line, err=True))
    if output:
        shutil.copyfile(path, output)
        path = Path(output)
    size = os.path.getsize(path)
    click.echo(f"{path} ({size / 1e6:.1f} MB, uncompressed newc cpio)")


@image.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--size", default="64M", show_default=True, help="Image size (e.g. 64M, 1G).")
def rootfs(output: str, size: str) -> None:
    """Build an ext4 root file system with the default guest userspace.

    Boot with it: vmm run --disk OUTPUT --root /dev/vda -- CMD
    """
    from pathlib import Path

    from vmm.config import parse_size
    from vmm.images.rootfs import build_rootfs

    build_rootfs(Path(output), parse_size(size, "--size"), lambda line: click.echo(line, err=True))
    click.echo(f"{output} ({size}, ext4)")


@image.command()
@click.argument("name", default="longmode")
def firmware(name: str) -> None:
    """Build a firmware payload (or reuse it) and print its image and its symbols (ELF).

    For GDB: add-symbol-file ELF -o 0xf0000 (the payload runs in segment F000).
    """
    from vmm.arch.x86_64 import layout
    from vmm.firmware import firmware_path

    path = firmware_path(name)
    click.echo(f"image:   {path}")
    symbols = path.with_suffix(".elf")
    if symbols.is_file():
        click.echo(f"symbols: {symbols}")
        click.echo(f"gdb:     add-symbol-file {symbols} -o {layout.RESET_CS_BASE:#x}")


@image.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--size", default="2G", show_default=True, help="Disk image size (e.g. 2G).")
@click.option("--autologin", is_flag=True,
              help="Log root in on the serial console without a password.")
def debian(output: str, size: str, autologin: bool) -> None:
    """A Debian 12 root disk with Debian's own kernel, initramfs and systemd.

    Bootstrapped by mmdebstrap on first use (cached in ~/.cache/vmm/debian); prints
    the kernel, the initramfs and the `vmm run` line that boots them (as root).
    """
    from pathlib import Path

    from vmm.config import parse_size
    from vmm.images.debian import AUTOLOGIN, boot_command, debian_disk, debian_system

    system = debian_system(lambda line: click.echo(f"vmm: {line}", err=True))
    disk = debian_disk(system, Path(output), parse_size(size, "--size"),
                       AUTOLOGIN if autologin else None)
    click.echo(f"root:    {disk} ({size}, ext4)")
    click.echo(f"kernel:  {system.kernel}")
    click.echo(f"initrd:  {system.initrd}")
    click.echo(f"boot:    {boot_command(system, disk)}")
