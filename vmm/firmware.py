"""Find or build vmm's own firmware payloads (the tiny guests in ``firmware/``).

A firmware image is a flat binary of at most 64 KiB that the VMM loads so that
it ends at 1 MiB; the vCPU starts at the reset vector F000:FFF0 in real mode
(see ``layout.py`` "Firmware" and ``firmware/README.md``).

``firmware_path(name_or_path)`` accepts either a path to a raw image the user
built (returned as is) or the name of a built-in payload (``hello``,
``longmode``, ...: the ``firmware/*.S`` files).  Built-ins are assembled with
GNU binutils (``as``, ``ld``, ``objcopy``) on first use and cached under::

    ${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/vmm}/firmware/<key>/<name>.bin

where ``<key>`` is the first 16 hex digits of the SHA-256 of the source, the
files it includes, the linker script and the build recipe: editing any of them
builds a fresh image, and a cached image is found without running anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from vmm.arch.x86_64 import layout
from vmm.cache import cache_dir
from vmm.errors import GuestBuildError, LoaderError
from vmm.package_data import source_folder

#: The package that ships ``firmware/`` when vmm is installed (setuptools
#: package data); in a source checkout we use the folder itself.
SOURCE_PACKAGE = "vmm.firmware_src"

LINKER_SCRIPT = "firmware.ld"

# The build recipe.  It is part of the cache key: change anything here (or bump
# RECIPE_VERSION) and every payload is rebuilt.  {src}, {obj}, {elf}, {bin},
# {dir} and {ld_script} are filled in by _build().
RECIPE_VERSION = 2  # 2: the ELF is kept beside the image (symbols for GDB)
RECIPE: tuple[tuple[str, ...], ...] = (
    # Assemble.  --64: an x86-64 object; the sources switch to 16/32-bit code
    # themselves with .code16/.code32.  -I: where `.include "layout.inc"` looks.
    ("as", "--64", "--fatal-warnings", "-I", "{dir}", "-o", "{obj}", "{src}"),
    # Link at offsets within segment 0xF000, ending at 0x10000 (firmware.ld).
    ("ld", "-m", "elf_x86_64", "-T", "{ld_script}", "-o", "{elf}", "{obj}"),
    # Flatten to the raw bytes from the first to the last address; fill the
    # few bytes between the code and the reset stub with `hlt` (0xF4).
    ("objcopy", "-O", "binary", "--gap-fill=0xf4", "{elf}", "{bin}"),
)

#: First bytes of the reset stub (the image's last 16 bytes) we accept:
#: jmp ptr16:16 (EA), jmp rel16 (E9), jmp rel8 (EB).
JUMP_OPCODES = frozenset({0xEA, 0xE9, 0xEB})
RESET_STUB_SIZE = 0x10000 - layout.RESET_IP  # 16 bytes, F000:FFF0..FFFF


def source_dir() -> Path:
    """The folder holding the firmware sources (``*.S``, ``*.inc``, ``firmware.ld``)."""
    return source_folder(SOURCE_PACKAGE, LINKER_SCRIPT, "firmware")


def available_firmware() -> list[str]:
    """Names of the built-in payloads, sorted: the stems of ``firmware/*.S``."""
    directory = source_dir()
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.S") if p.is_file())


def firmware_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Path of a firmware image: a user-supplied file, or a built (cached) built-in.

    Raises LoaderError for a name that is neither an existing file nor a
    built-in payload, and GuestBuildError when a built-in fails to build.
    """
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    name = str(name_or_path)
    builtins = available_firmware()
    if candidate.is_dir() and name not in builtins:
        raise LoaderError(f"{candidate}: is a directory, not a firmware image")
    if name not in builtins:
        listed = ", ".join(builtins) if builtins else "none found"
        raise LoaderError(
            f"{name}: no such firmware file or built-in payload (built-ins: {listed})"
        )
    directory = source_dir()
    source = directory / f"{name}.S"
    target = cache_dir() / "firmware" / _cache_key(directory, source) / f"{name}.bin"
    if target.is_file():  # the fast path: no subprocess, no write
        return target
    _build(name, directory, source, target)
    return target


def _cache_key(directory: Path, source: Path) -> str:
    """First 16 hex digits of SHA-256(recipe, source, includes, linker script)."""
    digest = hashlib.sha256()
    digest.update(f"vmm-firmware-recipe-{RECIPE_VERSION}\0".encode())
    for step in RECIPE:
        digest.update("\0".join(step).encode() + b"\n")
    inputs = [source, directory / LINKER_SCRIPT, *sorted(directory.glob("*.inc"))]
    for path in inputs:
        digest.update(f"\0{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _first_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:  # as: "x.S:3: Error: ...", ld: "ld: x.o: error: ..."
        if re.search(r"\berror:", line, re.IGNORECASE):
            return line
    for line in lines:
        if not line.endswith("Assembler messages:"):
            return line
    return "no diagnostic output"


def _build(name: str, directory: Path, source: Path, target: Path) -> None:
    """Run RECIPE in a private temp dir next to target, then rename into place.

    The final os.replace is atomic, so concurrent builds of the same payload are
    safe: each writes its own temp dir and the last rename wins (same bytes).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        fields = {
            "src": str(source),
            "dir": str(directory),
            "ld_script": str(directory / LINKER_SCRIPT),
            "obj": str(work / f"{name}.o"),
            "elf": str(work / f"{name}.elf"),
            "bin": str(work / f"{name}.bin"),
        }
        for step in RECIPE:
            argv = [arg.format(**fields) for arg in step]
            try:
                result = subprocess.run(argv, capture_output=True, text=True, check=False)
            except FileNotFoundError:
                raise GuestBuildError(
                    f"firmware {name}: {argv[0]} not found: building firmware needs "
                    "GNU binutils (as, ld, objcopy)"
                ) from None
            if result.returncode != 0:
                detail = _first_error_line(result.stderr + result.stdout)
                raise GuestBuildError(f"firmware {name}: {argv[0]} failed: {detail}")
        built = Path(fields["bin"])
        _check_image(name, built.read_bytes())
        # The ELF first: an image in the cache always has its symbols beside it.
        os.replace(fields["elf"], target.with_suffix(".elf"))
        os.replace(built, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_image(name: str, image: bytes) -> None:
    if not image:
        raise GuestBuildError(f"firmware {name}: the build produced an empty image")
    if len(image) > layout.FIRMWARE_MAX_SIZE:
        raise GuestBuildError(
            f"firmware {name}: image is {len(image)} bytes, "
            f"more than {layout.FIRMWARE_MAX_SIZE} (FIRMWARE_MAX_SIZE)"
        )
    if len(image) < RESET_STUB_SIZE or image[-RESET_STUB_SIZE] not in JUMP_OPCODES:
        raise GuestBuildError(
            f"firmware {name}: the last {RESET_STUB_SIZE} bytes (the reset vector) "
            "do not start with a jump"
        )
