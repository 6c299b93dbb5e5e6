"""Incremental policy sync against real maps: after every random change, and after the daemon restarts and
adopts the pinned maps, the kernel's maps hold exactly encode(translate(...)) of the same inputs."""

from __future__ import annotations

import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from policy_changes import POLICIES, random_interfaces, random_node, random_slice
from support import BPFFS_TEST_ROOT

from beekeeper.crds.nodestate import NodeNetworkPolicy
from beekeeper.crds.policyslice import BpfPolicySliceSpec
from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.policy_datapath import PolicyDatapath
from beekeeper.node_daemon.policy_delta import NodeMaps
from beekeeper.node_daemon.policy_index import PolicyIndexes
from beekeeper.node_daemon.policy_state import translate

pytestmark = pytest.mark.kernel


@pytest.fixture
def pinned() -> Iterator[Path]:
    path = BPFFS_TEST_ROOT / f"policy-delta-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        if path.exists():
            PolicyDatapath(path).remove()
        shutil.rmtree(path, ignore_errors=True)


def kernel_maps(path: Path) -> dict[str, dict[bytes, bytes]]:
    out = {}
    for spec in pm.SYNCED_MAPS:
        with bpf.obj_get(str(path / "maps" / spec.name)) as fd:
            out[spec.name] = dict(bpf.map_items(fd.fd, spec.key_size, spec.value_size))
    return out


def test_random_changes_and_a_restart_leave_the_maps_equal_to_a_from_scratch_encode(
    pinned: Path, tmp_path: Path
) -> None:
    rng = random.Random(11)
    indexes_table = PolicyIndexes(tmp_path / "indexes.json")
    datapath, maps = PolicyDatapath(pinned), NodeMaps()
    node, interfaces = random_node(rng), random_interfaces(rng)
    slices: dict[str, BpfPolicySliceSpec] = {}
    writes = 0
    try:
        for step in range(60):
            change = rng.random()
            if change < 0.45:
                policy = rng.choice(POLICIES)
                slices[f"{policy[2:]}-{rng.randint(0, 1)}"] = BpfPolicySliceSpec.model_validate(
                    random_slice(rng, policy)
                )
            elif change < 0.55 and slices:
                del slices[rng.choice(sorted(slices))]
            elif change < 0.75:
                node = random_node(rng)
            elif change < 0.9:
                interfaces = random_interfaces(rng)
            elif step:  # the daemon restarts: the pinned maps are adopted and diffed against
                datapath.close()
                datapath, maps = PolicyDatapath(pinned), NodeMaps()
            spec = NodeNetworkPolicy.model_validate(node)
            indexes = indexes_table.assign({r.policy for r in spec.rules or []} | {s.policy for s in slices.values()})
            plan = maps.update(spec, slices, indexes, interfaces)
            result = datapath.apply(maps.desired.maps, maps.desired.take_touched(), plan.state.policy_names, None)
            writes += result.updates + result.deletes

            expected = translate(spec, interfaces, indexes, slices)
            assert kernel_maps(pinned) == pm.encode(expected.state, lambda interface: int(interface)).maps, step
        assert writes > 60  # the changes did reach the kernel
    finally:
        datapath.close()
