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

What a node gets comes in bounded pieces, so no policy's size decides whether another one
(or a new pod) reaches the node: spec.networkPolicy holds the endpoints, the node's own
addresses (host) and a list of BpfPolicySlices; each policy with endpoints on the node has
its own slices (its entries, factored as local x peers x ports, the prefixes they name, its
own blocks' prefixes), and each pod identity those entries name has slices of its pods'
addresses, shared by the node's policies (a pod starting rewrites one slice per node, not
one per policy naming it). A policy whose entries on some node exceed
the expansion budget is refused (ExpansionBudgetExceeded) and ignored like an invalid one.
Its entries include those for other policies' prefixes nested in its blocks (the datapath
resolves one most specific prefix), so the policies over budget with their own prefixes
alone are refused first; that can only shrink the others.

compile_policies computes all of it from scratch and is the reference; the operator's passes go
through policy_incremental.IncrementalCompiler, which gives the same output from what changed.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import ipaddress
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import ValidationError

from beekeeper.crds.common import LabelSelector
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
from beekeeper.crds.policyslice import pack_endpoints, pack_slices
from beekeeper.node_daemon.policy_maps import port_prefixes
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
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Entries hash their peer constantly; ipaddress hashes are slow, so compute it once.
        object.__setattr__(self, "_hash", hash((self.cidr, self.excepts)))

    def __hash__(self) -> int:
        return self._hash

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
    _specs: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    def address_specs(self) -> list[dict[str, Any]]:
        """Its address slices' specs (without nodeName), the same list until forget_rows: every node whose
        rules name the identity ships these, so they are packed once and a node sees them unchanged by identity."""
        if self._specs is None:
            self._specs = pack_slices(None, [], self.address_rows(()), [])
        return self._specs

    def address_rows(self, hosts: Iterable[Network]) -> list[dict[str, Any]]:
        """The prefixes as slice ipcache rows in address order, without `hosts` (the node's own addresses)."""
        rows = sorted(self.prefixes.difference(hosts), key=_net_order)
        return [{"cidr": str(p), "identity": self.number} for p in rows]

    def forget_rows(self) -> None:
        """After prefixes changed."""
        self._specs = None


@dataclass
class PolicyOutcome:
    """What the status of one NetworkIdentityPolicy needs from compilation."""

    namespace: str
    name: str
    generation: int | None
    error: str | None = None
    """Why the spec cannot be enforced (the field, then the problem); the policy is ignored."""
    reason: str = "InvalidSpec"
    """CamelCase cause of error, for the Valid condition."""
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
    slices: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Per node, BpfPolicySlice name -> spec (nodeName included), as listed by the node's spec."""
    readers: dict[str, dict[int, set[str]]] = field(default_factory=dict)
    """Per node, pod identity -> the policies whose rules there name it (who its address slices concern)."""


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


def selects_pods(namespace: str, selector: LabelSelector, key: IdentityKey) -> bool:
    """Whether a policy of `namespace` with this podSelector applies to the identity's pods."""
    return key.namespace == namespace and selector.matches(key.label_map)


def matches_peer(namespace: str, peer: Peer, key: IdentityKey) -> bool:
    """Whether a selector peer (not an ipBlock) of a policy in `namespace` matches the identity."""
    if peer.namespace_selector is None:
        if key.namespace != namespace:
            return False
    elif not peer.namespace_selector.matches(key.namespace_label_map):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(key.label_map)


# --------------------------------------------------------------------------------------
# Rules of one policy, before ipBlocks are expanded per node
# --------------------------------------------------------------------------------------

PeerRef = int | Block
"""An identity number (ANY for every peer) or an ipBlock."""


class Entry(NamedTuple):
    """A rule for one local identity whose peer may still be an ipBlock (a tuple: policies make thousands)."""

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
        selected = self._selected(outcome.namespace, spec.pod_selector)
        types = spec.effective_policy_types()
        for direction, attr, wire, action in _RULE_LISTS:
            rules: Sequence[IngressRule | EgressRule] = getattr(spec, attr) or []
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
        return list(self._peers(outcome.namespace, peer))

    def _selected(self, namespace: str, selector: LabelSelector) -> list[int]:
        """The identities of `namespace` the policy's podSelector selects, in order."""
        return [n for n, info in sorted(self.infos.items()) if selects_pods(namespace, selector, info.key)]

    def _peers(self, namespace: str, peer: Peer) -> list[int]:
        """The identities a podSelector/namespaceSelector peer of a policy in `namespace` matches, in order."""
        return [n for n, info in sorted(self.infos.items()) if matches_peer(namespace, peer, info.key)]

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


