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

from beekeeper.crds.nodestate import NodeNetworkPolicy
from beekeeper.crds.policyslice import BpfPolicySliceSpec
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.policy_delta import NodeMaps, plan_writes
from beekeeper.node_daemon.policy_index import PolicyIndexes
from beekeeper.node_daemon.policy_state import translate


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
        slices: dict[str, BpfPolicySliceSpec] = {}
        maps = NodeMaps()
        kernel: dict[str, dict[bytes, bytes]] = {spec.name: {} for spec in pm.SYNCED_MAPS}
        for _ in range(40):
            change, full = rng.random(), False
            if change < 0.35:  # a slice added or edited
                policy = rng.choice(POLICIES)
                name = f"{policy[2:]}-{rng.randint(0, 1)}"
                slices[name] = BpfPolicySliceSpec.model_validate(random_slice(rng, policy))
            elif change < 0.45 and slices:  # removed
                del slices[rng.choice(sorted(slices))]
            elif change < 0.5 and slices:  # the same content again, as a new object (a relist)
                name = rng.choice(sorted(slices))
                slices[name] = BpfPolicySliceSpec.model_validate(slices[name].to_dict())
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
            names = {r.policy for r in spec.rules or []} | {s.policy for s in slices.values()}
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
