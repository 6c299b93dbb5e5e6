"""Property: keeping the maps up to date change by change gives what encoding the whole state from scratch gives.

Random sequences of changes (slices added, edited, re-sent unchanged, removed; endpoints
added, removed, moved to another interface, unresolved; the node's own prefixes and
inline rules edited; policies coming and going, so their indexes move; a daemon restart;
entries written behind the daemon's back) go through the incremental path (NodeMaps,
then plan_writes over the touched keys only, into a simulated kernel map) and, at every
step, the simulated maps must equal encode(translate(...)) of the same inputs, with the
same problems and endpoint placement.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_changes import POLICIES, random_interfaces, random_node, random_slice

from beekeeper.crds.nodestate import NodeNetworkPolicy, SliceRef
from beekeeper.crds.policyslice import Address, BpfPolicySliceSpec, slice_hash
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.policy_delta import NodeMaps, plan_writes
from beekeeper.node_daemon.policy_index import PolicyIndexes
from beekeeper.node_daemon.policy_slices import SliceReader
from beekeeper.node_daemon.policy_state import policy_names, translate


def apply(kernel: dict[str, dict[bytes, bytes]], desired: Any, touched: Any) -> None:
    for spec, upserts, removals in plan_writes(kernel, desired, touched):
        kernel[spec.name].update(upserts)
        for key in removals:
            del kernel[spec.name][key]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_incremental_maps_equal_a_from_scratch_encode(seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as state_dir:
        indexes_table = PolicyIndexes(Path(state_dir) / "indexes.json")
        node = random_node(rng)
        interfaces = random_interfaces(rng)
        objects: dict[str, dict[str, Any]] = {}  # as watched: each write a new resourceVersion
        reader, maps = SliceReader(), NodeMaps()
        kernel: dict[str, dict[bytes, bytes]] = {spec.name: {} for spec in pm.SYNCED_MAPS}
        for step in range(40):
            change, full = rng.random(), False
            if change < 0.35:  # a slice added or edited (often keeping most of its entries)
                policy = rng.choice(POLICIES)
                name = f"{policy[2:]}-{rng.randint(0, 1)}"
                objects[name] = {"metadata": {"resourceVersion": str(step)}, "spec": random_slice(rng, policy)}
            elif change < 0.45 and objects:  # removed
                del objects[rng.choice(sorted(objects))]
            elif change < 0.5 and objects:  # the same content again, a new resourceVersion (a relist)
                name = rng.choice(sorted(objects))
                objects[name] = {"metadata": {"resourceVersion": str(step)}, "spec": objects[name]["spec"]}
            elif change < 0.65:
                node = random_node(rng)
            elif change < 0.75:
                interfaces = random_interfaces(rng)
            elif change < 0.8:  # a restarted daemon: nothing cached, the kernel's maps as they are
                maps, full = NodeMaps(), True
            elif change < 0.85:  # entries changed behind the daemon's back, then a full diff finds them
                for entries in kernel.values():
                    entries[bytes(rng.randrange(256) for _ in range(4))] = b"\1\0\0\0"
                    if entries and rng.random() < 0.5:
                        del entries[rng.choice(sorted(entries))]
                full = True  # as after a failed write: the datapath reads the kernel's maps again
            spec = NodeNetworkPolicy.model_validate(node)
            refs = [SliceRef(name=n, content_hash=o["spec"]["contentHash"]) for n, o in sorted(objects.items())]
            slices, waiting, unreadable = reader.resolve(refs, objects)
            assert not waiting and not unreadable
            names = policy_names(spec, slices.values())
            indexes = indexes_table.assign(names)

            plan = maps.update(spec, slices, indexes, interfaces)
            touched = maps.desired.take_touched()
            apply(kernel, maps.desired.maps, None if full else touched)

            expected = translate(spec, interfaces, indexes, slices)
            encoded = pm.encode(expected.state, lambda interface: int(interface))
            assert kernel == encoded.maps
            assert maps.desired.maps == encoded.maps
            assert sorted(plan.problems) == sorted(expected.problems)
            assert plan.state.endpoints == expected.state.endpoints
            assert plan.unresolved == expected.unresolved
            assert maps.rules == len(expected.state.rules)


def test_a_new_slice_version_reuses_unchanged_entries_and_still_checks_every_field() -> None:
    body = {
        "policy": "a/p",
        "ipcache": [{"identity": 300 + i, "cidrs": [f"10.0.{i}.1/32", f"10.0.{i}.2/32"]} for i in range(4)],
        "cidrIdentities": [{"cidr": "10.0.0.0/8", "identity": 16777300}],
    }
    spec = {"nodeName": "n1", **body, "contentHash": slice_hash(body)}
    reader = SliceReader()

    def read(version: str, **changed: Any) -> BpfPolicySliceSpec | str:
        new = {**spec, **changed}
        obj = {"metadata": {"resourceVersion": version}, "spec": new}
        found, _, problems = reader.resolve([SliceRef(name="s", content_hash=new["contentHash"])], {"s": obj})
        return found["s"] if found else problems[0]

    first = read("1")
    assert isinstance(first, BpfPolicySliceSpec)
    grown = {"identity": 303, "cidrs": ["10.0.3.1/32", "10.0.3.2/32", "10.0.3.9/32"]}
    again = read("2", ipcache=[*spec["ipcache"][:3], grown])
    assert isinstance(again, BpfPolicySliceSpec) and again is not first
    assert again.ipcache is not None and first.ipcache is not None
    assert again.ipcache[0] is first.ipcache[0]  # an unchanged group is not read again
    assert again.addresses()[-1] == Address("10.0.3.9/32", 303)
    groups = spec["ipcache"]
    bad = {
        "ipcache.4.cidrs.0": [*groups, {"identity": 5, "cidrs": ["10.0.0.1/8"]}],  # not canonical
        "ipcache.0.identity": [{"identity": -1, "cidrs": groups[0]["cidrs"]}],  # known addresses, a bad identity
        "ipcache.0.extra": [{**groups[0], "extra": 1}],
        "ipcache.0.cidrs": [{"identity": 300, "cidrs": []}],
        "ipcache.0.cidrs.0": [{"identity": 300, "cidrs": [{"cidr": "10.0.0.1/32"}]}],
        "ipcache: 10.0.0.1/32 is listed twice": [*groups, {"identity": 9, "cidrs": ["10.0.0.1/32"]}],
    }
    for version, (where, ipcache) in enumerate(bad.items(), start=3):
        read("2")  # a good version before each bad one, whose entries are reused
        problem = read(str(version), ipcache=ipcache)
        assert isinstance(problem, str) and problem.startswith("slice s not understood by this daemon: "), problem
        assert where in problem, problem
