"""Policy compilation: NetworkPolicy semantics case by case, and the shape of what nodes get.

Every verdict is asked of both the brute-force reader of the policies (policy_reference)
and a replay of the datapath lookups over the compiled, encoded node maps
(policy_datapath_sim); they must agree, and the test states the expected answer.
"""

from __future__ import annotations

import json
import random
from typing import Any

from policy_datapath_sim import datapath_allows, encode_nodes, flat_policy
from policy_reference import World, allowed, namespace, pod, policy

from beekeeper.crds.nodestate import NodeNetworkPolicy
from beekeeper.operator.identities import plan_identities
from beekeeper.operator.pods import pod_records
from beekeeper.operator.policy_compile import (
    HOST,
    MIN_CIDR_IDENTITY,
    CompiledPolicies,
    assign_cidr_identities,
    compile_policies,
    parse_cidr,
)

NODES = {"n1": ["192.168.0.1"], "n2": ["192.168.0.2"]}
OUTSIDE = "203.0.113.7"
PORTS = [("serve-80-tcp", "TCP", 80), ("serve-81-udp", "UDP", 81)]


def truth_table_pods(ports: dict[str, list[tuple[str, str, int]]] | None = None) -> list[dict[str, Any]]:
    """Namespaces x, y, z by pods a, b, c (label pod=<name>); a and c on n1, b on n2; 10.0.<ns>.<pod>."""
    out = []
    for i, ns in enumerate("xyz", start=1):
        for j, name in enumerate("abc", start=1):
            out.append(
                pod(
                    ns,
                    name,
                    {"pod": name},
                    node="n2" if name == "b" else "n1",
                    ip=f"10.0.{i}.{j}",
                    ports=(ports or {}).get(f"{ns}/{name}", PORTS),
                )
            )
    return out


class Scenario:
    """A world compiled once; allows() answers through both evaluators."""

    def __init__(
        self,
        *policies: dict[str, Any],
        pods: list[dict[str, Any]] | None = None,
        namespaces: list[dict[str, Any]] | None = None,
        nodes: dict[str, list[str]] | None = None,
    ) -> None:
        self.world = World(
            namespaces=namespaces or [namespace("x", team="blue"), namespace("y", team="blue"), namespace("z")],
            pods=pods if pods is not None else truth_table_pods(),
            policies=list(policies),
            nodes=NODES if nodes is None else nodes,
        )
        self.compiled = compile_world(self.world)
        self.maps = encode_nodes(self.compiled)

    def ip(self, who: str) -> str:
        """A pod's IP for "namespace/name", else who is an address already."""
        if "/" not in who:
            return who
        ns, name = who.split("/")
        meta = [(p["metadata"], p["status"]) for p in self.world.pods]
        return next(status["podIP"] for m, status in meta if (m["namespace"], m["name"]) == (ns, name))

    def allows(self, src: str, dst: str, protocol: str = "TCP", port: int = 80) -> bool:
        src_ip, dst_ip = self.ip(src), self.ip(dst)
        expected = allowed(self.world, src_ip, dst_ip, protocol, port)
        actual = datapath_allows(self.maps, src_ip, dst_ip, protocol, port)
        assert expected == actual, f"{src} -> {dst} {protocol}/{port}: reference {expected}, datapath {actual}"
        return expected

    def node(self, name: str) -> NodeNetworkPolicy:
        assert self.compiled.nodes[name] is not None
        return flat_policy(self.compiled, name)


def compile_world(world: World) -> CompiledPolicies:
    records = pod_records(world.pods, {n["metadata"]["name"]: n["metadata"]["labels"] for n in world.namespaces})
    identities = plan_identities({r.key for r in records}, {}, {}, 0.0, 60.0).assigned
    return compile_policies(world.policies, records, identities, world.nodes)


def ingress(*peers: dict[str, Any], ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"from": list(peers)} if peers else {}
    if ports is not None:
        rule["ports"] = ports
    return rule


def egress(*peers: dict[str, Any], ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"to": list(peers)} if peers else {}
    if ports is not None:
        rule["ports"] = ports
    return rule


