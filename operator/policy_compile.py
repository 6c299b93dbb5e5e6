"""From NetworkIdentityPolicies, pods and identities to each node's policy datapath entries: pure functions.

Semantics are NetworkPolicy's (networking.k8s.io/v1) plus deny rules that win, compiled for
the datapath of bpf/policy.c: per packet at a local endpoint, in a direction the endpoint is
isolated in, the peer has a pod/host/world identity (ipcache, longest prefix), maybe a CIDR
identity (cidrIdentities, most specific prefix) and always the wildcard 0; any deny entry
for one of them drops, else any allow entry passes, else default deny.

Choices that keep that exact while the entries stay few and stable:

- Rules are keyed by identities, so they depend on label sets, not on pods: pod churn only
  changes endpoints and ipcache.
- ipBlocks become CIDR identities: one per distinct prefix (cidr and except entries), whose
  rules are the union of the blocks containing it and not excepting it. A node gets only the
  prefixes of the blocks its local rules use, which is enough for the most specific prefix
  to decide exactly (every boundary those blocks draw is in the set). Numbers derive from the
  prefix, so adding a policy does not renumber the others.
- A node's ipcache holds the addresses of the pod identities its rules name (an address
  missing there resolves to world, which no rule names, so leaving it out changes nothing),
  and the node's own InternalIPs as host: traffic between a pod and its own node is always
  allowed, as in NetworkPolicy (kubelet probes), unless a deny rule says otherwise.
- A named port resolves against the pods that serve it: the local endpoint's pods for
  ingress, the peer's for egress (per peer identity). Pods of one identity share labels but
  could declare different numbers for a name; the entry then allows their union (reported
  in the policy's Valid condition). Egress to an ipBlock on a named port matches nothing:
  which address is a pod with that port is not something a CIDR entry can say.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from beekeeper.crds.identity import MIN_POD_IDENTITY
from beekeeper.crds.networkpolicy import (
    EgressRule,
    IngressRule,
    NetworkIdentityPolicy,
    Peer,
    PolicyPort,
    PolicyType,
    parse_cidr,
)
from beekeeper.crds.nodestate import PolicyAction, RuleProtocol
from beekeeper.operator.identities import IdentityKey
from beekeeper.operator.pods import PodRecord

ANY = 0
HOST = 1
MIN_CIDR_IDENTITY = 1 << 24
_CIDR_SPAN = (1 << 32) - MIN_CIDR_IDENTITY

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Body = Mapping[str, Any]


def _net_order(net: Network) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen


def _within(inner: Network, outer: Network) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Block:
    """A parsed ipBlock: the addresses in cidr and in none of the except ranges."""

    cidr: Network
    excepts: tuple[Network, ...] = ()

    @property
    def prefixes(self) -> tuple[Network, ...]:
        return (self.cidr, *self.excepts)

    def covers(self, prefix: Network) -> bool:
        """Whether every address of `prefix` not claimed by a more specific one is in the block."""
        return _within(prefix, self.cidr) and not any(_within(prefix, e) for e in self.excepts)


def assign_cidr_identities(prefixes: Iterable[Network]) -> dict[Network, int]:
    """One identity (from 1 << 24) per prefix, derived from the prefix itself so the numbers
    stay put when other prefixes come and go; a hash collision probes to the next free one."""
    taken: set[int] = set()
    out: dict[Network, int] = {}
    for prefix in sorted(set(prefixes), key=_net_order):
        offset = int.from_bytes(hashlib.sha256(str(prefix).encode()).digest()[:8], "big") % _CIDR_SPAN
        while MIN_CIDR_IDENTITY + offset in taken:
            offset = (offset + 1) % _CIDR_SPAN
        taken.add(MIN_CIDR_IDENTITY + offset)
        out[prefix] = MIN_CIDR_IDENTITY + offset
    return out


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclass
class IdentityInfo:
    """One pod identity with the pods currently using it."""

    number: int
    key: IdentityKey
    prefixes: set[Network] = field(default_factory=set)
    """The pods' addresses, as host prefixes."""
    ports: dict[tuple[str, str], set[int]] = field(default_factory=lambda: defaultdict(set))
    """(port name, protocol) -> numbers, over every pod of the identity."""


@dataclass
class PolicyOutcome:
    """What the status of one NetworkIdentityPolicy needs from compilation."""

    namespace: str
    name: str
    generation: int | None
    error: str | None = None
    """Why the spec cannot be enforced (the field, then the problem); the policy is ignored."""
    warnings: list[str] = field(default_factory=list)
    selected: set[str] = field(default_factory=set)
    """namespace/name of the selected endpoints (pods with an IPv4 address on a known node)."""
    nodes: set[str] = field(default_factory=set)
    """Nodes with selected endpoints."""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


