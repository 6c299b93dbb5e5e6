"""The local control plane and the `beekeeper dev` CLI contract, against real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import wait_for

from beekeeper.devenv import build
from beekeeper.devenv.stack import DevEnvironment

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
    assert Path(handlers).resolve() == REPO / "operator" / "handlers.py"  # via the beekeeper/operator symlink


TRACEPOINT_PROGRAM = """
apiVersion: beekeeper.dev/v1alpha1
kind: BpfProgram
metadata: {name: devenv-pins}
spec:
  source:
    inline: "int on_getppid(void *ctx) { return 0; }"
  programs:
    - {name: on_getppid, type: tracepoint, tracepoint: "syscalls:sys_enter_getppid"}
"""


class DevCli:
    """`beekeeper dev ...` in its own state directory: one developer environment."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.env = {**os.environ, "BEEKEEPER_STATE_DIR": str(state)}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "beekeeper.cli", *args], env=self.env, capture_output=True, text=True, timeout=300
        )

    def kubectl(self, *args: str, input: str | None = None) -> str:
        kubeconfig = self("dev", "kubeconfig").stdout.strip()
        return subprocess.run(
            [str(build.binaries().kubectl), "--kubeconfig", kubeconfig, *args],
            input=input,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def attached_program_ids(self) -> list[int]:
        """Kernel ids of the test program as this environment's daemon reports them, once attached."""
        state = json.loads(self.kubectl("get", "bpfnodestate", socket.gethostname(), "-o", "json"))
        entries = (state.get("status") or {}).get("programs") or []
        return [
            i for p in entries if p["bpfProgram"] == "devenv-pins" and p["phase"] == "Attached" for i in p["programIds"]
        ]


def test_dev_cli_lifecycle_and_two_environments_on_one_machine(tmp_path: Path) -> None:
    """dev up (idempotent) → status → kubeconfig → kubectl works → dev down leaves nothing running.

    A second environment (its own BEEKEEPER_STATE_DIR) runs beside the first: each daemon pins
    under a directory derived from its own state, and `dev down` of one leaves the other's
    programs pinned and attached.
    """
    first, second = DevCli(tmp_path / "first"), DevCli(tmp_path / "second")
    try:
        for dev in (first, second):
            up = dev("dev", "up")
            assert up.returncode == 0, up.stderr
        again = first("dev", "up")
        assert again.returncode == 0 and "already running" in again.stderr
        status = first("dev", "status").stdout
        assert status.count("running") >= 5, status
        assert first("dev", "kubectl", "--", "get", "nodes", "-o", "name").stdout.strip(), "dev up registers a Node"
        port = json.loads((first.state / "components.json").read_text())["metrics_ports"][socket.gethostname()]
        url = f"https://127.0.0.1:{port}"
        why = first("why-dropped", "--kubeconfig", str(first.state / "kubeconfig"), "--url", url, "--src", "10.9.9.9")
        assert why.returncode == 0 and "no recorded drops match src=10.9.9.9" in why.stdout, why.stderr
        assert first("dev", "metrics").returncode == 0, "TLS with the kubeconfig's client certificate"
        pins = {dev: DevEnvironment(dev.state).bpffs_root for dev in (first, second)}
        assert pins[first] != pins[second] and f"pins:       {pins[first]}" in status
        for dev in (first, second):
            dev.kubectl("apply", "-f", "-", input=TRACEPOINT_PROGRAM)
        ids = {dev: wait_for(dev.attached_program_ids, 120, "the program attached") for dev in (first, second)}
        assert set(ids[first]).isdisjoint(ids[second]), "each environment loads its own copy"
        assert any(pins[first].rglob("*")) and any(pins[second].rglob("*"))

        down = first("dev", "down")
        assert down.returncode == 0, down.stderr
        assert not pins[first].exists(), "dev down unpins its own environment's programs"
        assert any(pins[second].rglob("*")), "the other environment's pins are untouched"
        assert second.attached_program_ids() == ids[second]
        assert set(ids[second]) <= kernel_program_ids() and not set(ids[first]) & kernel_program_ids()
        after = first("dev", "status").stdout
        assert "running " not in after, after
    finally:
        for dev in (first, second):
            dev("dev", "down")
    assert not pins[second].exists()


def kernel_program_ids() -> set[int]:
    listing = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(listing)}
