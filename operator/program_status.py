"""BpfProgram.status from the nodes' reports: pure aggregation.

Conditions follow metav1.Condition. Ready/Progressing/Degraded are what people read;
Reconciling/Stalled mirror them because kstatus (Flux, kpt, cli-utils) keys on those
two names, so health works in GitOps tools without a custom check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from beekeeper.crds.common import Condition, set_condition
from beekeeper.operator.desired_state import Placement

MAX_FAILING_NODES = 10
MAX_WARNINGS = 16
MAX_MESSAGE = 512


def _node_verdict(entry_hash: str, reports: Sequence[Mapping[str, Any]], expected: int) -> tuple[str, Mapping | None]:
    """('ready'|'failed'|'pending', first failure) for one node, judging only current-hash reports."""
    current = [r for r in reports if r.get("contentHash") == entry_hash]
    failed = next((r for r in current if r.get("phase") == "Failed"), None)
    if failed is not None:
        return "failed", failed
    # Loaded counts: a program whose interface pattern matches nothing yet is converged,
    # it attaches by itself when a matching interface appears.
    running = [r for r in current if r.get("phase") in ("Attached", "Loaded")]
    return ("ready", None) if len(running) >= expected and expected > 0 else ("pending", None)


def _warnings(entry_hash: str, reports: Mapping[str, Sequence[Mapping[str, Any]]], nodes: Sequence[str]) -> list[str]:
    """Distinct warnings of the selected nodes' current reports, each with the nodes that report it."""
    where: dict[str, list[str]] = {}
    for node in nodes:
        for report in reports.get(node, ()):
            if report.get("contentHash") == entry_hash:
                for warning in report.get("warnings") or []:
                    where.setdefault(warning, []).append(node)
    out = []
    for warning, on in where.items():
        shown = ", ".join(on[:3]) + (f" and {len(on) - 3} more" if len(on) > 3 else "")
        out.append(f"{warning[: 1000 - len(shown)]} (node{'s' if len(on) > 1 else ''} {shown})")
    return out[:MAX_WARNINGS]


def aggregate(
    placement: Placement,
    reports: Mapping[str, Sequence[Mapping[str, Any]]],
    previous: Mapping[str, Any] | None,
    deleting: bool,
    now: str,
) -> dict[str, Any]:
    """Compute the whole status; `reports[node]` holds that node's entries for this BpfProgram."""
    previous = previous or {}
    conditions = [Condition.model_validate(c) for c in previous.get("conditions") or []]
    gen = placement.generation
    selected = placement.nodes
    ready, failing = [], []
    if placement.entry is not None:
        expected = len(placement.entry.programs)
        for node in selected:
            verdict, failure = _node_verdict(placement.entry.content_hash, reports.get(node, ()), expected)
            if verdict == "ready":
                ready.append(node)
            elif verdict == "failed" and failure is not None:
                failing.append(
                    {
                        "node": node,
                        "program": failure.get("name", ""),
                        "reason": failure.get("reason") or "Failed",
                        "message": (failure.get("message") or "")[:MAX_MESSAGE],
                    }
                )
    pending = len(selected) - len(ready) - len(failing)
    warnings = _warnings(placement.entry.content_hash, reports, selected) if placement.entry is not None else []

    if placement.error:
        why = placement.error_reason
        phase, ready_ok, ready_reason, ready_msg = "Degraded", False, why, placement.error
        progressing, prog_reason, prog_msg = False, why, placement.error
        degraded, deg_reason, deg_msg = True, why, placement.error
    else:
        progressing = pending > 0
        degraded = bool(failing or warnings)
        if not selected:
            ready_ok, ready_reason, ready_msg = True, "NoMatchingNodes", "no node matches spec.nodeSelector"
        elif len(ready) == len(selected):
            ready_ok, ready_reason, ready_msg = True, "AllNodesReady", f"attached on {len(ready)}/{len(selected)} nodes"
        else:
            ready_ok, ready_reason = False, "NodesNotReady"
            ready_msg = f"attached on {len(ready)}/{len(selected)} nodes"
        prog_reason, prog_msg = ("Attaching", f"{pending} node(s) still working") if progressing else ("Done", "")
        if failing:
            first = failing[0]
            deg_reason = first["reason"]
            deg_msg = f"failed on {len(failing)} node(s); {first['node']}: {first['program']}: {first['message']}"
        elif warnings:
            deg_reason = "MetricsNotExported"
            deg_msg = f"{len(warnings)} warning(s); {warnings[0]}"
        else:
            deg_reason, deg_msg = "NoFailures", ""
        phase = "Degraded" if degraded else "Progressing" if progressing else "Ready"
    if deleting:
        phase = "Deleting"

    for type_, value, reason, message in (
        ("Ready", ready_ok, ready_reason, ready_msg),
        ("Progressing", progressing, prog_reason, prog_msg),
        ("Degraded", degraded, deg_reason, deg_msg[:MAX_MESSAGE]),
        ("Reconciling", progressing, prog_reason, prog_msg),
        ("Stalled", degraded, deg_reason, deg_msg[:MAX_MESSAGE]),
    ):
        new = Condition(
            type=type_,
            status="True" if value else "False",
            reason=reason,
            message=message,
            observed_generation=gen,
            last_transition_time=now,
        )
        conditions = set_condition(conditions, new)

    return {
        "observedGeneration": gen,
        "conditions": sorted((c.to_dict() for c in conditions), key=lambda c: c["type"]),
        "nodes": {"selected": len(selected), "ready": len(ready), "failed": len(failing)},
        "ready": f"{len(ready)}/{len(selected)}",
        "phase": phase,
        "failingNodes": failing[:MAX_FAILING_NODES],
        "warnings": warnings or None,  # None: a merge patch removes warnings that went away
        "image": placement.image.status() if placement.image is not None else None,
    }
