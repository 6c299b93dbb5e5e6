"""RuntimeSecurityPolicy: model validation, per-node compilation and status aggregation (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from beekeeper.crds.nodestate import BpfNodeStateSpec
from beekeeper.crds.runtimesecurity import RuntimeSecurityPolicy
from beekeeper.operator.pods import slim_pod
from beekeeper.operator.runtime_compile import compile_runtime
from beekeeper.operator.runtime_status import aggregate

CID = "containerd://" + "ab" * 32
NOW = "2026-01-01T00:00:00Z"
REF = "shop/no-shells"


def policy(name: str = "no-shells", namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "beekeeper.dev/v1alpha1",
        "kind": "RuntimeSecurityPolicy",
        "metadata": {"name": name, "namespace": namespace, "generation": 2},
        "spec": {
            "podSelector": {"matchLabels": {"app": "backend"}},
            "rules": [{"name": "shells", "exec": {"paths": ["/bin/sh"]}, "action": "Block"}],
            **spec,
        },
    }


def pod(name: str, node: str | None = "n1", namespace: str = "shop", **labels: str) -> dict[str, Any]:
    return slim_pod(
        {
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "app"}, {"name": "side"}]},
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": "app", "containerID": CID},
                    {"name": "side", "containerID": "containerd://" + "cd" * 32},
                ],
                "ephemeralContainerStatuses": [{"name": "debugger", "containerID": "containerd://" + "ef" * 32}],
            },
        }
    )


@pytest.mark.parametrize(
    "rules, message",
    [
        ([{"name": "a", "exec": {"paths": ["bin/sh"]}, "action": "Block"}], "absolute"),
        ([{"name": "a", "exec": {"paths": ["/a/../sh"]}, "action": "Block"}], "'..'"),
        ([{"name": "a", "exec": {"pathPrefixes": ["/tmp"]}, "action": "Block"}], "end with /"),
        ([{"name": "a", "exec": {}, "action": "Block"}], "paths or pathPrefixes"),
        ([], "at least 1"),
        (
            [
                {"name": "a", "exec": {"paths": ["/bin/sh"]}, "action": "Block"},
                {"name": "b", "exec": {"paths": ["/bin/sh"]}, "action": "Audit"},
            ],
            "different actions",
        ),
        ([{"name": "a", "exec": {"paths": ["/bin/sh"]}, "action": "Allow"}], "defaultAction"),
    ],
)
def test_bad_policies_are_refused_with_the_reason(rules: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RuntimeSecurityPolicy.model_validate(policy(rules=rules))


def test_same_path_same_action_in_two_rules_is_no_conflict() -> None:
    rules = [
        {"name": "a", "exec": {"paths": ["/bin/sh"]}, "action": "Block"},
        {"name": "b", "exec": {"paths": ["/bin/sh", "/bin/bash"]}, "action": "Block"},
    ]
    RuntimeSecurityPolicy.model_validate(policy(rules=rules))


def test_nodes_get_only_their_selected_pods_and_containers() -> None:
    pods = [
        pod("web-1", "n1", app="backend"),
        pod("web-2", "n2", app="backend"),
        pod("front", "n1", app="frontend"),
        pod("pending", None, app="backend"),
        pod("elsewhere", "n1", namespace="other", app="backend"),
    ]
    compiled = compile_runtime([policy()], pods, ["n1", "n2", "n3"])
    outcome = compiled.policies["shop/no-shells"]
    assert outcome.error is None
    assert outcome.selected == ["shop/pending", "shop/web-1", "shop/web-2"]
    assert outcome.nodes == {"n1", "n2"}
    n1 = compiled.nodes["n1"]["policies"]
    assert [p["pod"] for p in n1[0]["pods"]] == ["web-1"]  # never the other namespace's pod
    assert [c["name"] for c in n1[0]["pods"][0]["containers"]] == ["app", "debugger", "side"]
    assert compiled.nodes["n3"]["policies"] == []  # loaded everywhere while a policy exists
    for node in ("n1", "n2", "n3"):
        BpfNodeStateSpec.model_validate({"nodeName": node, "runtimeSecurity": compiled.nodes[node]})


def test_containers_narrow_the_selection() -> None:
    compiled = compile_runtime([policy(containers=["app"])], [pod("web-1", app="backend")], ["n1"])
    pods = compiled.nodes["n1"]["policies"][0]["pods"]
    assert pods[0]["containers"] == [{"name": "app", "containerId": CID}]


def test_revision_changes_with_content_only() -> None:
    first = compile_runtime([policy()], [pod("web-1", app="backend")], ["n1"]).nodes["n1"]
    again = compile_runtime([policy()], [pod("web-1", app="backend")], ["n1"]).nodes["n1"]
    relabelled = compile_runtime([policy()], [pod("web-1", app="other")], ["n1"]).nodes["n1"]
    assert first["revision"] == again["revision"] != relabelled["revision"]


def test_no_valid_policy_means_no_runtime_security_anywhere() -> None:
    bad = policy(rules=[])
    compiled = compile_runtime([bad], [pod("web-1", app="backend")], ["n1"])
    assert compiled.nodes == {}
    assert "rules" in (compiled.policies["shop/no-shells"].error or "")


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_ready_once_every_node_reports_the_written_revision() -> None:
    compiled = compile_runtime([policy()], [pod("a", "n1", app="backend"), pod("b", "n2", app="backend")], ["n1", "n2"])
    outcome = compiled.policies["shop/no-shells"]
    rev = {n: compiled.nodes[n]["revision"] for n in ("n1", "n2")}
    reports = {
        "n1": {"enforcing": True, "hook": "tracepoint", "observedRevision": rev["n1"], "matches": {REF: 3}},
        "n2": {"enforcing": True, "hook": "tracepoint", "observedRevision": "0" * 64},
    }
    status = aggregate(outcome, compiled.nodes, reports, None, NOW)
    assert conditions(status)["Ready"] == ("False", "NodesNotEnforcing")
    assert conditions(status)["Reconciling"][0] == "True" and conditions(status)["Stalled"][0] == "False"
    assert status["nodesEnforcing"] == 1 and status["matches"] == 3 and status["hooks"] == {"tracepoint": 2}
    reports["n2"]["observedRevision"] = rev["n2"]
    status = aggregate(outcome, compiled.nodes, reports, status, NOW)
    assert conditions(status)["Ready"] == ("True", "Enforced")
    assert conditions(status)["Reconciling"][0] == "False"
    assert status["selectedPods"] == 2 and status["nodesEnforcing"] == 2


def test_status_stalled_for_invalid_spec_and_hookless_nodes() -> None:
    compiled = compile_runtime([policy(rules=[])], [], ["n1"])
    status = aggregate(compiled.policies["shop/no-shells"], compiled.nodes, {}, None, NOW)
    assert conditions(status)["Valid"] == ("False", "InvalidSpec")
    assert conditions(status)["Stalled"] == ("True", "InvalidSpec")
    compiled = compile_runtime([policy()], [pod("a", "n1", app="backend")], ["n1"])
    reports = {"n1": {"enforcing": False, "message": "no exec hook: tracepoint refused"}}
    status = aggregate(compiled.policies["shop/no-shells"], compiled.nodes, reports, None, NOW)
    assert conditions(status)["Stalled"] == ("True", "NoExecHook")
    assert "tracepoint refused" in next(c["message"] for c in status["conditions"] if c["type"] == "Ready")
