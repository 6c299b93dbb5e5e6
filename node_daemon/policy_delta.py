"""The synced maps' desired content kept up to date per change, so a change costs the entries it touches (pure).

translate() + encode() compute the whole content from the node spec and every slice: at
10k peers that is ~150 ms to end in two map writes. PolicyMaps instead keeps each source's
encoded entries (the node spec's own part, and every slice by name, encoded once per
version with encode() itself) and, per key, what each source says. Replacing one source
re-resolves only the keys it adds, drops or changes, and records them as touched: those
are the only entries to compare with the kernel's. Resolution is the from-scratch one (a
unit test checks they agree over random change sequences): a policy key holds the lowest
policy index naming it, a prefix the node's own identity, else the first slice's by name
(a conflict is reported, not fatal), an endpoint is keyed by its interface.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from beekeeper.crds.nodestate import IpcacheEntry, NodeNetworkPolicy
from beekeeper.crds.policyslice import Address, BpfPolicySliceSpec
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.policy_state import (
    ACTIONS,
    DIRECTIONS,
    PROTOCOLS,
    FlatRule,
    Translation,
    map_rules,
    node_endpoints,
    place_endpoints,
)
from beekeeper.node_daemon.routes import PodInterface, Unresolved

NODE_SOURCE = ""
"""The node spec's own entries: sorts before every slice name, so its prefixes win."""

PREFIX_MAPS = {pm.IPCACHE.name: "ipcache", pm.CIDR_IDS.name: "cidr identity"}
POLICY_MAPS = (pm.POLICY_ALLOW.name, pm.POLICY_DENY.name)
ADDRESSES_ONLY = 0
"""The index an address slice is encoded with: it has no rule, so no entry carries it."""
SYNCED = tuple(spec.name for spec in pm.SYNCED_MAPS)

Entries = dict[str, dict[bytes, bytes]]
"""map name -> key -> value, as encode() gives them."""


def _prefixes(entries: Iterable[IpcacheEntry]) -> list[pm.PrefixIdentity]:
    return [pm.PrefixIdentity(e.cidr, e.identity) for e in entries]


def source_entries(
    rules: Iterable[FlatRule],
    ipcache: Iterable[IpcacheEntry],
    cidr_ids: Iterable[IpcacheEntry],
    policy_indexes: Mapping[str, int],
) -> Entries:
    """One source's entries of the policy and prefix maps; raises ValueError like encode()."""
    state = pm.DatapathState(
        ipcache=_prefixes(ipcache), cidr_ids=_prefixes(cidr_ids), rules=map_rules(rules, policy_indexes)
    )
    encoded = pm.encode(state, lambda interface: None)
    return {name: entries for name, entries in encoded.maps.items() if name != pm.ENDPOINTS.name}


@dataclass
class SliceKeys:
    """A slice's encoded keys per entry, handed to the encoding of its next version: most entries carry over,
    and only new ones are encoded (a peer among thousands costs its own keys, not the slice's)."""

    rules: dict[tuple[int, str, str, int, int, int], dict[int, list[bytes]]] = field(default_factory=dict)
    """(local identity, direction, action, protocol, first port, last port) -> peer -> policy keys."""
    prefixes: dict[tuple[str, str, int], tuple[bytes, bytes] | None] = field(default_factory=dict)
    """(map, cidr, identity) -> (key, value); None for IPv6, which the datapath does not look up."""


