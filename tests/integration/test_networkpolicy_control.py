"""NetworkIdentityPolicy control plane against the real apiserver and operator process (no kernel).

Pods are API objects only (no kubelet): bound to a registered Node through spec.nodeName,
their IP set through the status subresource, as a kubelet would report it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import yaml
from kubernetes import client
from support import node_network_policy, running_pod, wait_for

from beekeeper import kube
from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE_PLURAL,
    GROUP,
    NETWORK_IDENTITY_PLURAL,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
)
from beekeeper.operator.identities import GC_GRACE_ENV

pytestmark = pytest.mark.integration

NODE_IP = "192.0.2.10"


class Api:
    def __init__(self, cluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        api = cluster.api()
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def identities(self) -> dict[str, int]:
        """app label -> identity number, for this test's namespace."""
        items = self.custom.list_cluster_custom_object(GROUP, VERSION, NETWORK_IDENTITY_PLURAL)["items"]
        return {
            i["spec"]["labels"]["app"]: int(i["metadata"]["name"])
            for i in items
            if i["spec"]["namespace"] == self.namespace and "app" in (i["spec"].get("labels") or {})
        }

    def nodestate(self, node: str) -> dict[str, Any]:
        return self.custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node)

    def network_policy(self, node: str) -> dict[str, Any]:
        return node_network_policy(self.custom, node)

    def policy(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, NETWORK_IDENTITY_POLICY_PLURAL, name
        )

    def apply(self, manifest: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def create_pod(self, name: str, app: str, node: str, ip: str, ports: list[dict[str, Any]]) -> None:
        running_pod(self.core, self.namespace, name, app, node, ip, ports)


@pytest.fixture
def api(cluster, operator_process, namespace) -> Iterator[Api]:
    api = Api(cluster, namespace)
    yield api
    for pod in api.core.list_namespaced_pod(namespace).items:  # no kubelet to finish a graceful delete
        api.core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)


@pytest.fixture
def node(cluster) -> Iterator[str]:
    """A Node object with an InternalIP (no daemon: nothing reports enforcement)."""
    name = f"np-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(cluster.api())
    kube.register_node(cluster.api(), name)
    core.patch_node_status(name, {"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}})
    yield name
    cluster.kubectl("delete", "node", name, "--wait=false", check=False)


@contextmanager
def short_identity_grace(operator_process) -> Iterator[None]:
    """Restart the operator with a 1 s identity grace period; restart it as it was afterwards."""
    original = operator_process.env

    operator_process.restart(env={**original, GC_GRACE_ENV: "1"})
    try:
        yield
    finally:
        operator_process.restart(env=original)


def frontend_to_backend(namespace: str, port: int | str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NetworkIdentityPolicy",
        "metadata": {"name": "frontend-to-backend", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "backend"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                    "ports": [{"protocol": "TCP", "port": port}],
                }
            ],
        },
    }


def rule_tuples(network_policy: dict[str, Any]) -> set[tuple]:
    return {
        (
            r["localIdentity"],
            r["direction"],
            r["peerIdentity"],
            r["protocol"],
            r["portStart"],
            r["portEnd"],
            r["action"],
        )
        for r in network_policy.get("rules") or []
    }


