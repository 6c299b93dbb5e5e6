"""Pods as the policy control plane sees them: identity key, addresses, node and named ports.

Only pods that can send or receive traffic through a pod interface count: hostNetwork pods
share the node's addresses (policy treats them as the host) and pods in a terminal phase no
longer own their IP, which the network may already have given to a new pod. An address is
owned by one pod at a time; when stale data shows two, the choice is deterministic.
"""

from __future__ import annotations

import bisect
import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from beekeeper.operator.identities import IdentityKey

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class NamedPort:
    """A named container port: NetworkPolicy resolves `port: <name>` through these, per protocol."""

    name: str
    protocol: str
    number: int


@dataclass(frozen=True, slots=True)
class PodRecord:
    """One pod as policy sees it. Slotted, with `ref` and `ipv4` set once: the operator holds one per pod,
    and an instance dict made them 870 bytes each at 10k pods."""

    namespace: str
    name: str
    node: str | None
    key: IdentityKey
    ips: tuple[str, ...]
    """Addresses this pod owns (status.podIPs), normalised."""
    named_ports: frozenset[NamedPort]
    ref: str = field(init=False, repr=False, compare=False)
    """namespace/name."""
    ipv4: str | None = field(init=False, repr=False, compare=False)
    """The address the IPv4-only datapath enforces at; None leaves the pod unenforceable."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", f"{self.namespace}/{self.name}")
        # ips are normalised (_addresses), so an IPv4 address is one without a colon.
        object.__setattr__(self, "ipv4", next((ip for ip in self.ips if ":" not in ip), None))


def _addresses(status: Mapping[str, Any]) -> list[str]:
    raw = [entry.get("ip") for entry in status.get("podIPs") or []] or [status.get("podIP")]
    out = []
    for value in raw:
        try:
            address = str(ipaddress.ip_address(value or ""))
        except ValueError:
            continue
        if address not in out:
            out.append(address)
    return out


_NO_PORTS: frozenset[NamedPort] = frozenset()


def _named_ports(spec: Mapping[str, Any]) -> frozenset[NamedPort]:
    # Native sidecars (init containers that keep running) serve ports like regular containers.
    containers = list(spec.get("containers") or []) + [
        c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"
    ]
    ports = frozenset(
        NamedPort(p["name"], p.get("protocol") or "TCP", int(p["containerPort"]))
        for c in containers
        for p in c.get("ports") or []
        if p.get("name") and p.get("containerPort")
    )
    return ports or _NO_PORTS  # most pods have none: one shared object, not an empty set each


def pod_records(
    pods: Iterable[Mapping[str, Any]], namespace_labels: Mapping[str, Mapping[str, str]]
) -> list[PodRecord]:
    """The live pod-network pods, sorted by namespace/name, each address kept by one pod only.

    Pods of a namespace not (yet) seen are left out until it is, since their identity
    depends on its labels. On a duplicate address the pod not being deleted wins, then
    the newest.
    """
    candidates: list[tuple[Mapping[str, Any], PodRecord]] = []
    for body in pods:
        record = _candidate(body, namespace_labels)  # "" is no namespace's name: left out
        if record is not None:
            candidates.append((body.get("metadata") or {}, record))

    candidates.sort(key=lambda c: c[1].ref)
    candidates.sort(key=lambda c: c[0].get("creationTimestamp") or "", reverse=True)
    candidates.sort(key=lambda c: bool(c[0].get("deletionTimestamp")))
    owners: dict[str, str] = {}
    for _, record in candidates:
        for ip in record.ips:
            owners.setdefault(ip, record.ref)
    records = [
        PodRecord(r.namespace, r.name, r.node, r.key, tuple(ip for ip in r.ips if owners[ip] == r.ref), r.named_ports)
        for _, r in candidates
    ]
    return sorted(records, key=lambda r: r.ref)


def _candidate(
    body: Mapping[str, Any],
    namespace_labels: Mapping[str, Mapping[str, str]],
    keys: dict[IdentityKey, IdentityKey] | None = None,
) -> PodRecord | None:
    """keys: one IdentityKey object per label set, shared by the pods that have it."""
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    namespace = meta.get("namespace", "")
    if spec.get("hostNetwork") or status.get("phase") in TERMINAL_PHASES or namespace not in namespace_labels:
        return None
    key = IdentityKey.of(namespace, meta.get("labels"), namespace_labels[namespace])
    if keys is not None:
        key = keys.setdefault(key, key)
    return PodRecord(namespace, meta["name"], spec.get("nodeName"), key, tuple(_addresses(status)), _named_ports(spec))


class PodRecords:
    """pod_records with memory, for the operator's pass over every pod: only the bodies not seen in the last
    pass (the cache keeps a pod's object until it changes) or in a relabelled namespace are read again, and
    duplicate addresses are settled among the pods that claim them only, as pod_records would."""

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._bodies: dict[int, Mapping[str, Any]] = {}
        """id -> body of the last pass (held, so no new object takes one of these ids meanwhile)."""
        self._candidates: dict[int, PodRecord] = {}
        self._by_ref: dict[str, tuple[Mapping[str, Any], PodRecord]] = {}
        self._order: list[str] = []
        self._claims: dict[str, list[str]] = {}
        self._namespaces: dict[str, dict[str, str]] = {}
        self._records: list[PodRecord] = []
        self._keys: dict[IdentityKey, IdentityKey] = {}
        """The identity keys the records share (pruned to the live ones when it has grown to twice as many)."""

    def _drop(self, key: int) -> None:
        del self._bodies[key]
        record = self._candidates.pop(key, None)
        if record is None:
            return
        del self._by_ref[record.ref]
        del self._order[bisect.bisect_left(self._order, record.ref)]
        for ip in record.ips:
            self._claims[ip].remove(record.ref)
            if not self._claims[ip]:
                del self._claims[ip]

    def _add(self, body: Mapping[str, Any], namespace_labels: Mapping[str, Mapping[str, str]]) -> None:
        self._bodies[id(body)] = body
        record = _candidate(body, namespace_labels, self._keys)
        if record is None:
            return
        if record.ref in self._by_ref:  # two objects for one pod: keep the one seen last, like a dict would
            self._drop(id(self._by_ref[record.ref][0]))
            self._bodies[id(body)] = body
        self._candidates[id(body)] = record
        self._by_ref[record.ref] = (body.get("metadata") or {}, record)
        bisect.insort(self._order, record.ref)
        for ip in record.ips:
            self._claims.setdefault(ip, []).append(record.ref)

    def __call__(
        self, pods: Iterable[Mapping[str, Any]], namespace_labels: Mapping[str, Mapping[str, str]]
    ) -> list[PodRecord]:
        bodies = pods if isinstance(pods, list) else list(pods)
        ids = list(map(id, bodies))
        relabelled = {
            ns
            for ns in self._namespaces.keys() | namespace_labels.keys()
            if self._namespaces.get(ns) != namespace_labels.get(ns)
        }
        if ids == self._ids and not relabelled:
            return list(self._records)
        self._namespaces = {ns: dict(labels) for ns, labels in namespace_labels.items()}
        current = set(ids)
        again = (
            [
                key
                for key, body in self._bodies.items()
                if key not in current or (body.get("metadata") or {}).get("namespace", "") in relabelled
            ]
            if relabelled or len(current) != len(self._bodies) or not current.issuperset(self._bodies)
            else []
        )
        for key in again:
            self._drop(key)
        for body in bodies:
            if id(body) not in self._bodies:
                self._add(body, namespace_labels)
        if len(self._keys) > 2 * len(self._candidates) + 64:
            self._keys = {r.key: r.key for r in self._candidates.values()}
        self._ids = ids
        owners: dict[str, str] = {}
        for ip, claimants in self._claims.items():
            if len(claimants) > 1:
                ranked = sorted(claimants)
                ranked.sort(key=lambda ref: self._by_ref[ref][0].get("creationTimestamp") or "", reverse=True)
                ranked.sort(key=lambda ref: bool(self._by_ref[ref][0].get("deletionTimestamp")))
                owners[ip] = ranked[0]
        records = [self._by_ref[ref][1] for ref in self._order]
        if owners:
            records = [
                r
                if not any(ip in owners for ip in r.ips)
                else PodRecord(
                    r.namespace,
                    r.name,
                    r.node,
                    r.key,
                    tuple(ip for ip in r.ips if owners.get(ip, r.ref) == r.ref),
                    r.named_ports,
                )
                for r in records
            ]
        self._records = records
        return list(records)


def shared(value: Any) -> Any:
    """One string object for a value many cached objects repeat (pods' namespaces, nodes and labels, slices'
    node and policy names): a watch event's JSON brings its own copy each."""
    return sys.intern(value) if isinstance(value, str) else value


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields pod_records and the runtime-security compiler read, so the cache does not hold whole pods.

    The cached pods were the operator's largest table at 10k pods, so the strings pods share (namespace,
    node, labels, phase, creation second) are interned and empty or default fields left out.
    """
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}

    def ports(containers: Iterable[Mapping[str, Any]] | None, sidecars: bool = False) -> list[dict[str, Any]]:
        return [
            {"ports": c["ports"], **({"restartPolicy": c["restartPolicy"]} if sidecars else {})}
            for c in containers or []
            if c.get("ports") and (not sidecars or c.get("restartPolicy") == "Always")
        ]

    metadata = {k: meta[k] for k in ("name", "uid", "resourceVersion", "deletionTimestamp") if meta.get(k) is not None}
    metadata.update({k: shared(meta[k]) for k in ("namespace", "creationTimestamp") if meta.get(k) is not None})
    if meta.get("labels"):
        metadata["labels"] = {shared(k): shared(v) for k, v in meta["labels"].items()}
    slim_spec: dict[str, Any] = {"nodeName": shared(spec["nodeName"])} if spec.get("nodeName") else {}
    if spec.get("hostNetwork"):
        slim_spec["hostNetwork"] = True
    for key, sidecars in (("containers", False), ("initContainers", True)):
        if serving := ports(spec.get(key), sidecars):
            slim_spec[key] = serving
    slim_status = {"phase": shared(status["phase"])} if status.get("phase") is not None else {}
    # podIP is podIPs[0] whenever podIPs is set (_addresses reads podIPs first).
    if status.get("podIPs"):
        slim_status["podIPs"] = status["podIPs"]
    elif status.get("podIP") is not None:
        slim_status["podIP"] = status["podIP"]
    # Runtime security finds each container's cgroup by its id.
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        if status.get(key):
            slim_status[key] = [
                {"name": shared(c.get("name")), "containerID": c.get("containerID")} for c in status[key]
            ]
    return {"metadata": metadata, "spec": slim_spec, "status": slim_status}
