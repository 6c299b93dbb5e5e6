"""Pods as the policy control plane sees them: identity key, addresses, node and named ports.

Only pods that can send or receive traffic through a pod interface count: hostNetwork pods
share the node's addresses (policy treats them as the host) and pods in a terminal phase no
longer own their IP, which the network may already have given to a new pod. An address is
owned by one pod at a time; when stale data shows two, the choice is deterministic.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from beekeeper.operator.identities import IdentityKey

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class NamedPort:
    """A named container port: NetworkPolicy resolves `port: <name>` through these, per protocol."""

    name: str
    protocol: str
    number: int


@dataclass(frozen=True)
class PodRecord:
    namespace: str
    name: str
    node: str | None
    key: IdentityKey
    ips: tuple[str, ...]
    """Addresses this pod owns (status.podIPs), normalised."""
    named_ports: frozenset[NamedPort]

    @cached_property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @cached_property
    def ipv4(self) -> str | None:
        """The address the IPv4-only datapath enforces at; None leaves the pod unenforceable (computed once:
        the compilers ask for it per pod and pass)."""
        return next((ip for ip in self.ips if ipaddress.ip_address(ip).version == 4), None)


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


def _named_ports(spec: Mapping[str, Any]) -> frozenset[NamedPort]:
    # Native sidecars (init containers that keep running) serve ports like regular containers.
    containers = list(spec.get("containers") or []) + [
        c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"
    ]
    return frozenset(
        NamedPort(p["name"], p.get("protocol") or "TCP", int(p["containerPort"]))
        for c in containers
        for p in c.get("ports") or []
        if p.get("name") and p.get("containerPort")
    )


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


def _candidate(body: Mapping[str, Any], namespace_labels: Mapping[str, Mapping[str, str]]) -> PodRecord | None:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    namespace = meta.get("namespace", "")
    if spec.get("hostNetwork") or status.get("phase") in TERMINAL_PHASES or namespace not in namespace_labels:
        return None
    key = IdentityKey.of(namespace, meta.get("labels"), namespace_labels[namespace])
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
        record = _candidate(body, namespace_labels)
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


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields pod_records and the runtime-security compiler read, so the cache does not hold whole pods."""
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}

    def ports(containers: Iterable[Mapping[str, Any]] | None, sidecars: bool = False) -> list[dict[str, Any]]:
        return [
            {"ports": c["ports"], **({"restartPolicy": c["restartPolicy"]} if sidecars else {})}
            for c in containers or []
            if c.get("ports") and (not sidecars or c.get("restartPolicy") == "Always")
        ]

    return {
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "labels", "resourceVersion", "creationTimestamp", "deletionTimestamp")
            if meta.get(k) is not None
        },
        "spec": {
            "nodeName": spec.get("nodeName"),
            "hostNetwork": bool(spec.get("hostNetwork")),
            "containers": ports(spec.get("containers")),
            "initContainers": ports(spec.get("initContainers"), sidecars=True),
        },
        "status": {
            **{k: status[k] for k in ("phase", "podIP", "podIPs") if status.get(k) is not None},
            # Runtime security finds each container's cgroup by its id.
            **{
                k: [{"name": c.get("name"), "containerID": c.get("containerID")} for c in status[k]]
                for k in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")
                if status.get(k)
            },
        },
    }