DEFAULT_EXPANSION_BUDGET = 8192
"""Policy map entries one policy may take on one node: the product of local identities, peers
(with every ipBlock prefix they cover) and port blocks. Beyond it the policy is refused
(Valid=False, ExpansionBudgetExceeded), so one tenant cannot fill a node's maps."""
BUDGET_ENV = "BEEKEEPER_POLICY_EXPANSION_BUDGET"
BUDGET_REASON = "ExpansionBudgetExceeded"


def expansion_budget() -> int:
    """The operator's per-policy, per-node budget: $BEEKEEPER_POLICY_EXPANSION_BUDGET or the default."""
    raw = os.environ.get(BUDGET_ENV)
    if not raw:
        return DEFAULT_EXPANSION_BUDGET
    try:
        budget = int(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={raw!r} is not a whole number") from None
    if budget < 1:
        raise ValueError(f"{BUDGET_ENV}={raw!r} must be at least 1")
    return budget


_PortKey = tuple[RuleProtocol, int, int]
_RuleKey = tuple[int, PolicyType, PolicyAction, int]
"""(local identity, direction, action, peer identity)."""


@functools.cache
def _port_cost(port: _PortKey) -> int:
    protocol, start, end = port
    return 1 if protocol is RuleProtocol.ANY else len(port_prefixes(start, end))


@dataclass
class _NodeView:
    """One node's endpoints and, per policy, the (local identity, entry) pairs that apply there."""

    endpoints: list[tuple[PodRecord, int]]
    addresses: Sequence[str]
    items: dict[str, list[tuple[int, Entry]]] = field(default_factory=dict)
    isolated: dict[str, set[tuple[int, PolicyType]]] = field(default_factory=dict)
    blocks: dict[str, set[Block]] = field(default_factory=dict)
    """Per policy, the ipBlocks of its entries here."""


def _node_view(
    endpoints: list[tuple[PodRecord, int]], addresses: Sequence[str], compiler: _PolicyCompiler
) -> _NodeView:
    view = _NodeView(endpoints, addresses)
    for n in sorted({number for _, number in endpoints}):
        for e in compiler.entries.get(n, ()):
            view.items.setdefault(e.policy, []).append((n, e))
        for direction in PolicyType:
            for ref in compiler.isolating.get((n, direction), ()):
                view.isolated.setdefault(ref, set()).add((n, direction))
                view.items.setdefault(ref, [])
    view.blocks = {ref: {e.peer for _, e in items if isinstance(e.peer, Block)} for ref, items in view.items.items()}
    return view


def _prefixes(blocks: Iterable[Block]) -> list[Network]:
    return sorted({p for b in blocks for p in b.prefixes}, key=_net_order)


def _policy_rules(view: _NodeView, ref: str, covered: Callable[[Block], list[int]]) -> dict[_RuleKey, set[_PortKey]]:
    """One policy's entries on the node, peers resolved to identities, an ipBlock to every prefix it
    covers (as _Coverage's negative prefix codes: the CIDR identities are numbered later)."""
    rules: dict[_RuleKey, set[_PortKey]] = defaultdict(set)
    for n, e in view.items.get(ref, ()):
        port = (e.protocol, e.port_start, e.port_end)
        for peer in covered(e.peer) if isinstance(e.peer, Block) else (e.peer,):
            rules[n, e.direction, e.action, peer].add(port)
    if view.addresses:
        for n, direction in view.isolated.get(ref, ()):
            rules[n, direction, PolicyAction.ALLOW, HOST].add((RuleProtocol.ANY, 0, 0))
    return rules


def _cost(rules: Mapping[_RuleKey, set[_PortKey]]) -> int:
    return sum(_port_cost(port) for ports in rules.values() for port in ports)


class _Coverage:
    """Which of a node's prefixes each ipBlock covers, computed once per block.

    Prefixes inside a block's cidr are a contiguous run of the prefixes sorted by address, so
    each block looks only at its run (a thousand /32 blocks stay cheap)."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self.prefixes = _prefixes(blocks)
        self._keys = [(p.version, int(p.network_address)) for p in self.prefixes]
        self._memo: dict[Block, list[int]] = {}

    def __call__(self, block: Block) -> list[int]:
        """The covered prefixes as codes -(index + 1), apart from every identity (those are >= 0)."""
        if block not in self._memo:
            cidr = block.cidr
            lo = bisect.bisect_left(self._keys, (cidr.version, int(cidr.network_address)))
            hi = bisect.bisect_right(self._keys, (cidr.version, int(cidr.broadcast_address)))
            self._memo[block] = [-(i + 1) for i in range(lo, hi) if block.covers(self.prefixes[i])]
        return self._memo[block]

    def prefix(self, code: int) -> Network:
        return self.prefixes[-code - 1]


class _Expansions:
    """Each policy's entries per node for a given set of active policies there (what decides the node's
    prefixes), computed once: the budget rounds and the slices read the same results."""

    def __init__(self) -> None:
        self._coverage: dict[tuple[str, frozenset[str]], _Coverage] = {}
        self._rules: dict[tuple[str, frozenset[str], str], dict[_RuleKey, set[_PortKey]]] = {}

    def coverage(self, node: str, view: _NodeView, active: frozenset[str]) -> _Coverage:
        if (node, active) not in self._coverage:
            self._coverage[node, active] = _Coverage(b for ref in active for b in view.blocks[ref])
        return self._coverage[node, active]

    def rules(self, node: str, view: _NodeView, active: frozenset[str], ref: str) -> dict[_RuleKey, set[_PortKey]]:
        if (node, active, ref) not in self._rules:
            self._rules[node, active, ref] = _policy_rules(view, ref, self.coverage(node, view, active))
        return self._rules[node, active, ref]


def _over_budget(
    views: Mapping[str, _NodeView], refs: set[str], budget: int, expansions: _Expansions
) -> dict[str, tuple[int, str, bool]]:
    """Policies among refs whose entries on some node exceed the budget: ref -> (cost, node, own fault).

    Own fault: the policy exceeds it with only its own ipBlock prefixes, not through prefixes
    of other policies nested inside its blocks."""
    over: dict[str, tuple[int, str, bool]] = {}
    for node, view in sorted(views.items()):
        active = frozenset(ref for ref in view.items if ref in refs)
        for ref in sorted(active):
            cost = _cost(expansions.rules(node, view, active, ref))
            if cost <= budget:
                continue
            own = _cost(_policy_rules(view, ref, _Coverage(view.blocks[ref])))
            if ref not in over or (own > budget, cost) > (over[ref][2], over[ref][0]):
                over[ref] = (cost, node, own > budget)
    return over


def _factored(rules: Mapping[_RuleKey, set[_PortKey]], identity: Callable[[int], int]) -> list[dict[str, Any]]:
    """(local, direction, action) x peers x ports, grouping peers that share the same ports."""
    groups: dict[tuple[int, PolicyType, PolicyAction, tuple[_PortKey, ...]], list[int]] = defaultdict(list)
    for (n, direction, action, peer), ports in rules.items():
        groups[n, direction, action, tuple(sorted(ports))].append(identity(peer))
    return [
        {
            "localIdentity": n,
            "direction": direction.value,
            "action": action.value,
            "peers": sorted(peers),
            "ports": [{"protocol": p.value, "portStart": start, "portEnd": end} for p, start, end in ports],
        }
        for (n, direction, action, ports), peers in sorted(groups.items(), key=lambda g: (g[0], sorted(g[1])))
    ]


def _node_prefix(node: str) -> str:
    return node if len(node) <= 200 else hashlib.sha256(node.encode()).hexdigest()[:16]


def slice_name(node: str, policy: str, index: int) -> str:
    """Stable per (node, policy, part), a DNS subdomain whatever the node's name length."""
    return f"{_node_prefix(node)}.{hashlib.sha256(policy.encode()).hexdigest()[:12]}-{index}"