def pods_(**labels: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": labels}}


def namespaces_(**labels: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": labels}}


def select(**labels: str) -> dict[str, Any]:
    return {"matchLabels": labels}


# --- isolation ------------------------------------------------------------------------------


def test_no_policy_allows_everything() -> None:
    s = Scenario(policy("x", "nothing-selected", podSelector=select(pod="none")))
    assert s.allows("x/a", "y/b") and s.allows(OUTSIDE, "x/a") and s.allows("x/a", OUTSIDE, "UDP", 53)
    assert all(not ep.ingress_enforced and not ep.egress_enforced for ep in s.node("n1").endpoints or [])


def test_no_valid_policy_anywhere_means_no_datapath_on_any_node() -> None:
    """Nodes told None detach the datapath: with nothing to enforce no program stays on a veth."""
    assert Scenario().compiled.nodes == {"n1": None, "n2": None}
    broken = policy("x", "broken", podSelector={"matchLabels": {"bad key!": "x"}})
    assert set(Scenario(broken).compiled.nodes.values()) == {None}


def test_default_deny_ingress_leaves_egress_and_other_pods_alone() -> None:
    s = Scenario(policy("x", "deny", podSelector=select(pod="a")))
    assert not s.allows("x/b", "x/a") and not s.allows(OUTSIDE, "x/a") and not s.allows("y/a", "x/a", "ICMP", 0)
    assert s.allows("x/a", "x/b") and s.allows("x/a", OUTSIDE) and s.allows("x/b", "x/c")
    flags = {
        ep.pod: (ep.ingress_enforced, ep.egress_enforced) for ep in s.node("n1").endpoints or [] if ep.namespace == "x"
    }
    assert flags == {"a": (True, False), "c": (False, False)}


def test_default_deny_both_directions() -> None:
    s = Scenario(policy("x", "deny", policyTypes=["Ingress", "Egress"]))
    assert not s.allows("x/a", "x/b") and not s.allows("x/a", "y/a") and not s.allows("y/a", "x/a")
    assert s.allows("y/a", "z/b")


def test_egress_rules_default_policy_types_to_both_directions() -> None:
    s = Scenario(policy("x", "p", podSelector=select(pod="a"), egress=[egress(pods_(pod="b"))]))
    assert s.allows("x/a", "x/b") and not s.allows("x/a", "x/c")
    assert not s.allows("x/b", "x/a")  # Ingress is isolated too, with nothing allowed


def test_egress_rules_without_egress_in_policy_types_are_ignored_and_reported() -> None:
    s = Scenario(policy("x", "p", policyTypes=["Ingress"], ingress=[ingress()], egress=[egress(pods_(pod="b"))]))
    assert s.allows("x/a", "x/c") and s.allows("x/a", OUTSIDE)
    assert s.compiled.policies["x/p"].warnings == ["spec.egress is ignored: spec.policyTypes does not include Egress"]


def test_policy_selects_only_pods_of_its_namespace() -> None:
    s = Scenario(policy("x", "deny", podSelector={}))
    assert not s.allows("y/a", "x/a") and s.allows("x/a", "y/a") and s.allows("x/a", "z/c")


def test_allows_are_the_union_of_policies() -> None:
    s = Scenario(
        policy("x", "from-b", podSelector=select(pod="a"), ingress=[ingress(pods_(pod="b"))]),
        policy("x", "from-c", podSelector=select(pod="a"), ingress=[ingress(pods_(pod="c"))]),
    )
    assert s.allows("x/b", "x/a") and s.allows("x/c", "x/a") and not s.allows("y/b", "x/a")


def test_both_sides_must_allow() -> None:
    s = Scenario(
        policy("x", "a-out", podSelector=select(pod="a"), policyTypes=["Egress"], egress=[egress(pods_(pod="b"))]),
        policy("x", "b-in", podSelector=select(pod="b"), ingress=[ingress(pods_(pod="c"))]),
    )
    assert not s.allows("x/a", "x/b")  # a may send, b does not accept from a
    assert s.allows("x/c", "x/b")
    assert not s.allows("x/a", "x/c")  # c accepts anything, a may only reach b


# --- peers ----------------------------------------------------------------------------------


def test_pod_selector_alone_means_the_policy_namespace() -> None:
    s = Scenario(policy("x", "p", podSelector=select(pod="a"), ingress=[ingress(pods_(pod="b"))]))
    assert s.allows("x/b", "x/a") and not s.allows("y/b", "x/a") and not s.allows("x/c", "x/a")


def test_namespace_selector_alone_means_every_pod_there() -> None:
    s = Scenario(policy("x", "p", podSelector=select(pod="a"), ingress=[ingress(namespaces_(team="blue"))]))
    assert s.allows("y/c", "x/a") and s.allows("x/b", "x/a") and not s.allows("z/a", "x/a")


def test_only_from_namespace_y_denies_the_own_namespace() -> None:
    s = Scenario(
        policy(
            "x",
            "p",
            podSelector=select(pod="a"),
            ingress=[ingress(namespaces_(**{"kubernetes.io/metadata.name": "y"}))],
        )
    )
    assert s.allows("y/a", "x/a") and not s.allows("x/b", "x/a") and not s.allows("z/b", "x/a")


def test_namespace_and_pod_selector_in_one_peer_is_and() -> None:
    both = {**namespaces_(**{"kubernetes.io/metadata.name": "y"}), **pods_(pod="b")}
    s = Scenario(policy("x", "p", podSelector=select(pod="a"), ingress=[ingress(both)]))
    assert s.allows("y/b", "x/a") and not s.allows("y/c", "x/a") and not s.allows("x/b", "x/a")


def test_separate_peers_are_or() -> None:
    s = Scenario(
        policy(
            "x",
            "p",
            podSelector=select(pod="a"),
            ingress=[ingress(namespaces_(**{"kubernetes.io/metadata.name": "y"}), pods_(pod="b"))],
        )
    )
    assert s.allows("y/c", "x/a") and s.allows("x/b", "x/a") and not s.allows("x/c", "x/a")


def test_empty_from_allows_everyone_including_outside_addresses() -> None:
    s = Scenario(policy("x", "p", podSelector=select(pod="a"), ingress=[ingress()]))
    assert (
        s.allows("z/c", "x/a", "UDP", 81)
        and s.allows(OUTSIDE, "x/a", "SCTP", 9)
        and s.allows(OUTSIDE, "x/a", "ICMP", 0)
    )
    assert [(r.peer_identity, r.protocol.value) for r in s.node("n1").rules or [] if r.peer_identity != HOST] == [
        (0, "Any")
    ]


def test_explicit_empty_from_and_ports_mean_everything() -> None:
    s = Scenario(policy("x", "p", podSelector=select(pod="a"), ingress=[{"from": [], "ports": []}]))
    assert s.allows("z/c", "x/a", "UDP", 81) and s.allows(OUTSIDE, "x/a", "ICMP", 0)


def test_match_expressions_select_peers() -> None:
    s = Scenario(
        policy(
            "x",
            "p",
            podSelector=select(pod="a"),
            ingress=[
                ingress({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["b"]}]}})
            ],
        )
    )
    assert s.allows("x/c", "x/a") and not s.allows("x/b", "x/a")


