"""Shared fixtures: one real control plane per test run, a fresh namespace per test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_rig import OciRig
from support import BPFFS_TEST_ROOT, Cluster, NodeDaemons, OperatorProcess, fresh_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """etcd + kube-apiserver + kube-controller-manager from the cached build, CRDs installed."""
    with fresh_cluster("beekeeper-test-cp-") as cluster:
        yield cluster


@pytest.fixture(scope="session", autouse=True)
def _bpffs_test_root() -> Iterator[None]:
    """Each test removes its own pins; the shared root they live under goes after the run (if left empty)."""
    yield
    with contextlib.suppress(OSError):
        BPFFS_TEST_ROOT.rmdir()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) after the test."""
    with cluster.temp_namespace() as name:
        yield name


@pytest.fixture(scope="session")
def workdir(cluster: Cluster) -> Path:
    path = cluster.control_plane.dir / "components"
    path.mkdir(exist_ok=True)
    return path


_SESSION_OPERATOR: list[OperatorProcess] = []
"""The session's operator once some test has started it (it then runs until the session ends)."""


@pytest.fixture(scope="session")
def operator_process(cluster: Cluster, workdir: Path) -> Iterator[OperatorProcess]:
    """The operator, running for the whole session (tests may restart it)."""
    proc = OperatorProcess.create(cluster.kubeconfig, workdir / "operator.log").start()
    _SESSION_OPERATOR.append(proc)
    yield proc
    _SESSION_OPERATOR.remove(proc)
    proc.stop()


@pytest.fixture(scope="module")
def without_operator() -> Iterator[None]:
    """No operator while the module's tests run, whatever ran before them: they write objects by hand that
    the operator owns (a BpfNodeState of no Node it deletes, statuses it rewrites). Restarted afterwards."""
    paused = [proc for proc in _SESSION_OPERATOR if proc.alive()]
    for proc in paused:
        proc.stop()
    yield
    for proc in paused:
        proc.start()
        proc.wait_ready()


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
    operator = getattr(item, "funcargs", {}).get("operator_process")
    if report.failed and report.when == "call" and operator is not None:
        # The operator runs for the whole session: its last lines are the ones about this test.
        report.sections.append(("operator log (last 60 lines)", operator.log_tail(60)))
    return report


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRig]:
    """A real OCI registry (distribution, TLS with its own CA) on loopback, buildah to push and cosign to sign."""
    from registry_rig import ImageBuilder, Registry

    root = tmp_path_factory.mktemp("oci")
    registry = Registry(root / "registry").start()
    builder = ImageBuilder(root / "buildah", registry)
    rig = OciRig(registry, builder, root / "cosign")
    yield rig
    registry.stop()
    builder.close()