def address_slice_name(node: str, identity: int, index: int) -> str:
    """Stable per (node, identity, part); never a policy's name (those are 12 hex digits, no "i")."""
    return f"{_node_prefix(node)}.id{identity}-{index}"


def endpoint_slice_name(node: str, index: int) -> str:
    """Stable per (node, part); never a policy's or an identity's slice name."""
    return f"{_node_prefix(node)}.endpoints-{index}"


_ENDPOINT_SLICE = re.compile(r"\.endpoints-[0-9]+$")


def endpoint_slice(name: str) -> bool:
    """Whether the slice of this name holds a node's endpoints."""
    return _ENDPOINT_SLICE.search(name) is not None


_ADDRESS_SLICE = re.compile(r"\.id([0-9]+)-[0-9]+$")


def address_slice_identity(name: str) -> int | None:
    """The identity whose addresses an address slice (by its name) holds; None for a policy's slice."""
    found = _ADDRESS_SLICE.search(name)
    return int(found.group(1)) if found else None


def pod_peers(peers: Iterable[PeerRef]) -> frozenset[int]:
    """The pod identities among these peers (not ANY, host, CIDR identities or ipBlocks): whoever names
    them needs their addresses."""
    return frozenset(p for p in peers if isinstance(p, int) and MIN_POD_IDENTITY <= p < MIN_CIDR_IDENTITY)


