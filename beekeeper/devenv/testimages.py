"""The real-node rig's own images, built here without a registry: the CRI sandbox and test pods.

Both are one static Go binary (testpod/main.go) in a single-layer OCI image, so containerd
gets a "pause" image and the tests get frontend/backend pods that serve and probe TCP without
pulling anything. The archives are cached per source digest and imported with `ctr images import`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from beekeeper.devenv.build import BuildError
from beekeeper.devenv.images import Progress, write_oci_archive
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


def ensure_archives(progress: Progress = print) -> list[Path]:
    """Build the testpod binary and one OCI archive per image, once per source version."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(SOURCE.iterdir()))).hexdigest()[:16]
    out = cache_dir() / "images" / f"testpod-{digest}"
    archives = [out / f"{image.ref.split('/')[1].replace(':', '-')}.oci.tar" for image in IMAGES]
    if all(a.exists() for a in archives):
        return archives
    progress("[images] building the static testpod binary (pause + test pods)")
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "rootfs").mkdir(parents=True)
    built = subprocess.run(
        ["go", "build", "-C", str(SOURCE), "-trimpath", "-ldflags=-s -w", "-o", str(tmp / "rootfs" / "testpod"), "."],
        env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": ""},
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise BuildError(f"building {SOURCE} failed:\n{built.stderr}")
    layer = tmp / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tmp / "rootfs" / "testpod", arcname="testpod", filter=_reproducible)
    for image, archive in zip(IMAGES, archives, strict=True):
        config = {"Entrypoint": image.entrypoint, "Env": ["PATH=/"]}
        write_oci_archive(
            layer, tmp / archive.name, image.ref, config, created_by="testpod (beekeeper.devenv.testimages)"
        )
    shutil.rmtree(tmp / "rootfs")
    layer.unlink()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return archives


def _reproducible(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info
