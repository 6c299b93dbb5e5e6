"""From BpfNodeState.spec.networkPolicy to the datapath's desired map contents (pure).

The operator names endpoints by pod IP; the datapath keys them by interface. The
interfaces found for each IP (node_daemon/routes.py) come in as an argument, so this
translation is unit-tested without a kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from beekeeper.crds.networkpolicy import PolicyType
from beekeeper.crds.nodestate import Endpoint as SpecEndpoint
from beekeeper.crds.nodestate import NodeNetworkPolicy, PolicyAction, RuleProtocol
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


def translate(
    spec: NodeNetworkPolicy,
    interfaces: Mapping[str, PodInterface | Unresolved],
    policy_indexes: Mapping[str, int],
) -> Translation:
    """The DatapathState for spec, given each endpoint IP's interface and each policy's index."""
    out = Translation(pm.DatapathState(policy_names={index: name for name, index in policy_indexes.items()}))
    for ep in spec.endpoints or []:
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
    out.state.ipcache = [pm.PrefixIdentity(e.cidr, e.identity) for e in spec.ipcache or []]
    out.state.cidr_ids = [pm.PrefixIdentity(e.cidr, e.identity) for e in spec.cidr_identities or []]
    out.state.rules = [
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
        for r in spec.rules or []
    ]
    return out