@dataclass
class CompiledPolicies:
    nodes: dict[str, dict[str, Any] | None]
    """Per node, spec.networkPolicy in wire form (sorted, so equal inputs give equal bytes); None when the
    node has no endpoint."""
    policies: dict[str, PolicyOutcome]
    """Per namespace/name."""


def _error_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def parse_policy(body: Body) -> tuple[PolicyOutcome, NetworkIdentityPolicy | None]:
    """Validate one policy as the API would; an invalid one carries an error naming the field."""
    meta = body["metadata"]
    outcome = PolicyOutcome(meta["namespace"], meta["name"], meta.get("generation"))
    try:
        policy = NetworkIdentityPolicy.from_dict({k: v for k, v in body.items() if k != "status"})
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        outcome.error = f"{_error_path(first['loc'])}: {message}"
        return outcome, None
    return outcome, policy


# --------------------------------------------------------------------------------------
# Rules of one policy, before ipBlocks are expanded per node
# --------------------------------------------------------------------------------------

PeerRef = int | Block
"""An identity number (ANY for every peer) or an ipBlock."""


@dataclass(frozen=True)
class Entry:
    """A rule for one local identity whose peer may still be an ipBlock."""

    direction: PolicyType
    peer: PeerRef
    protocol: RuleProtocol
    port_start: int
    port_end: int
    action: PolicyAction
    policy: str


@dataclass(frozen=True)
class _Named:
    name: str
    protocol: RuleProtocol
    path: str


_PortSpec = tuple[RuleProtocol, int, int] | _Named

_RULE_LISTS: tuple[tuple[PolicyType, str, str, PolicyAction], ...] = (
    (PolicyType.INGRESS, "ingress", "ingress", PolicyAction.ALLOW),
    (PolicyType.INGRESS, "ingress_deny", "ingressDeny", PolicyAction.DENY),
    (PolicyType.EGRESS, "egress", "egress", PolicyAction.ALLOW),
    (PolicyType.EGRESS, "egress_deny", "egressDeny", PolicyAction.DENY),
)


def _port_specs(ports: Sequence[PolicyPort] | None, path: str) -> list[_PortSpec]:
    """Empty ports mean every port of every protocol (ICMP included)."""
    if not ports:
        return [(RuleProtocol.ANY, 0, 0)]
    specs: list[_PortSpec] = []
    for i, port in enumerate(ports):
        protocol = RuleProtocol(port.protocol.value)
        if port.port is None:
            specs.append((protocol, 0, 0))
        elif isinstance(port.port, int):
            specs.append((protocol, port.port, port.end_port or port.port))
        else:
            specs.append(_Named(port.port, protocol, f"{path}.ports[{i}].port"))
    return specs


