"""`beekeeper dev apply` (make demo): which applied objects are Ready, on their way, or stuck."""

from __future__ import annotations

from typing import Any

from beekeeper.devenv.apply_wait import verdict


def obj(kind: str, generation: int, observed: int | None, **conditions: tuple[str, str, str]) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if observed is not None:
        status = {
            "observedGeneration": observed,
            "conditions": [
                {"type": t, "status": s, "reason": r, "message": m, "observedGeneration": observed}
                for t, (s, r, m) in conditions.items()
            ],
        }
    return {"kind": kind, "metadata": {"name": "x", "generation": generation}, "status": status}


def test_ready_once_the_applied_generation_is_ready() -> None:
    assert verdict(obj("BpfProgram", 2, 2, Ready=("True", "AllNodesReady", "")))[0] == "ready"
    state, why = verdict(obj("BpfProgram", 2, 1, Ready=("True", "AllNodesReady", "")))
    assert state == "pending" and "generation 2 not observed" in why
    assert verdict(obj("BpfProgram", 1, None))[0] == "pending"


def test_stuck_objects_fail_at_once_with_their_reason() -> None:
    state, why = verdict(
        obj(
            "BpfProgram",
            1,
            1,
            Ready=("False", "NodesNotReady", "attached on 0/1 nodes"),
            Degraded=("True", "CompileError", "failed on 1 node(s); vm: fn: main.c:2:12: error"),
        )
    )
    assert state == "failed" and why.startswith("BpfProgram/x: Degraded=True CompileError")
    assert "main.c:2:12" in why
    state, why = verdict(obj("NetworkIdentityPolicy", 1, 1, Valid=("False", "InvalidSpec", "bad port")))
    assert state == "failed" and "InvalidSpec" in why and "bad port" in why


def test_progressing_objects_are_waited_for() -> None:
    state, why = verdict(obj("BpfProgram", 1, 1, Ready=("False", "NodesNotReady", "attached on 0/1 nodes")))
    assert state == "pending" and "NodesNotReady" in why
