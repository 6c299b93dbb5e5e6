"""Build beekeeper's container image without Docker and without a registry, cached by content.

    beekeeper dev images build      # prints the OCI archives of the base and the project image

The base is `debootstrap --variant=minbase bookworm`, slimmed like debian:bookworm-slim and
packed as a one-layer OCI archive; it is seeded into buildah's storage under the name the
Dockerfile's FROM asks for, so the unchanged Dockerfile builds with `buildah bud --pull=never`
(and with `docker build` anywhere else). A container runtime imports the same archives
(`ctr -n k8s.io images import`).

Hermetic: TLS from inside an image build may be intercepted on the machines we target, so no
pip runs against the network inside the build. The wheels of the pinned dependency set
(constraints.txt) are built on the host and handed to the build in its context (`wheels/`);
the Dockerfile installs them with `--no-index` when they are there. apt inside RUN is plain HTTP
with signed indexes and stays.

Everything is keyed by content under ~/.cache/beekeeper/images: the base by its recipe, the
wheels by constraints.txt and pyproject.toml, the project image by every file of its build context.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beekeeper.devenv.paths import cache_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_REF = "docker.io/library/debian:bookworm-slim"
"""The name the Dockerfile's FROM resolves to; the base is stored and archived under it."""
PROJECT_REPOSITORY = "localhost/beekeeper"
KEEP_PROJECT_IMAGES = 3
"""Other worktrees share the cache: keep a few recent builds, not only ours."""

# What debian:bookworm-slim leaves out (its /etc/dpkg/dpkg.cfg.d/docker): later installs skip them too.
_DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""
_CLEAN = "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"
_APT_CLEAN = f"""\
DPkg::Post-Invoke {{ "{_CLEAN}"; }};
APT::Update::Post-Invoke {{ "{_CLEAN}"; }};
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
APT::Install-Recommends "false";
"""
_BASE_CONFIG = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["bash"]}
_SOURCES = f"""\
Types: deb
URIs: {MIRROR}
Suites: {SUITE} {SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: {SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
_SLIM_PATHS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists", "var/log")
_BASE_RECIPE = "\n".join(["debootstrap --variant=minbase", SUITE, MIRROR, _DPKG_EXCLUDES, _APT_CLEAN, _SOURCES, "v1"])

# The Dockerfile's build context: exactly what its COPY lines name (plus the host-built wheels).
CONTEXT_FILES = (
    "Dockerfile",
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "scripts/build_bpf.py",
    "README.md",
    "LICENSE",
    "constraints.txt",
)
CONTEXT_DIRS = ("beekeeper", "operator", "node_daemon", "crds", "bpf")

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """An image build step failed; the message names the step and its output."""


@dataclass(frozen=True)
class Images:
    """OCI archives (one image each, named by `*_ref`) ready for `ctr images import` or skopeo."""

    base: Path
    base_ref: str
    project: Path
    project_ref: str

    def __str__(self) -> str:
        return f"base {self.base_ref}: {self.base}\nproject {self.project_ref}: {self.project}"


def images_dir() -> Path:
    return cache_dir() / "images"


def build_all(progress: Progress = print) -> Images:
    """The base and the project image, built only when their inputs changed."""
    base = base_archive(progress)
    project, ref = project_archive(base, progress)
    return Images(base, BASE_REF, project, ref)


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def _run(argv: list[str], what: str, progress: Progress, **kwargs: Any) -> str:
    progress(f"[images] {what}: {' '.join(argv)}")
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}); last output:\n{tail}")
    return proc.stdout


def base_archive(progress: Progress = print) -> Path:
    """The debootstrapped base as an OCI archive, also seeded into buildah's storage as BASE_REF."""
    key = _digest([_BASE_RECIPE.encode()])[:16]
    archive = images_dir() / f"base-{SUITE}-{key}.oci.tar"
    if not archive.exists():
        started = time.monotonic()
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=archive.parent, prefix="base-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            _run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), MIRROR], "debootstrap", progress)
            _slim(rootfs)
            layer = Path(tmp) / "layer.tar"
            _run(
                ["tar", "--sort=name", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(layer), "."],
                "pack rootfs",
                progress,
            )
            partial = archive.with_suffix(".partial")
            write_oci_archive(layer, partial, BASE_REF, _BASE_CONFIG)
            partial.rename(archive)
        progress(f"[images] base image built in {time.monotonic() - started:.0f}s: {archive}")
    _seed_buildah(archive, BASE_REF, progress)
    return archive


