"""Build the OCI registry and cosign the bytecode-image tests use, from the Go module proxy.

The tests pull BpfProgram images from a real registry (the CNCF distribution registry, what
Docker Hub and most self-hosted registries run) and sign them with the real cosign, so what the
node daemon and the operator parse is what they meet on a cluster. Neither is packaged in
Debian 12; both are compiled at pinned versions and cached like the control plane.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from beekeeper.devenv.build import go_install
from beekeeper.devenv.images import Progress
from beekeeper.devenv.paths import cache_dir

REGISTRY_VERSION = "v3.1.2"
"""github.com/distribution/distribution/v3, the registry behind `registry:3` images."""
COSIGN_VERSION = "v2.6.5"


@dataclass(frozen=True)
class OciTools:
    registry: Path
    cosign: Path


def tools() -> OciTools:
    """Where the pinned binaries live (whether or not they are built yet)."""
    bins = cache_dir() / "bin"
    return OciTools(bins / f"registry-{REGISTRY_VERSION}" / "registry", bins / f"cosign-{COSIGN_VERSION}" / "cosign")


def ensure_registry(progress: Progress = print) -> Path:
    """Build the registry once (about a minute cold on 2 cores); cached afterwards."""
    path = tools().registry
    if not path.exists():
        ldflags = f"-s -w -X github.com/distribution/distribution/v3/version.version={REGISTRY_VERSION}"
        go_install("github.com/distribution/distribution/v3/cmd/registry", REGISTRY_VERSION, ldflags, path, progress)
    return path


def ensure_cosign(progress: Progress = print) -> Path:
    """Build cosign once (several minutes cold: it links every cloud KMS client); cached afterwards."""
    path = tools().cosign
    if not path.exists():
        ldflags = f"-s -w -X sigs.k8s.io/release-utils/version.gitVersion={COSIGN_VERSION}"
        go_install("github.com/sigstore/cosign/v2/cmd/cosign", COSIGN_VERSION, ldflags, path, progress)
    return path


if __name__ == "__main__":
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    print(ensure_registry(progress), ensure_cosign(progress))
