"""One change among N in the operator's policy compiler, in-process: from scratch vs incremental.

    .venv/bin/python bench/policy_incremental.py [--sizes 1000,10000] [--repeats 5]

The world of bench/datapath.py (N peer pods on another node, each its own identity, N/4000 + 1
policies letting groups of them and a client reach the server on TCP/80), then three changes:

- rule: the client's policy gains one rule (peer 0 on TCP/81), one rule among N;
- label: one peer's group label flips (its identity leaves one policy's peers for another's);
- pod: one more peer pod, with a new identity.

Each is applied and reverted --repeats times; timed on the changed inputs: compile_policies from
scratch, and IncrementalCompiler.compile warm from the unchanged world (as the reconciler's next
pass). Both must agree; the table shows medians and scratch/incremental, side by side in one run.
No root needed: nothing leaves the process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beekeeper.operator.identities import IdentityKey, plan_identities
from beekeeper.operator.pods import PodRecord, pod_records
from beekeeper.operator.policy_compile import CompiledPolicies, compile_policies
from beekeeper.operator.policy_incremental import IncrementalCompiler
from bench.datapath import ELSEWHERE, GROUP, NAMESPACE, NODE, World, peer_ip, pod_body

NAMESPACES = {NAMESPACE: {"kubernetes.io/metadata.name": NAMESPACE}}
NODES: dict[str, list[str]] = {NODE: [], ELSEWHERE: []}


@dataclass
class Pod:
    """What World reads of the rig's pods."""

    name: str
    ip: str
    labels: dict[str, str]


Inputs = tuple[list[dict[str, Any]], list[PodRecord], dict[IdentityKey, int]]


def record(name: str, node: str, ip: str, labels: dict[str, str]) -> PodRecord:
    return pod_records([pod_body(name, node, ip, labels)], NAMESPACES)[0]


def changes(world: World) -> dict[str, Inputs]:
    """The changed inputs per change; unchanged pods stay the same objects (as the operator's cache keeps them)."""
    policies, records = world.policies(), world.records
    groups = max(1, (world.size + GROUP - 1) // GROUP)

    def with_records(new: list[PodRecord]) -> tuple[list[PodRecord], dict[IdentityKey, int]]:
        identities = dict(world.identities)
        missing = {r.key for r in new} - set(identities)
        planned = plan_identities(missing, {}, {}, 0.0, 60.0).assigned
        taken = set(identities.values())
        for key, number in planned.items():
            while number in taken:
                number += 1
            identities[key] = number
            taken.add(number)
        return new, identities

    j = world.size // 2
    relabelled = [
        record(r.name, ELSEWHERE, peer_ip(j), {"peer": str(j), "group": str((j // GROUP + 1) % groups)})
        if r.name == f"peer-{j}"
        else r
        for r in records
    ]
    added = [*records, record(f"peer-{world.size}", ELSEWHERE, peer_ip(world.size), {"peer": "new", "group": "0"})]
    return {
        "rule": (world.policies(extra_peer=True), records, world.identities),
        "label": (policies, *with_records(relabelled)),
        "pod": (policies, *with_records(added)),
    }


def timed(action: Callable[[], CompiledPolicies]) -> tuple[float, CompiledPolicies]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def same(a: CompiledPolicies, b: CompiledPolicies) -> bool:
    return (
        a.nodes == b.nodes
        and a.slices == b.slices
        and {r: o.__dict__ for r, o in a.policies.items()} == {r: o.__dict__ for r, o in b.policies.items()}
    )


def measure(size: int, repeats: int) -> list[dict[str, Any]]:
    client, server = Pod("client", "10.63.0.1", {"app": "client"}), Pod("server", "10.63.0.2", {"app": "server"})
    world = World(size, client, server)  # type: ignore[arg-type]
    base: Inputs = (world.policies(), world.records, world.identities)
    incremental = IncrementalCompiler()
    cold, _ = timed(lambda: incremental.compile(*base, NODES))
    rows = []
    for change, inputs in changes(world).items():
        scratch, warm, back = [], [], []
        for _ in range(repeats):
            seconds, expected = timed(lambda: compile_policies(*inputs, NODES))  # noqa: B023
            scratch.append(seconds)
            seconds, actual = timed(lambda: incremental.compile(*inputs, NODES))  # noqa: B023
            warm.append(seconds)
            if not same(actual, expected):
                raise SystemExit(f"N={size} {change}: incremental and from-scratch outputs differ")
            back.append(timed(lambda: incremental.compile(*base, NODES))[0])
        rows.append(
            {
                "N": size,
                "change": change,
                "scratch ms": statistics.median(scratch) * 1e3,
                "incremental ms": statistics.median(warm) * 1e3,
                "revert ms": statistics.median(back) * 1e3,
                "scratch/incremental": statistics.median(scratch) / statistics.median(warm),
                "cold ms": cold * 1e3,
            }
        )
        print(f"N={size} {change}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [row for size in map(int, args.sizes.split(",")) for row in measure(size, args.repeats)]
    columns = list(rows[0])
    print(" | ".join(columns))
    print(" | ".join("---" for _ in columns))
    for row in rows:
        print(" | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
