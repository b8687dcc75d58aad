"""Where a folder of non-Python sources shipped with vmm lives.

firmware/ and guest-kernel/ are package data of an installed vmm
(``vmm.firmware_src``, ``vmm.guest_kernel``); in a source checkout they sit at
the top of the tree. Both lookups go through :func:`source_folder`.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def source_folder(package: str, marker: str, checkout_folder: str) -> Path:
    """The installed ``package``'s folder if it is on disk and holds ``marker``,
    else ``checkout_folder`` at the top of the source tree."""
    # Where setuptools puts package data of ``vmm.X``: vmm/X/ beside this file.
    # (Path arithmetic, not importlib.resources: importing that costs ~6 ms of
    # every `vmm run`, which asks for the kernel's folder.)
    installed = Path(__file__).resolve().parent.joinpath(*package.split(".")[1:])
    if (installed / marker).is_file():
        return installed
    return REPO_ROOT / checkout_folder
