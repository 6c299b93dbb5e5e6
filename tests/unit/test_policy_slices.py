"""Node policy state in bounded pieces: packing, the expansion budget, and the daemon's reading of slices."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from policy_datapath_sim import datapath_allows, encode_nodes, flat_policy
from policy_reference import World, allowed, namespace, pod, policy

from beekeeper.crds.nodestate import NodeNetworkPolicy, SliceRef
from beekeeper.crds.policyslice import (
    MAX_RULE_PEERS,
    MAX_RULE_PORTS,
    SLICE_BYTES,
    Address,
    BpfPolicySliceSpec,
    pack_slices,
    slice_hash,
)
from beekeeper.node_daemon.policy_slices import SliceReader, SliceStore
from beekeeper.node_daemon.policy_state import translate
from beekeeper.operator.identities import plan_identities
from beekeeper.operator.pods import pod_records
from beekeeper.operator.policy_compile import (
    BUDGET_ENV,
    DEFAULT_EXPANSION_BUDGET,
    CompiledPolicies,
    address_slice_name,
    compile_policies,
    endpoint_slice_name,
    expansion_budget,
    slice_name,
)

NODES = {"n1": ["192.168.0.1"]}


def world(*policies: dict[str, Any]) -> World:
    pods = [
        pod("a", "web", {"app": "web"}, node="n1", ip="10.0.1.1"),
        pod("b", "server", {"app": "server"}, node="n1", ip="10.0.2.1"),
        pod("b", "client", {"app": "client"}, node="n1", ip="10.0.2.2"),
        pod("b", "other", {"app": "other"}, node="n1", ip="10.0.2.3"),
    ]
    return World([namespace("a"), namespace("b")], pods, list(policies), NODES)


def compile_world(w: World, budget: int = DEFAULT_EXPANSION_BUDGET) -> CompiledPolicies:
    records = pod_records(w.pods, {n["metadata"]["name"]: n["metadata"]["labels"] for n in w.namespaces})
    identities = plan_identities({r.key for r in records}, {}, {}, 0.0, 60.0).assigned
    return compile_policies(w.policies, records, identities, w.nodes, budget)


def blocks(first: str, count: int, ports: int, rules: int = 1) -> list[dict[str, Any]]:
    return [
        {
            "from": [{"ipBlock": {"cidr": f"{first}.{r}.{j}/32"}} for j in range(count)],
            "ports": [{"port": 1000 + ports * r + k} for k in range(ports)],
        }
        for r in range(rules)
    ]


SERVERS = policy(
    "b",
    "servers",
    podSelector={"matchLabels": {"app": "server"}},
    ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 80}]}],
)


def test_an_oversized_policy_is_refused_with_its_cost_and_the_others_stay() -> None:
    huge = policy("a", "huge", podSelector={"matchLabels": {"app": "web"}}, ingress=blocks("198.18", 32, 32, 32))
    compiled = compile_world(world(huge, SERVERS))
    outcome = compiled.policies["a/huge"]
    assert outcome.reason == "ExpansionBudgetExceeded"
    assert outcome.error == (
        f"ExpansionBudgetExceeded: expands to {32 * 32 * 32 + 1} kernel entries on node n1, budget 8192"
    )  # + the host entry
    assert compiled.policies["b/servers"].error is None
    # servers' slice, and the addresses of the clients its rule names (and the node's endpoints)
    kinds = sorted(
        body.get("policy", "endpoints" if "endpoints" in body else "") for body in compiled.slices["n1"].values()
    )
    assert kinds == ["", "b/servers", "endpoints"]
    web = next(e for e in flat_policy(compiled, "n1").endpoints or [] if e.pod == "web")
    assert not web.ingress_enforced  # refused means ignored, like an invalid spec
    maps = encode_nodes(compiled)
    w = world(huge, SERVERS)
    assert datapath_allows(maps, "10.0.2.2", "10.0.2.1", "TCP", 80)
    assert not datapath_allows(maps, "10.0.2.3", "10.0.2.1", "TCP", 80)
    assert not allowed(w, "10.0.2.3", "10.0.1.1", "TCP", 1000)  # the policy as written denies it ...
    assert datapath_allows(maps, "10.0.2.3", "10.0.1.1", "TCP", 1000)  # ... refused, it isolates nothing


def test_the_policies_naming_an_identity_share_its_address_slice() -> None:
    """A pod starting rewrites its identity's address slice on each node, not every policy slice naming it."""
    also = policy(
        "b",
        "also",
        podSelector={"matchLabels": {"app": "other"}},
        ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 443}]}],
    )
    w = world(SERVERS, also)
    before = compile_world(w)
    by_kind = {
        body.get("policy"): (name, body) for name, body in before.slices["n1"].items() if "endpoints" not in body
    }
    assert set(by_kind) == {"b/servers", "b/also", None}
    name, addresses = by_kind[None]
    (group,) = addresses["ipcache"]
    assert name == address_slice_name("n1", group["identity"], 0) and group["cidrs"] == ["10.0.2.2/32"]
    assert before.readers["n1"] == {group["identity"]: {"b/servers", "b/also"}}
    assert all("ipcache" not in body for ref, (_, body) in by_kind.items() if ref is not None)

    w.pods.append(pod("b", "client2", {"app": "client"}, node="n1", ip="10.0.2.9"))
    after = compile_world(w)
    moved = {
        n
        for n in after.slices["n1"].keys() | before.slices["n1"].keys()
        if after.slices["n1"].get(n) != before.slices["n1"].get(n)
    }
    assert moved == {name, endpoint_slice_name("n1", 0)}  # its identity's addresses, its node's endpoints
    assert after.slices["n1"][name]["ipcache"] == [
        {"identity": group["identity"], "cidrs": ["10.0.2.2/32", "10.0.2.9/32"]}
    ]
    assert datapath_allows(encode_nodes(after), "10.0.2.9", "10.0.2.1", "TCP", 80)


