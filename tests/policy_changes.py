"""Random node policy inputs for the incremental-maps tests (unit: simulated maps; kernel: real ones).

A small universe (few peers, prefixes, policies, pods) so that successive changes keep
hitting the same keys: shared entries, prefix conflicts, endpoints sharing a veth.
"""

from __future__ import annotations

import random
from typing import Any

from beekeeper.crds.policyslice import address_groups, slice_hash
from beekeeper.node_daemon.routes import PodInterface, Unresolved

POLICIES = [f"a/p{i}" for i in range(4)]
PEERS = [0, 1, 300, 301, 302, 16777300, 16777301]
LOCALS = [300, 301, 302]
CIDRS = ["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32", "10.0.0.0/24", "10.0.0.0/8", "192.168.0.1/32"]
PORTS: list[dict[str, Any]] = [
    {"protocol": "TCP", "portStart": 80, "portEnd": 80},
    {"protocol": "TCP", "portStart": 8000, "portEnd": 8080},
    {"protocol": "UDP", "portStart": 53, "portEnd": 53},
    {"protocol": "Any", "portStart": 0, "portEnd": 0},
    {"protocol": "SCTP", "portStart": 0, "portEnd": 0},
]
PODS = [(f"pod{i}", f"10.240.0.{i + 2}") for i in range(6)] + [("v6", "fd00::2")]


def random_slice(rng: random.Random, policy: str) -> dict[str, Any]:
    def prefixes(identities: list[int]) -> list[dict[str, Any]]:
        return [{"cidr": c, "identity": rng.choice(identities)} for c in rng.sample(CIDRS, rng.randint(0, 3))]

    rules = [
        {
            "localIdentity": rng.choice(LOCALS),
            "direction": rng.choice(["Ingress", "Egress"]),
            "action": rng.choice(["allow", "allow", "deny"]),
            "peers": rng.sample(PEERS, rng.randint(1, 3)),
            "ports": rng.sample(PORTS, rng.randint(1, 2)),
        }
        for _ in range(rng.randint(0, 3))
    ]
    body = {
        "policy": policy,
        "rules": rules,
        "ipcache": address_groups(prefixes([300, 301, 302])),
        "cidrIdentities": prefixes([16777300, 16777301]),
    }
    return {"nodeName": "n1", **body, "contentHash": slice_hash(body)}


def random_node(rng: random.Random) -> dict[str, Any]:
    endpoints = [
        {"namespace": "x", "pod": pod, "ip": ip, "identity": rng.choice(LOCALS), "ingressEnforced": rng.random() < 0.5}
        for pod, ip in rng.sample(PODS, rng.randint(0, len(PODS)))
    ]
    inline = [
        {
            "localIdentity": rng.choice(LOCALS),
            "direction": "Ingress",
            "peerIdentity": rng.choice(PEERS),
            "protocol": "TCP",
            "portStart": 443,
            "portEnd": 443,
            "action": "allow",
            "policy": rng.choice(POLICIES),
        }
        for _ in range(rng.choice([0, 0, 1]))
    ]
    own = [{"cidr": c, "identity": 1} for c in rng.sample(CIDRS, rng.choice([0, 1]))]
    return {"endpoints": endpoints, "ipcache": own, "rules": inline}


def random_interfaces(rng: random.Random) -> dict[str, PodInterface | Unresolved]:
    """Each pod IP on a veth of its own, unresolved, or (rarely) on another pod's."""
    out: dict[str, PodInterface | Unresolved] = {}
    for i, (_, ip) in enumerate(PODS):
        roll = rng.random()
        if roll < 0.15:
            out[ip] = Unresolved("no route")
        else:
            ifindex = 10 + (rng.randrange(len(PODS)) if roll < 0.25 else i)
            out[ip] = PodInterface(ifindex, f"veth{ifindex}")
    return out