def test_identities_node_state_and_status(api: Api, node: str, operator_process) -> None:
    ns = api.namespace
    http = [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    for i in range(3):
        api.create_pod(f"frontend-{i}", "frontend", node, f"10.200.0.{i + 1}", [])
    for i in range(2):
        api.create_pod(f"backend-{i}", "backend", node, f"10.200.1.{i + 1}", http)
    api.apply(frontend_to_backend(ns, "http"))

    ids = wait_for(lambda: len(found := api.identities()) == 2 and found, 30, "two NetworkIdentities")
    backend, frontend = ids["backend"], ids["frontend"]
    expected_rules = {
        (backend, "Ingress", frontend, "TCP", 8080, 8080, "allow"),
        (backend, "Ingress", 1, "Any", 0, 0, "allow"),  # the node itself (kubelet probes)
    }
    wait_for(lambda: rule_tuples(api.network_policy(node)) == expected_rules, 30, "named port resolved in the rules")
    spec = api.network_policy(node)
    assert not api.nodestate(node)["spec"]["networkPolicy"]["endpoints"]  # in the node's endpoint slice
    endpoints = {e["pod"]: (e["identity"], e["ingressEnforced"], e["egressEnforced"]) for e in spec["endpoints"]}
    assert endpoints == {
        **{f"frontend-{i}": (frontend, False, False) for i in range(3)},
        **{f"backend-{i}": (backend, True, False) for i in range(2)},
    }
    assert {e["cidr"]: e["identity"] for e in spec["ipcache"]} == {
        **{f"10.200.0.{i + 1}/32": frontend for i in range(3)},
        f"{NODE_IP}/32": 1,
    }
    assert {r["policy"] for r in spec["rules"]} == {f"{ns}/frontend-to-backend"}

    def status() -> dict[str, Any] | None:
        body = api.policy("frontend-to-backend")
        current = body.get("status") or {}
        return current if current.get("observedGeneration") == body["metadata"]["generation"] else None

    st = wait_for(status, 30, "policy status")
    conditions = {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}
    assert conditions == {  # no daemon here: converging, not stuck
        "Valid": ("True", "Accepted"),
        "Ready": ("False", "NodesNotEnforcing"),
        "Reconciling": ("True", "NodesNotEnforcing"),
        "Stalled": ("False", "NodesNotEnforcing"),
    }
    assert (st["selectedEndpoints"], st["nodesEnforcing"]) == (2, 0)
    printed = api.cluster.kubectl("get", "nip", "-n", ns, "frontend-to-backend").stdout
    assert "True" in printed and "False" in printed, printed

    # Operator restart (with a short identity grace period, for the end of the test): the same
    # numbers from the API, and nothing rewritten.
    state_version = api.nodestate(node)["metadata"]["resourceVersion"]
    policy_version = api.policy("frontend-to-backend")["metadata"]["resourceVersion"]
    with short_identity_grace(operator_process):
        assert api.identities() == ids  # the restarted operator is ready: its first pass completed
        assert api.nodestate(node)["metadata"]["resourceVersion"] == state_version
        assert api.policy("frontend-to-backend")["metadata"]["resourceVersion"] == policy_version

        # A policy edit changes only rules: endpoints, ipcache and identities stay, and neither the frontend
        # identity's address slice (shared by whatever names it) nor the node's endpoint slice is rewritten.
        def shared_slices() -> dict[str, str]:
            items = api.custom.list_cluster_custom_object(GROUP, VERSION, BPF_POLICY_SLICE_PLURAL)["items"]
            return {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in items if "policy" not in s["spec"]}

        shared = shared_slices()
        assert len(shared) == 2
        api.apply(frontend_to_backend(ns, 9090))
        expected_rules = {
            (backend, "Ingress", frontend, "TCP", 9090, 9090, "allow"),
            (backend, "Ingress", 1, "Any", 0, 0, "allow"),
        }
        wait_for(lambda: rule_tuples(api.network_policy(node)) == expected_rules, 30, "edited rule")
        after = api.network_policy(node)
        assert after["endpoints"] == spec["endpoints"] and after["ipcache"] == spec["ipcache"]
        assert shared_slices() == shared
        assert api.identities() == ids
        st = wait_for(status, 30, "status of generation 2")
        assert st["observedGeneration"] == 2

        # The frontend pods go: their identity is collected after the grace period, and the rule naming it goes.
        for i in range(3):
            api.core.delete_namespaced_pod(f"frontend-{i}", ns, grace_period_seconds=0)
        wait_for(lambda: api.identities() == {"backend": backend}, 30, "frontend identity collected")
        assert rule_tuples(api.network_policy(node)) == {(backend, "Ingress", 1, "Any", 0, 0, "allow")}
        assert {e["cidr"] for e in api.network_policy(node)["ipcache"]} == {f"{NODE_IP}/32"}


def client_to(namespace: str, app: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NetworkIdentityPolicy",
        "metadata": {"name": f"client-to-{app}", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": app}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": port}]}],
        },
    }


def test_an_edit_of_one_policy_leaves_another_on_the_node_ready(api: Api, node_daemons) -> None:
    """Each edit of client-to-b writes a new node revision; client-to-a's part of it stays, so its
    status is not rewritten at all (it used to flip to NodesNotEnforcing and back on every edit)."""
    node = node_daemons(backend="fake", args=["--fake-policy"]).node
    for i, app in enumerate(("client", "a", "b")):
        api.create_pod(f"{app}-0", app, node, f"10.201.0.{i + 1}", [])

    def ready(name: str, generation: int = 1) -> dict[str, Any] | None:
        body = api.policy(name)
        status = body.get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
        current = status.get("observedGeneration") == body["metadata"]["generation"] == generation
        return body if current and conditions.get("Ready") == "True" else None

    api.apply(client_to(api.namespace, "a", 80))
    api.apply(client_to(api.namespace, "b", 80))
    before = wait_for(lambda: ready("client-to-a"), 60, "client-to-a Ready")["metadata"]["resourceVersion"]
    wait_for(lambda: ready("client-to-b"), 60, "client-to-b Ready")
    revisions = {api.nodestate(node)["spec"]["networkPolicy"]["revision"]}
    for generation in (2, 3, 4):
        api.apply(client_to(api.namespace, "b", 79 + generation))
        wait_for(lambda g=generation: ready("client-to-b", g), 60, f"client-to-b generation {generation} Ready")
        revisions.add(api.nodestate(node)["spec"]["networkPolicy"]["revision"])
    assert len(revisions) == 4  # every edit moved the node's revision
    assert api.policy("client-to-a")["metadata"]["resourceVersion"] == before

    # A slice edited by hand, its contentHash left as it was, is written back.
    slices = api.custom.list_cluster_custom_object(GROUP, VERSION, BPF_POLICY_SLICE_PLURAL)["items"]
    mine = next(s for s in slices if s["spec"].get("policy") == f"{api.namespace}/client-to-a")
    name = mine["metadata"]["name"]
    wide = [{"protocol": "TCP", "portStart": 1, "portEnd": 65535}]
    patch = {"spec": {"rules": [{**rule, "ports": wide} for rule in mine["spec"]["rules"]]}}
    api.custom.patch_cluster_custom_object(GROUP, VERSION, BPF_POLICY_SLICE_PLURAL, name, patch)
    wait_for(
        lambda: (
            api.custom.get_cluster_custom_object(GROUP, VERSION, BPF_POLICY_SLICE_PLURAL, name)["spec"]["rules"]
            == mine["spec"]["rules"]
        ),
        30,
        "the hand-edited slice written back",
    )
