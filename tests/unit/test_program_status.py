"""Aggregation of node reports into BpfProgram.status."""

from __future__ import annotations

import pytest

from beekeeper.crds.bpfprogram import BpfProgramStatus
from beekeeper.operator.desired_state import Placement, place
from beekeeper.operator.program_status import MAX_FAILING_NODES, aggregate

NOW = "2026-11-24T10:00:00Z"
LATER = "2026-11-24T10:05:00Z"


@pytest.fixture
def placed(bpfprogram):
    def make(nodes: list[str]) -> Placement:
        result = place([bpfprogram("p")], {n: {} for n in nodes}, lambda ns, n: None)[0]
        assert result.entry is not None
        return result

    return make


def report(p: Placement, phase: str, **extra: str) -> dict:
    assert p.entry is not None
    name = p.entry.programs[0].name
    return {"bpfProgram": "p", "name": name, "contentHash": p.entry.content_hash, "phase": phase, **extra}


def conditions(status: dict) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_all_ready(placed) -> None:
    p = placed(["a", "b"])
    status = aggregate(p, {"a": [report(p, "Attached")], "b": [report(p, "Attached")]}, None, False, NOW)
    assert status["ready"] == "2/2" and status["phase"] == "Ready"
    assert conditions(status) == {
        "Degraded": "False",
        "Progressing": "False",
        "Ready": "True",
        "Reconciling": "False",
        "Stalled": "False",
    }
    assert status["observedGeneration"] == 1
    BpfProgramStatus.model_validate(status)  # the API accepts what we compute


def test_pending_node_is_progressing(placed) -> None:
    p = placed(["a", "b", "c"])
    status = aggregate(p, {"a": [report(p, "Attached")], "b": [report(p, "Compiling")]}, None, False, NOW)
    assert status["ready"] == "1/3" and status["phase"] == "Progressing"
    assert status["nodes"] == {"selected": 3, "ready": 1, "failed": 0}
    assert conditions(status)["Progressing"] == "True" and conditions(status)["Ready"] == "False"


def test_old_hash_does_not_count_as_ready(placed) -> None:
    p = placed(["a"])
    stale = {**report(p, "Attached"), "contentHash": "0" * 64}
    assert aggregate(p, {"a": [stale]}, None, False, NOW)["ready"] == "0/1"


def test_failure_is_reported_with_reason(placed) -> None:
    p = placed(["a", "b"])
    failed = report(p, "Failed", reason="CompileError", message="prog.c:3:5: error: use of undeclared identifier")
    status = aggregate(p, {"a": [report(p, "Attached")], "b": [failed]}, None, False, NOW)
    assert status["phase"] == "Degraded" and status["nodes"]["failed"] == 1
    assert status["failingNodes"] == [
        {
            "node": "b",
            "program": p.entry.programs[0].name,
            "reason": "CompileError",
            "message": "prog.c:3:5: error: use of undeclared identifier",
        }
    ]
    cond = {c["type"]: c for c in status["conditions"]}
    assert cond["Degraded"]["reason"] == "CompileError" and "prog.c:3:5" in cond["Degraded"]["message"]
    BpfProgramStatus.model_validate(status)


def test_failing_nodes_are_bounded(placed) -> None:
    nodes = [f"n{i:02d}" for i in range(25)]
    p = placed(nodes)
    failed = report(p, "Failed", reason="VerifierRejected", message="x" * 10_000)
    status = aggregate(p, {n: [failed] for n in nodes}, None, False, NOW)
    assert status["nodes"]["failed"] == 25 and len(status["failingNodes"]) == MAX_FAILING_NODES
    BpfProgramStatus.model_validate(status)


def test_transition_time_kept_when_nothing_changes(placed) -> None:
    p = placed(["a"])
    reports = {"a": [report(p, "Attached")]}
    first = aggregate(p, reports, None, False, NOW)
    second = aggregate(p, reports, first, False, LATER)
    assert first == second  # identical status means the operator writes nothing


def test_transition_time_moves_on_flip(placed) -> None:
    p = placed(["a"])
    first = aggregate(p, {"a": [report(p, "Attached")]}, None, False, NOW)
    second = aggregate(p, {"a": [report(p, "Pending")]}, first, False, LATER)
    ready = next(c for c in second["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["lastTransitionTime"] == LATER


def test_no_matching_nodes_is_ready_with_reason(placed) -> None:
    p = placed([])
    status = aggregate(p, {}, None, False, NOW)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert status["ready"] == "0/0" and ready["reason"] == "NoMatchingNodes"


def test_source_error_is_degraded() -> None:
    p = Placement("p", 2, error="spec.source.configMapRef: ConfigMap ns/code not found")
    status = aggregate(p, {}, None, False, NOW)
    assert status["phase"] == "Degraded"
    assert any("ns/code not found" in c["message"] for c in status["conditions"] if c["type"] == "Degraded")


def test_deleting_phase(placed) -> None:
    p = placed(["a"])
    assert aggregate(p, {}, None, True, NOW)["phase"] == "Deleting"


def test_loaded_with_no_matching_interface_counts_as_ready(placed) -> None:
    p = placed(["a"])
    loaded = report(p, "Loaded", reason="NoMatchingInterfaces", message="pattern veth* matches no interface")
    assert aggregate(p, {"a": [loaded]}, None, False, NOW)["phase"] == "Ready"


def test_metric_warnings_make_the_program_degraded_but_ready(placed) -> None:
    p = placed(["a", "b"])
    warning = "metric misses_total: not exported: unit p has no map 'missed' (it has: counts)"
    reports = {"a": [report(p, "Attached", warnings=[warning])], "b": [report(p, "Attached", warnings=[warning])]}
    status = aggregate(p, reports, None, False, NOW)
    assert status["phase"] == "Degraded" and status["ready"] == "2/2"
    assert conditions(status)["Ready"] == "True" and conditions(status)["Degraded"] == "True"
    assert status["warnings"] == [f"{warning} (nodes a, b)"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "MetricsNotExported" and "no map 'missed'" in degraded["message"]
    BpfProgramStatus.model_validate(status)

    stale = {"a": [report(p, "Attached", warnings=[warning]) | {"contentHash": "0" * 64}]}
    assert aggregate(p, stale, status, False, LATER)["warnings"] is None
    fixed = aggregate(p, {"a": [report(p, "Attached")], "b": [report(p, "Attached")]}, status, False, LATER)
    assert fixed["phase"] == "Ready" and fixed["warnings"] is None, "null: the merge patch removes them"