def _slim(rootfs: Path) -> None:
    """What debian:bookworm-slim does to a minbase rootfs: no docs, man pages, locales, apt lists or logs."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text(_DPKG_EXCLUDES)
    (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(_APT_CLEAN)
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(_SOURCES)
    for rel in _SLIM_PATHS:
        path = rootfs / rel
        if path.is_dir():
            for child in path.iterdir():
                if rel == "usr/share/doc" and (child / "copyright").exists():
                    for entry in child.iterdir():
                        if entry.name != "copyright":
                            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                    continue
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for cache in (rootfs / "var/cache/apt").glob("*.bin"):
        cache.unlink()
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    # Machine identity must come from the runtime, not from the image.
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "etc/hostname").unlink(missing_ok=True)


def write_oci_archive(
    layer: Path,
    archive: Path,
    ref: str,
    config: dict,
    created_by: str = f"debootstrap --variant=minbase {SUITE} (beekeeper.devenv.images)",
) -> None:
    """A one-layer OCI image layout in a tar (`oci-archive:`), named `ref` for skopeo and containerd."""
    layer_digest = _file_sha256(layer)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created_by": created_by}],
    }
    config_blob = json.dumps(image_config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _descriptor("application/vnd.oci.image.config.v1+json", config_blob),
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": f"sha256:{layer_digest}",
                "size": layer.stat().st_size,
            }
        ],
    }
    manifest_blob = json.dumps(manifest, sort_keys=True).encode()
    tag = ref.rsplit(":", 1)[1]
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                **_descriptor("application/vnd.oci.image.manifest.v1+json", manifest_blob),
                # skopeo reads the tag, containerd's importer the full name.
                "annotations": {"org.opencontainers.image.ref.name": tag, "io.containerd.image.name": ref},
            }
        ],
    }
    with tarfile.open(archive, "w") as tar:
        _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(tar, "index.json", json.dumps(index, sort_keys=True).encode())
        _add_bytes(tar, f"blobs/sha256/{hashlib.sha256(config_blob).hexdigest()}", config_blob)
        _add_bytes(tar, f"blobs/sha256/{hashlib.sha256(manifest_blob).hexdigest()}", manifest_blob)
        tar.add(layer, arcname=f"blobs/sha256/{layer_digest}")


def _descriptor(media_type: str, blob: bytes) -> dict:
    return {"mediaType": media_type, "digest": f"sha256:{hashlib.sha256(blob).hexdigest()}", "size": len(blob)}


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _buildah_image_id(ref: str) -> str | None:
    proc = subprocess.run(
        ["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", ref], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def _archive_config_digest(archive: Path) -> str:
    """The image id (config digest) of a one-image OCI archive."""
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{manifest_digest}"))  # type: ignore[arg-type]
    return manifest["config"]["digest"].split(":", 1)[1]


def _seed_buildah(archive: Path, ref: str, progress: Progress) -> None:
    """Put the archive into buildah's storage as `ref`, unless that exact image is already there."""
    if _buildah_image_id(ref) == _archive_config_digest(archive):
        return
    _run(["skopeo", "copy", "--quiet", f"oci-archive:{archive}", f"containers-storage:{ref}"], "seed buildah", progress)


def wheels(progress: Progress = print) -> Path:
    """The wheels of the pinned dependency set for this Python, built on the host (pip here trusts its network)."""
    constraints = (REPO_ROOT / "constraints.txt").read_bytes()
    key = _digest([constraints, (REPO_ROOT / "pyproject.toml").read_bytes(), sys.version.encode()])[:16]
    out = cache_dir() / "wheels" / key
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(tmp),
            "-c",
            str(REPO_ROOT / "constraints.txt"),
            str(REPO_ROOT),
            "setuptools",
        ],
        "build wheels",
        progress,
    )
    for own in tmp.glob("beekeeper-*.whl"):  # the image builds beekeeper from its own context
        own.unlink()
    tmp.rename(out)
    return out


def context_files() -> list[Path]:
    """Every file the Dockerfile copies, relative to the repository root, in a stable order."""
    files = [Path(name) for name in CONTEXT_FILES]
    for top in CONTEXT_DIRS:
        for path in sorted((REPO_ROOT / top).rglob("*")):
            rel = path.relative_to(REPO_ROOT)
            # build products stay out: the image builds its own (bpf/*.o in its build stage)
            if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in (".pyc", ".o", ".partial"):
                files.append(rel)
    return files


def project_archive(base: Path, progress: Progress = print) -> tuple[Path, str]:
    """Build the Dockerfile with buildah (if any input changed) and export it as an OCI archive."""
    wheel_dir = wheels(progress)
    files = context_files()
    key = _digest(
        [base.name.encode(), wheel_dir.name.encode()]
        + [str(rel).encode() + b"\0" + (REPO_ROOT / rel).read_bytes() for rel in files]
    )[:16]
    ref = f"{PROJECT_REPOSITORY}:{key}"
    archive = images_dir() / f"beekeeper-{key}.oci.tar"
    if archive.exists():
        return archive, ref
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=images_dir(), prefix="context-") as tmp:
        context = Path(tmp)
        for rel in files:
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, context / rel)
        shutil.copytree(wheel_dir, context / "wheels")
        # --network host: RUN apt-get needs the network and buildah has no CNI set up here.
        # --layers: the apt steps stay cached when only beekeeper's sources change.
        _run(
            [
                "buildah",
                "bud",
                "--pull=never",
                "--layers",
                "--network",
                "host",
                "--build-arg",
                f"REVISION={key}",
                "-t",
                ref,
                "-f",
                str(context / "Dockerfile"),
                str(context),
            ],
            "buildah bud",
            progress,
        )
        partial = archive.with_suffix(".partial")
        _run(["buildah", "push", "--quiet", ref, f"oci-archive:{partial}:{ref}"], "export image", progress)
        partial.rename(archive)
    progress(f"[images] project image {ref} built in {time.monotonic() - started:.0f}s ({image_size(ref)})")
    _prune(keep=KEEP_PROJECT_IMAGES, progress=progress)
    return archive, ref


def _prune(keep: int, progress: Progress) -> None:
    """Drop all but the newest `keep` project images (archives and buildah tags): each is ~0.5 GB."""
    archives = sorted(images_dir().glob("beekeeper-*.oci.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[keep:]:
        key = old.name.removeprefix("beekeeper-").removesuffix(".oci.tar")
        old.unlink(missing_ok=True)
        subprocess.run(["buildah", "rmi", f"{PROJECT_REPOSITORY}:{key}"], capture_output=True)
        progress(f"[images] pruned {PROJECT_REPOSITORY}:{key}")


def image_size(ref: str) -> str:
    """buildah's idea of the image's size, as humans read it."""
    out = subprocess.run(["buildah", "images", "--format", "{{.Size}}", ref], capture_output=True, text=True)
    return out.stdout.strip() or "unknown size"


if __name__ == "__main__":
    print(build_all(lambda msg: print(msg, file=sys.stderr, flush=True)))
