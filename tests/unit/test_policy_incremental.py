"""Property: the incremental compiler gives compile_policies' output, byte for byte, after every change.

A random world (policy_strategies) is compiled, then changed step by step (pods added, removed,
relabelled, moved or readdressed, named ports changed; policies added, edited, deleted; namespaces
relabelled; nodes added, removed or readdressed; the budget changed) and after each step one long-lived
IncrementalCompiler must agree with a from-scratch compile_policies: every node's spec.networkPolicy
and slices as serialized (order included), and every policy's outcome. Small budgets are drawn too,
so refusals (and policies coming back under the budget) are exercised.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from policy_reference import World, pod
from policy_strategies import (
    EXAMPLES,
    LABELS,
    NAMESPACE_LABELS,
    POD_ADDRESSES,
    PORT_NAMES,
    PORT_NUMBERS,
    PROTOCOLS,
    policies,
    property_settings,
    worlds,
)

from beekeeper.operator.identities import plan_identities
from beekeeper.operator.pods import PodRecords, pod_records
from beekeeper.operator.policy_compile import CompiledPolicies, compile_policies
from beekeeper.operator.policy_incremental import IncrementalCompiler

STEPS = 12
BUDGETS = [8192, 8192, 60, 12]
STEP_KINDS = [
    *("pod+", "pod-", "relabel", "relabel", "move", "address", "ports"),
    *("policy+", "edit", "edit", "policy-", "namespace", "node+", "node-", "node addresses", "budget"),
]
NODE_ADDRESSES = [[], ["192.168.0.1"], ["192.168.0.2"], ["192.168.0.9", "10.0.1.2"]]


def inputs(world: World) -> tuple[list[Any], dict[Any, int]]:
    records = pod_records(world.pods, {n["metadata"]["name"]: n["metadata"]["labels"] for n in world.namespaces})
    return records, plan_identities({r.key for r in records}, {}, {}, 0.0, 60.0).assigned


def wire(compiled: CompiledPolicies) -> dict[str, Any]:
    return {
        "nodes": json.dumps(compiled.nodes),
        "slices": json.dumps(compiled.slices),
        "readers": {node: {n: sorted(refs) for n, refs in r.items()} for node, r in compiled.readers.items()},
        "policies": {
            ref: (o.error, o.reason, o.warnings, sorted(o.selected), sorted(o.nodes), o.generation)
            for ref, o in compiled.policies.items()
        },
        "order": list(compiled.policies),
    }


@st.composite
def step(draw: st.DrawFn, world: World, serial: int) -> str:
    """Change the world in place; returns what was done (for the failure message)."""
    kind = draw(st.sampled_from(STEP_KINDS))
    pods, rules = world.pods, world.policies
    if kind == "pod+" or (kind in ("pod-", "relabel", "move", "address", "ports") and not pods):
        ns = draw(st.sampled_from(["x", "y", "z"]))
        labels = draw(st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in LABELS.items()}))
        pods.append(
            pod(
                ns,
                f"new{serial}",
                labels,
                draw(st.sampled_from([*sorted(world.nodes), "gone"])),
                draw(st.sampled_from([None, *POD_ADDRESSES])),
            )
        )
        return f"add pod {ns}/new{serial} {labels}"
    if kind in ("pod-", "relabel", "move", "address", "ports"):
        i = draw(st.integers(0, len(pods) - 1))
        target = pods[i] = copy.deepcopy(pods[i])
        name = target["metadata"]["name"]
        if kind == "pod-":
            del pods[i]
        elif kind == "relabel":
            target["metadata"]["labels"] = draw(
                st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in LABELS.items()})
            )
        elif kind == "move":
            target["spec"]["nodeName"] = draw(st.sampled_from([*sorted(world.nodes), "gone"]))
        elif kind == "address":
            ip = draw(st.sampled_from([None, *POD_ADDRESSES]))
            target["status"] = {"phase": "Running", **({"podIP": ip, "podIPs": [{"ip": ip}]} if ip else {})}
        else:  # named ports: the same for every pod of its labels, as the generator keeps them
            ports = [
                {
                    "name": n,
                    "protocol": draw(st.sampled_from(PROTOCOLS)),
                    "containerPort": draw(st.sampled_from(PORT_NUMBERS)),
                }
                for n in draw(st.lists(st.sampled_from(PORT_NAMES), max_size=2, unique=True))
            ]
            key = (target["metadata"]["namespace"], target["metadata"]["labels"])
            for j, other in enumerate(pods):
                if (other["metadata"]["namespace"], other["metadata"]["labels"]) == key:
                    pods[j] = copy.deepcopy(other)
                    pods[j]["spec"]["containers"] = [{"name": "c", "ports": ports}]
        return f"{kind} pod {name}"
    if kind == "policy+" or (kind in ("edit", "policy-") and not rules):
        rules.append(draw(policies(100 + serial)))
        return f"add policy {rules[-1]['metadata']['name']}"
    if kind in ("edit", "policy-"):
        i = draw(st.integers(0, len(rules) - 1))
        if kind == "policy-":
            return f"delete policy {rules.pop(i)['metadata']['name']}"
        old = rules[i]
        new = draw(policies(0))
        new["metadata"] = {**old["metadata"], "generation": old["metadata"]["generation"] + 1}
        rules[i] = new
        return f"edit policy {old['metadata']['name']}"
    if kind == "namespace":
        i = draw(st.integers(0, len(world.namespaces) - 1))
        ns = world.namespaces[i] = copy.deepcopy(world.namespaces[i])
        name = ns["metadata"]["name"]
        ns["metadata"]["labels"] = {
            "kubernetes.io/metadata.name": name,
            **draw(st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in NAMESPACE_LABELS.items()})),
        }
        return f"relabel namespace {name}"
    if kind == "node+":
        world.nodes = {**world.nodes, f"m{serial}": draw(st.sampled_from(NODE_ADDRESSES))}
        return f"add node m{serial}"
    if kind == "node-" and world.nodes:
        name = draw(st.sampled_from(sorted(world.nodes)))
        world.nodes = {k: v for k, v in world.nodes.items() if k != name}
        return f"remove node {name}"
    if kind == "node addresses" and world.nodes:
        name = draw(st.sampled_from(sorted(world.nodes)))
        world.nodes = {**world.nodes, name: draw(st.sampled_from(NODE_ADDRESSES))}
        return f"readdress node {name}"
    return "budget"


@property_settings(EXAMPLES // 3)
@given(world=worlds(), data=st.data())
def test_incremental_equals_from_scratch_after_every_change(world: World, data: st.DataObject) -> None:
    world.nodes = dict(world.nodes)
    budget = data.draw(st.sampled_from(BUDGETS))
    incremental, memory = IncrementalCompiler(), PodRecords()  # as the reconciler keeps them
    renumbered: dict[Any, int] = {}
    done = ["initial world"]
    for serial in range(STEPS + 1):
        if serial:
            done.append(data.draw(step(world, serial)))
            if done[-1] == "budget":
                budget = data.draw(st.sampled_from(BUDGETS))
        records, identities = inputs(world)
        if serial and data.draw(st.integers(0, 5)) == 0 and identities:  # a key given another number
            key = data.draw(st.sampled_from(sorted(identities)))
            renumbered[key] = max([*identities.values(), *renumbered.values()]) + 1
            done.append(f"renumber {key}")
        identities = {k: renumbered.get(k, n) for k, n in identities.items()}
        expected = compile_policies(world.policies, records, identities, world.nodes, budget)
        remembered = memory(world.pods, {n["metadata"]["name"]: n["metadata"]["labels"] for n in world.namespaces})
        assert remembered == records
        actual = incremental.compile(world.policies, remembered, identities, world.nodes, budget)
        assert wire(actual) == wire(expected), done


def test_unchanged_outputs_are_the_same_objects() -> None:
    """What a change does not touch comes back as the previous call's objects (the reconciler skips those)."""
    from policy_reference import namespace, policy

    world = World(
        [namespace("x")],
        [pod("x", "a", {"app": "web"}, "n1", "10.0.0.1"), pod("x", "b", {"app": "db"}, "n2", "10.0.0.2")],
        [
            policy("x", "web", podSelector={"matchLabels": {"app": "web"}}, ingress=[{"from": [{"podSelector": {}}]}]),
            policy("x", "db", podSelector={"matchLabels": {"app": "db"}}, ingress=[{"from": [{"podSelector": {}}]}]),
        ],
        {"n1": [], "n2": []},
    )
    incremental = IncrementalCompiler()
    first = incremental.compile(world.policies, *inputs(world), world.nodes)
    world.policies[1] = policy(
        "x", "db", 2, podSelector={"matchLabels": {"app": "db"}}, ingress=[{"ports": [{"port": 5432}]}]
    )
    second = incremental.compile(world.policies, *inputs(world), world.nodes)
    assert second.nodes["n1"] is first.nodes["n1"] and second.slices["n1"] is first.slices["n1"]
    assert second.nodes["n2"] is not first.nodes["n2"]
    assert wire(second) == wire(compile_policies(world.policies, *inputs(world), world.nodes))