class _PolicyCompiler:
    """Entries of every valid policy per local identity, with the identities it isolates."""

    def __init__(self, infos: Mapping[int, IdentityInfo]) -> None:
        self.infos = infos
        self.entries: dict[int, set[Entry]] = defaultdict(set)
        self.isolating: dict[tuple[int, PolicyType], list[str]] = defaultdict(list)
        self.blocks: set[Block] = set()

    def add(self, policy: NetworkIdentityPolicy, outcome: PolicyOutcome) -> None:
        spec = policy.spec
        selected = [
            n
            for n, info in sorted(self.infos.items())
            if info.key.namespace == outcome.namespace and spec.pod_selector.matches(info.key.label_map)
        ]
        types = spec.effective_policy_types()
        for direction, attr, wire, action in _RULE_LISTS:
            rules: list[IngressRule] | list[EgressRule] = getattr(spec, attr) or []
            if direction not in types:
                if rules:
                    outcome.warn(f"spec.{wire} is ignored: spec.policyTypes does not include {direction.value}")
                continue
            for i, rule in enumerate(rules):
                self._rule(rule, f"spec.{wire}[{i}]", direction, action, selected, outcome)
        for direction in types:
            for n in selected:
                self.isolating[n, direction].append(outcome.ref)

    def _rule(
        self,
        rule: IngressRule | EgressRule,
        path: str,
        direction: PolicyType,
        action: PolicyAction,
        selected: list[int],
        outcome: PolicyOutcome,
    ) -> None:
        peer_list = rule.from_ if isinstance(rule, IngressRule) else rule.to
        peer_field = "from" if isinstance(rule, IngressRule) else "to"
        peers: list[tuple[PeerRef, str]] = [(ANY, path)]
        if peer_list:
            peers = [
                (p, f"{path}.{peer_field}[{i}]")
                for i, peer in enumerate(peer_list)
                for p in self._peer(peer, outcome, f"{path}.{peer_field}[{i}]")
            ]
        ports = _port_specs(rule.ports, path)

        def entry(local: int, peer: PeerRef, protocol: RuleProtocol, start: int, end: int) -> None:
            self.entries[local].add(Entry(direction, peer, protocol, start, end, action, outcome.ref))

        for port in ports:
            if not isinstance(port, _Named):
                for local in selected:
                    for peer, _ in peers:
                        entry(local, peer, *port)
            elif direction is PolicyType.INGRESS:  # served by the local endpoint
                for local in selected:
                    for number in self._resolve(local, port, outcome):
                        for peer, _ in peers:
                            entry(local, peer, port.protocol, number, number)
            else:  # served by the peer
                for peer, peer_path in peers:
                    if isinstance(peer, Block):
                        outcome.warn(f"{port.path}: a named port cannot match the ipBlock of {peer_path}; use a number")
                        continue
                    for server in self._servers(port) if peer == ANY else [peer]:
                        for number in self._resolve(server, port, outcome):
                            for local in selected:
                                entry(local, server, port.protocol, number, number)

    def _peer(self, peer: Peer, outcome: PolicyOutcome, path: str) -> list[PeerRef]:
        if peer.ip_block is not None:
            block = Block(parse_cidr(peer.ip_block.cidr), tuple(parse_cidr(e) for e in peer.ip_block.except_ or []))
            if block.cidr.version != 4:
                outcome.warn(f"{path}.ipBlock: IPv6 is not enforced (the datapath handles IPv4 only)")
            self.blocks.add(block)
            return [block]
        matched = []
        for n, info in sorted(self.infos.items()):
            if peer.namespace_selector is None:
                if info.key.namespace != outcome.namespace:
                    continue
            elif not peer.namespace_selector.matches(info.key.namespace_label_map):
                continue
            if peer.pod_selector is None or peer.pod_selector.matches(info.key.label_map):
                matched.append(n)
        return matched

    def _servers(self, port: _Named) -> list[int]:
        """Every identity with pods that name a port so: "any peer" on a named port means those."""
        return [n for n, info in sorted(self.infos.items()) if (port.name, port.protocol.value) in info.ports]

    def _resolve(self, identity: int, port: _Named, outcome: PolicyOutcome) -> list[int]:
        numbers = sorted(self.infos[identity].ports.get((port.name, port.protocol.value), ()))
        if len(numbers) > 1:
            outcome.warn(
                f"{port.path}: {port.name!r} is {', '.join(map(str, numbers))} on different pods of identity "
                f"{identity}; all of them apply to each of those pods"
            )
        return numbers


# --------------------------------------------------------------------------------------
# Per node
# --------------------------------------------------------------------------------------


def _identity_infos(pods: Iterable[PodRecord], identities: Mapping[IdentityKey, int]) -> dict[int, IdentityInfo]:
    infos: dict[int, IdentityInfo] = {}
    for pod in pods:
        number = identities.get(pod.key)
        if number is None:
            continue
        info = infos.setdefault(number, IdentityInfo(number, pod.key))
        info.prefixes.update(ipaddress.ip_network(ip) for ip in pod.ips)
        for port in pod.named_ports:
            info.ports[port.name, port.protocol].add(port.number)
    return infos


_Rule = tuple[int, PolicyType, int, RuleProtocol, int, int, PolicyAction, str]


