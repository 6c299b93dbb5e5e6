"""Faults of the NetworkIdentityPolicy path, end to end: real apiserver, operator, node daemon, kernel, traffic.

- One tenant's oversized policy must not freeze policy for the others on the node: it is
  refused with a reason naming its cost, and every other tenant's policy changes and new
  pods keep being enforced (real connections allowed and denied as their policies say).
- A node daemon SIGKILLed under traffic must not change a single verdict: the pinned
  datapath keeps enforcing while it is down, and the restarted daemon adopts the programs
  (same ids on the pod veths) and serves changes again.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes import client
from netpol_rig import PodRig, Probe, Prober, TruthTable, assert_table, tcx_program_ids
from support import NodeDaemon, NodeDaemons, wait_for

from beekeeper import kube
from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE_PLURAL,
    GROUP,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
)
from beekeeper.operator.policy_compile import DEFAULT_EXPANSION_BUDGET

pytestmark = [pytest.mark.integration, pytest.mark.kernel]


@dataclass
class Tenants:
    api: client.ApiClient
    custom: client.CustomObjectsApi
    rig: PodRig
    node: NodeDaemon
    names: dict[str, str]
    """logical namespace -> real name."""
    applied: list[tuple[str, str]] = field(default_factory=list)

    def apply(self, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        manifest = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "NetworkIdentityPolicy",
            "metadata": {"name": name, "namespace": self.names[ns]},
            "spec": spec,
        }
        self.applied.append((self.names[ns], name))
        return kube.apply(self.api, manifest)

    def status(self, ns: str, name: str) -> dict[str, Any]:
        body = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.names[ns], NETWORK_IDENTITY_POLICY_PLURAL, name
        )
        status = body.get("status") or {}
        if status.get("observedGeneration") != body["metadata"]["generation"]:
            return {}
        return {c["type"]: c for c in status.get("conditions") or []}

    def ready(self, ns: str, name: str) -> bool:
        return (self.status(ns, name).get("Ready") or {}).get("status") == "True"


@pytest.fixture
def tenants(cluster, operator_process, node_daemons: NodeDaemons) -> Iterator[Tenants]:
    api = cluster.api()
    core = client.CoreV1Api(api)
    tag = uuid.uuid4().hex[:5]
    names = {ns: f"{ns}-{tag}" for ns in ("a", "b")}
    rig = PodRig(api)
    node = node_daemons()
    try:
        for ns, real in names.items():
            core.create_namespace({"metadata": {"name": real, "labels": {"tenant": ns}}})
        yield Tenants(api, client.CustomObjectsApi(api), rig, node, names)
    finally:
        rig.close()
        for real in names.values():
            core.delete_namespace(real, propagation_policy="Background")


def allow_from(apps: dict[str, int]) -> dict[str, Any]:
    """Pods app=server accept app=<key> on TCP <port> only."""
    return {
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": app}}}], "ports": [{"protocol": "TCP", "port": port}]}
            for app, port in apps.items()
        ],
    }


def oversized() -> dict[str, Any]:
    """The 78 KiB policy of the report: 32 rules x 32 /32 ipBlocks x 32 ports, all distinct (32768 entries)."""
    return {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [
            {
                "from": [{"ipBlock": {"cidr": f"198.18.{i}.{j}/32"}} for j in range(32)],
                "ports": [{"protocol": "TCP", "port": 1024 + 32 * i + k} for k in range(32)],
            }
            for i in range(32)
        ],
    }


def table(keys: list[str], allowed: dict[str, dict[str, int]]) -> TruthTable:
    """Everything open, except into b's servers: only from the given app on the given TCP port."""
    expected = TruthTable.full(keys)
    for server in (k for k in keys if k.startswith("b/server")):
        expected.set(False, to=server)
        for src, port in allowed.items():
            expected.set(True, frm=f"b/{src}", to=server, port=port, protocol="TCP")
        expected.set(True, frm=server, to=server)
    return expected