def _node_slices(
    node: str,
    view: _NodeView,
    refs: Iterable[str],
    infos: Mapping[int, IdentityInfo],
    cidr_ids: Mapping[Network, int],
    expansions: _Expansions,
) -> tuple[dict[str, dict[str, Any]], dict[int, set[str]]]:
    """Every policy's slices on the node and the address slices of the identities they name; and per such
    identity, the policies naming it."""
    active = frozenset(ref for ref in view.items if ref in refs)
    coverage = expansions.coverage(node, view, active)
    out: dict[str, dict[str, Any]] = {}
    readers: dict[int, set[str]] = {}
    for ref in sorted(active):
        rules = expansions.rules(node, view, active, ref)
        out.update(policy_slices(node, view, ref, rules, coverage, cidr_ids))
        for number in pod_peers(key[3] for key in rules):
            readers.setdefault(number, set()).add(ref)
    hosts = node_hosts(view.addresses)
    for number in sorted(readers):
        if number in infos:
            out.update(address_slices(node, infos[number], hosts))
    return out, readers


def node_hosts(addresses: Iterable[str]) -> frozenset[Network]:
    """The node's own addresses as prefixes: the node-wide ipcache says host for them, no slice repeats them."""
    return frozenset(ipaddress.ip_network(a) for a in addresses)


def address_slices(node: str, info: IdentityInfo, hosts: frozenset[Network]) -> dict[str, dict[str, Any]]:
    """The identity's address slices on the node (none when it has no address but the node's own)."""
    if hosts.isdisjoint(info.prefixes):
        specs = info.address_specs()
    else:
        rows = info.address_rows(hosts)
        specs = pack_slices(None, [], rows, []) if rows else []
    if specs and not specs[0].get("ipcache"):
        return {}
    return {address_slice_name(node, info.number, i): {"nodeName": node, **spec} for i, spec in enumerate(specs)}


def policy_slices(
    node: str,
    view: _NodeView,
    ref: str,
    rules: Mapping[_RuleKey, set[_PortKey]],
    coverage: _Coverage,
    cidr_ids: Mapping[Network, int],
) -> dict[str, dict[str, Any]]:
    """One policy's slices on the node: its factored rules and its prefixes (its own blocks' and the other
    policies' prefixes nested in them, which its rules name). The pod addresses are in address slices."""

    def identity(peer: int) -> int:
        return cidr_ids[coverage.prefix(peer)] if peer < 0 else peer

    peers = {key[3] for key in rules}
    prefixes = set(_prefixes(view.blocks[ref])) | {coverage.prefix(p) for p in peers if p < 0}
    if not rules and not prefixes:
        return {}
    specs = pack_slices(
        ref,
        _factored(rules, identity),
        [],
        [{"cidr": str(p), "identity": cidr_ids[p]} for p in sorted(prefixes, key=_net_order)],
    )
    return {slice_name(node, ref, i): {"nodeName": node, **spec} for i, spec in enumerate(specs)}


def endpoint_entry(pod: PodRecord, number: int, ingress: bool, egress: bool) -> dict[str, Any]:
    """One local endpoint of spec.networkPolicy, with the directions it is isolated in."""
    return {
        "namespace": pod.namespace,
        "pod": pod.name,
        "ip": pod.ipv4,
        "identity": number,
        "ingressEnforced": ingress,
        "egressEnforced": egress,
    }


def endpoint_slices(node: str, endpoints: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The node's endpoints (endpoint_entry's, in pod order) as its endpoint slices."""
    return {
        endpoint_slice_name(node, i): {"nodeName": node, **spec} for i, spec in enumerate(pack_endpoints(endpoints))
    }


def isolating(endpoints: Iterable[Mapping[str, Any]]) -> bool:
    """Whether some endpoint is isolated in some direction: then the node's addresses are its host."""
    return any(e["ingressEnforced"] or e["egressEnforced"] for e in endpoints)


