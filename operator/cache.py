"""What the operator has observed of the cluster, fed by its informers (informers.py).

The reconciler decides from this snapshot instead of reading the API on every change.
Every kind's table is replaced by each full listing (start-up, and any relist after a
watch gap or 410 Gone), so after a relist the cache equals the API: an object deleted
during the gap is gone. Changes the operator caused itself (the resourceVersions its writes
returned) do not wake the reconciler; every other change does.

ConfigMaps are watched cluster-wide (a BpfProgram may name any ConfigMap, and users do not
label them), but only the ones some BpfProgram references are stored: a cluster holds many,
some large. A newly referenced one is fetched once by the informers (`unknown_configmaps`)
and kept current by the watch from then on; passes wait until none is unknown.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from beekeeper.crds.policyslice import slice_hash
from beekeeper.operator.pods import shared, slim_pod

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
    "ConfigMap",
    "RuntimeSecurityPolicy",
)
NAMESPACED = frozenset({"Pod", "NetworkIdentityPolicy", "ConfigMap", "RuntimeSecurityPolicy"})
DELETED = "DELETED"
OWN_WRITE_TTL_SECONDS = 300.0
"""An own write whose watch event never came (e.g. lost in a watch gap) is forgotten after this."""


def _version(body: Mapping[str, Any] | None) -> int | None:
    """resourceVersions are opaque but, within one resource type from one etcd, they grow."""
    try:
        return int((body or {})["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


def _slim_namespace(body: Mapping[str, Any]) -> Body:
    meta = body.get("metadata") or {}
    return {"metadata": {k: meta[k] for k in ("name", "labels", "resourceVersion") if meta.get(k) is not None}}


def _slim_configmap(body: Mapping[str, Any]) -> Body:
    meta = body.get("metadata") or {}
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "resourceVersion") if meta.get(k) is not None},
        "data": dict(body.get("data") or {}),
        "binaryData": dict(body.get("binaryData") or {}),
    }


def _slim_policy_slice(body: Mapping[str, Any], own: bool = False) -> Body:
    """A slice as its names and `entriesHash`, the hash of the entries it really holds.

    The operator decides by hash whether a slice must be written, and checking the declared
    contentHash against the entries means a hand-edited slice is still rewritten. 5,000
    slices' entries as Python objects were most of the operator's memory at 10k pods. Endpoints
    are kept (one node's pods, as its node state held them before): which pods a new list of
    a node's slices changes decides which policies' Ready waits for that node.
    An own write (`own`: the operator's answer, or the watch event of it) holds what the operator
    hashed when it built it, so it is not hashed again (0.7 ms for a 16 KB slice). Labels are left
    out (nothing reads them) and node and policy names interned: 6,000 slices were 12 MiB.
    """
    if "entriesHash" in body:
        return dict(body)
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    slim_spec = {k: shared(spec[k]) for k in ("nodeName", "policy") if spec.get(k) is not None}
    slim_spec.update({k: spec[k] for k in ("contentHash", "endpoints") if spec.get(k) is not None})
    return {
        "metadata": {k: meta[k] for k in ("name", "resourceVersion") if meta.get(k) is not None},
        "spec": slim_spec,
        "entriesHash": slim_spec.get("contentHash") if own else slice_hash(spec),
    }


def _slim_node(body: Mapping[str, Any]) -> Body:
    """A Node as its labels (placement), uid (owner of its slices) and addresses (the host identity): a real
    Node's status (images, conditions, capacity) is tens of KiB."""
    meta = body.get("metadata") or {}
    return {
        "metadata": {
            k: meta[k] for k in ("name", "uid", "labels", "resourceVersion", "deletionTimestamp") if meta.get(k)
        },
        "status": {"addresses": list((body.get("status") or {}).get("addresses") or [])},
    }


def _without_managed_fields(body: Mapping[str, Any]) -> Body:
    """The object without metadata.managedFields, which nothing here reads (about half of a small object)."""
    meta = body.get("metadata")
    if not isinstance(meta, Mapping) or "managedFields" not in meta:
        return dict(body)
    return {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


# Pods, Nodes and Namespaces (and slices, above) are kept only in the fields the operator reads: a cluster
# has many.
_SLIM: dict[str, Callable[[Mapping[str, Any]], Body]] = {
    "Pod": slim_pod,
    "Node": _slim_node,
    "Namespace": _slim_namespace,
    "ConfigMap": _slim_configmap,
}


def stored(kind: str, body: Mapping[str, Any], own: bool = False) -> Body:
    """The form the cache keeps of an object (the same when applied again); `own`: the operator wrote it."""
    if kind == "BpfPolicySlice":
        return _slim_policy_slice(body, own)
    return _SLIM[kind](body) if kind in _SLIM else _without_managed_fields(body)


def program_reports(nodestates: Mapping[str, Mapping[str, Any]], bpfprogram: str) -> dict[str, list[Mapping[str, Any]]]:
    """Per node, that node daemon's status entries for one BpfProgram (nodes without any left out)."""
    reports: dict[str, list[Mapping[str, Any]]] = {}
    for node, state in nodestates.items():
        entries = [p for p in (state.get("status") or {}).get("programs") or [] if p.get("bpfProgram") == bpfprogram]
        if entries:
            reports[node] = entries
    return reports


def object_key(kind: str, body: Mapping[str, Any]) -> str:
    """The cache key of an object: namespace/name for namespaced kinds, else name."""
    meta = body["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if kind in NAMESPACED else meta["name"]


def configmap_refs(bpfprograms: Iterable[Mapping[str, Any]]) -> set[str]:
    """namespace/name of every ConfigMap a BpfProgram takes its source or bytecode from."""
    refs = set()
    for body in bpfprograms:
        for code in ("source", "bytecode"):
            ref = ((body.get("spec") or {}).get(code) or {}).get("configMapRef") or {}
            if ref.get("name") and ref.get("namespace"):
                refs.add(f"{ref['namespace']}/{ref['name']}")
    return refs


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
    """BpfPolicySlices by name (what the operator wrote, as the API has it), slimmed to their hashes."""
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    """namespace/name -> data, for the referenced ConfigMaps that exist."""
    binary_configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    """namespace/name -> binaryData (base64), for the referenced ConfigMaps that exist."""
    runtime_policies: list[Body] = field(default_factory=list)

    def node_labels(self) -> dict[str, dict[str, str]]:
        return {name: dict(body["metadata"].get("labels") or {}) for name, body in self.nodes.items()}

    def configmap(self, namespace: str, name: str) -> Mapping[str, str] | None:
        """A referenced ConfigMap's data; None when it does not exist."""
        return self.configmaps.get(f"{namespace}/{name}")

    def binary_configmap(self, namespace: str, name: str) -> Mapping[str, str] | None:
        """A referenced ConfigMap's binaryData (base64); None when it does not exist."""
        return self.binary_configmaps.get(f"{namespace}/{name}")


class OwnWrites:
    """resourceVersions the operator's own writes produced (and objects it deleted), per object.

    Filled by the pass thread as each write returns and consulted on the event loop when
    the watch event comes back, so the event is recognised however the two race.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: dict[tuple[str, str, str], float] = {}

    def expect(self, kind: str, key: str, version: str) -> None:
        """version is the written resourceVersion, or DELETED."""
        with self._lock:
            now = time.monotonic()
            # Insertion order is time order: the expired ones are at the front (a write costs O(1),
            # where filtering the whole dict cost O(writes in the last TTL) — thousands at 10k pods).
            while self._expected:
                oldest, at = next(iter(self._expected.items()))
                if now - at < OWN_WRITE_TTL_SECONDS:
                    break
                del self._expected[oldest]
            self._expected.pop((kind, key, version), None)
            self._expected[kind, key, version] = now

    def pending(self, kind: str, key: str, version: str) -> bool:
        """Whether this change is one of ours, without claiming it."""
        with self._lock:
            return (kind, key, version) in self._expected

    def claim(self, kind: str, key: str, version: str) -> bool:
        """Whether this change is one of ours (each is claimed once)."""
        with self._lock:
            return self._expected.pop((kind, key, version), None) is not None

    def forget(self, kind: str) -> None:
        """A relist replaced the kind's table: events of earlier writes will not come."""
        with self._lock:
            self._expected = {k: t for k, t in self._expected.items() if k[0] != kind}


@dataclass
class ClusterCache:
    """Latest known objects of every watched kind, plus a wake-up for the reconciler.

    Mutated only on the event loop (the informers hand over through call_soon_threadsafe).
    """

    tables: dict[str, dict[str, Body]] = field(default_factory=lambda: {kind: {} for kind in KINDS})
    listed: set[str] = field(default_factory=set)
    """Kinds listed at least once."""
    primed: asyncio.Event = field(default_factory=asyncio.Event)
    """Every kind listed and no referenced ConfigMap unknown: a pass may decide."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    own: OwnWrites = field(default_factory=OwnWrites)
    dirty: set[tuple[str, str, str]] = field(default_factory=set)
    """(kind, key, resourceVersion or DELETED) of the changes since the last pass began."""
    referenced: set[str] = field(default_factory=set)
    """namespace/name of the ConfigMaps BpfPrograms reference."""
    unknown_configmaps: set[str] = field(default_factory=set)
    """Referenced ConfigMaps not seen since they became referenced; the informers fetch them."""
    on_unknown_configmap: Callable[[str], None] | None = None

    @property
    def bpfprograms(self) -> dict[str, Body]:
        return self.tables["BpfProgram"]

    @property
    def nodes(self) -> dict[str, Body]:
        return self.tables["Node"]

    @property
    def nodestates(self) -> dict[str, Body]:
        return self.tables["BpfNodeState"]

    def observe(self, kind: str, event_type: str, body: Mapping[str, Any]) -> bool:
        """Apply one watch event (ADDED, MODIFIED, DELETED); True when the table changed."""
        key = object_key(kind, body)
        if kind == "ConfigMap":
            if key not in self.referenced:
                return False
            if key in self.unknown_configmaps:  # the watch told first: the fetch is moot
                self.unknown_configmaps.discard(key)
                self._update_primed()
        table = self.tables[kind]
        if event_type == DELETED:
            if key not in table:
                return False
            del table[key]
            self._changed(kind, key, DELETED)
        else:
            new, old = _version(body), _version(table.get(key))
            if key in table and new is not None and old is not None and new <= old:
                return False
            # The echo of an own write holds what the operator built (a slice is not hashed again).
            table[key] = stored(kind, body, self.own.pending(kind, key, str(new)))
            self._changed(kind, key, str(new))
        if kind == "BpfProgram":
            self._track_references()
        return True

    def replace(self, kind: str, bodies: Iterable[Mapping[str, Any]]) -> None:
        """A full listing of one kind: afterwards the table holds exactly what it lists."""
        table = self.tables[kind]
        listed = {object_key(kind, b): b for b in bodies}
        if kind == "ConfigMap":
            listed = {k: b for k, b in listed.items() if k in self.referenced}
            self.unknown_configmaps -= self.referenced
        self.own.forget(kind)
        for key in list(table):
            if key not in listed:
                del table[key]
                self._changed(kind, key, DELETED)
        for key, body in listed.items():
            if key not in table or _version(body) != _version(table[key]):
                table[key] = stored(kind, body)
                self._changed(kind, key, str(_version(body)))
        self.listed.add(kind)
        if kind == "BpfProgram":
            self._track_references()
        self._update_primed()

    def fetched(self, key: str, body: Mapping[str, Any] | None) -> None:
        """A newly referenced ConfigMap read by the informers (None: it does not exist)."""
        if key not in self.unknown_configmaps:  # no longer referenced, or a watch event came first
            return
        self.unknown_configmaps.discard(key)
        if body is not None:
            self.tables["ConfigMap"][key] = stored("ConfigMap", body)
        self.dirty.add(("ConfigMap", key, "fetched"))
        self.changed.set()
        self._update_primed()

    def record_own(self, kind: str, body: Mapping[str, Any] | None, key: str | None = None) -> None:
        """Put the result of an own write into the table without waking (body None: deleted)."""
        table = self.tables[kind]
        if body is None:
            if key is not None:
                table.pop(key, None)
            return
        key = object_key(kind, body)
        old, new = _version(table.get(key)), _version(body)
        # At the same version too: the watch event of this write may have come first, and the operator's
        # own form shares its objects with the compiler's.
        if key not in table or old is None or (new is not None and new >= old):
            table[key] = stored(kind, body, own=True)

    def take_dirty(self) -> set[tuple[str, str]]:
        """(kind, key) of the foreign changes since the last call (a pass is due when non-empty).

        Own writes are told apart here, not when their events arrive: an event can overtake
        the write's reply, and by now the pass that wrote has registered all its writes.
        """
        dirty, self.dirty = self.dirty, set()
        self.changed.clear()
        return {(kind, key) for kind, key, version in dirty if not self.own.claim(kind, key, version)}

    def _changed(self, kind: str, key: str, version: str) -> None:
        self.dirty.add((kind, key, version))
        self.changed.set()

    def _track_references(self) -> None:
        referenced = configmap_refs(self.bpfprograms.values())
        for key in set(self.tables["ConfigMap"]) - referenced:
            del self.tables["ConfigMap"][key]
        new = referenced - self.referenced
        self.referenced = referenced
        self.unknown_configmaps &= referenced
        if "ConfigMap" in self.listed:
            for key in sorted(new):
                self.unknown_configmaps.add(key)
                if self.on_unknown_configmap is not None:
                    self.on_unknown_configmap(key)
        self._update_primed()

    def _update_primed(self) -> None:
        if self.listed.issuperset(KINDS) and not self.unknown_configmaps:
            self.primed.set()
        else:
            self.primed.clear()

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
            configmaps={key: dict(body.get("data") or {}) for key, body in self.tables["ConfigMap"].items()},
            binary_configmaps={
                key: dict(body.get("binaryData") or {}) for key, body in self.tables["ConfigMap"].items()
            },
            runtime_policies=list(self.tables["RuntimeSecurityPolicy"].values()),
        )