def test_pod_label_change_changes_only_endpoints_and_ipcache() -> None:
    rule = policy("x", "p", podSelector=select(pod="a"), ingress=[ingress(pods_(role="client"))])
    before = Scenario(rule)
    assert not before.allows("x/b", "x/a")
    relabelled = truth_table_pods()
    relabelled[1]["metadata"]["labels"]["role"] = "client"  # x/b
    after = Scenario(rule, pods=relabelled)
    assert after.allows("x/b", "x/a")
    assert len(after.node("n1").rules or []) == len(before.node("n1").rules or []) + 1


# --- ipBlock --------------------------------------------------------------------------------


def test_ip_block_with_except_matches_outside_and_pod_addresses() -> None:
    block = {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}}
    s = Scenario(policy("x", "p", podSelector=select(pod="a"), ingress=[ingress(block)]))
    assert s.allows("x/b", "x/a") and s.allows("z/c", "x/a") and s.allows("10.0.9.9", "x/a")
    assert not s.allows("y/a", "x/a") and not s.allows("10.0.2.200", "x/a") and not s.allows(OUTSIDE, "x/a")
    cidrs = {e.cidr: e.identity for e in s.node("n1").cidr_identities or []}
    assert set(cidrs) == {"10.0.0.0/16", "10.0.2.0/24"} and all(i >= MIN_CIDR_IDENTITY for i in cidrs.values())


def test_egress_to_one_pod_address() -> None:
    s = Scenario(
        policy(
            "x",
            "p",
            podSelector=select(pod="a"),
            policyTypes=["Egress"],
            egress=[egress({"ipBlock": {"cidr": "10.0.2.2/32"}})],
        )
    )
    assert s.allows("x/a", "y/b") and not s.allows("x/a", "y/c") and not s.allows("x/a", OUTSIDE)


