"""The real-node rig's own images, built here without a registry: the CRI sandbox and test pods.

Both are one static Go binary (testpod/main.go) in a single-layer OCI image, so containerd
gets a "pause" image and the tests get frontend/backend pods that serve and probe TCP without
pulling anything. The archive is cached per source digest and imported with `ctr images import`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from beekeeper.devenv.build import BuildError
from beekeeper.devenv.paths import cache_dir

SOURCE = Path(__file__).with_name("testpod")
PAUSE_IMAGE = "beekeeper.local/pause:1"
TESTPOD_IMAGE = "beekeeper.local/testpod:1"


@dataclass(frozen=True)
class ImageSpec:
    """One image of the archive: its reference and what its container runs."""

    ref: str
    entrypoint: list[str]


IMAGES = (ImageSpec(PAUSE_IMAGE, ["/testpod", "pause"]), ImageSpec(TESTPOD_IMAGE, ["/testpod"]))


def ensure_archive(progress=print) -> Path:
    """Build the testpod binary and the OCI archive holding both images, once per source version."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(SOURCE.iterdir()))).hexdigest()[:16]
    archive = cache_dir() / "images" / f"testpod-{digest}.oci.tar"
    if archive.exists():
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    binary = archive.with_suffix(".bin")
    progress("[images] building the static testpod binary (pause + test pods)")
    built = subprocess.run(
        ["go", "build", "-C", str(SOURCE), "-trimpath", "-ldflags=-s -w", "-o", str(binary), "."],
        env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": ""},
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise BuildError(f"building {SOURCE} failed:\n{built.stderr}")
    tmp = archive.with_suffix(".tmp")
    tmp.write_bytes(oci_archive(binary.read_bytes(), IMAGES))
    tmp.rename(archive)
    binary.unlink()
    return archive


def _layer(binary: bytes) -> bytes:
    """An uncompressed layer with /testpod only; fixed metadata so the digest is reproducible."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("testpod")
        info.size, info.mode, info.mtime = len(binary), 0o755, 0
        tar.addfile(info, io.BytesIO(binary))
    return out.getvalue()


def oci_archive(binary: bytes, images: tuple[ImageSpec, ...]) -> bytes:
    """An OCI image-layout tarball with one manifest per image, all sharing the one layer."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer = _layer(binary)
    layer_desc = blob(layer, "application/vnd.oci.image.layer.v1.tar")
    manifests = []
    for image in images:
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": image.entrypoint, "Env": ["PATH=/"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": blob(_json(config), "application/vnd.oci.image.config.v1+json"),
            "layers": [layer_desc],
        }
        desc = blob(_json(manifest), "application/vnd.oci.image.manifest.v1+json")
        desc["annotations"] = {
            "io.containerd.image.name": image.ref,
            "org.opencontainers.image.ref.name": image.ref.rsplit(":", 1)[1],
        }
        desc["platform"] = {"architecture": "amd64", "os": "linux"}
        manifests.append(desc)
    files = {
        "oci-layout": _json({"imageLayoutVersion": "1.0.0"}),
        "index.json": _json({"schemaVersion": 2, "manifests": manifests}),
        **{f"blobs/sha256/{digest.split(':')[1]}": data for digest, data in blobs.items()},
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
