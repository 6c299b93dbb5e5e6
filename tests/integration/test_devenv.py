"""The local control plane and the `beekeeper dev` CLI contract, against real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from beekeeper.devenv import build

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_version_is_the_pinned_release(cluster) -> None:
    version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == build.KUBERNETES_VERSION
    client = json.loads(cluster.kubectl("version", "--client", "-o", "json").stdout)
    assert client["clientVersion"]["gitVersion"] == build.KUBERNETES_VERSION


def test_crds_installed_and_explained(cluster) -> None:
    names = cluster.kubectl("get", "crd", "-o", "name").stdout.split()
    assert {
        "customresourcedefinition.apiextensions.k8s.io/bpfprograms.beekeeper.dev",
        "customresourcedefinition.apiextensions.k8s.io/networkidentitypolicies.beekeeper.dev",
        "customresourcedefinition.apiextensions.k8s.io/bpfnodestates.beekeeper.dev",
    } <= set(names)
    explained = cluster.kubectl("explain", "bpfprogram.spec.programs").stdout
    assert "DESCRIPTION" in explained and "type" in explained and "interfaceSelector" in explained
    # The category lists every beekeeper resource at once.
    assert cluster.kubectl("get", "beekeeper", "-A").returncode == 0


def test_rbac_is_enforced(cluster) -> None:
    """Authorization is RBAC, as on a real cluster: an unbound service account can do nothing."""
    result = cluster.kubectl(
        "auth", "can-i", "list", "bpfprograms", "--as=system:serviceaccount:default:nobody", check=False
    )
    assert result.stdout.strip() == "no"


def test_namespace_deletion_completes(cluster) -> None:
    """kube-controller-manager's namespace controller runs, so namespaces really go away."""
    cluster.kubectl("create", "namespace", "bk-ns-gc")
    cluster.kubectl("delete", "namespace", "bk-ns-gc", "--timeout=60s")


def test_repo_root_imports_stdlib_operator() -> None:
    """operator/ must not shadow the standard library when Python runs from the repo root."""
    code = "import operator, collections, beekeeper.operator.handlers as h; print(operator.__file__); print(h.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    stdlib, handlers = result.stdout.split()
    assert Path(stdlib).parent == Path(os.__file__).parent
    assert Path(handlers) == REPO / "operator" / "handlers.py"


def test_dev_cli_lifecycle(tmp_path: Path) -> None:
    """dev up (idempotent) → status → kubeconfig → kubectl works → dev down leaves nothing running."""
    env = {**os.environ, "BEEKEEPER_STATE_DIR": str(tmp_path / "dev")}
    bk = [sys.executable, "-m", "beekeeper.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*bk, *args], env=env, capture_output=True, text=True, timeout=300)

    try:
        up = run("dev", "up")
        assert up.returncode == 0, up.stderr
        again = run("dev", "up")
        assert again.returncode == 0 and "already running" in again.stderr
        status = run("dev", "status").stdout
        assert status.count("running") >= 5, status
        kubeconfig = run("dev", "kubeconfig").stdout.strip()
        assert Path(kubeconfig).is_file()
        nodes = subprocess.run(
            [str(build.binaries().kubectl), "--kubeconfig", kubeconfig, "get", "nodes", "-o", "name"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert nodes.strip(), "dev up registers this machine as a Node"
    finally:
        down = run("dev", "down")
    assert down.returncode == 0, down.stderr
    after = run("dev", "status").stdout
    assert "running " not in after, after
