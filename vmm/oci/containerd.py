"""A containerd of our own, for tests and benchmarks: its own root, state and socket.

Nothing is shared with a system containerd (if there is one): the daemon runs
from a private config in a work directory, without its CRI plugin, and stops
with :meth:`PrivateContainerd.stop`. ``image_from_busybox`` gives it a busybox
image without a registry (vmm/oci/imagelayout.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from vmm.errors import VmmError

BUSYBOX_IMAGE = "docker.io/library/vmmbox:latest"
APPLETS = ("sh echo cat hostname id pwd env ls sleep mount sort grep head true false "
           "uname").split()


def runtime_binary() -> Path:
    """The vmm-runtime console script beside this Python (what --runc-binary is given)."""
    return Path(sys.executable).with_name("vmm-runtime")


class PrivateContainerd:
    def __init__(self, work: Path) -> None:
        self.work = Path(work)
        self.socket = self.work / "containerd.sock"
        self.daemon: subprocess.Popen | None = None

    @property
    def ctr(self) -> list[str]:
        return ["ctr", "--address", str(self.socket)]

    def start(self, timeout: float = 30) -> None:
        missing = [t for t in ("containerd", "ctr", "containerd-shim-runc-v2") if not shutil.which(t)]
        if missing:
            raise VmmError(f"{', '.join(missing)} not found: apt-get install containerd")
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.work / "config.toml"
        config.write_text(f"""version = 2
root = "{self.work}/root"
state = "{self.work}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
""")
        with open(self.work / "containerd.log", "wb") as log:
            self.daemon = subprocess.Popen(["containerd", "--config", str(config)], stdout=log,
                                           stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise VmmError(f"containerd did not start: see {self.work / 'containerd.log'}")
            time.sleep(0.05)

    def import_image(self, archive: Path) -> None:
        result = subprocess.run([*self.ctr, "images", "import", str(archive)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise VmmError(f"ctr images import {archive}: {result.stderr.strip()}")

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None


def image_from_busybox(work: Path, name: str = BUSYBOX_IMAGE) -> Path:
    """An OCI archive of a busybox image (our static busybox and a few applet links)."""
    from vmm.images.initramfs import busybox_root
    from vmm.oci.imagelayout import write_image_archive

    root = busybox_root(Path(work) / "image-root", APPLETS)
    archive = Path(work) / "image.tar"
    write_image_archive(root, name, archive)
    return archive
