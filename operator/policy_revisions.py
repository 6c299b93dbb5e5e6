"""Which policies each written node-state revision moved, so one policy's Ready does not dip for another's.

A node's spec.networkPolicy.revision hashes the whole node: its own addresses and every slice
ref (the endpoints', the policies' and the address slices'). Its daemon echoes the revision its
maps hold. A policy is enforced on the node once the echoed revision is one written at or after
the last write that changed what this policy needs there: its own slices, the address slices of
the identities it names, the endpoints it selects, or the node's addresses every policy depends
on. Judged by equality with the newest revision instead, every policy on a node went NotReady
for each edit of any other policy there (and, judged by every endpoint, for each pod started
there): a false verdict for kstatus and two needless status writes per policy.

The log is the operator's memory: after a restart a revision it has not seen counts as behind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from beekeeper.crds.nodestate import NETWORK_POLICY_FIELDS
from beekeeper.operator.policy_compile import endpoint_slice

KEEP = 32
"""Revisions remembered per node; a daemon further behind than this waits for the newest."""


@dataclass
class NodeRevisions:
    """One node's written revisions in order, and when each policy's part of them last changed."""

    written: dict[str, int] = field(default_factory=dict)
    """Revision -> sequence number of its latest write (insertion order is write order)."""
    node_wide: int = 0
    """Sequence number of the last write that changed the node's own lists (its addresses)."""
    policies: dict[str, int] = field(default_factory=dict)
    """Policy ref -> sequence number of the last write that changed its slice refs or selected endpoints."""
    seq: int = 0

    def covers(self, observed: str, ref: str) -> bool:
        """Whether the maps at `observed` already hold what `ref` needs now."""
        at = self.written.get(observed)
        return at is not None and at >= max(self.node_wide, self.policies.get(ref, 0))


def _pods(endpoints: Iterable[Mapping[str, Any]]) -> set[str]:
    return {f"{e.get('namespace')}/{e.get('pod')}" for e in endpoints}


def changed_pods(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]) -> set[str]:
    """namespace/name of the endpoints added, removed or changed (identity, address, isolation)."""
    before = {tuple(sorted(e.items())) for e in old}
    after = {tuple(sorted(e.items())) for e in new}
    return _pods(dict(e) for e in before ^ after)


Owners = Callable[[str], Set[str]]
"""A slice's name -> the policies it concerns: its own, or for an identity's addresses those naming it."""

Endpoints = Sequence[Mapping[str, Any]]


def listed_endpoints(policy: Mapping[str, Any] | None, *sources: Mapping[str, Mapping[str, Any]]) -> Endpoints | None:
    """The endpoints a spec.networkPolicy stands for: inline and in the endpoint slices it lists (each read
    from the first source, name -> slice spec, holding it at the listed contentHash); None when one is in none."""
    out = list((policy or {}).get("endpoints") or [])
    for ref in (policy or {}).get("slices") or []:
        if endpoint_slice(ref["name"]):
            found = (s.get(ref["name"]) for s in sources)
            spec = next((f for f in found if f is not None and f.get("contentHash") == ref["contentHash"]), None)
            if spec is None:
                return None
            out += spec.get("endpoints") or []
    return out


def moved(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    owners: Owners,
    selected: Mapping[str, Set[str]],
    endpoints: tuple[Endpoints | None, Endpoints | None],
) -> tuple[bool, set[str]]:
    """(the node's own lists differ, policies whose part differs) between two spec.networkPolicy.

    A policy's part is its slice refs (its own slices and the address slices of the identities
    it names) and the endpoints it selects (`selected`: policy ref -> namespace/name of its
    pods): a pod starting on a node concerns the policies selecting it or naming its identity,
    not every policy there. `owners` answers for slice names, old and new; `endpoints` are the
    old and new ones (listed_endpoints'), where one not known makes every endpoint of the other count
    as changed (and neither known, every policy).
    """
    old = old or {}
    node_wide = any(
        (old.get(k) or []) != (new.get(k) or []) for k in NETWORK_POLICY_FIELDS if k not in ("slices", "endpoints")
    )

    def refs(policy: Mapping[str, Any]) -> dict[str, set[tuple[str, str]]]:
        out: dict[str, set[tuple[str, str]]] = {}
        for ref in policy.get("slices") or []:
            for owner in owners(ref["name"]):
                out.setdefault(owner, set()).add((ref["name"], ref["contentHash"]))
        return out

    before, after = refs(old), refs(new)
    policies = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    before_eps, after_eps = endpoints
    if before_eps is None and after_eps is None:
        return node_wide, policies | set(selected)
    if before_eps is None or after_eps is None:
        pods = _pods(before_eps or after_eps or [])
    else:
        pods = changed_pods(before_eps, after_eps)
    if pods:
        policies |= {ref for ref, chosen in selected.items() if not pods.isdisjoint(chosen)}
    return node_wide, policies


class RevisionLog:
    """Per node, the revisions the operator wrote (nodes are written from several threads)."""

    def __init__(self, keep: int = KEEP) -> None:
        self._keep = keep
        self._nodes: dict[str, NodeRevisions] = {}
        self._lock = threading.Lock()

    def record(
        self,
        node: str,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any],
        owners: Owners,
        selected: Mapping[str, Set[str]],
        endpoints: tuple[Endpoints | None, Endpoints | None],
    ) -> None:
        """Note that `new` (with its revision) replaced `old` in the node's spec (moved() says what it moved)."""
        node_wide, policies = moved(old, new, owners, selected, endpoints)
        with self._lock:
            log = self._nodes.get(node)
            if log is None:
                log = self._nodes[node] = NodeRevisions()
                if old and old.get("revision"):  # written before this process: the baseline, diffed from here
                    log.written[old["revision"]] = 0
            log.seq += 1
            if node_wide:
                log.node_wide = log.seq
            for ref in policies:
                log.policies[ref] = log.seq
            log.written.pop(new["revision"], None)
            log.written[new["revision"]] = log.seq
            if len(log.written) > self._keep:  # one more than kept: the oldest goes
                del log.written[next(iter(log.written))]
                oldest = next(iter(log.written.values()))  # marks at or before it cover every remembered one
                log.policies = {ref: at for ref, at in log.policies.items() if at > oldest}

    def node(self, node: str) -> NodeRevisions | None:
        return self._nodes.get(node)

    def forget(self, node: str) -> None:
        with self._lock:
            self._nodes.pop(node, None)
