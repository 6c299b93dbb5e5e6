"""Shared fixtures: one real control plane per test run, a fresh namespace per test."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Cluster, NodeDaemons, OperatorProcess

from beekeeper import kube
from beekeeper.devenv import build
from beekeeper.devenv.controlplane import ControlPlane


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


@pytest.fixture(scope="session")
def operator_process(cluster: Cluster, workdir: Path) -> Iterator[OperatorProcess]:
    """The operator, running for the whole session (tests may restart it)."""
    proc = OperatorProcess.create(cluster.kubeconfig, workdir / "operator.log").start()
    yield proc
    proc.stop()


@pytest.fixture
def node_daemons(cluster: Cluster, workdir: Path, request: pytest.FixtureRequest) -> Iterator[NodeDaemons]:
    """Simulated nodes for one test, torn down after it (their logs printed if it failed)."""
    daemons = NodeDaemons(cluster, workdir)
    yield daemons
    report = getattr(request.node, "rep_call", None)
    daemons.stop_all(show_logs=report is not None and report.failed)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Remember each phase's report on the item so fixtures can print logs on failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
