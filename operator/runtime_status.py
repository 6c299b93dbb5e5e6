"""RuntimeSecurityPolicy.status from compilation and the nodes' reports: pure aggregation.

kstatus-shaped like BpfProgram's: Valid (the spec was accepted), Ready (every node with a
selected pod enforces the spec.runtimeSecurity revision written for it), Reconciling
(on the way there) and Stalled (it will not get there without a change: the spec is
invalid, or a node has no hook to enforce with). Matches are summed from the nodes'
counters, hooks counted over the nodes that hold selected pods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from beekeeper.crds.common import Condition, set_condition
from beekeeper.operator.runtime_compile import RuntimeOutcome

MAX_LISTED = 5
MAX_MESSAGE = 1024


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def node_enforces(written: Mapping[str, Any] | None, reported: Mapping[str, Any] | None) -> bool:
    """The node's daemon reports the revision the operator wrote for it, with every container mapped."""
    reported = reported or {}
    revision = (written or {}).get("revision")
    return bool(reported.get("enforcing")) and revision is not None and reported.get("observedRevision") == revision


def aggregate(
    outcome: RuntimeOutcome,
    written: Mapping[str, Mapping[str, Any]],
    reported: Mapping[str, Mapping[str, Any] | None],
    previous: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """The whole status of one policy; `written`/`reported` are spec/status.runtimeSecurity per node."""
    conditions = [Condition.model_validate(c) for c in (previous or {}).get("conditions") or []]
    nodes = sorted(outcome.nodes)
    enforcing = [n for n in nodes if node_enforces(written.get(n), reported.get(n))]
    hooks: dict[str, int] = {}
    for node in nodes:
        hook = (reported.get(node) or {}).get("hook")
        if hook:
            hooks[hook] = hooks.get(hook, 0) + 1
    matches = sum(int(((r or {}).get("matches") or {}).get(outcome.ref, 0)) for r in reported.values())
    hookless = [n for n in nodes if reported.get(n) is not None and not (reported.get(n) or {}).get("hook")]

    stalled = None
    if outcome.error:
        valid = (False, "InvalidSpec", outcome.error)
        ready = (False, "InvalidSpec", f"not enforced: {outcome.error}")
        stalled = ("InvalidSpec", outcome.error)
    else:
        valid = (True, "Accepted", "")
        if not nodes:
            ready = (True, "NoSelectedPods", "no scheduled pod matches spec.podSelector")
        elif len(enforcing) == len(nodes):
            ready = (True, "Enforced", f"enforced on {len(nodes)}/{len(nodes)} nodes")
        else:
            waiting = [n for n in nodes if n not in enforcing]
            why = [
                f"{n}: {(reported.get(n) or {}).get('message')}"
                for n in waiting
                if (reported.get(n) or {}).get("message")
            ]
            detail = _listed(why) if why else f"waiting for {_listed(waiting)}"
            ready = (False, "NodesNotEnforcing", f"enforced on {len(enforcing)}/{len(nodes)} nodes; {detail}")
            if hookless:
                stalled = ("NoExecHook", f"no exec hook can be attached on {_listed(hookless)}")
    reconciling = (True, "NodesNotEnforcing", ready[2]) if not ready[0] and stalled is None else (False, "Done", "")
    stalled_value = (True, *stalled) if stalled else (False, "NotStalled", "")
    for type_, (value, reason, message) in (
        ("Valid", valid),
        ("Ready", ready),
        ("Reconciling", reconciling),
        ("Stalled", stalled_value),
    ):
        conditions = set_condition(
            conditions,
            Condition(
                type=type_,
                status="True" if value else "False",
                reason=reason,
                message=message[:MAX_MESSAGE],
                observed_generation=outcome.generation,
                last_transition_time=now,
            ),
        )
    status: dict[str, Any] = {
        "observedGeneration": outcome.generation,
        "conditions": sorted((c.to_dict() for c in conditions), key=lambda c: c["type"]),
        "selectedPods": len(outcome.selected),
        "nodesEnforcing": len(enforcing),
        "matches": matches,
    }
    if hooks:
        status["hooks"] = hooks
    return status
