"""compile_policies, incrementally: the same output, with work proportional to what a change touches.

The operator's pass is level-based (a snapshot of everything), but one rule, label or pod change
among 10k identities must not recompile the world. This keeps, between passes:

- a selector cache (Cilium's): per selector a policy uses, the identities it matches, updated
  per identity that appears or goes, with a version that moves when the match set does;
- per policy, its entries per local identity, recompiled only when its spec, a selector's
  matches or (with named ports) the identities' ports changed; a version moves when its entries,
  isolation change;
- per node, its endpoints and per policy there the entries, budget cost and slices, rebuilt
  only on the nodes that host a changed policy's identities (or whose pods or addresses changed),
  and there only for the policies whose inputs moved; per identity its address slices, packed
  once for every node that needs them and repacked only when its pods' addresses change.

What did not change is returned as the very objects of the previous call (a node's
spec.networkPolicy, its slices), so the reconciler can skip them by identity instead of
comparing or serializing them. compile_policies stays the reference: a property test checks the
two agree after every step of random change sequences.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

from beekeeper.crds.common import LabelSelector
from beekeeper.crds.networkpolicy import NetworkIdentityPolicy, Peer, PolicyType
from beekeeper.operator.identities import IdentityKey
from beekeeper.operator.pods import PodRecord
from beekeeper.operator.policy_compile import (
    BUDGET_REASON,
    DEFAULT_EXPANSION_BUDGET,
    Block,
    Body,
    CompiledPolicies,
    Entry,
    IdentityInfo,
    Network,
    PolicyOutcome,
    _cost,
    _Coverage,
    _Named,
    _NodeView,
    _policy_rules,
    _PolicyCompiler,
    _PortKey,
    _RuleKey,
    address_slices,
    assign_cidr_identities,
    endpoint_entry,
    endpoint_slices,
    isolating,
    matches_peer,
    node_hosts,
    node_policy,
    parse_policy,
    pod_peers,
    policy_slices,
    selects_pods,
)

SelectorKey = tuple[str, str, str, str]
"""(kind, namespace scope, namespaceSelector, podSelector) in canonical JSON."""


class _Selections:
    """Selector -> matching identities, kept current per identity change instead of rescanned per policy."""

    def __init__(self) -> None:
        self.matching: dict[SelectorKey, set[int]] = {}
        self.versions: dict[SelectorKey, int] = {}
        self._tests: dict[SelectorKey, Callable[[IdentityKey], bool]] = {}
        self._by_label: dict[tuple[str, str], set[int]] = {}
        """Pod label -> identities with it: a new selector with matchLabels tests only those."""
        self._clock = 0

    def _bump(self, key: SelectorKey) -> None:
        self._clock += 1
        self.versions[key] = self._clock

    def get(
        self,
        key: SelectorKey,
        test: Callable[[IdentityKey], bool],
        infos: Mapping[int, IdentityInfo],
        labels: Mapping[str, str] | None,
    ) -> set[int]:
        """The identities matching; `labels` (the selector's matchLabels) narrows what a new one tests."""
        if key not in self.matching:
            self._tests[key] = test
            narrowed = [self._by_label.get(item, set()) for item in (labels or {}).items()]
            candidates: Iterable[int] = infos
            if narrowed:
                smallest: set[int] = min(narrowed, key=len)
                candidates = smallest
            self.matching[key] = {n for n in candidates if test(infos[n].key)}
            self._bump(key)
        return self.matching[key]

    def added(self, number: int, key: IdentityKey) -> None:
        for item in key.labels:
            self._by_label.setdefault(item, set()).add(number)
        for selector, test in self._tests.items():
            if test(key):
                self.matching[selector].add(number)
                self._bump(selector)

    def removed(self, number: int, key: IdentityKey) -> None:
        for item in key.labels:
            self._by_label[item].discard(number)
            if not self._by_label[item]:
                del self._by_label[item]
        for selector, matched in self.matching.items():
            if number in matched:
                matched.discard(number)
                self._bump(selector)

    def keep(self, used: set[SelectorKey]) -> None:
        """Forget the selectors no policy uses any more."""
        for selector in set(self.matching) - used:
            del self.matching[selector], self.versions[selector], self._tests[selector]


def _json(selector: LabelSelector | None) -> str:
    return "-" if selector is None else selector.model_dump_json(by_alias=True, exclude_none=True)


class _OnePolicy(_PolicyCompiler):
    """One policy's entries, its selections read from the cache (recording which it used)."""

    def __init__(
        self, infos: Mapping[int, IdentityInfo], selections: _Selections, servers: Mapping[tuple[str, str], set[int]]
    ) -> None:
        super().__init__(infos)
        self.selections = selections
        self.servers = servers
        self.used: set[SelectorKey] = set()
        self.named = False
        self.selected_ids: list[int] = []

    def _selected(self, namespace: str, selector: LabelSelector) -> list[int]:
        key: SelectorKey = ("pods", namespace, "-", _json(selector))
        self.used.add(key)
        test = functools.partial(selects_pods, namespace, selector)
        self.selected_ids = sorted(self.selections.get(key, test, self.infos, selector.match_labels))
        return self.selected_ids

    def _peers(self, namespace: str, peer: Peer) -> list[int]:
        scope = namespace if peer.namespace_selector is None else ""
        key: SelectorKey = ("peer", scope, _json(peer.namespace_selector), _json(peer.pod_selector))
        self.used.add(key)
        test = functools.partial(matches_peer, namespace, peer)
        labels = peer.pod_selector.match_labels if peer.pod_selector is not None else None
        return sorted(self.selections.get(key, test, self.infos, labels))

    def _servers(self, port: _Named) -> list[int]:
        self.named = True
        return sorted(self.servers.get((port.name, port.protocol.value), ()))

    def _resolve(self, identity: int, port: _Named, outcome: PolicyOutcome) -> list[int]:
        self.named = True
        return super()._resolve(identity, port, outcome)


@dataclass
class _Policy:
    """One policy as last compiled, with what it depended on."""

    fingerprint: tuple[Any, Any]
    outcome: PolicyOutcome
    """error, reason and warnings (selected and nodes are filled per call)."""
    policy: NetworkIdentityPolicy | None
    deps: tuple[tuple[SelectorKey, int], ...] = ()
    ports_version: int | None = None
    """The identities' ports it was compiled against, when it uses named ports."""
    entries: dict[int, set[Entry]] = field(default_factory=dict)
    isolating: frozenset[tuple[int, PolicyType]] = frozenset()
    types: frozenset[PolicyType] = frozenset()
    local: frozenset[int] = frozenset()
    named: frozenset[int] = frozenset()
    """Pod identities its entries name (the nodes it is on need their address slices)."""
    version: int = 0


@dataclass
class _Pair:
    """One policy on one node: its entries there, and what was derived from them."""

    key: tuple[Any, ...]
    items: list[tuple[int, Entry]]
    isolated: set[tuple[int, PolicyType]]
    blocks: set[Block]
    named: frozenset[int]
    """The pod identities its entries here name."""
    rules: dict[frozenset[Block], tuple[dict[_RuleKey, set[_PortKey]], int]] = field(default_factory=dict)
    """Per coverage (the ipBlocks active on the node): its rules and their cost."""
    own_cost: int | None = None
    """Its cost over its own ipBlocks alone (whether an over-budget cost is its own fault), once asked."""
    slices: tuple[tuple[Any, ...], dict[str, dict[str, Any]]] | None = None


@dataclass
class _Node:
    addresses: tuple[str, ...] = ()
    endpoints: dict[str, tuple[PodRecord, int]] = field(default_factory=dict)
    """Pods with an IPv4 address and an identity, by namespace/name."""
    ids: Counter[int] = field(default_factory=Counter)
    view: _NodeView | None = None
    pairs: dict[str, _Pair] = field(default_factory=dict)
    over: dict[str, tuple[int, bool]] = field(default_factory=dict)
    """Policies over the budget here with every valid policy active: ref -> (cost, own fault)."""
    prefixes: frozenset[Network] = frozenset()
    entries: dict[str, tuple[PodRecord, int, bool, bool, dict[str, Any]]] = field(default_factory=dict)
    """Per endpoint, its inputs and its spec.networkPolicy entry."""
    order: list[str] = field(default_factory=list)
    """The endpoints' namespace/name, sorted."""
    changed: set[str] = field(default_factory=set)
    """Endpoints added, removed or changed since the last outputs."""
    policy: dict[str, Any] | None = None
    hosts: tuple[str, ...] = ()
    """The addresses policy was built with."""
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    fragments: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    """The per-policy and per-identity slice dicts node.slices was merged from (the very objects)."""
    endpoint_slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The endpoint slices of node.entries, the rest of node.slices."""
    isolating: bool = False
    """Whether some endpoint is isolated (then the node's addresses are in the policy as host)."""
    addresses_out: dict[int, tuple[object, tuple[str, ...], dict[str, dict[str, Any]]]] = field(default_factory=dict)
    """Per identity named here: (its packed specs, the node's addresses, its address slices here)."""
    readers: dict[int, set[str]] = field(default_factory=dict)


class IncrementalCompiler:
    """compile_policies with memory: call compile() with each pass's whole inputs; the result is equal to
    compile_policies' on the same inputs, computed from what changed since the previous call."""

    def __init__(self) -> None:
        self._reset(None)

    def _reset(self, budget: int | None) -> None:
        """Forget everything (a new budget changes every cost)."""
        self._budget = budget
        self._pods: dict[str, tuple[PodRecord, int | None]] = {}
        self._listed: list[PodRecord] = []
        self._listed_ids: set[int] = set()
        self._refs_by_key: dict[IdentityKey, set[str]] = {}
        """Pods (namespace/name) per identity key, to find those a renumbered key concerns."""
        self._identities: dict[IdentityKey, int] = {}
        self._members: Counter[int] = Counter()
        self._prefix_counts: dict[int, Counter[Network]] = {}
        self._port_counts: dict[int, Counter[tuple[str, str, int]]] = {}
        self.infos: dict[int, IdentityInfo] = {}
        self._servers: dict[tuple[str, str], set[int]] = {}
        self._ports_version = 0
        self._where: dict[int, Counter[str]] = {}
        """Per identity, the nodes of its endpoints (known nodes or not)."""
        self._endpoints_of: dict[int, dict[str, str]] = {}
        """Per identity, its endpoints (namespace/name -> node)."""
        self._selections = _Selections()
        self._policies: dict[str, _Policy] = {}
        self._clock = 0
        self._by_local: dict[int, set[str]] = {}
        self._named_by: dict[int, set[str]] = {}
        self._nodes: dict[str, _Node] = {}
        self._enforced: dict[int, tuple[bool, bool]] = {}
        """(ingress, egress) isolation of the identities some valid policy selects."""
        self._refs: set[str] = set()
        self._prefixes: frozenset[Network] = frozenset()
        self._cidr_ids: dict[Network, int] = {}
        self._cidr_version = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ----------------------------------------------------------------------------------
    # Pods and identities
    # ----------------------------------------------------------------------------------

    def _node(self, name: str) -> _Node:
        return self._nodes.setdefault(name, _Node())

    def _touch(self, number: int, touched: dict[int, IdentityKey | None]) -> None:
        if number not in touched:
            info = self.infos.get(number)
            touched[number] = info.key if info is not None and self._members[number] else None

    def _pod_out(
        self, pod: PodRecord, number: int | None, touched: dict[int, IdentityKey | None], dirty: set[str]
    ) -> None:
        if number is None:
            return
        self._touch(number, touched)
        info = self.infos[number]
        self._members[number] -= 1
        counts = self._prefix_counts[number]
        for ip in pod.ips:
            prefix = ipaddress.ip_network(ip)
            counts[prefix] -= 1
            if not counts[prefix]:
                del counts[prefix]
                info.prefixes.discard(prefix)
                info.forget_rows()
        ports = self._port_counts[number]
        for port in pod.named_ports:
            item = (port.name, port.protocol, port.number)
            ports[item] -= 1
            if not ports[item]:
                del ports[item]
                self._ports_version = self._tick()
                numbers = info.ports[port.name, port.protocol]
                numbers.discard(port.number)
                if not numbers:
                    del info.ports[port.name, port.protocol]
                    self._servers[port.name, port.protocol].discard(number)
        if pod.node is not None and pod.ipv4 is not None:
            node = self._node(pod.node)
            del node.endpoints[pod.ref]
            del node.order[bisect.bisect_left(node.order, pod.ref)]
            node.changed.add(pod.ref)
            node.ids[number] -= 1
            if not node.ids[number]:
                del node.ids[number]
            self._where[number][pod.node] -= 1
            if not self._where[number][pod.node]:
                del self._where[number][pod.node]
            del self._endpoints_of[number][pod.ref]
            dirty.add(pod.node)

    def _pod_in(
        self, pod: PodRecord, number: int | None, touched: dict[int, IdentityKey | None], dirty: set[str]
    ) -> None:
        if number is None:
            return
        self._touch(number, touched)
        info = self.infos.get(number)
        if info is None or not self._members[number]:
            # New, or every pod of the old key left in this call (the number may now stand for another key).
            info = self.infos[number] = IdentityInfo(number, pod.key)
            self._prefix_counts[number], self._port_counts[number] = Counter(), Counter()
            self._where.setdefault(number, Counter())
            self._endpoints_of.setdefault(number, {})
        self._members[number] += 1
        counts = self._prefix_counts[number]
        for ip in pod.ips:
            prefix = ipaddress.ip_network(ip)
            counts[prefix] += 1
            info.prefixes.add(prefix)
            info.forget_rows()
        ports = self._port_counts[number]
        for port in pod.named_ports:
            item = (port.name, port.protocol, port.number)
            ports[item] += 1
            if ports[item] == 1:
                self._ports_version = self._tick()
                info.ports[port.name, port.protocol].add(port.number)
                self._servers.setdefault((port.name, port.protocol), set()).add(number)
        if pod.node is not None and pod.ipv4 is not None:
            node = self._node(pod.node)
            node.endpoints[pod.ref] = (pod, number)
            bisect.insort(node.order, pod.ref)
            node.changed.add(pod.ref)
            node.ids[number] += 1
            self._where[number][pod.node] += 1
            self._endpoints_of[number][pod.ref] = pod.node
            dirty.add(pod.node)

    def _update_pods(
        self, pods: Iterable[PodRecord], identities: Mapping[IdentityKey, int], dirty: set[str]
    ) -> set[int]:
        """Apply the pods that changed; returns the identities whose addresses or existence changed."""
        listed = pods if isinstance(pods, list) else list(pods)
        ids = set(map(id, listed))
        if len(ids) != len(listed):  # one record object listed twice: no shortcut
            ids = set()
        fresh = ids - self._listed_ids  # new objects (the old ones are held in _listed: no id was reused)
        if not fresh and len(ids) == len(self._listed_ids) and identities == self._identities:
            return set()  # the very records, the same numbers: nothing to do
        Slot = tuple[PodRecord, int | None]
        changed: list[tuple[Slot | None, Slot | None]] = []
        previous = self._pods
        renumbered = (
            set() if identities == self._identities else {k for k, _ in identities.items() ^ self._identities.items()}
        )
        if ids and len(fresh) + len(self._listed_ids - ids) < len(listed) // 4:
            # The objects that came or went, and the pods of keys whose number changed.
            gone = self._listed_ids - ids
            by_ref = {p.ref: p for p in compress(listed, map(fresh.__contains__, map(id, listed)))}
            refs = set(by_ref) | {p.ref for p in compress(self._listed, map(gone.__contains__, map(id, self._listed)))}
            for key in renumbered:
                refs |= self._refs_by_key.get(key, set())
            for ref in refs:
                old = previous.get(ref)
                pod = by_ref.get(ref) or (old[0] if old is not None and id(old[0]) in ids else None)
                now: Slot | None = None if pod is None else (pod, identities.get(pod.key))
                if now is None:
                    if old is not None:
                        changed.append((old, None))
                        del previous[ref]
                elif old is None or (old[0] is not now[0] and old[0] != now[0]) or old[1] != now[1]:
                    changed.append((old, now))
                    previous[ref] = now
                else:
                    previous[ref] = now
        else:
            current: dict[str, Slot] = {}
            for pod in listed:
                number = identities.get(pod.key)
                ref = pod.ref
                slot: Slot = (pod, number)
                current[ref] = slot
                old = previous.get(ref)
                if old is None or (old[0] is not pod and old[0] != pod) or old[1] != number:
                    changed.append((old, slot))
            changed += [(gone, None) for ref, gone in previous.items() if ref not in current]
            self._pods = current
        self._listed, self._listed_ids, self._identities = listed, ids, dict(identities)
        for old, now in changed:
            for entry, sign in ((old, -1), (now, 1)):
                if entry is not None:
                    refs_of = self._refs_by_key.setdefault(entry[0].key, set())
                    (refs_of.add if sign > 0 else refs_of.discard)(entry[0].ref)
                    if not refs_of:
                        del self._refs_by_key[entry[0].key]
        touched: dict[int, IdentityKey | None] = {}
        before = {n: frozenset(self.infos[n].prefixes) for old, _ in changed if old and (n := old[1]) in self.infos}
        for _, into in changed:
            if into is not None and (n := into[1]) in self.infos and n not in before:
                before[n] = frozenset(self.infos[n].prefixes)
        for out, _ in changed:
            if out is not None:
                self._pod_out(*out, touched, dirty)
        for _, into in changed:
            if into is not None:
                self._pod_in(*into, touched, dirty)
        moved: set[int] = set()
        for number, old_key in touched.items():
            new_key = self.infos[number].key if self._members[number] > 0 else None
            if new_key != old_key:
                moved.add(number)
                if old_key is not None:
                    self._selections.removed(number, old_key)
                if new_key is not None:
                    self._selections.added(number, new_key)
            if new_key is None:
                del self.infos[number], self._prefix_counts[number], self._port_counts[number], self._members[number]
                del self._where[number], self._endpoints_of[number]
            elif before.get(number) != self.infos[number].prefixes:
                moved.add(number)
        return moved

    # ----------------------------------------------------------------------------------
    # Policies
    # ----------------------------------------------------------------------------------

    def _current(self, entry: _Policy) -> bool:
        versions = self._selections.versions
        return all(versions.get(key) == version for key, version in entry.deps) and (
            entry.ports_version is None or entry.ports_version == self._ports_version
        )

    def _compile_policy(self, body: Body, fingerprint: tuple[Any, Any], old: _Policy | None) -> _Policy:
        if old is not None and old.fingerprint == fingerprint:
            outcome = PolicyOutcome(old.outcome.namespace, old.outcome.name, old.outcome.generation, old.outcome.error)
            policy = old.policy
        else:
            outcome, policy = parse_policy(body)
        if policy is None:
            return _Policy(fingerprint, outcome, None)
        one = _OnePolicy(self.infos, self._selections, self._servers)
        one.add(policy, outcome)
        versions = self._selections.versions
        entries = dict(one.entries)
        named = pod_peers(e.peer for es in entries.values() for e in es)
        return _Policy(
            fingerprint,
            outcome,
            policy,
            tuple(sorted((key, versions[key]) for key in one.used)),
            self._ports_version if one.named else None,
            entries,
            frozenset(one.isolating),
            frozenset(policy.spec.effective_policy_types()),
            frozenset(one.selected_ids),
            named,
        )

    def _index(self, ref: str, old: _Policy | None, new: _Policy | None) -> None:
        for index, attr in ((self._by_local, "local"), (self._named_by, "named")):
            for n in getattr(old, attr) if old else ():
                index[n].discard(ref)
                if not index[n]:
                    del index[n]
            for n in getattr(new, attr) if new else ():
                index.setdefault(n, set()).add(ref)

    def _update_policies(self, bodies: list[Body]) -> set[str]:
        """Recompile the policies whose inputs changed; returns those whose entries or isolation did."""
        changed: set[str] = set()
        seen: set[str] = set()
        for body in bodies:
            meta = body["metadata"]
            ref = f"{meta['namespace']}/{meta['name']}"
            seen.add(ref)
            fingerprint = (body.get("spec"), meta.get("generation"))
            old = self._policies.get(ref)
            if old is not None and old.fingerprint == fingerprint and (old.policy is None or self._current(old)):
                continue
            new = self._compile_policy(body, fingerprint, old)
            if (
                old is not None
                and (old.policy is None) == (new.policy is None)
                and old.entries == new.entries
                and old.isolating == new.isolating
            ):
                new.version = old.version
            else:
                new.version = self._tick()
                changed.add(ref)
            self._index(ref, old, new)
            self._policies[ref] = new
        for ref in set(self._policies) - seen:
            self._index(ref, self._policies.pop(ref), None)
            changed.add(ref)
        self._selections.keep({key for p in self._policies.values() for key, _ in p.deps})
        return changed

    def _update_enforcement(self, refs: set[str], old_local: Mapping[str, frozenset[int]], valid: set[str]) -> set[int]:
        """The directions each identity these policies select (now or before) is isolated in; returns those
        whose isolation changed."""
        candidates: set[int] = set()
        for ref in refs:
            entry = self._policies.get(ref)
            candidates |= (entry.local if entry else frozenset()) | old_local.get(ref, frozenset())
        moved: set[int] = set()
        for n in candidates:
            types = {d for ref in self._by_local.get(n, ()) if ref in valid for d in self._policies[ref].types}
            flags = (PolicyType.INGRESS in types, PolicyType.EGRESS in types)
            if flags != self._enforced.get(n, (False, False)):
                moved.add(n)
            if any(flags):
                self._enforced[n] = flags
            else:
                self._enforced.pop(n, None)
        return moved

    def _hosting(self, refs: Iterable[str], old_local: Mapping[str, frozenset[int]]) -> set[str]:
        """The nodes with endpoints of identities these policies select (now or before)."""
        nodes: set[str] = set()
        for ref in refs:
            entry = self._policies.get(ref)
            for n in (entry.local if entry else frozenset()) | old_local.get(ref, frozenset()):
                nodes.update(self._where.get(n, ()))
        return nodes

    # ----------------------------------------------------------------------------------
    # Nodes
    # ----------------------------------------------------------------------------------

    def _pair(self, node: _Node, ref: str, ids: list[int]) -> _Pair:
        entry = self._policies[ref]
        key = (entry.version, tuple(ids), node.addresses)
        pair = node.pairs.get(ref)
        if pair is not None and pair.key == key:
            return pair
        items = [(n, e) for n in ids for e in entry.entries.get(n, ())]
        isolated = {(n, d) for n in ids for d in PolicyType if (n, d) in entry.isolating}
        blocks = {e.peer for _, e in items if isinstance(e.peer, Block)}
        return _Pair(key, items, isolated, blocks, pod_peers(e.peer for _, e in items))

    def _rebuild_view(self, node: _Node, budget: int) -> None:
        """The node's policies and their entries there; their cost with every valid policy active."""
        per_ref: dict[str, list[int]] = {}
        for n in sorted(node.ids):
            for ref in self._by_local.get(n, ()):
                per_ref.setdefault(ref, []).append(n)
        node.pairs = {ref: self._pair(node, ref, ids) for ref, ids in sorted(per_ref.items())}
        view = node.view = _NodeView([], node.addresses)
        for ref, pair in node.pairs.items():
            view.items[ref], view.isolated[ref], view.blocks[ref] = pair.items, pair.isolated, pair.blocks
        node.over = {}
        active = frozenset(node.pairs)
        for ref in sorted(active):
            cost = self._rules(node, ref, active)[1]
            if cost > budget:
                node.over[ref] = (cost, self._own_cost(node, ref) > budget)

    def _own_cost(self, node: _Node, ref: str) -> int:
        """What the policy expands to on the node with only its own ipBlocks (kept on its pair, which is
        rebuilt when its entries there or the node's addresses move)."""
        pair = node.pairs[ref]
        if pair.own_cost is None:
            assert node.view is not None
            pair.own_cost = _cost(_policy_rules(node.view, ref, _Coverage(pair.blocks)))
        return pair.own_cost

    def _coverage_key(self, node: _Node, active: frozenset[str]) -> frozenset[Block]:
        return frozenset(b for ref in active for b in node.pairs[ref].blocks)

    def _rules(self, node: _Node, ref: str, active: frozenset[str]) -> tuple[dict[_RuleKey, set[_PortKey]], int]:
        pair = node.pairs[ref]
        blocks = self._coverage_key(node, active)
        if blocks not in pair.rules:
            assert node.view is not None
            rules = _policy_rules(node.view, ref, _Coverage(blocks))
            pair.rules[blocks] = (rules, _cost(rules))
        return pair.rules[blocks]

    def _over_budget(self, refs: set[str], budget: int) -> dict[str, tuple[int, str, bool]]:
        """policy_compile._over_budget over the kept views (only run when some policy is over the budget)."""
        over: dict[str, tuple[int, str, bool]] = {}
        for name, node in sorted(self._nodes.items()):
            if node.view is None:
                continue
            active = frozenset(ref for ref in node.pairs if ref in refs)
            for ref in sorted(active):
                cost = self._rules(node, ref, active)[1]
                if cost <= budget:
                    continue
                own = self._own_cost(node, ref)
                if ref not in over or (own > budget, cost) > (over[ref][2], over[ref][0]):
                    over[ref] = (cost, name, own > budget)
        return over

    def _outputs(self, name: str, node: _Node, refs: set[str], enforcement: set[int]) -> None:
        """The node's slices and spec.networkPolicy, reusing every piece whose inputs did not move."""
        assert node.view is not None
        active = frozenset(ref for ref in node.pairs if ref in refs)
        blocks = self._coverage_key(node, active)
        coverage: _Coverage | None = None
        fragments: list[dict[str, dict[str, Any]]] = []
        for ref in sorted(active):
            pair = node.pairs[ref]
            key = (pair.key, blocks, self._cidr_version if blocks else None)
            if pair.slices is None or pair.slices[0] != key:
                coverage = coverage or _Coverage(blocks)
                rules = self._rules(node, ref, active)[0]
                pair.slices = (key, policy_slices(name, node.view, ref, rules, coverage, self._cidr_ids))
            if pair.slices[1]:
                fragments.append(pair.slices[1])
        readers: dict[int, set[str]] = {}
        for ref in sorted(active):
            for n in node.pairs[ref].named:
                readers.setdefault(n, set()).add(ref)
        hosts = node_hosts(node.addresses)
        kept: dict[int, tuple[object, tuple[str, ...], dict[str, dict[str, Any]]]] = {}
        for n in sorted(readers):
            info = self.infos.get(n)
            if info is None:
                continue
            specs = info.address_specs()
            out = node.addresses_out.get(n)
            if out is None or out[0] is not specs or out[1] != node.addresses:
                out = (specs, node.addresses, address_slices(name, info, hosts))
            kept[n] = out
            if out[2]:
                fragments.append(out[2])
        node.addresses_out, node.readers = kept, readers
        moved = len(fragments) != len(node.fragments) or any(
            a is not b for a, b in zip(fragments, node.fragments, strict=True)
        )
        node.fragments = fragments
        if not refs:
            if moved or node.endpoint_slices:
                node.slices = {k: v for f in fragments for k, v in f.items()}
            node.policy, node.endpoint_slices = None, {}
            return
        # Endpoint entries: only those of pods that changed or whose identity's isolation did.
        if node.policy is None:
            recheck: Iterable[str] = list(node.endpoints)
            node.entries = {}
        else:
            recheck = node.changed | {
                ref for n in enforcement & node.ids.keys() for ref, at in self._endpoints_of[n].items() if at == name
            }
        node.changed = set()
        entries_moved = node.policy is None
        for ref in recheck:
            slot = node.endpoints.get(ref)
            if slot is None:
                entries_moved = node.entries.pop(ref, None) is not None or entries_moved
                continue
            pod, n = slot
            flags = self._enforced.get(n, (False, False))
            memo = node.entries.get(ref)
            if memo is None or memo[0] is not pod or memo[1:4] != (n, *flags):
                node.entries[ref] = (pod, n, *flags, endpoint_entry(pod, n, *flags))
                entries_moved = True
        if entries_moved:
            endpoints = [node.entries[ref][4] for ref in node.order]
            node.endpoint_slices, node.isolating = endpoint_slices(name, endpoints), isolating(endpoints)
        if moved or entries_moved:
            node.slices = {k: v for f in [*fragments, node.endpoint_slices] for k, v in f.items()}
        if moved or entries_moved or node.addresses != node.hosts:
            node.policy = node_policy(node.isolating, node.addresses, node.slices)
            node.hosts = node.addresses

    # ----------------------------------------------------------------------------------

    def compile(
        self,
        policies: Iterable[Body],
        pods: Iterable[PodRecord],
        identities: Mapping[IdentityKey, int],
        nodes: Mapping[str, Sequence[str]],
        budget: int = DEFAULT_EXPANSION_BUDGET,
    ) -> CompiledPolicies:
        """What compile_policies(policies, pods, identities, nodes, budget) returns."""
        if budget != self._budget:
            self._reset(budget)
        dirty: set[str] = set()
        moved = self._update_pods(pods, identities, dirty)
        for name, addresses in nodes.items():
            node = self._node(name)
            if node.addresses != tuple(addresses) or (node.view is None and node.endpoints):
                node.addresses = tuple(addresses)
                dirty.add(name)
        for name in [n for n, node in self._nodes.items() if n not in nodes and node.view is not None]:
            gone = self._nodes[name]
            gone.view, gone.pairs, gone.policy, gone.slices, gone.fragments = None, {}, None, {}, []
            gone.addresses_out, gone.readers = {}, {}
        bodies = sorted(policies, key=lambda b: (b["metadata"]["namespace"], b["metadata"]["name"]))
        old_local = {ref: p.local for ref, p in self._policies.items()}
        changed = self._update_policies(bodies)
        # Moved addresses change the address slices of the nodes whose rules name them, not the policies.
        dirty |= self._hosting(changed | {ref for n in moved for ref in self._named_by.get(n, ())}, old_local)
        dirty = {name for name in dirty if name in nodes}
        for name in dirty:
            node = self._nodes[name]
            if node.endpoints:
                self._rebuild_view(node, budget)
            else:
                node.view, node.pairs, node.over, node.policy = None, {}, {}, None

        # The budget, as compile_policies decides it (the rounds only run when some policy is over it).
        valid = {ref for ref, p in self._policies.items() if p.policy is not None}
        refused: dict[str, tuple[int, str, bool]] = {}
        if any(node.over for name, node in self._nodes.items() if name in nodes):
            while over := self._over_budget(valid, budget):
                own = {ref for ref, (_, _, fault) in over.items() if fault}
                for ref in sorted(own or over):
                    refused[ref] = over[ref]
                    valid.discard(ref)
        if bool(valid) != bool(self._refs):
            dirty = set(nodes)
        else:
            dirty |= {n for n in self._hosting(valid ^ self._refs, old_local) if n in nodes}
        enforcement = self._update_enforcement(changed | (valid ^ self._refs), old_local, valid)
        self._refs = valid

        outcomes: dict[str, PolicyOutcome] = {}
        for body in bodies:
            meta = body["metadata"]
            ref = f"{meta['namespace']}/{meta['name']}"
            entry = self._policies[ref]
            outcome = outcomes[ref] = PolicyOutcome(
                entry.outcome.namespace,
                entry.outcome.name,
                entry.outcome.generation,
                entry.outcome.error,
                entry.outcome.reason,
                list(entry.outcome.warnings),
            )
            if ref in refused:
                cost, node_name, fault = refused[ref]
                outcome.reason = BUDGET_REASON
                outcome.error = (
                    f"{BUDGET_REASON}: expands to {cost} kernel entries on node {node_name}, budget {budget}"
                )
                if not fault:
                    outcome.error += " (with the ipBlock prefixes of other policies on the node nested in its blocks)"
            elif ref in valid:
                for n in entry.local:
                    for pod_ref, node_name in self._endpoints_of.get(n, {}).items():
                        if node_name in nodes:
                            outcome.nodes.add(node_name)
                            outcome.selected.add(pod_ref)

        # CIDR identities over every node's prefixes: renumbered only when that set changes.
        for name in dirty:
            node = self._nodes[name]
            node.prefixes = (
                frozenset(p for ref in node.pairs if ref in valid for b in node.pairs[ref].blocks for p in b.prefixes)
                if node.view is not None
                else frozenset()
            )
        prefixes = frozenset().union(*(n.prefixes for name, n in self._nodes.items() if name in nodes and n.prefixes))
        if prefixes != self._prefixes:
            cidr_ids = assign_cidr_identities(prefixes)
            if cidr_ids != self._cidr_ids:
                self._cidr_version = self._tick()
                dirty |= {name for name, n in self._nodes.items() if name in nodes and n.view is not None}
            self._prefixes, self._cidr_ids = prefixes, cidr_ids

        for name in dirty:
            if self._nodes[name].view is not None:
                self._outputs(name, self._nodes[name], valid, enforcement)
        compiled: dict[str, dict[str, Any] | None] = {}
        slices: dict[str, dict[str, dict[str, Any]]] = {}
        readers: dict[str, dict[int, set[str]]] = {}
        for name in nodes:
            node = self._nodes[name]
            compiled[name] = node.policy if node.view is not None else None
            slices[name] = node.slices if node.view is not None else {}
            readers[name] = node.readers if node.view is not None else {}
        return CompiledPolicies(compiled, outcomes, slices, readers)
