"""From BpfNodeState.spec.networkPolicy and its BpfPolicySlices to the datapath's desired map contents (pure).

The operator names endpoints by pod IP (in endpoint slices); the datapath keys them by interface. The
interfaces found for each IP (node_daemon/routes.py) come in as an argument, so this
translation is unit-tested without a kernel. Slices ship rules factored (peers x ports);
the product is expanded here. Prefix entries are unioned: the node's own (its addresses
as host) win, and two slices naming one prefix differently keep the first by slice name
(the operator writes a consistent set, so that only happens with hand-made slices).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from beekeeper.crds.networkpolicy import PolicyType
from beekeeper.crds.nodestate import Endpoint as SpecEndpoint
from beekeeper.crds.nodestate import IpcacheEntry, NodeNetworkPolicy, PolicyAction, RuleProtocol
from beekeeper.crds.policyslice import Address, BpfPolicySliceSpec
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.routes import PodInterface, Unresolved

PROTOCOLS = {
    RuleProtocol.ANY: pm.PROTO_ANY,
    RuleProtocol.TCP: pm.PROTO_TCP,
    RuleProtocol.UDP: pm.PROTO_UDP,
    RuleProtocol.SCTP: pm.PROTO_SCTP,
}
DIRECTIONS = {PolicyType.INGRESS: pm.Direction.INGRESS, PolicyType.EGRESS: pm.Direction.EGRESS}
ACTIONS = {PolicyAction.ALLOW: pm.Action.ALLOW, PolicyAction.DENY: pm.Action.DENY}


def pod_name(endpoint: SpecEndpoint) -> str:
    return f"{endpoint.namespace}/{endpoint.pod}"


@dataclass
class Translation:
    state: pm.DatapathState
    interfaces: dict[int, SpecEndpoint] = field(default_factory=dict)
    """ifindex -> the endpoint whose traffic it carries (the interfaces to attach)."""
    unresolved: dict[str, str] = field(default_factory=dict)
    """Endpoint IP -> why it has no interface (yet); those endpoints are left out."""
    problems: list[str] = field(default_factory=list)
    """Endpoints left out for good (IPv6, two endpoints on one interface)."""


@dataclass(frozen=True)
class FlatRule:
    """One expanded entry, as the maps take it (policy by name)."""

    policy: str
    local_identity: int
    direction: PolicyType
    peer_identity: int
    protocol: RuleProtocol
    port_start: int
    port_end: int
    action: PolicyAction


def node_endpoints(spec: NodeNetworkPolicy, slices: Mapping[str, BpfPolicySliceSpec]) -> list[SpecEndpoint]:
    """The node's endpoints: inline, then those of its endpoint slices by slice name."""
    return [*(spec.endpoints or []), *(ep for _, piece in sorted(slices.items()) for ep in piece.endpoints or [])]


def policy_names(spec: NodeNetworkPolicy, slices: Iterable[BpfPolicySliceSpec]) -> set[str]:
    """The policies the node's entries come from (an address slice belongs to none): each needs an index."""
    return {r.policy for r in spec.rules or []} | {p.policy for p in slices if p.policy is not None}


def slice_rules(piece: BpfPolicySliceSpec) -> Iterable[FlatRule]:
    """One slice's product of peers and ports."""
    if piece.policy is None:  # addresses only (the model refuses rules without a policy)
        return
    for rule in piece.rules or []:
        for port in rule.ports:
            for peer in rule.peers:
                yield FlatRule(
                    piece.policy,
                    rule.local_identity,
                    rule.direction,
                    peer,
                    port.protocol,
                    port.port_start,
                    port.port_end,
                    rule.action,
                )


def flat_rules(spec: NodeNetworkPolicy, slices: Iterable[BpfPolicySliceSpec]) -> Iterable[FlatRule]:
    """The node's inline rules and every slice's product of peers and ports."""
    for r in spec.rules or []:
        yield FlatRule(
            r.policy, r.local_identity, r.direction, r.peer_identity, r.protocol, r.port_start, r.port_end, r.action
        )
    for piece in slices:
        yield from slice_rules(piece)