def test_a_nodes_endpoints_travel_in_slices_of_their_own() -> None:
    """The node state lists slices and the node's addresses: a change elsewhere rewrites a short list of refs,
    not the node's pods (which were most of its bytes and of the apiserver's work per write)."""
    w = world(copy.deepcopy(SERVERS))
    before = compile_world(w)
    spec = before.nodes["n1"]
    assert spec is not None and spec["endpoints"] == []
    endpoints = before.slices["n1"][endpoint_slice_name("n1", 0)]
    assert "policy" not in endpoints and "ipcache" not in endpoints
    assert {e["pod"] for e in endpoints["endpoints"]} == {p["metadata"]["name"] for p in w.pods}
    assert {r["name"] for r in spec["slices"]} == set(before.slices["n1"])
    w.policies[0]["spec"]["ingress"][0]["ports"] = [{"port": 8080}]
    after = compile_world(w)
    assert after.slices["n1"][endpoint_slice_name("n1", 0)] == endpoints  # a rule edit leaves the pods alone
    with pytest.raises(ValueError, match="endpoints travel in slices of their own"):
        BpfPolicySliceSpec.model_validate({**endpoints, "policy": "b/servers"})


def test_an_address_slice_holds_no_rules() -> None:
    with pytest.raises(ValueError, match="rules and cidrIdentities need a policy"):
        BpfPolicySliceSpec.model_validate(
            {"nodeName": "n1", "contentHash": "0" * 64, "cidrIdentities": [{"cidr": "10.0.0.0/8", "identity": 1 << 24}]}
        )


def test_the_budget_is_configurable_and_counts_port_blocks() -> None:
    ranged = policy(
        "a",
        "ranged",
        podSelector={"matchLabels": {"app": "web"}},
        ingress=[{"from": [{"ipBlock": {"cidr": "198.18.0.0/24"}}], "ports": [{"port": 1024, "endPort": 65535}]}],
    )
    assert compile_world(world(ranged), budget=7).policies["a/ranged"].error is None  # 6 blocks + host
    assert "expands to 7 kernel entries" in (compile_world(world(ranged), budget=6).policies["a/ranged"].error or "")


def test_budget_blames_the_policy_whose_own_prefixes_exceed_it_first() -> None:
    """wide's one rule covers every /32 of nested: with nested, wide alone would count 1025 x 8 ports."""
    nested = policy("a", "nested", podSelector={"matchLabels": {"app": "web"}}, ingress=blocks("198.18", 32, 1, 32))
    wide = policy(
        "b",
        "wide",
        podSelector={"matchLabels": {"app": "server"}},
        ingress=[{"from": [{"ipBlock": {"cidr": "198.18.0.0/16"}}], "ports": [{"port": 80 + k} for k in range(8)]}],
    )
    compiled = compile_world(world(nested, wide), budget=1000)
    assert compiled.policies["a/nested"].reason == "ExpansionBudgetExceeded"
    assert compiled.policies["b/wide"].error is None


def test_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert expansion_budget() == DEFAULT_EXPANSION_BUDGET
    monkeypatch.setenv(BUDGET_ENV, "100000")
    assert expansion_budget() == 100000
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=BUDGET_ENV):
        expansion_budget()


def test_rules_are_factored_so_the_wire_grows_with_peers_plus_ports() -> None:
    big = policy("a", "big", podSelector={"matchLabels": {"app": "web"}}, ingress=blocks("198.18", 32, 32, 7))
    compiled = compile_world(world(big))
    assert compiled.policies["a/big"].error is None
    (body,) = [b for b in compiled.slices["n1"].values() if "endpoints" not in b]
    assert len(json.dumps(body)) < 40_000  # 7169 entries
    assert len(flat_policy(compiled, "n1").rules or []) == 7 * 32 * 32 + 1


