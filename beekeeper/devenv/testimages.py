"""The real-node rig's own images, built here without a registry: the CRI sandbox and test pods.

Both are one static Go binary (testpod/main.go) in a single-layer OCI image, so containerd
gets a "pause" image and the tests get frontend/backend pods that serve and probe TCP without
pulling anything. The layer also carries a shell and a few coreutils (SHELL_TOOLS, copied from
the host with the shared libraries they load) so the runtime-security tests have a real
/bin/sh to block, found through PATH, a symlink or a copy. The archives are cached per digest
of the sources and of those host files, and imported with `ctr images import`.
"""

from __future__ import annotations

import hashlib
import os
import re
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
SHELL_TOOLS = ("dash", "id", "cp", "ln", "cat", "true")
"""Host programs copied to /bin of the image; /bin/sh links to dash."""
IMAGE_PATH = "/:/bin"


def shell_files() -> dict[str, Path]:
    """Path in the image -> host file: SHELL_TOOLS in /bin and every library `ldd` says they load."""
    files: dict[str, Path] = {}
    for tool in SHELL_TOOLS:
        found = shutil.which(tool, path="/usr/bin:/bin")
        if found is None:
            raise BuildError(f"the testpod image needs {tool} from the host (coreutils, dash)")
        files[f"bin/{tool}"] = Path(found).resolve()
        ldd = subprocess.run(["ldd", found], capture_output=True, text=True, check=True).stdout
        for library in re.findall(r"(/\S+) \(0x", ldd):
            files[library.lstrip("/")] = Path(library).resolve()
    return files


def ensure_archives(progress: Progress = print) -> list[Path]:
    """Build the testpod binary and one OCI archive per image, once per source version."""
    extra = shell_files()
    inputs = [p.read_bytes() for p in sorted(SOURCE.iterdir())]
    inputs += [name.encode() + host.read_bytes() for name, host in sorted(extra.items())]
    digest = hashlib.sha256(b"".join(inputs)).hexdigest()[:16]
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
        _add_shell(tar, extra)
    for image, archive in zip(IMAGES, archives, strict=True):
        config = {"Entrypoint": image.entrypoint, "Env": [f"PATH={IMAGE_PATH}"]}
        write_oci_archive(
            layer, tmp / archive.name, image.ref, config, created_by="testpod (beekeeper.devenv.testimages)"
        )
    shutil.rmtree(tmp / "rootfs")
    layer.unlink()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return archives


def _add_shell(tar: tarfile.TarFile, files: dict[str, Path]) -> None:
    """The shell tools with their parent directories, /bin/sh -> dash, and an empty /tmp (mode 1777)."""
    directories = sorted({str(parent) for name in files for parent in Path(name).parents if str(parent) != "."})
    for directory in [*directories, "tmp"]:
        info = _reproducible(tarfile.TarInfo(directory))
        info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
        tar.addfile(info)
    for name, host in sorted(files.items()):
        tar.add(host, arcname=name, filter=_reproducible)
    link = _reproducible(tarfile.TarInfo("bin/sh"))
    link.type, link.linkname = tarfile.SYMTYPE, "dash"
    tar.addfile(link)


def _reproducible(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info
