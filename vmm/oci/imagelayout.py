"""An OCI image archive from a directory: what `ctr images import` takes.

The OCI image layout (opencontainers/image-spec, image-layout.md) is a tar of:

    oci-layout            {"imageLayoutVersion": "1.0.0"}
    index.json            the entry point: one manifest, named by annotation
    blobs/sha256/<digest> the manifest, the image config, one uncompressed layer

Every blob is addressed by the SHA-256 of its bytes. The tests and benchmarks
use it to give containerd a busybox image without a registry; the layer is
made deterministic (fixed times and owners) so the same tree gives the same
image.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"


def _layer(root: Path) -> bytes:
    """An uncompressed tar of ``root``'s contents, deterministic."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.mtime = 0
            info.uname = info.gname = ""
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buffer.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes, media_type: str) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def write_image_archive(root: Path, name: str, output: Path, *, cmd: list[str] | None = None,
                        env: list[str] | None = None) -> str:
    """Write the archive of an image named ``name`` whose one layer is ``root``; its manifest digest."""
    layer = _layer(root)
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": cmd or ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}"]},
    }
    with tarfile.open(output, "w") as tar:
        config_desc = _blob(tar, json.dumps(config).encode(), MEDIA_CONFIG)
        layer_desc = _blob(tar, layer, MEDIA_LAYER)
        manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config_desc,
                    "layers": [layer_desc]}
        manifest_desc = _blob(tar, json.dumps(manifest).encode(), MEDIA_MANIFEST)
        manifest_desc["annotations"] = {"io.containerd.image.name": name,
                                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [manifest_desc]}
        for member, data in (("oci-layout", {"imageLayoutVersion": "1.0.0"}), ("index.json", index)):
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(member)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return manifest_desc["digest"]