def test_large_entries_split_into_bounded_slices_with_the_same_product() -> None:
    rule = {
        "localIdentity": 300,
        "direction": "Ingress",
        "action": "allow",
        "peers": list(range(1000, 1000 + 3 * MAX_RULE_PEERS)),
        "ports": [{"protocol": "TCP", "portStart": p, "portEnd": p} for p in range(1, 2 * MAX_RULE_PORTS + 2)],
    }
    ipcache = [{"cidr": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}/32", "identity": 1000} for i in range(20000)]
    specs = pack_slices("a/p", [rule], ipcache, [])
    assert len(specs) > 1
    for spec in specs:
        assert len(json.dumps(spec, separators=(",", ":"))) <= SLICE_BYTES + 1024
        assert spec["contentHash"] == slice_hash(spec)
        BpfPolicySliceSpec.model_validate({"nodeName": "n1", **spec})
    pairs = {
        (p, port["portStart"]) for s in specs for r in s.get("rules", []) for p in r["peers"] for port in r["ports"]
    }
    assert len(pairs) == len(rule["peers"]) * len(rule["ports"])
    addresses = [a for s in specs for a in BpfPolicySliceSpec.model_validate({"nodeName": "n1", **s}).addresses()]
    assert sorted(addresses) == sorted(Address(row["cidr"], row["identity"]) for row in ipcache)


def test_addresses_are_grouped_per_identity_on_the_wire() -> None:
    rows = [{"cidr": f"10.0.0.{i}/32", "identity": 300 + i % 2} for i in range(4)]
    (spec,) = pack_slices("a/p", [], rows, [])
    assert spec["ipcache"] == [
        {"identity": 300, "cidrs": ["10.0.0.0/32", "10.0.0.2/32"]},
        {"identity": 301, "cidrs": ["10.0.0.1/32", "10.0.0.3/32"]},
    ]


def test_slice_names_are_stable_dns_subdomains() -> None:
    assert slice_name("node-1", "a/p", 0) == slice_name("node-1", "a/p", 0) != slice_name("node-1", "a/q", 0)
    long = slice_name("n" * 63 + "." + "m" * 63 + "." + "o" * 63 + "." + "p" * 60, "a/p", 3)
    assert len(long) <= 253 and all(len(label) <= 63 for label in long.split("."))


def slice_object(name: str, spec: dict[str, Any], version: str = "1") -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": version}, "spec": spec}


def test_reader_waits_for_listed_hashes_and_skips_what_it_cannot_read() -> None:
    good = {"nodeName": "n1", **pack_slices("a/p", [], [], [{"cidr": "10.0.0.0/8", "identity": 16777300}])[0]}
    bad = {"nodeName": "n1", "policy": "a/q", "contentHash": "c" * 64, "rules": [{"peers": []}]}
    reader = SliceReader()
    refs = [SliceRef(name="s1", content_hash=good["contentHash"]), SliceRef(name="s2", content_hash="c" * 64)]
    found, waiting, problems = reader.resolve(refs, {"s1": slice_object("s1", good)})
    assert (set(found), waiting, problems) == ({"s1"}, ["s2"], [])
    ahead = {**good, "contentHash": "d" * 64}
    assert SliceReader().resolve(refs[:1], {"s1": slice_object("s1", ahead, "2")})[1] == ["s1"]
    # Read at the listed hash before: that version stays applied while the node state has yet to list the new one.
    assert reader.resolve(refs[:1], {"s1": slice_object("s1", ahead, "2")})[:2] == (found, [])
    found, waiting, problems = reader.resolve(refs, {"s1": slice_object("s1", good), "s2": slice_object("s2", bad)})
    assert set(found) == {"s1"} and not waiting and len(problems) == 1 and "slice s2 not understood" in problems[0]


def test_store_relist_drops_what_vanished_during_a_gap() -> None:
    store = SliceStore()
    store.replace([slice_object("s1", {}), slice_object("s2", {})])
    store.observe("DELETED", slice_object("s1", {}))
    store.observe("MODIFIED", slice_object("s3", {}))
    assert set(store.snapshot()) == {"s2", "s3"}
    store.replace([slice_object("s3", {})])
    assert set(store.snapshot()) == {"s3"}


def test_node_wide_entries_win_and_slice_conflicts_are_reported_not_fatal() -> None:
    spec = NodeNetworkPolicy.model_validate({"ipcache": [{"cidr": "192.168.0.1/32", "identity": 1}]})
    one = BpfPolicySliceSpec.model_validate(
        {
            "nodeName": "n1",
            "policy": "a/p",
            "contentHash": "a" * 64,
            "ipcache": [{"identity": 300, "cidrs": ["192.168.0.1/32"]}, {"identity": 301, "cidrs": ["10.0.0.1/32"]}],
        }
    )
    two = BpfPolicySliceSpec.model_validate(
        {
            "nodeName": "n1",
            "policy": "a/q",
            "contentHash": "b" * 64,
            "ipcache": [{"identity": 302, "cidrs": ["10.0.0.1/32"]}],
        }
    )
    plan = translate(spec, {}, {"a/p": 0, "a/q": 1}, {"s1": one, "s2": two})
    assert {e.cidr: e.identity for e in plan.state.ipcache} == {"192.168.0.1/32": 1, "10.0.0.1/32": 301}
    assert len(plan.problems) == 1 and "slice s2" in plan.problems[0]
