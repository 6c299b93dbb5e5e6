"""A brute-force NetworkIdentityPolicy evaluator, written from the NetworkPolicy rules, not from the compiler.

It reads the raw objects (dicts as the apiserver stores them) and answers one question: may a
packet from address `src` reach address `dst` with this protocol and destination port? It
shares no code with beekeeper.operator (its own selector and CIDR matching), so the property
test compares two independent readings of the same semantics:

- A pod is isolated for a direction when some policy of its namespace selects it and has
  that direction in its policyTypes (defaulted: Ingress, plus Egress when egress or
  egressDeny rules exist).
- A flow needs the client's egress and the server's ingress to agree. An isolated direction
  allows what any selecting policy's rules allow; a deny rule of any selecting policy wins.
- Traffic between a pod and the node it runs on is allowed unless a deny rule matches.
- Peers: no `from`/`to` = everyone (pods, nodes, the outside); podSelector alone = pods of
  the policy's namespace; namespaceSelector alone = every pod of the matching namespaces;
  both = AND; ipBlock = addresses in cidr and in no except entry, pod addresses included.
- Ports: none = every protocol and port; otherwise protocol (default TCP) and the number,
  range or named container port of the destination pod (name and protocol must match).

The module also holds the builders of those raw objects, shared by the policy tests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

API_VERSION = "beekeeper.dev/v1alpha1"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

# --- builders -------------------------------------------------------------------------------


def namespace(name: str, **labels: str) -> dict[str, Any]:
    """A Namespace as the apiserver stores it (it always adds kubernetes.io/metadata.name)."""
    return {"metadata": {"name": name, "labels": {NAMESPACE_NAME_LABEL: name, **labels}}}


def pod(
    ns: str,
    name: str,
    labels: Mapping[str, str] | None = None,
    node: str | None = "n1",
    ip: str | None = None,
    ports: Sequence[tuple[str, str, int]] = (),
    **extra: Any,
) -> dict[str, Any]:
    """A running Pod; ports are named container ports (name, protocol, number)."""
    body: dict[str, Any] = {
        "metadata": {"namespace": ns, "name": name, "labels": dict(labels or {}), "resourceVersion": "1"},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "c", "ports": [{"name": n, "protocol": p, "containerPort": num} for n, p, num in ports]}
            ],
        },
        "status": {"phase": "Running"},
    }
    if ip:
        body["status"].update(podIP=ip, podIPs=[{"ip": ip}])
    for key, value in extra.items():
        section, _, name_ = key.partition("__")
        body[section][name_] = value
    return body


def policy(ns: str, name: str, generation: int = 1, **spec: Any) -> dict[str, Any]:
    """A NetworkIdentityPolicy; spec keys in wire form (podSelector defaults to {})."""
    return {
        "apiVersion": API_VERSION,
        "kind": "NetworkIdentityPolicy",
        "metadata": {"namespace": ns, "name": name, "generation": generation},
        "spec": {"podSelector": {}, **spec},
    }


# --- evaluator ------------------------------------------------------------------------------


@dataclass
class World:
    namespaces: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    policies: list[dict[str, Any]]
    nodes: dict[str, list[str]] = field(default_factory=dict)
    """node name -> its InternalIP addresses."""

    def pod_at(self, address: str) -> dict[str, Any] | None:
        return next((p for p in self.pods if (p.get("status") or {}).get("podIP") == address), None)

    def namespace_labels(self, name: str) -> dict[str, str]:
        ns = next(n for n in self.namespaces if n["metadata"]["name"] == name)
        return ns["metadata"].get("labels") or {}


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    for key, value in ((selector or {}).get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for requirement in (selector or {}).get("matchExpressions") or []:
        key, operator, values = requirement["key"], requirement["operator"], requirement.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def policy_types(spec: Mapping[str, Any]) -> list[str]:
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if spec.get("egress") or spec.get("egressDeny") else [])]


def _in_block(address: str, block: Mapping[str, Any]) -> bool:
    ip = ipaddress.ip_address(address)

    def inside(cidr: str) -> bool:
        net = ipaddress.ip_network(cidr, strict=False)
        return net.version == ip.version and ip in net

    return inside(block["cidr"]) and not any(inside(e) for e in block.get("except") or [])


def _peer_matches(world: World, peer: Mapping[str, Any], policy_ns: str, address: str) -> bool:
    if "ipBlock" in peer:
        return _in_block(address, peer["ipBlock"])
    other = world.pod_at(address)
    if other is None:
        return False
    other_ns = other["metadata"]["namespace"]
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], world.namespace_labels(other_ns)):
            return False
    elif other_ns != policy_ns:
        return False
    return "podSelector" not in peer or selector_matches(peer["podSelector"], other["metadata"].get("labels") or {})


def _port_matches(world: World, entry: Mapping[str, Any], dst: str, protocol: str, port: int) -> bool:
    if protocol != entry.get("protocol", "TCP"):
        return False
    wanted = entry.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, int):
        return wanted <= port <= entry.get("endPort", wanted)
    server = world.pod_at(dst)
    if server is None:
        return False
    return any(
        p.get("name") == wanted and p.get("protocol", "TCP") == protocol and p.get("containerPort") == port
        for c in server["spec"].get("containers") or []
        for p in c.get("ports") or []
    )


def _rule_matches(
    world: World, rule: Mapping[str, Any], peers_key: str, policy_ns: str, peer: str, dst: str, proto: str, port: int
) -> bool:
    peers = rule.get(peers_key) or []
    if peers and not any(_peer_matches(world, p, policy_ns, peer) for p in peers):
        return False
    ports = rule.get("ports") or []
    return not ports or any(_port_matches(world, entry, dst, proto, port) for entry in ports)


def _side_allows(world: World, local: Mapping[str, Any], direction: str, peer: str, dst: str, proto: str, port: int):
    """Whether the local pod's policies let the flow through in `direction` (peer = the other address)."""
    ns = local["metadata"]["namespace"]
    labels = local["metadata"].get("labels") or {}
    selecting = [
        p
        for p in world.policies
        if p["metadata"]["namespace"] == ns
        and direction in policy_types(p["spec"])
        and selector_matches(p["spec"].get("podSelector"), labels)
    ]
    if not selecting:
        return True
    allow_key, deny_key, peers_key = (
        ("ingress", "ingressDeny", "from") if direction == "Ingress" else ("egress", "egressDeny", "to")
    )
    for p in selecting:
        for rule in p["spec"].get(deny_key) or []:
            if _rule_matches(world, rule, peers_key, ns, peer, dst, proto, port):
                return False
    if peer in world.nodes.get(local["spec"].get("nodeName"), []):
        return True
    return any(
        _rule_matches(world, rule, peers_key, p["metadata"]["namespace"], peer, dst, proto, port)
        for p in selecting
        for rule in p["spec"].get(allow_key) or []
    )


def allowed(world: World, src: str, dst: str, protocol: str, port: int) -> bool:
    """The verdict for the first packet of a flow src -> dst (protocol TCP, UDP, SCTP or ICMP)."""
    client, server = world.pod_at(src), world.pod_at(dst)
    if client is not None and not _side_allows(world, client, "Egress", dst, dst, protocol, port):
        return False
    return server is None or _side_allows(world, server, "Ingress", src, dst, protocol, port)
