"""Numeric security identities for pod label sets: deterministic allocation and garbage collection.

An identity stands for one (namespace, pod labels, namespace labels) set, so every pod with
the same labels shares it and policy entries keyed by identities survive pod churn. The
numbers are persisted as NetworkIdentity objects (named by the number); the functions here
are pure and decide which numbers to keep, create and delete, so the same inputs give the
same numbers, also after an operator restart.

A new label set starts probing at a number derived from a hash of the set, not at the lowest
free one: two operators racing (kopf peering is not leader election), or a number re-created
after its object was lost, land on the same number for the same set instead of colliding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import ValidationError

from beekeeper.crds.identity import MAX_POD_IDENTITY, MIN_POD_IDENTITY, NAMESPACE_LABEL, NetworkIdentity

GC_GRACE_ENV = "BEEKEEPER_IDENTITY_GC_SECONDS"
DEFAULT_GC_GRACE_SECONDS = 60.0

_SPAN = MAX_POD_IDENTITY - MIN_POD_IDENTITY + 1

Labels = tuple[tuple[str, str], ...]


def gc_grace_seconds() -> float:
    """How long an unused identity is kept (a pod recreated with the same labels meanwhile reuses it)."""
    return float(os.environ.get(GC_GRACE_ENV) or DEFAULT_GC_GRACE_SECONDS)


def _frozen(labels: Mapping[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


class IdentityKey(NamedTuple):
    """The label set an identity stands for; hashable and ordered so allocation is deterministic (a tuple:
    every pass looks every pod's key up in dicts of every identity, and a tuple hashes and compares in C)."""

    namespace: str
    labels: Labels = ()
    namespace_labels: Labels = ()

    @classmethod
    def of(
        cls, namespace: str, labels: Mapping[str, str] | None, namespace_labels: Mapping[str, str] | None
    ) -> IdentityKey:
        return cls(namespace, _frozen(labels), _frozen(namespace_labels))

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def namespace_label_map(self) -> dict[str, str]:
        return dict(self.namespace_labels)

    def spec(self) -> dict[str, Any]:
        """NetworkIdentity.spec in wire form."""
        spec: dict[str, Any] = {"namespace": self.namespace}
        if self.labels:
            spec["labels"] = self.label_map
        if self.namespace_labels:
            spec["namespaceLabels"] = self.namespace_label_map
        return spec

    def candidates(self) -> Iterator[int]:
        """Every pod identity number, starting at the one this key hashes to."""
        canonical = json.dumps([self.namespace, self.labels, self.namespace_labels], separators=(",", ":"))
        start = int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big") % _SPAN
        for offset in range(_SPAN):
            yield MIN_POD_IDENTITY + (start + offset) % _SPAN


def parse_identity(body: Mapping[str, Any]) -> tuple[int, IdentityKey | None] | None:
    """(number, key) of a NetworkIdentity object; key None when it cannot be used (malformed or being deleted).

    None when the name is not an identity number at all: such an object reserves nothing.
    """
    meta = body.get("metadata") or {}
    try:
        number = int(meta.get("name", ""))
    except ValueError:
        return None
    if not MIN_POD_IDENTITY <= number <= MAX_POD_IDENTITY:
        return None
    if meta.get("deletionTimestamp"):
        return number, None
    try:
        spec = NetworkIdentity.from_dict(dict(body)).spec
    except ValidationError:
        return number, None
    return number, IdentityKey.of(spec.namespace, spec.labels, spec.namespace_labels)


def parse_identities(bodies: Iterable[Mapping[str, Any]]) -> dict[int, IdentityKey | None]:
    """number -> key of the persisted identities; None marks a number that is taken but unusable."""
    parsed = (parse_identity(b) for b in bodies)
    return dict(p for p in parsed if p is not None)


class IdentityReader:
    """parse_identities with memory, for the operator's pass over every NetworkIdentity: an object seen before
    (the cache keeps the same one until it changes) is not validated again."""

    def __init__(self) -> None:
        self._memo: dict[int, tuple[Mapping[str, Any], tuple[int, IdentityKey | None] | None]] = {}
        self._ids: list[int] = []
        self._out: dict[int, IdentityKey | None] = {}

    def __call__(self, bodies: Iterable[Mapping[str, Any]]) -> dict[int, IdentityKey | None]:
        listed = list(bodies)
        ids = list(map(id, listed))
        if ids == self._ids:  # the very objects of the last pass (held in the memo, so no id was reused)
            return dict(self._out)
        memo: dict[int, tuple[Mapping[str, Any], tuple[int, IdentityKey | None] | None]] = {}
        out: dict[int, IdentityKey | None] = {}
        for body in listed:
            seen = self._memo.get(id(body))
            if seen is None or seen[0] is not body:
                seen = (body, parse_identity(body))
            memo[id(body)] = seen
            if seen[1] is not None:
                out[seen[1][0]] = seen[1][1]
        self._memo, self._ids, self._out = memo, ids, out
        return dict(out)


@dataclass
class IdentityPlan:
    """What one reconcile pass does with identities."""

    assigned: dict[IdentityKey, int]
    """Every wanted key's number (existing or new)."""
    create: dict[int, IdentityKey]
    """New numbers to persist before anything references them."""
    delete: list[int]
    """Numbers unused for the whole grace period."""
    unused_since: dict[int, float] = field(default_factory=dict)
    """Carried to the next pass: when each persisted but unused number was first seen unused."""
    next_gc: float | None = None
    """When the next unused number's grace period ends (same clock as `now`)."""


def plan_identities(
    wanted: Iterable[IdentityKey],
    existing: Mapping[int, IdentityKey | None],
    unused_since: Mapping[int, float],
    now: float,
    grace: float,
) -> IdentityPlan:
    """Assign a number to every wanted key, reusing persisted ones, and pick unused ones to delete.

    Duplicates (two objects for one key, after a race) resolve to the lowest number; the
    others become unused and are collected like any unused identity.
    """
    # Highest number first, so the lowest one of a key is the one left (comprehensions: a pass runs this per
    # identity of the cluster).
    by_key = {key: number for number, key in sorted(existing.items(), reverse=True) if key is not None}
    wanted_keys = set(wanted)
    assigned = {key: number for key in wanted_keys if (number := by_key.get(key)) is not None}
    create: dict[int, IdentityKey] = {}
    taken = set(existing)
    for key in sorted(wanted_keys - assigned.keys()):  # new ones in order: who probes first is deterministic
        number = next(n for n in key.candidates() if n not in taken)
        taken.add(number)
        assigned[key] = number
        create[number] = key

    in_use = set(assigned.values())
    plan = IdentityPlan(assigned, create, [])
    for number in sorted(n for n in existing.keys() - in_use if existing[n] is not None):
        since = unused_since.get(number, now)
        if now - since >= grace:
            plan.delete.append(number)
            continue
        plan.unused_since[number] = since
        due = since + grace
        plan.next_gc = due if plan.next_gc is None else min(plan.next_gc, due)
    return plan


def identity_body(number: int, key: IdentityKey) -> dict[str, Any]:
    """The NetworkIdentity object persisting one number."""
    return {
        "apiVersion": NetworkIdentity.model_fields["api_version"].default,
        "kind": NetworkIdentity.names.kind,
        "metadata": {
            "name": str(number),
            "labels": {"app.kubernetes.io/managed-by": "beekeeper", NAMESPACE_LABEL: key.namespace},
        },
        "spec": key.spec(),
    }
