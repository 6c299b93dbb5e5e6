"""A real OCI registry for the tests: the CNCF distribution registry over TLS, images pushed by buildah.

Images are built the way bpfman's docs build bytecode images (its Containerfile.bytecode:
`FROM scratch`, the labels from build args, `COPY` of the object), with buildah in a private
storage root, and pushed with `buildah push`. Signatures come from the real cosign.
The registry's access log counts what clients fetched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from beekeeper.devenv import certs, processes
from beekeeper.devenv.oci_tools import ensure_cosign, ensure_registry

BYTECODE_CONTAINERFILE = """\
FROM scratch

ARG BYTECODE_FILE
ARG PROGRAMS
ARG MAPS

LABEL "io.ebpf.programs"=$PROGRAMS
LABEL "io.ebpf.maps"=$MAPS

COPY  $BYTECODE_FILE /
"""
"""bpfman's Containerfile.bytecode, as its `bpfman image build` and docs use it."""

COSIGN_PASSWORD = "beekeeper-test"

_CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {host}:{port}
  tls:
    certificate: {cert}
    key: {key}
"""


@dataclass
class Registry:
    """One registry process; several may serve one storage directory (one per listening address)."""

    dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    pid: int | None = None
    ca: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        pki = certs.ensure_pki(self.dir / "pki")
        self.ca = pki.ca_cert
        self._cert, self._key = certs.ensure_serving_cert(pki, "registry", ["127.0.0.1", "localhost", "10.243.0.1"])
        self.port = self.port or processes.free_port()
        (self.dir / "certs.d").mkdir(exist_ok=True)
        shutil.copy(self.ca, self.dir / "certs.d" / "ca.crt")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / f"registry-{self.host}-{self.port}.log"

    def start(self) -> Registry:
        config = self.dir / f"config-{self.host}-{self.port}.yml"
        config.write_text(
            _CONFIG.format(storage=self.dir / "storage", host=self.host, port=self.port, cert=self._cert, key=self._key)
        )
        self.pid = processes.spawn([str(ensure_registry(lambda _: None)), "serve", str(config)], self.log)
        processes.wait_until(self._answers, "registry", 30, self.pid, self.log)
        return self

    def stop(self) -> None:
        processes.stop(self.pid)
        self.pid = None

    def _answers(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(f"https://{self.address}/v2/", timeout=2, context=context) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def fetches(self, repository: str, kind: str = "blobs") -> int:
        """GET requests the registry served for repository's blobs or manifests (from its access log)."""
        pattern = re.compile(rf'"GET /v2/{re.escape(repository)}/{kind}/[^ ]+ HTTP/[0-9.]+" 200 ')
        return sum(1 for line in self.log.read_text(errors="replace").splitlines() if pattern.search(line))


@dataclass
class ImageBuilder:
    """buildah with its own storage under dir; pushes to a Registry."""

    dir: Path
    registry: Registry

    def _buildah(self, *args: str) -> str:
        root = ["--root", str(self.dir / "storage"), "--runroot", str(self.dir / "run")]
        proc = subprocess.run(["buildah", *root, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"buildah {' '.join(args)} failed: {proc.stderr[-2000:]}")
        return proc.stdout

    def build_and_push(
        self, repository: str, tag: str, obj: Path, programs: dict[str, str], maps: dict[str, str]
    ) -> str:
        """Build a bytecode image like bpfman's docs, push it as repository:tag; returns the pushed digest."""
        context = self.dir / "context" / f"{repository.replace('/', '_')}-{tag}"
        shutil.rmtree(context, ignore_errors=True)
        context.mkdir(parents=True)
        shutil.copy(obj, context / obj.name)
        (context / "Containerfile.bytecode").write_text(BYTECODE_CONTAINERFILE)
        local = f"localhost/{repository}:{tag}"
        self._buildah(
            "build",
            "--pull=never",
            "--quiet",
            "-f",
            str(context / "Containerfile.bytecode"),
            "--build-arg",
            f"BYTECODE_FILE={obj.name}",
            "--build-arg",
            f"PROGRAMS={json.dumps(programs, separators=(',', ':'))}",
            "--build-arg",
            f"MAPS={json.dumps(maps, separators=(',', ':'))}",
            "-t",
            local,
            str(context),
        )
        digest_file = context / "digest"
        self._buildah(
            "push",
            "--quiet",
            "--cert-dir",
            str(self.registry.dir / "certs.d"),
            "--digestfile",
            str(digest_file),
            local,
            f"docker://{self.registry.address}/{repository}:{tag}",
        )
        return digest_file.read_text().strip()

    def close(self) -> None:
        subprocess.run(
            ["buildah", "--root", str(self.dir / "storage"), "--runroot", str(self.dir / "run"), "rmi", "--all", "-f"],
            capture_output=True,
        )
        subprocess.run(["umount", "-R", str(self.dir / "storage")], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Cosign:
    """The real cosign with one key pair (cosign.key encrypted with COSIGN_PASSWORD, cosign.pub in PEM)."""

    dir: Path
    registry: Registry

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = ensure_cosign(lambda _: None)
        if not (self.dir / "cosign.pub").exists():
            self._run("generate-key-pair")

    @property
    def public_key(self) -> Path:
        return self.dir / "cosign.pub"

    def _run(self, *args: str) -> str:
        env = {**os.environ, "COSIGN_PASSWORD": COSIGN_PASSWORD, "SSL_CERT_FILE": str(self.registry.ca)}
        env["HOME"] = str(self.dir)  # cosign keeps a TUF cache under $HOME; keep it in the test's directory
        proc = subprocess.run(
            [str(self.binary), *args], cwd=self.dir, env=env, capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"cosign {' '.join(args)} failed: {proc.stderr[-2000:]}")
        return proc.stdout

    def sign(self, image: str) -> None:
        """Key-based signature, kept off the public transparency log (tests have no network)."""
        self._run("sign", "--key", str(self.dir / "cosign.key"), "--tlog-upload=false", "--yes", image)


@dataclass
class OciRig:
    """What the tests' session fixture hands out; cosign is built on first use (minutes, once)."""

    registry: Registry
    builder: ImageBuilder
    cosign_dir: Path

    @cached_property
    def cosign(self) -> Cosign:
        return Cosign(self.cosign_dir, self.registry)
