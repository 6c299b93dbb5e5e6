"""The node daemon's policy glue without a kernel: spec translation, stable indexes, status writes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from beekeeper import kube
from beekeeper.crds.nodestate import NodeNetworkPolicy
from beekeeper.crds.policyslice import BpfPolicySliceSpec, slice_hash
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.agent import NodeAgent
from beekeeper.node_daemon.drops import DropLog
from beekeeper.node_daemon.fake_backend import FakeBackend
from beekeeper.node_daemon.fake_policy import FakePolicyDatapath, FakeRoutes
from beekeeper.node_daemon.metrics import BpfCollector
from beekeeper.node_daemon.policy_agent import PolicyAgent
from beekeeper.node_daemon.policy_index import PolicyIndexes
from beekeeper.node_daemon.policy_state import translate
from beekeeper.node_daemon.routes import PodInterface, Unresolved

SPEC = {
    "endpoints": [
        {"namespace": "x", "pod": "a", "ip": "10.240.0.2", "identity": 300, "ingressEnforced": True},
        {"namespace": "x", "pod": "b", "ip": "10.240.0.6", "identity": 301, "egressEnforced": True},
        {"namespace": "x", "pod": "c", "ip": "10.240.0.10", "identity": 302},
        {"namespace": "x", "pod": "v6", "ip": "fd00::2", "identity": 303},
    ],
    "ipcache": [{"cidr": "10.240.0.6/32", "identity": 301}],
    "cidrIdentities": [{"cidr": "10.0.0.0/8", "identity": 16777300}],
    "rules": [
        {
            "localIdentity": 300,
            "direction": "Ingress",
            "peerIdentity": 301,
            "protocol": "UDP",
            "portStart": 80,
            "portEnd": 81,
            "action": "allow",
            "policy": "x/allow-b",
        },
        {"localIdentity": 301, "direction": "Egress", "peerIdentity": 0, "action": "deny", "policy": "x/deny"},
    ],
}


def test_translate_keys_endpoints_by_the_routed_interface_and_reports_the_rest() -> None:
    interfaces = {
        "10.240.0.2": PodInterface(7, "veth-a"),
        "10.240.0.6": Unresolved("no route"),
        "10.240.0.10": PodInterface(7, "veth-a"),  # a second pod routed to the same veth
    }
    plan = translate(NodeNetworkPolicy.model_validate(SPEC), interfaces, {"x/allow-b": 4, "x/deny": 9})
    assert plan.state.endpoints == [pm.Endpoint(7, "10.240.0.2", 300, True, False)]
    assert set(plan.interfaces) == {7} and plan.interfaces[7].pod == "a"
    assert plan.unresolved == {"10.240.0.6": "no route"}
    assert len(plan.problems) == 2
    assert "x/c and x/a are both routed to veth-a" in plan.problems[0] and "IPv6" in plan.problems[1]
    assert plan.state.rules == [
        pm.Rule(300, pm.Direction.INGRESS, 301, pm.PROTO_UDP, 80, 81, pm.Action.ALLOW, 4),
        pm.Rule(301, pm.Direction.EGRESS, 0, pm.PROTO_ANY, 0, 0, pm.Action.DENY, 9),
    ]
    assert plan.state.ipcache == [pm.PrefixIdentity("10.240.0.6/32", 301)]
    assert plan.state.cidr_ids == [pm.PrefixIdentity("10.0.0.0/8", 16777300)]
    assert plan.state.policy_names == {4: "x/allow-b", 9: "x/deny"}


def test_endpoints_of_endpoint_slices_are_placed_like_inline_ones() -> None:
    """The operator lists a node's endpoints in slices of their own; the maps cannot tell the difference."""
    interfaces = {"10.240.0.2": PodInterface(7, "veth-a"), "10.240.0.6": PodInterface(8, "veth-b")}
    inline = translate(NodeNetworkPolicy.model_validate(SPEC), interfaces, {"x/allow-b": 4, "x/deny": 9})
    first, second = ({"nodeName": "n1", "endpoints": part} for part in (SPEC["endpoints"][:1], SPEC["endpoints"][1:]))
    pieces = {
        name: BpfPolicySliceSpec.model_validate({**body, "contentHash": slice_hash(body)})
        for name, body in (("n1.endpoints-0", first), ("n1.endpoints-1", second))
    }
    spec = NodeNetworkPolicy.model_validate({**SPEC, "endpoints": []})
    sliced = translate(spec, interfaces, {"x/allow-b": 4, "x/deny": 9}, pieces)
    assert sliced.state == inline.state and sliced.problems == inline.problems
    assert sliced.state.endpoints == [
        pm.Endpoint(7, "10.240.0.2", 300, True, False),
        pm.Endpoint(8, "10.240.0.6", 301, False, True),
    ]


