"""Build helm and kubeconform, the tools that lint, render and validate the chart, from the Go module proxy.

Neither is packaged in Debian 12, and the machines we target download no prebuilt binaries,
so both are compiled at pinned versions and cached like the control plane: minutes once,
nothing afterwards.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from beekeeper.devenv.build import go_install
from beekeeper.devenv.images import Progress
from beekeeper.devenv.paths import cache_dir

HELM_VERSION = "v3.22.0"
HELM_KUBE_VERSION = (1, 37)
"""What helm's own Makefile stamps in: the Kubernetes version of its client-go (v0.37), the default
of `helm template` and `helm lint` (unstamped it is 1.20, below the chart's kubeVersion)."""
KUBECONFORM_VERSION = "v0.7.0"


@dataclass(frozen=True)
class ChartTools:
    helm: Path
    kubeconform: Path


def tools() -> ChartTools:
    """Where the pinned binaries live (whether or not they are built yet)."""
    bins = cache_dir() / "bin"
    return ChartTools(
        bins / f"helm-{HELM_VERSION}" / "helm", bins / f"kubeconform-{KUBECONFORM_VERSION}" / "kubeconform"
    )


def ensure_chart_tools(progress: Progress = print) -> ChartTools:
    """Build whichever pinned tool is missing; cheap when both are cached."""
    paths = tools()
    if not paths.helm.exists():
        major, minor = HELM_KUBE_VERSION
        stamps = [f"helm.sh/helm/v3/internal/version.version={HELM_VERSION}"]
        for pkg in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
            stamps += [f"{pkg}.k8sVersionMajor={major}", f"{pkg}.k8sVersionMinor={minor}"]
        ldflags = " ".join(["-s", "-w", *(f"-X {stamp}" for stamp in stamps)])
        go_install("helm.sh/helm/v3/cmd/helm", HELM_VERSION, ldflags, paths.helm, progress)
    if not paths.kubeconform.exists():
        package = "github.com/yannh/kubeconform/cmd/kubeconform"
        go_install(package, KUBECONFORM_VERSION, "-s -w", paths.kubeconform, progress)
    return paths


if __name__ == "__main__":
    print(ensure_chart_tools(lambda msg: print(msg, file=sys.stderr, flush=True)))
