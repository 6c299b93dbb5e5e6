"""What the operator has observed of the cluster, fed by watch events.

The reconciler decides from this snapshot instead of listing the API on every change;
it is primed by one full list at start so nothing is decided from a partial view.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Body = dict[str, Any]


def _newer(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """resourceVersions are opaque but, within one resource type from one etcd, they grow."""
    if old is None:
        return True
    try:
        return int(new["metadata"]["resourceVersion"]) >= int(old["metadata"]["resourceVersion"])
    except (KeyError, ValueError):
        return True


@dataclass
class ClusterCache:
    """Latest known BpfPrograms, Nodes and BpfNodeStates, plus a wake-up for the reconciler."""

    bpfprograms: dict[str, Body] = field(default_factory=dict)
    nodes: dict[str, Body] = field(default_factory=dict)
    nodestates: dict[str, Body] = field(default_factory=dict)
    primed: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _table(self, kind: str) -> dict[str, Body]:
        return {"BpfProgram": self.bpfprograms, "Node": self.nodes, "BpfNodeState": self.nodestates}[kind]

    def observe(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Apply one watch event (type None is kopf's initial listing)."""
        table = self._table(kind)
        name = body["metadata"]["name"]
        if event_type == "DELETED":
            table.pop(name, None)
        elif _newer(table.get(name), body):
            table[name] = dict(body)
        self.changed.set()

    def replace(self, kind: str, bodies: list[Mapping[str, Any]]) -> None:
        """Merge a full listing: objects missing from it are gone."""
        table = self._table(kind)
        listed = {b["metadata"]["name"]: b for b in bodies}
        for name in list(table):
            if name not in listed:
                del table[name]
        for name, body in listed.items():
            if _newer(table.get(name), body):
                table[name] = dict(body)
        self.changed.set()

    def node_labels(self) -> dict[str, dict[str, str]]:
        return {name: dict(body["metadata"].get("labels") or {}) for name, body in self.nodes.items()}

    def reports_for(self, bpfprogram: str) -> dict[str, list[Mapping[str, Any]]]:
        """Per node, that node daemon's status entries for one BpfProgram."""
        reports: dict[str, list[Mapping[str, Any]]] = {}
        for node, state in self.nodestates.items():
            entries = [
                p for p in (state.get("status") or {}).get("programs") or [] if p.get("bpfProgram") == bpfprogram
            ]
            if entries:
                reports[node] = entries
        return reports