def test_one_tenants_oversized_policy_leaves_every_other_tenant_enforced(tenants: Tenants) -> None:
    t = tenants
    for key, app in (("b/server", "server"), ("b/client", "client"), ("b/other", "other"), ("a/web", "web")):
        ns, name = key.split("/")
        t.rig.add(key, t.names[ns], name, t.node.node, {"app": app})
    t.rig.wait_servers()
    t.apply("b", "servers", allow_from({"client": 80}))
    wait_for(lambda: t.ready("b", "servers"), 60, "tenant b's policy Ready")
    assert_table(t.rig.pods, table(list(t.rig.pods), {"client": 80}), "tenant b's policy enforced")

    body = t.apply("a", "huge", oversized())
    assert len(json.dumps(body["spec"])) > 70_000
    wait_for(lambda: t.status("a", "huge").get("Valid"), 60, "tenant a's policy judged")

    # While the oversized policy exists, tenant b changes a policy and starts a pod on the same node.
    t.rig.add("b/server2", t.names["b"], "server2", t.node.node, {"app": "server"})
    t.rig.wait_servers()
    t.apply("b", "servers", allow_from({"client": 80, "other": 81}))
    assert_table(
        t.rig.pods, table(list(t.rig.pods), {"client": 80, "other": 81}), "tenant b's edit and new pod enforced"
    )
    wait_for(lambda: t.ready("b", "servers"), 60, "tenant b's edited policy Ready")

    conditions = t.status("a", "huge")
    valid, ready = conditions["Valid"], conditions["Ready"]
    assert valid["status"] == "False" and valid["reason"] == "ExpansionBudgetExceeded", valid
    assert f"on node {t.node.node}, budget {DEFAULT_EXPANSION_BUDGET}" in valid["message"], valid
    cost = int(valid["message"].split("expands to ")[1].split()[0])
    assert cost >= 32 * 32 * 32, valid
    assert ready["status"] == "False" and ready["reason"] == "ExpansionBudgetExceeded", ready

    state = t.custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, t.node.node)
    slices = t.custom.list_cluster_custom_object(
        GROUP, VERSION, BPF_POLICY_SLICE_PLURAL, field_selector=f"spec.nodeName={t.node.node}"
    )["items"]
    assert {s["spec"].get("policy") for s in slices} <= {f"{t.names['b']}/servers", None}  # None: addresses
    assert f"{t.names['b']}/servers" in {s["spec"].get("policy") for s in slices}
    print(
        f"\noversized policy: {len(json.dumps(body['spec']))} bytes of spec, {cost} kernel entries on the node "
        f"(budget {DEFAULT_EXPANSION_BUDGET}); node state {len(json.dumps(state))} bytes, "
        f"{len(slices)} slice(s) of {[len(json.dumps(s)) for s in slices]} bytes"
    )


def test_node_daemon_sigkill_under_traffic_changes_no_verdict(tenants: Tenants) -> None:
    t = tenants
    for key, app in (("b/server", "server"), ("b/client", "client"), ("b/other", "other")):
        t.rig.add(key, t.names["b"], key.split("/")[1], t.node.node, {"app": app})
    t.rig.wait_servers()
    t.apply("b", "servers", allow_from({"client": 80}))
    wait_for(lambda: t.ready("b", "servers"), 60, "policy Ready")
    expected = table(list(t.rig.pods), {"client": 80})
    assert_table(t.rig.pods, expected, "policy enforced")
    ids = {key: tcx_program_ids(pod.host_if) for key, pod in t.rig.pods.items()}

    flows = [
        Probe(src, "b/server", port, proto)
        for src in ("b/client", "b/other")
        for port in (80, 81)
        for proto in ("TCP", "UDP")
    ]
    flows += [Probe("b/other", "b/client", 80, "TCP"), Probe("b/server", "b/other", 81, "UDP")]
    # Allowed flows answer at once, so their prober runs many rounds; denied ones each wait out the timeout.
    probers = [
        Prober(t.rig.pods, {p: expected.cells[p] for p in flows if expected.cells[p] is verdict})
        for verdict in (True, False)
    ]
    threads = [threading.Thread(target=p.run, daemon=True) for p in probers]
    for thread in threads:
        thread.start()
    try:
        for p in probers:
            p.rounds_after(3)
        t.node.kill()
        killed = time.monotonic()
        for p in probers:
            p.rounds_after(5)  # the datapath enforces alone
        offset = t.node.log.stat().st_size
        t.node.start()
        wait_for(lambda: "policy datapath ready" in t.node.log.read_text()[offset:], 60, "daemon adopted the datapath")
        restarted = time.monotonic()
        for p in probers:
            p.rounds_after(3)
    finally:
        for p in probers:
            p.stop.set()
        for thread in threads:
            thread.join(timeout=30)
    wrong = [w for p in probers for w in p.wrong]
    connections = sum(p.connections for p in probers)
    assert not wrong, f"{len(wrong)} wrong verdicts of {connections}, first: {wrong[:5]}"
    assert {key: tcx_program_ids(pod.host_if) for key, pod in t.rig.pods.items()} == ids

    # The restarted daemon serves changes again.
    t.apply("b", "servers", allow_from({"client": 80, "other": 81}))
    assert_table(t.rig.pods, table(list(t.rig.pods), {"client": 80, "other": 81}), "edit after the restart")
    wait_for(lambda: t.ready("b", "servers"), 60, "edited policy Ready")
    print(
        f"\ndaemon SIGKILL under traffic: {connections} connections ({probers[0].connections} allowed), "
        f"0 wrong verdicts, down {restarted - killed:.1f} s, program ids unchanged on {len(ids)} veths"
    )