def map_rules(rules: Iterable[FlatRule], policy_indexes: Mapping[str, int]) -> list[pm.Rule]:
    """Expanded entries as the maps take them (policy by index)."""
    return [
        pm.Rule(
            local_identity=r.local_identity,
            direction=DIRECTIONS[r.direction],
            peer_identity=r.peer_identity,
            protocol=PROTOCOLS[r.protocol],
            port_start=r.port_start,
            port_end=r.port_end,
            action=ACTIONS[r.action],
            policy_index=policy_indexes[r.policy],
        )
        for r in rules
    ]


def union_prefixes(
    own: Iterable[IpcacheEntry], pieces: Iterable[tuple[str, Iterable[IpcacheEntry | Address]]], what: str
) -> tuple[list[pm.PrefixIdentity], list[str]]:
    """Node-wide entries, then each slice's that name a new prefix; conflicts are reported, not fatal."""
    chosen: dict[str, int] = {}
    problems: list[str] = []
    for own_entry in own:
        chosen.setdefault(own_entry.cidr, own_entry.identity)
    seen_from: dict[str, str] = {}
    for name, entries in pieces:
        for entry in entries:
            if entry.cidr not in chosen:
                chosen[entry.cidr], seen_from[entry.cidr] = entry.identity, name
            elif chosen[entry.cidr] != entry.identity and entry.cidr in seen_from:
                problems.append(
                    f"slice {name}: {what} {entry.cidr} is {entry.identity} but {chosen[entry.cidr]} in slice "
                    f"{seen_from[entry.cidr]}, which is kept"
                )
    return [pm.PrefixIdentity(cidr, identity) for cidr, identity in chosen.items()], problems


def place_endpoints(
    endpoints: Iterable[SpecEndpoint], interfaces: Mapping[str, PodInterface | Unresolved], out: Translation
) -> None:
    """Each endpoint on the interface found for its IP (into out: state.endpoints, interfaces, unresolved, problems)."""
    for ep in endpoints:
        if ipaddress.ip_address(ep.ip).version != 4:
            out.problems.append(f"{pod_name(ep)}: {ep.ip} is IPv6; the datapath enforces IPv4 only")
            continue
        found = interfaces.get(ep.ip, Unresolved("not looked up"))
        if isinstance(found, Unresolved):
            out.unresolved[ep.ip] = found.reason
            continue
        if found.ifindex in out.interfaces:
            other = out.interfaces[found.ifindex]
            out.problems.append(f"{pod_name(ep)} and {pod_name(other)} are both routed to {found.ifname}")
            continue
        out.interfaces[found.ifindex] = ep
        out.state.endpoints.append(
            pm.Endpoint(found.ifindex, ep.ip, ep.identity, ep.ingress_enforced, ep.egress_enforced)
        )


def translate(
    spec: NodeNetworkPolicy,
    interfaces: Mapping[str, PodInterface | Unresolved],
    policy_indexes: Mapping[str, int],
    slices: Mapping[str, BpfPolicySliceSpec] | None = None,
) -> Translation:
    """The DatapathState for spec plus its slices (by name), given each endpoint IP's interface and each
    policy's index (from scratch; node_daemon/policy_delta.py keeps the same result up to date per change)."""
    pieces = sorted((slices or {}).items())
    out = Translation(pm.DatapathState(policy_names={index: name for name, index in policy_indexes.items()}))
    place_endpoints(node_endpoints(spec, slices or {}), interfaces, out)
    out.state.ipcache, problems = union_prefixes(spec.ipcache or [], ((n, p.addresses()) for n, p in pieces), "ipcache")
    out.state.cidr_ids, more = union_prefixes(
        spec.cidr_identities or [], ((n, p.cidr_identities or []) for n, p in pieces), "cidr identity"
    )
    out.problems += problems + more
    out.state.rules = map_rules(flat_rules(spec, [p for _, p in pieces]), policy_indexes)
    return out