def test_an_endpoint_slice_the_daemon_cannot_read_holds_the_maps(tmp_path) -> None:
    """Left out like an unreadable policy slice, its pods would be detached and unenforced; instead the
    maps keep the last state with its endpoints, and the status says why."""
    agent = PolicyAgent("n1", tmp_path / "bpf", tmp_path / "state", DropLog(), FakePolicyDatapath, FakeRoutes())
    endpoint = {"namespace": "x", "pod": "a", "ip": "10.240.0.2", "identity": 300, "ingressEnforced": True}

    def state(endpoints: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        spec = {"nodeName": "n1", "endpoints": endpoints}
        spec["contentHash"] = slice_hash(spec)
        raw = {"slices": [{"name": "n1.endpoints-0", "contentHash": spec["contentHash"]}]}
        return raw, {"n1.endpoints-0": {"metadata": {"resourceVersion": spec["contentHash"][:8]}, "spec": spec}}

    first = agent.reconcile(*state([endpoint])[:1], 1, None, state([endpoint])[1])
    assert first is not None and first["enforcing"] and (first["endpoints"], first["attached"]) == (1, 1), first
    raw, slices = state([{**endpoint, "podUid": "from a newer operator"}])
    held = agent.reconcile(raw, 2, first, slices)
    assert held is not None and held["enforcing"] and (held["endpoints"], held["attached"]) == (1, 1), held
    assert "n1.endpoints-0 not understood by this daemon" in held["message"]
    assert "keep the last state" in held["message"] and held["observedGeneration"] == 1


def test_policy_indexes_are_stable_across_restarts_and_never_reused(tmp_path) -> None:
    path = tmp_path / "indexes.json"
    first = PolicyIndexes(path).assign(["ns/a", "ns/b"])
    assert sorted(first.values()) == [0, 1]
    again = PolicyIndexes(path)  # a restarted daemon
    assert again.assign(["ns/b", "ns/c"]) == {"ns/b": first["ns/b"], "ns/c": 2}
    assert again.assign(["ns/a"]) == {"ns/a": 3}, "a deleted policy's number stays retired"
    assert json.loads(path.read_text()) == {"next": 4, "indexes": {"ns/a": 3}}
    path.write_text("{not json")
    assert PolicyIndexes(path).assign(["ns/z"]) == {"ns/z": 0}, "an unreadable table starts over"


class FakePolicy:
    """Stands in for PolicyAgent: returns the status it is told to."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None
        self.calls: list[tuple[Any, int | None, Any]] = []
        self.unresolved = 0
        self.removed = False

    def reconcile(
        self, raw: Any, generation: int | None, previous: Any, slices: Any = None, rescan: bool = True
    ) -> dict[str, Any] | None:
        self.calls.append((raw, generation, previous))
        return self.status

    def remove(self) -> None:
        self.removed = True


class FakeStatusApi:
    """Stands in for kube.apply_custom: records the statuses the daemon server-side applies."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.patches: list[dict[str, Any]] = []
        monkeypatch.setattr(kube, "apply_custom", self.apply_custom)

    def apply_custom(self, custom, plural, body, manager, status=False) -> dict[str, Any]:
        assert manager == "beekeeper-node-daemon" and status is True and plural == "bpfnodestates"
        self.patches.append(body["status"])
        return {"status": body["status"]}


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> tuple[NodeAgent, FakePolicy, FakeStatusApi]:
    backend = FakeBackend()
    policy = FakePolicy()
    node = NodeAgent("n1", backend, client.ApiClient(), BpfCollector(backend, "n1"), policy)  # type: ignore[arg-type]
    api = FakeStatusApi(monkeypatch)
    return node, policy, api


def nodestate(generation: int, network_policy: dict | None = None, status: dict | None = None) -> dict:
    spec: dict[str, Any] = {"nodeName": "n1"}
    if network_policy is not None:
        spec["networkPolicy"] = network_policy
    return {"metadata": {"name": "n1", "generation": generation}, "spec": spec, "status": status or {}}


ENFORCING = {"enforcing": True, "endpoints": 1, "attached": 1, "rules": 0, "observedGeneration": 1}


def test_policy_status_leaves_dropped_fields_out_of_the_apply(agent) -> None:
    node, policy, api = agent
    policy.status = {**ENFORCING, "attached": 0, "missing": ["10.240.0.2"]}
    node.reconcile(nodestate(1, {"endpoints": []}))
    assert policy.calls[-1][:2] == ({"endpoints": []}, 1)
    assert api.patches[-1]["networkPolicy"]["missing"] == ["10.240.0.2"]

    policy.status = dict(ENFORCING)  # the interface appeared: missing is gone
    node.reconcile_policy(nodestate(1, {"endpoints": []}))
    written = api.patches[-1]["networkPolicy"]
    assert "missing" not in written and "message" not in written and written["attached"] == 1

    patches = len(api.patches)
    node.reconcile_policy(nodestate(1, {"endpoints": []}))
    assert len(api.patches) == patches, "an unchanged status is not written again"


def test_policy_failure_makes_the_node_not_ready_and_removal_clears_the_report(agent) -> None:
    node, policy, api = agent
    policy.status = {**ENFORCING, "enforcing": False, "message": "maps not synced: no space"}
    node.reconcile(nodestate(1, {"endpoints": []}))
    (ready,) = api.patches[-1]["conditions"]
    assert ready["status"] == "False" and ready["reason"] == "PolicyNotEnforced"
    assert "no space" in ready["message"]

    policy.status = None
    node.reconcile(nodestate(2))
    assert "networkPolicy" not in api.patches[-1]
    assert api.patches[-1]["conditions"][0]["status"] == "True"


def test_previous_report_is_handed_over_and_a_restart_writes_nothing_new(agent) -> None:
    node, policy, api = agent
    previous = {**ENFORCING, "lastSyncTime": "2026-01-01T00:00:00Z"}
    policy.status = previous
    old_status = {
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Converged",
                "message": "0/0 attached",
                "observedGeneration": 1,
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
        "capabilities": node.capabilities,
        "programs": [],
        "attached": "0/0",
        "networkPolicy": previous,
    }
    node.reconcile(nodestate(1, {"endpoints": []}, old_status))
    assert policy.calls[-1][2] == previous
    assert api.patches == []


def test_node_state_deleted_removes_the_datapath(agent) -> None:
    node, policy, _ = agent
    node.remove_all()
    assert policy.removed


def test_without_a_policy_datapath_a_policy_is_reported_as_not_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = FakeBackend()
    node = NodeAgent("n1", backend, client.ApiClient(), BpfCollector(backend, "n1"), policy_disabled="disabled here")
    api = FakeStatusApi(monkeypatch)
    node.reconcile(nodestate(1))
    assert "networkPolicy" not in api.patches[-1] and api.patches[-1]["conditions"][0]["status"] == "True"

    node.reconcile(nodestate(2, {"endpoints": SPEC["endpoints"][:1]}))
    written = api.patches[-1]
    assert written["networkPolicy"]["enforcing"] is False and written["networkPolicy"]["endpoints"] == 1
    assert written["networkPolicy"]["message"] == "disabled here"
    assert written["conditions"][0]["reason"] == "PolicyNotEnforced"


def test_an_invalid_spec_entry_keeps_its_transition_time(agent) -> None:
    """A program entry the daemon cannot parse stays Failed across passes; its lastTransitionTime must not
    move on every resync (it did: each pass stamped it anew, so each resync rewrote the status)."""
    node, policy, api = agent
    policy.status = None
    invalid = {"bpfProgram": "broken", "programs": [{"name": "p"}]}  # no contentHash, source, ...
    earlier = {
        "bpfProgram": "broken",
        "name": "p",
        "phase": "Failed",
        "reason": "InvalidSpec",
        "message": "whatever was written before",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    state = nodestate(1)
    state["spec"]["programs"] = [invalid]
    state["status"] = {"programs": [earlier]}
    node.reconcile(state)
    (entry,) = api.patches[-1]["programs"]
    assert entry["reason"] == "InvalidSpec" and entry["lastTransitionTime"] == "2026-01-01T00:00:00Z"

    patches = len(api.patches)
    node.reconcile(state, resync=True)
    assert len(api.patches) == patches, "an unchanged status is not written again"