def _node_policy(
    endpoints: list[tuple[PodRecord, int]],
    addresses: Sequence[str],
    compiler: _PolicyCompiler,
    cidr_ids: Mapping[Network, int],
) -> dict[str, Any]:
    """One node's spec.networkPolicy in wire form, every list present (what a merge patch needs).

    Plain dicts, not models: a node can have thousands of entries and this runs on every
    pass; the unit tests validate what it builds against NodeNetworkPolicy."""
    local = sorted({number for _, number in endpoints})
    entries = [e for n in local for e in compiler.entries.get(n, ())]
    prefixes = sorted({p for e in entries if isinstance(e.peer, Block) for p in e.peer.prefixes}, key=_net_order)

    rules: set[_Rule] = set()
    for n in local:
        for e in compiler.entries.get(n, ()):
            base = (n, e.direction)
            rest = (e.protocol, e.port_start, e.port_end, e.action, e.policy)
            if isinstance(e.peer, Block):
                rules.update((*base, cidr_ids[p], *rest) for p in prefixes if e.peer.covers(p))
            else:
                rules.add((*base, e.peer, *rest))
        if addresses:
            for direction in PolicyType:
                refs = compiler.isolating.get((n, direction))
                if refs:
                    rules.add((n, direction, HOST, RuleProtocol.ANY, 0, 0, PolicyAction.ALLOW, min(refs)))

    peers = {r[2] for r in rules}
    ipcache: dict[Network, int] = {}
    for number in sorted(p for p in peers if MIN_POD_IDENTITY <= p < MIN_CIDR_IDENTITY and p in compiler.infos):
        ipcache.update(dict.fromkeys(compiler.infos[number].prefixes, number))
    if HOST in peers:
        for address in addresses:
            ipcache[ipaddress.ip_network(address)] = HOST  # the node's own address is the host, whatever claims it

    def enforced(n: int, direction: PolicyType) -> bool:
        return bool(compiler.isolating.get((n, direction)))

    return {
        "endpoints": [
            {
                "namespace": pod.namespace,
                "pod": pod.name,
                "ip": pod.ipv4,
                "identity": number,
                "ingressEnforced": enforced(number, PolicyType.INGRESS),
                "egressEnforced": enforced(number, PolicyType.EGRESS),
            }
            for pod, number in endpoints
        ],
        "ipcache": [{"cidr": str(n), "identity": ipcache[n]} for n in sorted(ipcache, key=_net_order)],
        "cidrIdentities": [{"cidr": str(p), "identity": cidr_ids[p]} for p in prefixes],
        "rules": [
            {
                "localIdentity": local_id,
                "direction": direction.value,
                "peerIdentity": peer,
                "protocol": protocol.value,
                "portStart": start,
                "portEnd": end,
                "action": action.value,
                "policy": ref,
            }
            for local_id, direction, peer, protocol, start, end, action, ref in sorted(rules)
        ],
    }


def compile_policies(
    policies: Iterable[Body],
    pods: Iterable[PodRecord],
    identities: Mapping[IdentityKey, int],
    nodes: Mapping[str, Sequence[str]],
) -> CompiledPolicies:
    """Every node's spec.networkPolicy and every policy's outcome.

    `pods` come from pod_records (pods without a number in `identities` are left out: their
    identity is not persisted yet); `nodes` maps each node to its InternalIP addresses.
    """
    pod_list = list(pods)
    infos = _identity_infos(pod_list, identities)
    compiler = _PolicyCompiler(infos)
    outcomes: dict[str, PolicyOutcome] = {}
    valid: list[tuple[NetworkIdentityPolicy, PolicyOutcome]] = []
    for body in sorted(policies, key=lambda b: (b["metadata"]["namespace"], b["metadata"]["name"])):
        outcome, policy = parse_policy(body)
        outcomes[outcome.ref] = outcome
        if policy is not None:
            compiler.add(policy, outcome)
            valid.append((policy, outcome))
    cidr_ids = assign_cidr_identities(p for block in compiler.blocks for p in block.prefixes)

    per_node: dict[str, list[tuple[PodRecord, int]]] = {node: [] for node in nodes}
    for pod in pod_list:
        number = identities.get(pod.key)
        if pod.node in per_node and pod.ipv4 is not None and number is not None:
            per_node[pod.node].append((pod, number))
            for policy, outcome in valid:
                if pod.namespace == outcome.namespace and policy.spec.pod_selector.matches(pod.key.label_map):
                    outcome.selected.add(pod.ref)
                    outcome.nodes.add(pod.node)

    # No valid policy anywhere: nothing to enforce, so no node runs the datapath at all (a node
    # told None detaches it). Otherwise the programs would stay on every pod's veth for good,
    # and an uninstall could never leave the nodes' kernels clean.
    compiled = {
        node: _node_policy(endpoints, nodes[node], compiler, cidr_ids) if endpoints and valid else None
        for node, endpoints in per_node.items()
    }
    return CompiledPolicies(compiled, outcomes)


def node_addresses(node: Body) -> list[str]:
    """A Node's InternalIP addresses: what the host identity stands for on that node."""
    out = []
    for address in (node.get("status") or {}).get("addresses") or []:
        if address.get("type") != "InternalIP":
            continue
        try:
            out.append(str(ipaddress.ip_address(address.get("address", ""))))
        except ValueError:
            continue
    return out
