"""NetworkIdentityPolicy.status from compilation outcomes and node reports."""

from __future__ import annotations

from beekeeper.crds.networkpolicy import NetworkIdentityPolicyStatus
from beekeeper.operator.policy_compile import PolicyOutcome
from beekeeper.operator.policy_status import NodeEnforcement, aggregate

REF = "shop/p"
NOW = "2026-11-24T10:00:00Z"
LATER = "2026-11-24T10:05:00Z"


def outcome(nodes: set[str], **kwargs) -> PolicyOutcome:
    return PolicyOutcome("shop", "p", 3, selected={f"shop/pod-{n}" for n in nodes}, nodes=set(nodes), **kwargs)


def enforcing(generation: int = 5, observed: int = 5, on: bool = True) -> NodeEnforcement:
    return NodeEnforcement(generation, {"enforcing": on, "observedGeneration": observed})


def conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_ready_when_every_node_with_endpoints_enforces_the_written_generation() -> None:
    status = aggregate(outcome({"n1", "n2"}), {"n1": enforcing(), "n2": enforcing(4, 7)}, None, NOW)
    assert conditions(status) == {
        "Valid": ("True", "Accepted"),
        "Ready": ("True", "Enforced"),
        "Reconciling": ("False", "Enforced"),
        "Stalled": ("False", "Enforced"),
    }
    assert (status["observedGeneration"], status["selectedEndpoints"], status["nodesEnforcing"]) == (3, 2, 2)
    NetworkIdentityPolicyStatus.model_validate(status)  # the wire form fits the API


def test_stale_or_not_enforcing_nodes_are_waited_for() -> None:
    nodes = {"n1": enforcing(), "n2": enforcing(6, 5), "n3": enforcing(on=False), "n4": NodeEnforcement(1, None)}
    status = aggregate(outcome(set(nodes)), nodes, None, NOW)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NodesNotEnforcing")
    assert ready["message"] == "enforced on 1/4 nodes; waiting for n2, n3, n4"
    assert status["nodesEnforcing"] == 1
    # kstatus: InProgress while nodes converge, not Failed
    assert conditions(status)["Reconciling"] == ("True", "NodesNotEnforcing")
    assert conditions(status)["Stalled"] == ("False", "NodesNotEnforcing")


def test_the_policy_revision_decides_not_the_generation() -> None:
    """A BpfProgram change moves the node's generation, not its policy: still enforced."""
    a, b = "a" * 64, "b" * 64
    report = {"enforcing": True, "observedGeneration": 5, "observedRevision": a}
    assert NodeEnforcement(7, report, revision=a).enforces(REF)
    assert not NodeEnforcement(7, report, revision=b).enforces(REF)
    assert not NodeEnforcement(5, {**report, "enforcing": False}, revision=a).enforces(REF)
    older_daemon = {"enforcing": True, "observedGeneration": 5}
    assert not NodeEnforcement(7, older_daemon, revision=a).enforces(REF)
    assert NodeEnforcement(5, older_daemon, revision=a).enforces(REF)


def test_node_write_errors_are_named() -> None:
    nodes = {"n1": NodeEnforcement(None, {"enforcing": True, "observedGeneration": 9}, "422 Unprocessable Entity")}
    ready = next(c for c in aggregate(outcome({"n1"}), nodes, None, NOW)["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NodeStateNotWritten" and "n1: 422 Unprocessable Entity" in ready["message"]
    # The API refusing the node's state does not pass by waiting: kstatus Failed, not InProgress.
    status = aggregate(outcome({"n1"}), nodes, None, NOW)
    assert conditions(status)["Stalled"] == ("True", "NodeStateNotWritten")
    assert conditions(status)["Reconciling"][0] == "False"


def test_no_selected_endpoints_is_ready() -> None:
    status = aggregate(outcome(set()), {}, None, NOW)
    assert conditions(status)["Ready"] == ("True", "NoSelectedEndpoints") and status["selectedEndpoints"] == 0


def test_invalid_spec_is_not_valid_nor_ready() -> None:
    bad = outcome(set(), error="spec.ingress[0].from[0].ipBlock: except entry must be inside cidr")
    status = aggregate(bad, {}, None, NOW)
    assert conditions(status) == {
        "Valid": ("False", "InvalidSpec"),
        "Ready": ("False", "InvalidSpec"),
        "Reconciling": ("False", "InvalidSpec"),
        "Stalled": ("True", "InvalidSpec"),
    }
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert "except entry must be inside cidr" in stalled["message"]
    valid = next(c for c in status["conditions"] if c["type"] == "Valid")
    assert valid["message"].startswith("spec.ingress[0].from[0].ipBlock")


def test_warnings_are_listed_in_valid_and_bounded() -> None:
    warned = outcome(set(), warnings=[f"spec.egress[{i}]: something" for i in range(7)])
    valid = next(c for c in aggregate(warned, {}, None, NOW)["conditions"] if c["type"] == "Valid")
    assert (valid["status"], valid["reason"]) == ("True", "AcceptedWithWarnings")
    assert valid["message"].endswith("; and 2 more warnings")


def test_transition_time_moves_only_when_status_changes() -> None:
    first = aggregate(outcome({"n1"}), {"n1": enforcing()}, None, NOW)
    same = aggregate(outcome({"n1"}), {"n1": enforcing()}, first, LATER)
    assert same == first
    flipped = aggregate(outcome({"n1"}), {"n1": enforcing(on=False)}, first, LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times == {"Valid": NOW, "Ready": LATER, "Reconciling": LATER, "Stalled": NOW}
