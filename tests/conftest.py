"""Shared fixtures: one real control plane per test run, a fresh namespace per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import NodeDaemon, Process

from beekeeper import kube
from beekeeper.devenv import build, processes
from beekeeper.devenv.controlplane import ControlPlane


@dataclass
class Cluster:
    """A running local control plane and the pinned kubectl that talks to it."""

    control_plane: ControlPlane
    kubectl_path: Path

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def api(self):
        return kube.api_client(self.kubeconfig)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """etcd + kube-apiserver + kube-controller-manager from the cached build, CRDs installed."""
    from beekeeper.crds.generate import crd_manifests

    root = Path(tempfile.mkdtemp(prefix="beekeeper-test-cp-"))
    control_plane = ControlPlane(root)
    try:
        control_plane.start(lambda msg: print(msg, flush=True))
        kube.install_crds(kube.api_client(control_plane.kubeconfig), crd_manifests())
        yield Cluster(control_plane, build.binaries().kubectl)
    finally:
        control_plane.stop()
        if not os.environ.get("BEEKEEPER_KEEP_TEST_STATE"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) after the test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def workdir(cluster: Cluster) -> Path:
    path = cluster.control_plane.dir / "components"
    path.mkdir(exist_ok=True)
    return path


def _component_env(cluster: Cluster) -> dict[str, str]:
    return {"KUBECONFIG": str(cluster.kubeconfig), "BEEKEEPER_LOG_LEVEL": "debug"}


@pytest.fixture(scope="session")
def operator_process(cluster: Cluster, workdir: Path) -> Iterator[Process]:
    """The operator, running for the whole session (tests may restart it)."""
    proc = Process(
        "operator",
        [sys.executable, "-m", "beekeeper.cli", "operator"],
        workdir / "operator.log",
        _component_env(cluster),
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def node_daemons(cluster: Cluster, workdir: Path, request: pytest.FixtureRequest) -> Iterator:
    """start(labels) -> NodeDaemon: registers a Node and starts its daemon; all torn down after the test."""
    started: list[NodeDaemon] = []
    api = cluster.api()
    test_id = uuid.uuid4().hex[:6]

    def start(labels: dict[str, str] | None = None, name: str | None = None) -> NodeDaemon:
        node = name or f"node-{test_id}-{len(started)}"
        kube.register_node(api, node, {"beekeeper.dev/test": test_id, **(labels or {})})
        bpffs_root = Path(f"/sys/fs/bpf/beekeeper-test/{node}")
        state = workdir / "nodes" / node
        port = processes.free_port()
        daemon = NodeDaemon(
            f"node-daemon {node}",
            [
                sys.executable,
                "-m",
                "beekeeper.cli",
                "node-daemon",
                "--node-name",
                node,
                "--bpffs-root",
                str(bpffs_root),
                "--state-dir",
                str(state),
                "--metrics-address",
                "127.0.0.1",
                "--metrics-port",
                str(port),
            ],
            workdir / f"node-daemon-{node}.log",
            _component_env(cluster),
            node=node,
            test_labels={"beekeeper.dev/test": test_id},
            metrics_port=port,
            bpffs_root=bpffs_root,
            state_dir=state,
        ).start()
        started.append(daemon)
        return daemon

    yield start

    for daemon in started:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"--- {daemon.name} log ---\n{daemon.log_tail()}")
        daemon.stop()
        cluster.kubectl("delete", "node", daemon.node, "--wait=false", check=False)
        shutil.rmtree(daemon.bpffs_root, ignore_errors=True)  # unpinning the links detaches them


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Remember each phase's report on the item so fixtures can print logs on failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
