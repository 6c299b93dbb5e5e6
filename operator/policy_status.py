"""NetworkIdentityPolicy.status from compilation and the nodes' reports: pure aggregation.

Valid says whether the spec could be compiled (and carries warnings about parts that cannot
take effect). Ready says whether every node with a selected endpoint runs the state written
for it: its daemon reports status.networkPolicy.enforcing with an observedRevision that holds
this policy's current part of spec.networkPolicy (see policy_revisions: an edit of another
policy on the node does not make this one wait). A BpfProgram change on the node moves
metadata.generation but not the revision, so Ready does not dip for it either.
(A daemon that reports no revision is compared by generation, as before.)

Reconciling (nodes still converging) and Stalled (invalid, or a write the API refuses:
waiting will not fix it) are the conditions kstatus reads, so Flux and kpt report a broken
policy as Failed instead of waiting for their timeout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from beekeeper.crds.common import Condition, set_condition
from beekeeper.operator.policy_compile import PolicyOutcome
from beekeeper.operator.policy_revisions import NodeRevisions

STALLED_READY_REASONS = frozenset({"NodeStateNotWritten"})
"""Ready reasons that do not resolve by waiting: the API refused what the operator must write."""
MAX_LISTED = 5
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class NodeEnforcement:
    """One node's side of Ready: the BpfNodeState generation written and what its daemon reports."""

    generation: int | None
    reported: Mapping[str, Any] | None
    """status.networkPolicy of the BpfNodeState."""
    write_error: str | None = None
    """Why the operator could not write the node's state, if it could not."""
    revision: str | None = None
    """spec.networkPolicy.revision written."""
    slice_errors: Mapping[str, str] = field(default_factory=dict)
    """Policy ref -> why the operator could not write that policy's slices for the node."""
    revisions: NodeRevisions | None = None
    """The revisions the operator wrote to the node, and what each moved."""

    def error_for(self, ref: str) -> str | None:
        return self.write_error or self.slice_errors.get(ref)

    def enforces(self, ref: str) -> bool:
        """Whether the node's maps hold what policy `ref` needs there now (other policies may be behind)."""
        reported = self.reported or {}
        if self.write_error is not None or self.slice_errors.get(ref) or not reported.get("enforcing"):
            return False
        observed = reported.get("observedRevision")
        if self.revision is not None and observed is not None:
            return observed == self.revision or (self.revisions is not None and self.revisions.covers(observed, ref))
        generation = reported.get("observedGeneration")
        return generation is not None and self.generation is not None and generation >= self.generation


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _ready(outcome: PolicyOutcome, nodes: Mapping[str, NodeEnforcement], enforcing: list[str]) -> tuple[bool, str, str]:
    if outcome.error:
        return False, outcome.reason, f"not enforced: {outcome.error}"
    total = len(outcome.nodes)
    if not total:
        return True, "NoSelectedEndpoints", "no pod with an IPv4 address matches spec.podSelector"
    if len(enforcing) == total:
        return True, "Enforced", f"enforced on {total}/{total} nodes"
    failed = [
        f"{n}: {nodes[n].error_for(outcome.ref)}"
        for n in sorted(outcome.nodes)
        if n in nodes and nodes[n].error_for(outcome.ref)
    ]
    if failed:
        return False, "NodeStateNotWritten", f"enforced on {len(enforcing)}/{total} nodes; {_listed(failed)}"
    waiting = sorted(outcome.nodes - set(enforcing))
    return False, "NodesNotEnforcing", f"enforced on {len(enforcing)}/{total} nodes; waiting for {_listed(waiting)}"


def aggregate(
    outcome: PolicyOutcome,
    nodes: Mapping[str, NodeEnforcement],
    previous: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """The whole status of one policy."""
    conditions = [Condition.model_validate(c) for c in (previous or {}).get("conditions") or []]
    if outcome.error:
        valid, valid_reason, valid_message = False, outcome.reason, outcome.error
    else:
        valid, valid_reason = True, "AcceptedWithWarnings" if outcome.warnings else "Accepted"
        valid_message = "; ".join(outcome.warnings[:MAX_LISTED])
        if len(outcome.warnings) > MAX_LISTED:
            valid_message += f"; and {len(outcome.warnings) - MAX_LISTED} more warnings"
    enforcing = sorted(n for n in outcome.nodes if n in nodes and nodes[n].enforces(outcome.ref))
    ready, ready_reason, ready_message = _ready(outcome, nodes, enforcing)
    stalled = not valid or ready_reason in STALLED_READY_REASONS
    reconciling = not ready and not stalled
    for type_, value, reason, message in (
        ("Valid", valid, valid_reason, valid_message),
        ("Ready", ready, ready_reason, ready_message),
        ("Reconciling", reconciling, ready_reason, ready_message if reconciling else ""),
        ("Stalled", stalled, ready_reason, (valid_message if not valid else ready_message) if stalled else ""),
    ):
        new = Condition(
            type=type_,
            status="True" if value else "False",
            reason=reason,
            message=message[:MAX_MESSAGE],
            observed_generation=outcome.generation,
            last_transition_time=now,
        )
        conditions = set_condition(conditions, new)
    return {
        "observedGeneration": outcome.generation,
        "conditions": sorted((c.to_dict() for c in conditions), key=lambda c: c["type"]),
        "selectedEndpoints": len(outcome.selected),
        "nodesEnforcing": len(enforcing),
    }
