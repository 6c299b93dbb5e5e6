"""The project's Helm chart released on the real-node rig, with the image built on this machine.

Shared by `beekeeper dev cluster up` (a cluster to look at, chart installed) and the real-node
tests (install, upgrade, uninstall). The image is imported into the rig's containerd, so the
release runs with `image.pullPolicy=Never`; the daemon keeps its state under the rig's directory
and pins where the chart says (/sys/fs/bpf/beekeeper), which `dev cluster down` clears.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from beekeeper.devenv import images
from beekeeper.devenv.chart_tools import ensure_chart_tools
from beekeeper.devenv.realnode import RealNode

CHART = images.REPO_ROOT / "helm" / "beekeeper"
NAMESPACE = "beekeeper-system"
RELEASE = "beekeeper"


@dataclass
class ChartRelease:
    """One Helm release of the chart on the rig, driven by the pinned helm binary."""

    helm: Path
    kubeconfig: Path
    repository: str
    tag: str
    state_dir: Path

    def values(self, tag: str | None = None) -> list[str]:
        return [
            f"--set=image.repository={self.repository}",
            f"--set=image.tag={tag or self.tag}",
            "--set=image.pullPolicy=Never",
            f"--set=nodeDaemon.stateDir={self.state_dir}",
        ]

    def helm_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.helm), f"--kubeconfig={self.kubeconfig}", f"--namespace={NAMESPACE}", *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr.strip()}")
        return result

    def installed(self) -> bool:
        return self.helm_cmd("status", RELEASE, check=False).returncode == 0

    def install(self, *values: str) -> float:
        """helm install --wait, with more `--set=...` values; returns the seconds it took."""
        started = time.monotonic()
        self.helm_cmd(
            "install", RELEASE, str(CHART), "--create-namespace", "--wait", "--timeout=5m", *self.values(), *values
        )
        return time.monotonic() - started

    def upgrade(self, tag: str) -> float:
        started = time.monotonic()
        self.helm_cmd("upgrade", RELEASE, str(CHART), "--wait", "--timeout=5m", *self.values(tag))
        return time.monotonic() - started

    def uninstall(self, check: bool = True) -> float:
        started = time.monotonic()
        self.helm_cmd("uninstall", RELEASE, "--wait", "--timeout=5m", check=check)
        return time.monotonic() - started


def prepare(rig: RealNode, progress: images.Progress = print) -> ChartRelease:
    """Build (or find cached) helm and the project image and import the image into the rig."""
    tools = ensure_chart_tools(progress)
    built = images.build_all(progress)
    rig.import_images(built.project)
    repository, tag = built.project_ref.rsplit(":", 1)
    return ChartRelease(tools.helm, rig.kubeconfig, repository, tag, rig.dir / "beekeeper-state")