def slice_entries(
    piece: BpfPolicySliceSpec, index: int, previous: SliceKeys | None = None
) -> tuple[Entries, SliceKeys]:
    """A slice's entries, its policy at `index`, and its keys for the next version; raises ValueError like
    encode(), whose result this equals (pm.policy_keys and pm.lpm_v4_key make every key)."""
    if index == pm.NO_POLICY or not 0 <= index <= pm.NO_POLICY:
        raise ValueError(f"policy index {index} is reserved or out of range")
    value = pm.POLICY_VALUE.pack(index)
    old = previous or SliceKeys()
    keys = SliceKeys()
    out: Entries = {name: {} for name in SYNCED if name != pm.ENDPOINTS.name}
    for rule in piece.rules or []:
        action = ACTIONS[rule.action]
        target = out[pm.POLICY_ALLOW.name if action is pm.Action.ALLOW else pm.POLICY_DENY.name]
        direction = DIRECTIONS[rule.direction]
        for port in rule.ports:
            protocol = PROTOCOLS[port.protocol]
            header = (rule.local_identity, direction.value, action.value, protocol, port.port_start, port.port_end)
            known = old.rules.get(header, {})
            by_peer = keys.rules.setdefault(header, {})
            for peer in rule.peers:
                made = by_peer.get(peer) or known.get(peer)
                if made is None:
                    made = pm.policy_keys(
                        pm.Rule(
                            rule.local_identity,
                            direction,
                            peer,
                            protocol,
                            port.port_start,
                            port.port_end,
                            action,
                            index,
                        )
                    )
                by_peer[peer] = made
                for key in made:
                    target[key] = value
    prefixes: tuple[tuple[str, Sequence[IpcacheEntry | Address]], ...] = (
        (pm.IPCACHE.name, piece.addresses()),
        (pm.CIDR_IDS.name, piece.cidr_identities or []),
    )
    for map_name, entries in prefixes:
        what = PREFIX_MAPS[map_name]
        target = out[map_name]
        for entry in entries:
            cache_key = (map_name, entry.cidr, entry.identity)
            if cache_key in old.prefixes:
                encoded = old.prefixes[cache_key]
            else:
                network = ipaddress.ip_network(entry.cidr, strict=False)
                encoded = None
                if isinstance(network, ipaddress.IPv4Network):
                    if not 0 <= entry.identity <= pm.NO_POLICY:
                        raise ValueError(f"{what} identity {entry.identity} is not a 32-bit unsigned integer")
                    encoded = (pm.lpm_v4_key(network), pm.IDENTITY_VALUE.pack(entry.identity))
            keys.prefixes[cache_key] = encoded
            if encoded is not None:
                target[encoded[0]] = encoded[1]
    return out, keys


def slice_rule_count(piece: BpfPolicySliceSpec) -> int:
    """The entries a slice expands to (peers x ports per rule), as status.networkPolicy.rules counts them."""
    return sum(len(rule.peers) * len(rule.ports) for rule in piece.rules or [])


def node_entries(spec: NodeNetworkPolicy, policy_indexes: Mapping[str, int]) -> Entries:
    """The node spec's own entries: its addresses and any inline rules."""
    rules = (
        FlatRule(
            r.policy, r.local_identity, r.direction, r.peer_identity, r.protocol, r.port_start, r.port_end, r.action
        )
        for r in spec.rules or []
    )
    return source_entries(rules, spec.ipcache or [], spec.cidr_identities or [], policy_indexes)


def _policy_index(value: bytes) -> int:
    index: int = pm.POLICY_VALUE.unpack(value)[0]
    return index


def _cidr(key: bytes) -> str:
    prefixlen, address = pm.LPM_V4_KEY.unpack(key)
    return f"{ipaddress.IPv4Address(address)}/{prefixlen}"


def _identity(value: bytes) -> int:
    identity: int = pm.IDENTITY_VALUE.unpack(value)[0]
    return identity


