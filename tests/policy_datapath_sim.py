"""The lookups of bpf/policy.c, replayed in Python over what the operator writes for each node.

Each node's spec.networkPolicy and its BpfPolicySlices go through the daemon's own
translation (node_daemon.policy_state: slices expanded, prefixes unioned) into the exact map
contents it writes (node_daemon.policy_maps.encode: the same bytes, LPM keys and port-range blocks),
then a packet is judged the way evaluate() in policy.c judges it: at the client's endpoint
for egress and the server's for ingress, only in an enforced direction, peer identities =
ipcache longest match (world when absent), the most specific cidr_ids prefix, and 0; any
deny hit drops, else any allow hit passes, else default deny.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from beekeeper.crds.nodestate import IpcacheEntry, NodeNetworkPolicy, PolicyRule
from beekeeper.crds.policyslice import BpfPolicySliceSpec
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.policy_state import flat_rules, node_endpoints, policy_names, translate, union_prefixes
from beekeeper.node_daemon.routes import PodInterface
from beekeeper.operator.policy_compile import CompiledPolicies

PROTOCOLS = {"TCP": pm.PROTO_TCP, "UDP": pm.PROTO_UDP, "SCTP": pm.PROTO_SCTP, "ICMP": 1, "Any": pm.PROTO_ANY}


def _lpm(table: Mapping[bytes, bytes], data: bytes) -> bytes | None:
    """The value of the longest key whose first prefixlen bits equal data's (BPF_MAP_TYPE_LPM_TRIE)."""
    best, best_len = None, -1
    wanted = int.from_bytes(data, "big")
    bits = len(data) * 8
    for key, value in table.items():
        prefixlen = struct.unpack_from("<I", key)[0]
        stored = int.from_bytes(key[4:], "big")
        if prefixlen > best_len and (stored ^ wanted) >> (bits - prefixlen) == 0:
            best, best_len = value, prefixlen
    return best


@dataclass
class NodeMaps:
    """One node's synced maps, plus its endpoints by IP (the kernel finds them by ifindex)."""

    maps: dict[str, dict[bytes, bytes]]
    endpoints: dict[str, tuple[int, int]]
    """endpoint IP -> (identity, flags)."""

    @classmethod
    def encode(cls, policy: NodeNetworkPolicy, slices: Mapping[str, BpfPolicySliceSpec] | None = None) -> NodeMaps:
        """Through the daemon's own translation (slices expanded, prefixes unioned), interfaces numbered 1..n."""
        interfaces = {e.ip: PodInterface(i + 1, f"veth{i}") for i, e in enumerate(node_endpoints(policy, slices or {}))}
        names = sorted(policy_names(policy, (slices or {}).values()))
        plan = translate(policy, interfaces, {name: i for i, name in enumerate(names)}, slices)
        encoded = pm.encode(plan.state, lambda interface: interface if isinstance(interface, int) else None)
        endpoints = {}
        for value in encoded.maps[pm.ENDPOINTS.name].values():
            identity, ip, flags = pm.ENDPOINT_VALUE.unpack(value)
            endpoints[str(ipaddress.IPv4Address(ip))] = (identity, flags)
        return cls(encoded.maps, endpoints)

    def _identity(self, table: str, address: str) -> int | None:
        value = _lpm(self.maps[table], ipaddress.IPv4Address(address).packed)
        return pm.IDENTITY_VALUE.unpack(value)[0] if value is not None else None

    def passes(self, local_ip: str, direction: pm.Direction, peer: str, protocol: str, port: int) -> bool:
        """policy.c evaluate() for the first packet of a flow at the endpoint with local_ip."""
        identity, flags = self.endpoints[local_ip]
        flag = pm.EP_INGRESS_ENFORCED if direction is pm.Direction.INGRESS else pm.EP_EGRESS_ENFORCED
        if not flags & flag:
            return True
        peer_id = self._identity(pm.IPCACHE.name, peer)
        cidr_id = self._identity(pm.CIDR_IDS.name, peer)
        peers = [pm.ID_WORLD if peer_id is None else peer_id, *([cidr_id] if cidr_id else []), pm.ID_ANY]

        def hit(table: str) -> bool:
            for peer_identity in peers:
                key = pm.POLICY_KEY.pack(
                    pm.PREFIX_FULL,
                    identity,
                    peer_identity,
                    direction.code,
                    PROTOCOLS[protocol],
                    port.to_bytes(2, "big"),
                )
                if _lpm(self.maps[table], key[4:]) is not None:
                    return True
            return False

        if hit(pm.POLICY_DENY.name):
            return False
        return hit(pm.POLICY_ALLOW.name)


def node_slices(compiled: CompiledPolicies, node: str) -> dict[str, BpfPolicySliceSpec]:
    """The slices a node's spec lists, validated against the API model on the way."""
    listed = {r["name"] for r in (compiled.nodes[node] or {}).get("slices") or []}
    bodies = compiled.slices.get(node) or {}
    assert listed == set(bodies), (listed, set(bodies))
    return {name: BpfPolicySliceSpec.model_validate(body) for name, body in bodies.items()}


def encode_nodes(compiled: CompiledPolicies) -> dict[str, NodeMaps]:
    """Each node's spec.networkPolicy and slices (wire form, validated against the API models) as maps."""
    return {
        node: NodeMaps.encode(NodeNetworkPolicy.model_validate(policy), node_slices(compiled, node))
        for node, policy in compiled.nodes.items()
        if policy is not None
    }


def flat_policy(compiled: CompiledPolicies, node: str) -> NodeNetworkPolicy:
    """A node's state with its slices folded in, as the maps see it: every rule expanded, prefixes unioned,
    the endpoint slices' endpoints inline."""
    spec = NodeNetworkPolicy.model_validate(compiled.nodes[node])
    slices = node_slices(compiled, node)
    pieces = sorted(slices.items())
    ipcache, _ = union_prefixes(spec.ipcache or [], ((n, p.addresses()) for n, p in pieces), "ipcache")
    cidr_ids, _ = union_prefixes(spec.cidr_identities or [], ((n, p.cidr_identities or []) for n, p in pieces), "")
    rules = [
        PolicyRule(
            local_identity=r.local_identity,
            direction=r.direction,
            peer_identity=r.peer_identity,
            protocol=r.protocol,
            port_start=r.port_start,
            port_end=r.port_end,
            action=r.action,
            policy=r.policy,
        )
        for r in flat_rules(spec, [p for _, p in pieces])
    ]
    return spec.model_copy(
        update={
            "endpoints": node_endpoints(spec, slices),
            "ipcache": [IpcacheEntry(cidr=e.cidr, identity=e.identity) for e in ipcache],
            "cidr_identities": [IpcacheEntry(cidr=e.cidr, identity=e.identity) for e in cidr_ids],
            "rules": sorted(
                rules,
                key=lambda r: (
                    r.local_identity,
                    r.direction,
                    r.peer_identity,
                    r.protocol,
                    r.port_start,
                    r.port_end,
                    r.action,
                    r.policy,
                ),
            ),
            "slices": None,
        }
    )


def datapath_allows(nodes: Mapping[str, NodeMaps], src: str, dst: str, protocol: str, port: int) -> bool:
    """Egress at the client's node (if the client is an endpoint), then ingress at the server's."""
    for maps in nodes.values():
        if src in maps.endpoints and not maps.passes(src, pm.Direction.EGRESS, dst, protocol, port):
            return False
    for maps in nodes.values():
        if dst in maps.endpoints and not maps.passes(dst, pm.Direction.INGRESS, src, protocol, port):
            return False
    return True