@st.composite
def pod_bodies(draw: st.DrawFn, index: int) -> dict[str, Any]:
    """Pods that may share an address (a stale one, being deleted, older or newer) or be left out."""
    body = pod(
        draw(st.sampled_from(["x", "y", "w"])),
        f"p{index}",
        draw(st.fixed_dictionaries({}, optional={"app": st.sampled_from(LABELS["app"])})),
        draw(st.sampled_from(["n1", "n2", None])),
        draw(st.sampled_from([None, "10.0.0.1", "10.0.0.2", "10.0.0.3"])),
    )
    body["metadata"]["creationTimestamp"] = draw(st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]))
    if draw(st.integers(0, 4)) == 0:
        body["metadata"]["deletionTimestamp"] = "2026-01-03T00:00:00Z"
    if draw(st.integers(0, 6)) == 0:
        body["status"]["phase"] = draw(st.sampled_from(["Succeeded", "Pending"]))
    return body


@property_settings(EXAMPLES // 3)
@given(data=st.data())
def test_pod_records_with_memory_equal_pod_records(data: st.DataObject) -> None:
    records = PodRecords()
    bodies = [data.draw(pod_bodies(i)) for i in range(data.draw(st.integers(0, 6)))]
    namespaces = {"x": {"kubernetes.io/metadata.name": "x"}, "y": {"kubernetes.io/metadata.name": "y"}}
    for serial in range(8):
        assert records(bodies, namespaces) == pod_records(bodies, namespaces)
        change = data.draw(st.sampled_from(["add", "remove", "replace", "namespace", "none"]))
        if change == "add" or (change in ("remove", "replace") and not bodies):
            bodies.append(data.draw(pod_bodies(100 + serial)))
        elif change in ("remove", "replace"):
            i = data.draw(st.integers(0, len(bodies) - 1))
            name = bodies[i]["metadata"]["name"]
            if change == "remove":
                del bodies[i]
            else:
                bodies[i] = data.draw(pod_bodies(0))
                bodies[i]["metadata"]["name"] = name
        elif change == "namespace":
            namespaces = {**namespaces, "y": {"kubernetes.io/metadata.name": "y", "team": str(serial)}}