@dataclass
class PolicyMaps:
    """The synced maps' desired content, maintained source by source."""

    maps: Entries = field(default_factory=lambda: {name: {} for name in SYNCED})
    """Desired content of every synced map (complete: a full diff after a restart uses it)."""
    touched: dict[str, set[bytes]] = field(default_factory=lambda: {name: set() for name in SYNCED})
    """Keys whose desired value may have changed since take_touched()."""
    _sources: dict[str, Entries] = field(default_factory=dict)
    _candidates: dict[str, dict[bytes, dict[str, bytes]]] = field(
        default_factory=lambda: {name: {} for name in SYNCED if name != pm.ENDPOINTS.name}
    )
    _conflicts: dict[str, set[bytes]] = field(default_factory=lambda: {name: set() for name in PREFIX_MAPS})

    def set_source(self, name: str, entries: Entries | None) -> None:
        """Replace what source `name` contributes (None: it is gone); the same object again costs nothing."""
        old = self._sources.get(name)
        if old is entries:
            return
        if entries is None:
            del self._sources[name]
        else:
            self._sources[name] = entries
        for map_name, candidates in self._candidates.items():
            before = old[map_name] if old else {}
            after = entries[map_name] if entries else {}
            if before is after:
                continue
            dirty = set(before.keys() - after.keys())
            for key in dirty:
                per_source = candidates[key]
                del per_source[name]
                if not per_source:
                    del candidates[key]
            for key, value in after.items() - before.items():
                candidates.setdefault(key, {})[name] = value
                dirty.add(key)
            self._resolve(map_name, dirty)

    def sources(self) -> set[str]:
        return set(self._sources)

    def _resolve(self, map_name: str, keys: Iterable[bytes]) -> None:
        candidates, desired, touched = self._candidates[map_name], self.maps[map_name], self.touched[map_name]
        conflicts = self._conflicts.get(map_name)
        for key in keys:
            per_source = candidates.get(key)
            if not per_source:
                value = None
            elif len(per_source) == 1:
                (value,) = per_source.values()
            elif conflicts is None:
                value = min(per_source.values(), key=_policy_index)
            else:
                value = per_source[min(per_source)]
            if conflicts is not None:
                if per_source and len(set(per_source.values())) > 1:
                    conflicts.add(key)
                else:
                    conflicts.discard(key)
            if value is None:
                if desired.pop(key, None) is not None:
                    touched.add(key)
            elif desired.get(key) != value:
                desired[key] = value
                touched.add(key)

    def set_endpoints(self, entries: Mapping[bytes, bytes]) -> None:
        """The endpoints map's content (small: recomputed whole when endpoints or their interfaces change)."""
        desired = self.maps[pm.ENDPOINTS.name]
        changed = {k for k in desired.keys() - entries.keys()} | {k for k, v in entries.items() if desired.get(k) != v}
        for key in changed:
            if key in entries:
                desired[key] = entries[key]
            else:
                del desired[key]
        self.touched[pm.ENDPOINTS.name] |= changed

    def take_touched(self) -> dict[str, set[bytes]]:
        """The keys touched since the last call (and forget them)."""
        touched, self.touched = self.touched, {name: set() for name in SYNCED}
        return touched

    def problems(self) -> list[str]:
        """Prefixes two slices give different identities (the node's own entries win silently, as in translate)."""
        out = []
        for map_name, what in PREFIX_MAPS.items():
            candidates = self._candidates[map_name]
            for key in self._conflicts[map_name]:
                per_source = candidates[key]
                kept = min(per_source)
                if kept == NODE_SOURCE:
                    continue
                for source in sorted(per_source):
                    if per_source[source] != per_source[kept]:
                        out.append(
                            f"slice {source}: {what} {_cidr(key)} is {_identity(per_source[source])} but "
                            f"{_identity(per_source[kept])} in slice {kept}, which is kept"
                        )
        return sorted(out)


def endpoint_translation(
    spec: NodeNetworkPolicy,
    slices: Mapping[str, BpfPolicySliceSpec],
    interfaces: Mapping[str, PodInterface | Unresolved],
    policy_indexes: Mapping[str, int],
) -> tuple[Translation, dict[bytes, bytes]]:
    """The endpoints as translate() places them, and their endpoints-map entries."""
    out = Translation(pm.DatapathState(policy_names={index: name for name, index in policy_indexes.items()}))
    place_endpoints(node_endpoints(spec, slices), interfaces, out)
    encoded = pm.encode(pm.DatapathState(endpoints=out.state.endpoints), lambda interface: int(interface))
    return out, encoded.maps[pm.ENDPOINTS.name]