def test_nested_blocks_of_several_policies() -> None:
    wide = {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/16"]}}
    narrow = {"ipBlock": {"cidr": "10.0.2.0/24", "except": ["10.0.2.2/32"]}}
    s = Scenario(
        policy("x", "wide", podSelector=select(pod="a"), ingress=[ingress(wide, ports=[{"port": 80}])]),
        policy("x", "narrow", podSelector=select(pod="a"), ingress=[ingress(narrow, ports=[{"port": 81}])]),
    )
    assert s.allows("10.9.0.1", "x/a", port=80) and not s.allows("10.9.0.1", "x/a", port=81)
    assert not s.allows("x/b", "x/a", port=80)  # in the except of wide
    assert s.allows("y/a", "x/a", port=81) and not s.allows("y/a", "x/a", port=80)
    assert not s.allows("y/b", "x/a", port=81)  # in the except of narrow


def test_ip_block_deny_beats_pod_allow() -> None:
    s = Scenario(
        policy(
            "x",
            "p",
            podSelector=select(pod="a"),
            ingress=[ingress(namespaces_())],
            ingressDeny=[ingress({"ipBlock": {"cidr": "10.0.2.0/24"}})],
        )
    )
    assert s.allows("x/b", "x/a") and not s.allows("y/b", "x/a") and s.allows("z/b", "x/a")


def test_cidr_identities_are_stable_when_other_prefixes_come_and_go() -> None:
    alone = assign_cidr_identities([parse_cidr("10.0.0.0/8")])
    more = assign_cidr_identities([parse_cidr("192.168.0.0/16"), parse_cidr("10.0.0.0/8"), parse_cidr("10.1.0.0/16")])
    assert alone[parse_cidr("10.0.0.0/8")] == more[parse_cidr("10.0.0.0/8")]
    assert len(set(more.values())) == 3


def test_node_gets_only_the_prefixes_of_its_own_rules() -> None:
    s = Scenario(
        policy("x", "p", podSelector=select(pod="a"), ingress=[ingress({"ipBlock": {"cidr": "10.0.0.0/8"}})]),
        policy("x", "q", podSelector=select(pod="b"), ingress=[ingress({"ipBlock": {"cidr": "172.16.0.0/12"}})]),
    )
    assert [e.cidr for e in s.node("n1").cidr_identities or []] == ["10.0.0.0/8"]
    assert [e.cidr for e in s.node("n2").cidr_identities or []] == ["172.16.0.0/12"]


def test_ipv6_blocks_are_accepted_with_a_warning() -> None:
    s = Scenario(policy("x", "p", ingress=[ingress({"ipBlock": {"cidr": "fd00::/8"}})]))
    assert s.compiled.policies["x/p"].warnings == [
        "spec.ingress[0].from[0].ipBlock: IPv6 is not enforced (the datapath handles IPv4 only)"
    ]
    assert not s.allows("y/a", "x/a")


# --- ports ----------------------------------------------------------------------------------


def test_port_by_number_and_protocol() -> None:
    s = Scenario(
        policy("x", "p", podSelector=select(pod="a"), ingress=[ingress(ports=[{"protocol": "TCP", "port": 80}])])
    )
    assert s.allows("y/a", "x/a", "TCP", 80) and not s.allows("y/a", "x/a", "TCP", 81)
    assert not s.allows("y/a", "x/a", "UDP", 80) and not s.allows("y/a", "x/a", "ICMP", 0)


def test_protocol_only_allows_every_port_of_it() -> None:
    s = Scenario(policy("x", "p", podSelector=select(pod="a"), ingress=[ingress(ports=[{"protocol": "TCP"}])]))
    assert s.allows("y/a", "x/a", "TCP", 80) and s.allows("y/a", "x/a", "TCP", 65535)
    assert not s.allows("y/a", "x/a", "UDP", 80) and not s.allows("y/a", "x/a", "SCTP", 80)


def test_port_range() -> None:
    s = Scenario(
        policy(
            "x",
            "p",
            podSelector=select(pod="a"),
            ingress=[ingress(ports=[{"protocol": "UDP", "port": 1000, "endPort": 2047}])],
        )
    )
    for port, expected in ((999, False), (1000, True), (1500, True), (2047, True), (2048, False)):
        assert s.allows("y/a", "x/a", "UDP", port) is expected
    (rule,) = [r for r in s.node("n1").rules or [] if r.peer_identity != HOST]
    assert (rule.protocol.value, rule.port_start, rule.port_end) == ("UDP", 1000, 2047)


def test_sctp_port() -> None:
    s = Scenario(
        policy("x", "p", podSelector=select(pod="a"), ingress=[ingress(ports=[{"protocol": "SCTP", "port": 80}])])
    )
    assert s.allows("y/a", "x/a", "SCTP", 80) and not s.allows("y/a", "x/a", "TCP", 80)


def test_named_port_ingress_resolves_per_local_identity() -> None:
    ports = {"x/a": [("web", "TCP", 8080)], "x/b": [("web", "TCP", 9090)], "x/c": [("web", "UDP", 8080)]}
    s = Scenario(policy("x", "p", ingress=[ingress(ports=[{"port": "web"}])]), pods=truth_table_pods(ports))
    assert s.allows("y/a", "x/a", "TCP", 8080) and not s.allows("y/a", "x/a", "TCP", 9090)
    assert s.allows("y/a", "x/b", "TCP", 9090) and not s.allows("y/a", "x/b", "TCP", 8080)
    assert not s.allows("y/a", "x/c", "TCP", 8080) and not s.allows("y/a", "x/c", "UDP", 8080)  # protocol must match


def test_named_port_egress_resolves_per_peer_identity() -> None:
    ports = {"y/a": [("db", "TCP", 5432)], "y/b": [("db", "TCP", 5433)], "y/c": []}
    s = Scenario(
        policy(
            "x",
            "p",
            podSelector=select(pod="a"),
            policyTypes=["Egress"],
            egress=[egress(namespaces_(**{"kubernetes.io/metadata.name": "y"}), ports=[{"port": "db"}])],
        ),
        pods=truth_table_pods(ports),
    )
    assert s.allows("x/a", "y/a", "TCP", 5432) and not s.allows("x/a", "y/a", "TCP", 5433)
    assert s.allows("x/a", "y/b", "TCP", 5433) and not s.allows("x/a", "y/b", "TCP", 5432)
    assert not s.allows("x/a", "y/c", "TCP", 5432)


def test_named_port_egress_to_everyone_means_pods_serving_it() -> None:
    ports = {"z/c": [("dns", "UDP", 53)]}
    s = Scenario(
        policy(
            "x",
            "p",
            podSelector=select(pod="a"),
            policyTypes=["Egress"],
            egress=[egress(ports=[{"protocol": "UDP", "port": "dns"}])],
        ),
        pods=truth_table_pods(ports),
    )
    assert s.allows("x/a", "z/c", "UDP", 53) and not s.allows("x/a", "z/b", "UDP", 53)
    assert not s.allows("x/a", OUTSIDE, "UDP", 53)


def test_named_port_egress_to_ip_block_matches_nothing_and_says_so() -> None:
    s = Scenario(
        policy(
            "x",
            "p",
            podSelector=select(pod="a"),
            policyTypes=["Egress"],
            egress=[egress({"ipBlock": {"cidr": "10.0.0.0/8"}}, ports=[{"port": "serve-80-tcp"}])],
        )
    )
    assert s.compiled.policies["x/p"].warnings == [
        "spec.egress[0].ports[0].port: a named port cannot match the ipBlock of spec.egress[0].to[0]; use a number"
    ]
    assert [r for r in s.node("n1").rules or [] if r.peer_identity != HOST] == []


def test_named_port_with_several_numbers_in_one_identity_allows_the_union_and_warns() -> None:
    pods = truth_table_pods()
    pods[1]["metadata"]["labels"] = {"pod": "a"}  # x/b now shares x/a's identity, with other numbers
    pods[1]["spec"]["containers"][0]["ports"] = [{"name": "serve-80-tcp", "protocol": "TCP", "containerPort": 8080}]
    world = World(
        [namespace("x"), namespace("y"), namespace("z")],
        pods,
        [policy("x", "p", podSelector=select(pod="a"), ingress=[ingress(ports=[{"port": "serve-80-tcp"}])])],
        NODES,
    )
    compiled = compile_world(world)
    (warning,) = compiled.policies["x/p"].warnings
    assert "'serve-80-tcp' is 80, 8080 on different pods of identity" in warning
    maps = encode_nodes(compiled)
    assert datapath_allows(maps, "10.0.2.1", "10.0.1.1", "TCP", 8080)  # the limitation: x/a also opens 8080


# --- deny -----------------------------------------------------------------------------------


def test_deny_wins_over_allow_of_another_policy() -> None:
    s = Scenario(
        policy("x", "allow-all", podSelector=select(pod="a"), ingress=[ingress()]),
        policy(
            "x",
            "deny-y",
            podSelector=select(pod="a"),
            ingressDeny=[ingress(namespaces_(**{"kubernetes.io/metadata.name": "y"}))],
        ),
    )
    assert not s.allows("y/a", "x/a") and s.allows("z/a", "x/a") and s.allows(OUTSIDE, "x/a")


def test_egress_deny_for_a_namespace_with_ports() -> None:
    s = Scenario(
        policy(
            "x",
            "p",
            policyTypes=["Egress"],
            egress=[egress()],
            egressDeny=[egress(namespaces_(**{"kubernetes.io/metadata.name": "y"}), ports=[{"protocol": "UDP"}])],
        )
    )
    assert (
        not s.allows("x/a", "y/b", "UDP", 81)
        and s.allows("x/a", "y/b", "TCP", 80)
        and s.allows("x/a", "z/b", "UDP", 81)
    )


def test_deny_alone_isolates_with_nothing_allowed() -> None:
    s = Scenario(policy("x", "p", podSelector=select(pod="a"), ingressDeny=[ingress(pods_(pod="b"))]))
    assert not s.allows("x/b", "x/a") and not s.allows("x/c", "x/a")


# --- host -----------------------------------------------------------------------------------


def test_own_node_is_always_allowed_unless_denied() -> None:
    s = Scenario(policy("x", "deny", policyTypes=["Ingress", "Egress"]))
    assert s.allows("192.168.0.1", "x/a") and s.allows("x/a", "192.168.0.1")
    assert not s.allows("192.168.0.2", "x/a")  # another node is just an address
    assert {e.cidr: e.identity for e in s.node("n1").ipcache or []} == {"192.168.0.1/32": HOST}
    denied = Scenario(
        policy("x", "deny", policyTypes=["Ingress"], ingressDeny=[ingress({"ipBlock": {"cidr": "192.168.0.0/16"}})])
    )
    assert not denied.allows("192.168.0.1", "x/a")


def test_node_without_addresses_gets_no_host_entries() -> None:
    s = Scenario(policy("x", "deny"), nodes={"n1": [], "n2": []})
    assert s.node("n1").rules is None or all(r.peer_identity != HOST for r in s.node("n1").rules)
    assert not s.node("n1").ipcache


# --- what nodes get -------------------------------------------------------------------------


def test_typical_policy_costs_few_entries() -> None:
    """frontend -> backend TCP 8080; 3 frontend and 2 backend pods over two nodes."""
    ns = [namespace("shop")]
    pods = [pod("shop", f"fe{i}", {"app": "frontend"}, node=f"n{i % 2 + 1}", ip=f"10.0.0.{i + 1}") for i in range(3)]
    pods += [pod("shop", f"be{i}", {"app": "backend"}, node=f"n{i % 2 + 1}", ip=f"10.0.1.{i + 1}") for i in range(2)]
    rule = policy(
        "shop",
        "fe-be",
        podSelector=select(app="backend"),
        ingress=[ingress(pods_(app="frontend"), ports=[{"protocol": "TCP", "port": 8080}])],
    )
    s = Scenario(rule, pods=pods, namespaces=ns)
    n1, n2 = s.node("n1"), s.node("n2")
    assert (len(n1.endpoints or []), len(n1.ipcache or []), len(n1.cidr_identities or []), len(n1.rules or [])) == (
        3,
        4,
        0,
        2,
    )
    assert (len(n2.endpoints or []), len(n2.ipcache or []), len(n2.rules or [])) == (2, 4, 2)
    assert s.allows("shop/fe0", "shop/be1", "TCP", 8080) and not s.allows("shop/fe0", "shop/be1", "TCP", 8081)
    assert not s.allows("shop/be0", "shop/be1", "TCP", 8080)


def test_ipcache_holds_only_identities_the_rules_name() -> None:
    s = Scenario(policy("x", "p", podSelector=select(pod="a"), ingress=[ingress(pods_(pod="b"))]))
    assert {e.cidr for e in s.node("n1").ipcache or []} == {"10.0.1.2/32", "192.168.0.1/32"}
    assert s.node("n2").ipcache == []  # x/b is on n2, but nothing there is isolated


def test_node_without_pods_has_no_network_policy() -> None:
    s = Scenario(nodes={**NODES, "n3": ["192.168.0.3"]})
    assert s.compiled.nodes["n3"] is None


def test_output_is_sorted_and_independent_of_input_order() -> None:
    policies = [
        policy(
            "x",
            "p",
            ingress=[
                ingress(
                    pods_(pod="b"),
                    namespaces_(team="blue"),
                    ports=[{"port": 80}, {"port": "serve-81-udp", "protocol": "UDP"}],
                )
            ],
        ),
        policy(
            "y",
            "q",
            policyTypes=["Egress"],
            egress=[egress({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.1.0/24"]}})],
        ),
    ]
    pods = truth_table_pods()
    one = Scenario(*policies, pods=pods).compiled.nodes
    shuffled = list(pods)
    random.Random(7).shuffle(shuffled)
    two = Scenario(*reversed(policies), pods=shuffled).compiled.nodes
    assert json.dumps(one) == json.dumps(two)  # the same bytes
    rules = NodeNetworkPolicy.model_validate(one["n1"]).rules or []
    keys = [
        (r.local_identity, r.direction.value, r.peer_identity, r.protocol.value, r.port_start, r.port_end)
        for r in rules
    ]
    assert keys == sorted(keys) and len(set(map(str, rules))) == len(rules)


def test_pods_without_a_persisted_identity_are_left_out() -> None:
    world = World([namespace("x"), namespace("y"), namespace("z")], truth_table_pods(), [policy("x", "deny")], NODES)
    records = pod_records(world.pods, {n["metadata"]["name"]: n["metadata"]["labels"] for n in world.namespaces})
    identities = plan_identities({r.key for r in records}, {}, {}, 0.0, 60.0).assigned
    del identities[records[0].key]  # x/a: its NetworkIdentity could not be created
    compiled = compile_policies(world.policies, records, identities, NODES)
    endpoints = [ep for body in compiled.slices["n1"].values() for ep in body.get("endpoints") or []]
    assert endpoints and "a" not in {ep["pod"] for ep in endpoints if ep["namespace"] == "x"}
    assert compiled.policies["x/deny"].selected == {"x/b", "x/c"}


def test_ipv6_only_pod_is_no_endpoint() -> None:
    pods = truth_table_pods()
    pods[0]["status"].update(podIP="fd00::1", podIPs=[{"ip": "fd00::1"}])
    s = Scenario(policy("y", "all"), pods=pods)
    assert "a" not in {ep.pod for ep in s.node("n1").endpoints or [] if ep.namespace == "x"}


def test_outcome_counts_selected_endpoints_and_their_nodes() -> None:
    s = Scenario(policy("x", "p", podSelector=select(pod="b")), policy("y", "all"))
    assert s.compiled.policies["x/p"].selected == {"x/b"} and s.compiled.policies["x/p"].nodes == {"n2"}
    assert len(s.compiled.policies["y/all"].selected) == 3 and s.compiled.policies["y/all"].nodes == {"n1", "n2"}


# --- validity -------------------------------------------------------------------------------


def test_invalid_policy_names_the_field_and_is_ignored() -> None:
    bad = policy("x", "bad", ingress=[ingress({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}})])
    s = Scenario(bad, policy("y", "ok"))
    outcome = s.compiled.policies["x/bad"]
    assert outcome.error == (
        "spec.ingress[0].from[0].ipBlock: except entry 10.1.0.0/24 must be a strict subset of cidr 10.0.0.0/16, "
        "same IP family"
    )
    assert s.compiled.policies["y/ok"].error is None
    ep = {(e.namespace, e.pod): e for e in s.node("n1").endpoints or []}
    assert not ep["x", "a"].ingress_enforced and ep["y", "a"].ingress_enforced


def test_invalid_port_names_the_field() -> None:
    s = Scenario(policy("x", "bad", ingress=[ingress(ports=[{"port": "Not_A_Name"}])]))
    error = s.compiled.policies["x/bad"].error
    assert error is not None and error.startswith("spec.ingress[0].ports[0].port")
