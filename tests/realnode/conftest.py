"""One real one-node cluster for the whole run (containerd, kubelet, kube-proxy, scheduler).

The rig is brought up once per session and torn down at the end, where the teardown also
asserts that nothing of it is left on the machine: no mounts, interfaces, routes, cgroups,
directories or processes. Only one rig runs per machine; a concurrent run waits its turn.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from realnode_pods import HOST_SYSCTLS, pod_manifest
from registry_rig import OciRig, Registry
from support import Cluster, wait_for

from beekeeper.devenv import build
from beekeeper.devenv.realnode import HOST_IP, RealNode


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.realnode)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="a real node needs root (namespaces, cgroups, containerd)"))


@pytest.fixture(scope="session")
def host_sysctls_before() -> dict[str, str]:
    return {name: Path("/proc/sys", name).read_text() for name in HOST_SYSCTLS}


@pytest.fixture(scope="session")
def realnode(host_sysctls_before: dict[str, str]) -> Iterator[RealNode]:
    """The running rig; its teardown fails the run if anything of it survives."""
    root = Path(tempfile.mkdtemp(prefix="beekeeper-test-realnode-"))
    rig = RealNode(root)
    try:
        rig.up(lambda msg: print(msg, flush=True), lock_wait=900)
        yield rig
        print(f"real node: timings {rig.load_state().timings}, RSS MB {rig.rss_mb()}")
    finally:
        rig.down(lambda msg: print(msg, flush=True))
        left = rig.leftovers()
        if not os.environ.get("BEEKEEPER_KEEP_TEST_STATE"):
            shutil.rmtree(root, ignore_errors=True)
    assert not left, "the real-node rig left things behind:\n" + "\n".join(left)


@pytest.fixture(scope="session")
def node_cluster(realnode: RealNode) -> Cluster:
    return Cluster(realnode.control_plane, build.binaries().kubectl)


@pytest.fixture
def node_namespace(node_cluster: Cluster) -> Iterator[str]:
    with node_cluster.temp_namespace() as name:
        yield name


@pytest.fixture
def run_pod(node_cluster: Cluster, node_namespace: str) -> Callable[..., dict]:
    """Create a testpod pod and wait until it runs; returns its Pod object."""

    def run(name: str, args: list[str], labels: dict[str, str] | None = None, timeout: float = 60) -> dict:
        node_cluster.kubectl("apply", "-f", "-", input=json.dumps(pod_manifest(node_namespace, name, args, labels)))

        def running() -> dict | None:
            pod = json.loads(node_cluster.kubectl("get", "pod", "-n", node_namespace, name, "-o", "json").stdout)
            return pod if pod["status"].get("phase") == "Running" and pod["status"].get("podIP") else None

        return wait_for(running, timeout, f"pod {node_namespace}/{name} Running")

    return run


@pytest.fixture(scope="session")
def node_registry(realnode: RealNode, oci_registry: OciRig) -> Iterator[Registry]:
    """The session's registry served also on the rig's host address, which the node's pods reach.

    The registry on 127.0.0.1 is the machine's loopback, not the node's (its network namespace
    has a loopback of its own); a second process serves the same storage, certificate and CA
    on HOST_IP (the certificate names it), so images pushed to oci_registry are pulled here.
    """
    registry = Registry(oci_registry.registry.dir, host=HOST_IP).start()
    yield registry
    registry.stop()
