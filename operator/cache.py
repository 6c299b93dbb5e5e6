"""What the operator has observed of the cluster, fed by watch events.

The reconciler decides from this snapshot instead of listing the API on every change;
it is primed by one full list at start so nothing is decided from a partial view.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from beekeeper.operator.pods import slim_pod

Body = dict[str, Any]

KINDS = (
    "BpfProgram",
    "Node",
    "BpfNodeState",
    "Pod",
    "Namespace",
    "NetworkIdentityPolicy",
    "NetworkIdentity",
    "BpfPolicySlice",
)
NAMESPACED = frozenset({"Pod", "NetworkIdentityPolicy"})


def _newer(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """resourceVersions are opaque but, within one resource type from one etcd, they grow."""
    if old is None:
        return True
    try:
        return int(new["metadata"]["resourceVersion"]) >= int(old["metadata"]["resourceVersion"])
    except (KeyError, ValueError):
        return True


def _slim_namespace(body: Mapping[str, Any]) -> Body:
    meta = body.get("metadata") or {}
    return {"metadata": {k: meta[k] for k in ("name", "labels", "resourceVersion") if meta.get(k) is not None}}


# Pods and Namespaces are kept only in the fields the policy compiler reads: a cluster has many.
_SLIM: dict[str, Callable[[Mapping[str, Any]], Body]] = {"Pod": slim_pod, "Namespace": _slim_namespace}


def _stored(kind: str, body: Mapping[str, Any]) -> Body:
    return _SLIM[kind](body) if kind in _SLIM else dict(body)


def program_reports(nodestates: Mapping[str, Mapping[str, Any]], bpfprogram: str) -> dict[str, list[Mapping[str, Any]]]:
    """Per node, that node daemon's status entries for one BpfProgram (nodes without any left out)."""
    reports: dict[str, list[Mapping[str, Any]]] = {}
    for node, state in nodestates.items():
        entries = [p for p in (state.get("status") or {}).get("programs") or [] if p.get("bpfProgram") == bpfprogram]
        if entries:
            reports[node] = entries
    return reports


def _key(kind: str, body: Mapping[str, Any]) -> str:
    meta = body["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if kind in NAMESPACED else meta["name"]


@dataclass(frozen=True)
class Snapshot:
    """A copy of the cache's tables for one pass: taken on the event loop, read in the pass thread."""

    bpfprograms: list[Body]
    nodes: dict[str, Body]
    nodestates: dict[str, Body]
    pods: list[Body]
    namespaces: dict[str, dict[str, str]]
    """name -> labels."""
    policies: list[Body]
    identities: list[Body]
    policy_slices: dict[str, Body] = field(default_factory=dict)
    """BpfPolicySlices by name (what the operator wrote, as the API has it)."""

    def node_labels(self) -> dict[str, dict[str, str]]:
        return {name: dict(body["metadata"].get("labels") or {}) for name, body in self.nodes.items()}


@dataclass
class ClusterCache:
    """Latest known objects of every watched kind, plus a wake-up for the reconciler."""

    tables: dict[str, dict[str, Body]] = field(default_factory=lambda: {kind: {} for kind in KINDS})
    primed: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def bpfprograms(self) -> dict[str, Body]:
        return self.tables["BpfProgram"]

    @property
    def nodes(self) -> dict[str, Body]:
        return self.tables["Node"]

    @property
    def nodestates(self) -> dict[str, Body]:
        return self.tables["BpfNodeState"]

    def observe(self, kind: str, event_type: str | None, body: Mapping[str, Any], wake: bool = True) -> None:
        """Apply one watch event (type None is kopf's initial listing).

        wake=False records the operator's own writes without causing another pass.
        """
        table = self.tables[kind]
        key = _key(kind, body)
        if event_type == "DELETED":
            table.pop(key, None)
        elif _newer(table.get(key), body):
            table[key] = _stored(kind, body)
        if wake:
            self.changed.set()

    def replace(self, kind: str, bodies: list[Mapping[str, Any]]) -> None:
        """Merge a full listing: objects missing from it are gone."""
        table = self.tables[kind]
        listed = {_key(kind, b): b for b in bodies}
        for key in list(table):
            if key not in listed:
                del table[key]
        for key, body in listed.items():
            if _newer(table.get(key), body):
                table[key] = _stored(kind, body)
        self.changed.set()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            bpfprograms=list(self.bpfprograms.values()),
            nodes=dict(self.nodes),
            nodestates=dict(self.nodestates),
            pods=list(self.tables["Pod"].values()),
            namespaces={
                name: dict(body["metadata"].get("labels") or {}) for name, body in self.tables["Namespace"].items()
            },
            policies=list(self.tables["NetworkIdentityPolicy"].values()),
            identities=list(self.tables["NetworkIdentity"].values()),
            policy_slices=dict(self.tables["BpfPolicySlice"]),
        )

    def reports_for(self, bpfprogram: str) -> dict[str, list[Mapping[str, Any]]]:
        """Per node, that node daemon's status entries for one BpfProgram."""
        return program_reports(self.nodestates, bpfprogram)