class NodeMaps:
    """One node's desired maps, updated from its spec and slices: only new or changed sources are encoded."""

    def __init__(self) -> None:
        self.desired = PolicyMaps()
        self._node: tuple[object, Entries] | None = None
        self._encoded: dict[str, tuple[BpfPolicySliceSpec, int, Entries | str]] = {}
        """slice name -> (the model it was encoded from, its policy's index, its entries or why it has none)."""
        self._keys: dict[str, SliceKeys] = {}
        """slice name -> its last readable version's keys per entry."""
        self._rule_counts: dict[str, int] = {}

    @property
    def rules(self) -> int:
        """Expanded rules of the node spec and every applied slice."""
        return sum(self._rule_counts.values())

    def update(
        self,
        spec: NodeNetworkPolicy,
        slices: Mapping[str, BpfPolicySliceSpec],
        policy_indexes: Mapping[str, int],
        interfaces: Mapping[str, PodInterface | Unresolved],
    ) -> Translation:
        """Take spec and its slices (the same model objects again cost nothing); returns the endpoints'
        placement (state.endpoints, interfaces, unresolved) and every problem, translate()'s and unreadable
        slices'. Raises ValueError, leaving the desired maps as they were, when the node's own part is invalid.
        """
        plan, endpoints = endpoint_translation(spec, slices, interfaces, policy_indexes)
        inline = {r.policy: policy_indexes[r.policy] for r in spec.rules or []}
        key = (spec.ipcache, spec.cidr_identities, spec.rules, inline)
        if self._node is None or self._node[0] != key:
            self._node = (key, node_entries(spec, policy_indexes))
            self._rule_counts[NODE_SOURCE] = len(spec.rules or [])
        self.desired.set_endpoints(endpoints)
        self.desired.set_source(NODE_SOURCE, self._node[1])
        for name in self.desired.sources() - slices.keys() - {NODE_SOURCE}:
            self.desired.set_source(name, None)
        for name in self._encoded.keys() - slices.keys():
            del self._encoded[name]
            self._keys.pop(name, None)
            self._rule_counts.pop(name, None)
        for name, piece in slices.items():
            index = ADDRESSES_ONLY if piece.policy is None else policy_indexes[piece.policy]
            cached = self._encoded.get(name)
            if cached is None or cached[0] is not piece or cached[1] != index:
                try:
                    entries: Entries | str
                    entries, self._keys[name] = slice_entries(piece, index, self._keys.get(name))
                except ValueError as exc:
                    entries = f"slice {name} not understood by this daemon: {exc}"
                cached = self._encoded[name] = (piece, index, entries)
                self._rule_counts[name] = 0 if isinstance(entries, str) else slice_rule_count(piece)
            if isinstance(cached[2], str):
                plan.problems.append(cached[2])
                self.desired.set_source(name, None)
            else:
                self.desired.set_source(name, cached[2])
        plan.problems.extend(self.desired.problems())
        return plan


def plan_writes(
    written: Mapping[str, Mapping[bytes, bytes]],
    desired: Mapping[str, Mapping[bytes, bytes]],
    touched: Mapping[str, Iterable[bytes]] | None,
) -> list[tuple[pm.MapSpec, dict[bytes, bytes], list[bytes]]]:
    """Per synced map (in SYNCED_MAPS order): the entries to write and the keys to delete so that a map
    holding `written` holds `desired`, looking only at the touched keys (None: at every key)."""
    plan = []
    for spec in pm.SYNCED_MAPS:
        current, wanted = written[spec.name], desired[spec.name]
        keys: Iterable[bytes] = current.keys() | wanted.keys() if touched is None else touched[spec.name]
        upserts, removals = {}, []
        for key in keys:
            value = wanted.get(key)
            if value is None:
                if key in current:
                    removals.append(key)
            elif current.get(key) != value:
                upserts[key] = value
        plan.append((spec, upserts, removals))
    return plan
