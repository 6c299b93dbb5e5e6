"""Property: the compiled datapath entries give the verdict of evaluating the policies directly.

Random namespaces, pods (labels, nodes, named ports) and policies (allow and deny rules,
pod/namespace selectors, ipBlocks with except entries, numeric and named ports, ranges,
protocols) are compiled per node, encoded into the node's exact map contents and replayed
through the lookups of bpf/policy.c (policy_datapath_sim). For sampled flows between pods,
node addresses and outside addresses, that verdict must equal the one of the brute-force
reader of the policies (policy_reference).

Known limitation kept out of the generator: pods with the same labels always declare the
same named ports (the entries are per identity; see test_policy_compile for what happens
otherwise). Flows from a pod to itself never cross its interface and are not sampled.
"""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from policy_datapath_sim import datapath_allows, encode_nodes
from policy_reference import World, allowed
from policy_strategies import OUTSIDE, PROTOCOLS, property_settings, worlds

from beekeeper.operator.identities import plan_identities
from beekeeper.operator.pods import pod_records
from beekeeper.operator.policy_compile import compile_policies

PROBES_PER_WORLD = 300


def compile_world(world: World):
    records = pod_records(world.pods, {n["metadata"]["name"]: n["metadata"]["labels"] for n in world.namespaces})
    identities = plan_identities({r.key for r in records}, {}, {}, 0.0, 60.0).assigned
    return compile_policies(world.policies, records, identities, world.nodes)


def probe_ports(world: World) -> list[int]:
    """Ports where verdicts change: every number, range edge (and just past it) and named port in play."""
    out = {1, 65535}
    for body in world.policies:
        for field in ("ingress", "egress", "ingressDeny", "egressDeny"):
            for rule in body["spec"].get(field) or []:
                for entry in rule.get("ports") or []:
                    if isinstance(entry.get("port"), int):
                        end = entry.get("endPort", entry["port"])
                        out |= {entry["port"] - 1, entry["port"], (entry["port"] + end) // 2, end, end + 1}
    for body in world.pods:
        out |= {p["containerPort"] for c in body["spec"]["containers"] for p in c.get("ports") or []}
    return sorted(out)


@property_settings()
@given(world=worlds(), seed=st.integers(0, 2**32 - 1))
def test_datapath_entries_agree_with_the_policies(world: World, seed: int) -> None:
    compiled = compile_world(world)
    assert all(o.error is None for o in compiled.policies.values()), [o.error for o in compiled.policies.values()]
    maps = encode_nodes(compiled)
    pod_ips = [p["status"]["podIP"] for p in world.pods if p["status"].get("podIP")]
    others = OUTSIDE + [a for addresses in world.nodes.values() for a in addresses]
    ports = probe_ports(world)
    rng = random.Random(seed)  # probes are cheap, drawing each through hypothesis is not
    for _ in range(PROBES_PER_WORLD):
        # Mostly pod to pod (both sides' policies count), else a pod and an outside or node address.
        src, dst = rng.sample(pod_ips, 2) if len(pod_ips) > 1 and rng.random() < 0.6 else (None, None)
        if src is None:
            pair = [rng.choice(pod_ips), rng.choice(others)] if pod_ips else rng.sample(others, 2)
            src, dst = pair if rng.random() < 0.5 else pair[::-1]
        protocol = rng.choice([*PROTOCOLS, "ICMP"])
        port = 0 if protocol == "ICMP" else rng.choice(ports)
        expected = allowed(world, src, dst, protocol, port)
        actual = datapath_allows(maps, src, dst, protocol, port)
        assert expected == actual, (
            f"{src} -> {dst} {protocol}/{port}: the policies say {expected}, the datapath entries {actual}"
        )