def node_policy(isolated: bool, addresses: Sequence[str], slices: Mapping[str, Any]) -> dict[str, Any]:
    """One node's spec.networkPolicy in wire form, every list present (the inline ones empty but the
    node's own addresses as host, once an endpoint is isolated) and every slice listed by content hash."""
    hosts = sorted(node_hosts(addresses), key=_net_order) if isolated else []
    return {
        "endpoints": [],
        "ipcache": [{"cidr": str(n), "identity": HOST} for n in hosts],
        "cidrIdentities": [],
        "rules": [],
        "slices": [{"name": name, "contentHash": body["contentHash"]} for name, body in sorted(slices.items())],
    }


def compile_policies(
    policies: Iterable[Body],
    pods: Iterable[PodRecord],
    identities: Mapping[IdentityKey, int],
    nodes: Mapping[str, Sequence[str]],
    budget: int = DEFAULT_EXPANSION_BUDGET,
) -> CompiledPolicies:
    """Every node's spec.networkPolicy, its BpfPolicySlices and every policy's outcome.

    `pods` come from pod_records (pods without a number in `identities` are left out: their
    identity is not persisted yet); `nodes` maps each node to its InternalIP addresses;
    `budget` bounds the policy map entries of one policy on one node.
    """
    pod_list = list(pods)
    infos = _identity_infos(pod_list, identities)
    compiler = _PolicyCompiler(infos)
    outcomes: dict[str, PolicyOutcome] = {}
    valid: dict[str, tuple[NetworkIdentityPolicy, PolicyOutcome]] = {}
    for body in sorted(policies, key=lambda b: (b["metadata"]["namespace"], b["metadata"]["name"])):
        outcome, policy = parse_policy(body)
        outcomes[outcome.ref] = outcome
        if policy is not None:
            compiler.add(policy, outcome)
            valid[outcome.ref] = (policy, outcome)

    per_node: dict[str, list[tuple[PodRecord, int]]] = {node: [] for node in nodes}
    for pod in pod_list:
        number = identities.get(pod.key)
        if pod.node in per_node and pod.ipv4 is not None and number is not None:
            per_node[pod.node].append((pod, number))
    for eps in per_node.values():  # in pod order whatever the input order, so equal pods give equal bytes
        eps.sort(key=lambda e: e[0].ref)
    views = {node: _node_view(eps, nodes[node], compiler) for node, eps in per_node.items() if eps}

    # Refuse what exceeds the budget, the policies over it on their own first: removing them
    # can only shrink the others (fewer nested prefixes), so this settles in a few rounds.
    expansions = _Expansions()
    while over := _over_budget(views, set(valid), budget, expansions):
        own = {ref for ref, (_, _, fault) in over.items() if fault}
        for ref in sorted(own or over):
            cost, node, fault = over[ref]
            outcome = valid.pop(ref)[1]
            outcome.reason = BUDGET_REASON
            outcome.error = f"{BUDGET_REASON}: expands to {cost} kernel entries on node {node}, budget {budget}"
            if not fault:
                outcome.error += " (with the ipBlock prefixes of other policies on the node nested in its blocks)"

    for node, pod in ((node, pod) for node, eps in per_node.items() for pod, _ in eps):
        for policy, outcome in valid.values():
            if pod.namespace == outcome.namespace and policy.spec.pod_selector.matches(pod.key.label_map):
                outcome.selected.add(pod.ref)
                outcome.nodes.add(node)

    refs = set(valid)
    cidr_ids = assign_cidr_identities(
        p for view in views.values() for ref in view.items if ref in refs for b in view.blocks[ref] for p in b.prefixes
    )
    # No valid policy anywhere: nothing to enforce, so no node runs the datapath at all (a node
    # told None detaches it). Otherwise the programs would stay on every pod's veth for good,
    # and an uninstall could never leave the nodes' kernels clean.
    compiled: dict[str, dict[str, Any] | None] = dict.fromkeys(nodes)
    slices: dict[str, dict[str, dict[str, Any]]] = {node: {} for node in nodes}
    readers: dict[str, dict[int, set[str]]] = {node: {} for node in nodes}
    for node, view in views.items():
        slices[node], readers[node] = _node_slices(node, view, refs, compiler.infos, cidr_ids, expansions)
        if refs:

            def enforced(n: int, direction: PolicyType) -> bool:
                return any(ref in refs for ref in compiler.isolating.get((n, direction), ()))

            endpoints = [
                endpoint_entry(pod, n, enforced(n, PolicyType.INGRESS), enforced(n, PolicyType.EGRESS))
                for pod, n in view.endpoints
            ]
            slices[node].update(endpoint_slices(node, endpoints))
            compiled[node] = node_policy(isolating(endpoints), view.addresses, slices[node])
    return CompiledPolicies(compiled, outcomes, slices, readers)


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
