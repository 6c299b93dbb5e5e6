"""Random policy worlds for the property tests: namespaces, pods (labels, nodes, named ports) and policies
(allow and deny rules, pod/namespace selectors, ipBlocks with except entries, numeric and named ports,
ranges, protocols). Pods with the same labels always declare the same named ports (the entries are per
identity; see test_policy_compile for what happens otherwise)."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from policy_reference import World, namespace, pod, policy

EXAMPLES = int(os.environ.get("BEEKEEPER_PROPERTY_EXAMPLES", "300"))
"""Worlds per property test (CI may raise it); slower tests take a share of it."""


def property_settings(examples: int = EXAMPLES) -> settings:
    """Reproducible runs (derandomized, no example database) of worlds large enough to be slow."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


NODES = {"n1": ["192.168.0.1"], "n2": ["192.168.0.2"], "n3": []}
OUTSIDE = ["10.0.1.200", "10.0.2.77", "10.9.9.9", "172.16.3.4", "192.168.5.5", "8.8.8.8"]
POD_ADDRESSES = [f"10.0.{a}.{b}" for a in range(4) for b in (1, 2, 3, 9, 130)]
CIDRS = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.0.0.0/16",
    "10.0.1.0/24",
    "10.0.1.0/25",
    "10.0.1.0/30",
    "10.0.2.0/24",
    "10.0.2.2/32",
    "10.0.3.128/25",
    "192.168.0.0/16",
    "192.168.0.1/32",
    "172.16.0.0/12",
]
PORT_NAMES = ["http", "dns", "metrics"]
PORT_NUMBERS = [53, 80, 81, 1000, 8080, 9090]
PROTOCOLS = ["TCP", "UDP", "SCTP"]
LABELS = {"app": ["web", "db", "api"], "tier": ["front", "back"]}
NAMESPACE_LABELS = {"team": ["a", "b"], "env": ["prod", "dev"]}

label_sets = st.dictionaries(st.sampled_from(sorted(LABELS)), st.just(""), max_size=2).flatmap(
    lambda keys: st.fixed_dictionaries({k: st.sampled_from(LABELS[k]) for k in keys})
)


@st.composite
def selectors(draw: st.DrawFn, vocabulary: dict[str, list[str]]) -> dict[str, Any]:
    """{} (everything), matchLabels, or one set-based requirement."""
    key = draw(st.sampled_from(sorted(vocabulary)))
    kind = draw(st.sampled_from(["all", "labels", "In", "NotIn", "Exists", "DoesNotExist"]))
    if kind == "all":
        return {}
    if kind == "labels":
        return {"matchLabels": {key: draw(st.sampled_from(vocabulary[key]))}}
    requirement: dict[str, Any] = {"key": key, "operator": kind}
    if kind in ("In", "NotIn"):
        requirement["values"] = draw(st.lists(st.sampled_from(vocabulary[key]), min_size=1, max_size=2, unique=True))
    return {"matchExpressions": [requirement]}


@st.composite
def peers(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["pods", "namespaces", "both", "ipBlock", "ipBlock"]))
    if kind == "ipBlock":
        cidr = draw(st.sampled_from(CIDRS))
        outer = ipaddress.ip_network(cidr)
        inside = [c for c in CIDRS if ipaddress.ip_network(c).subnet_of(outer) and ipaddress.ip_network(c) != outer]
        block: dict[str, Any] = {"cidr": cidr}
        if inside:
            excepts = draw(st.lists(st.sampled_from(inside), max_size=2, unique=True))
            if excepts:
                block["except"] = excepts
        return {"ipBlock": block}
    peer = {}
    if kind in ("pods", "both"):
        peer["podSelector"] = draw(selectors(LABELS))
    if kind in ("namespaces", "both"):
        peer["namespaceSelector"] = draw(
            selectors({**NAMESPACE_LABELS, "kubernetes.io/metadata.name": ["x", "y", "z"]})
        )
    return peer


@st.composite
def ports(draw: st.DrawFn) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    protocol = draw(st.sampled_from([None, *PROTOCOLS]))
    if protocol:
        entry["protocol"] = protocol
    kind = draw(st.sampled_from(["any", "number", "range", "named", "named"]))
    if kind == "number":
        entry["port"] = draw(st.sampled_from(PORT_NUMBERS))
    elif kind == "range":
        start = draw(st.sampled_from(PORT_NUMBERS))
        entry.update(port=start, endPort=draw(st.integers(start, 9100)))
    elif kind == "named":
        entry["port"] = draw(st.sampled_from(PORT_NAMES))
    return entry


@st.composite
def rules(draw: st.DrawFn, peers_key: str) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    shape = draw(st.sampled_from(["absent", "empty", "some", "some"]))
    if shape == "empty":
        rule[peers_key] = []
    elif shape == "some":
        rule[peers_key] = draw(st.lists(peers(), min_size=1, max_size=2))
    port_shape = draw(st.sampled_from(["absent", "empty", "some", "some"]))
    if port_shape == "empty":
        rule["ports"] = []
    elif port_shape == "some":
        rule["ports"] = draw(st.lists(ports(), min_size=1, max_size=2))
    return rule


@st.composite
def policies(draw: st.DrawFn, index: int) -> dict[str, Any]:
    types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    spec: dict[str, Any] = {"podSelector": draw(selectors(LABELS))}
    if types:
        spec["policyTypes"] = types
    for field, peers_key, direction in (
        ("ingress", "from", "Ingress"),
        ("egress", "to", "Egress"),
        ("ingressDeny", "from", "Ingress"),
        ("egressDeny", "to", "Egress"),
    ):
        if field.endswith("Deny") and types and direction not in types:
            continue  # rejected by the CRD's CEL rules
        if draw(st.booleans()):
            spec[field] = draw(st.lists(rules(peers_key), max_size=2))
    return policy(draw(st.sampled_from(["x", "y", "z"])), f"p{index}", **spec)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    namespaces = [
        namespace(
            name,
            **draw(st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in NAMESPACE_LABELS.items()})),
        )
        for name in ("x", "y", "z")
    ]
    count = draw(st.integers(1, 8))
    addresses = draw(st.lists(st.sampled_from(POD_ADDRESSES), min_size=count, max_size=count, unique=True))
    named: dict[tuple[str, tuple], list[tuple[str, str, int]]] = {}
    pods = []
    for i, address in enumerate(addresses):
        ns, labels = draw(st.sampled_from(["x", "y", "z"])), draw(label_sets)
        key = (ns, tuple(sorted(labels.items())))
        if key not in named:  # same labels, same named ports (see the module docstring)
            names = draw(st.lists(st.sampled_from(PORT_NAMES), max_size=3, unique=True))
            named[key] = [(n, draw(st.sampled_from(PROTOCOLS)), draw(st.sampled_from(PORT_NUMBERS))) for n in names]
        running = draw(st.integers(0, 9)) > 0  # now and then a pod without an address yet
        pods.append(
            pod(ns, f"pod{i}", labels, draw(st.sampled_from(sorted(NODES))), address if running else None, named[key])
        )
    count = draw(st.integers(1, 5))
    return World(namespaces, pods, [draw(policies(i)) for i in range(count)], NODES)
