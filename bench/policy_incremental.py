"""One change among N in the operator's policy work per pass, in-process: from scratch vs with memory.

    .venv/bin/python bench/policy_incremental.py [--sizes 1000,10000] [--repeats 5]

The world of bench/datapath.py (N peer pods on another node, each its own identity, N/4000 + 1
policies letting groups of them and a client reach the server on TCP/80; every identity persisted
as a NetworkIdentity), then three changes:

- rule: the client's policy gains one rule (peer 0 on TCP/81), one rule among N;
- label: one peer's labels change (a new identity, in the next group's policy when there is one);
- pod: one more peer pod, with a new identity.

What the reconciler does with them per pass, from the cache's bodies to every node's compiled
spec.networkPolicy and slices: pod records, persisted identities read, identities planned, policies
compiled. "scratch" is pod_records + parse_identities + compile_policies (the pass before the
incremental control plane), "incremental" is PodRecords + IdentityReader + IncrementalCompiler warm
from the unchanged world (the reconciler's next pass); plan_identities is the same in both. Also
timed: compile_policies vs IncrementalCompiler alone. Each change is applied and reverted --repeats
times; both sides must give equal outputs; medians and ratios, side by side in one run. No root
needed: nothing leaves the process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beekeeper.operator.identities import IdentityKey, IdentityReader, identity_body, parse_identities, plan_identities
from beekeeper.operator.pods import PodRecord, PodRecords, pod_records
from beekeeper.operator.policy_compile import CompiledPolicies, compile_policies
from beekeeper.operator.policy_incremental import IncrementalCompiler
from bench.datapath import ELSEWHERE, GROUP, NAMESPACE, NODE, World, peer_ip, pod_body

NAMESPACES = {NAMESPACE: {"kubernetes.io/metadata.name": NAMESPACE}}
NODES: dict[str, list[str]] = {NODE: [], ELSEWHERE: []}
Body = dict[str, Any]


@dataclass
class Pod:
    """What World reads of the rig's pods."""

    name: str
    ip: str
    labels: dict[str, str]


@dataclass
class Inputs:
    """One pass's cache contents (unchanged objects shared between worlds, as the operator's cache keeps them)."""

    policies: list[Body]
    pods: list[Body]
    identities: list[Body]


def changes(world: World, base: Inputs) -> dict[str, Inputs]:
    j = world.size // 2
    groups = max(1, (world.size + GROUP - 1) // GROUP)
    relabelled = pod_body(
        f"peer-{j}", ELSEWHERE, peer_ip(j), {"peer": f"{j}b", "group": str((j // GROUP + 1) % groups)}
    )
    added = pod_body(f"peer-{world.size}", ELSEWHERE, peer_ip(world.size), {"peer": "new", "group": "0"})
    return {
        "rule": Inputs(world.policies(extra_peer=True), base.pods, base.identities),
        "label": Inputs(
            base.policies,
            [relabelled if p["metadata"]["name"] == f"peer-{j}" else p for p in base.pods],
            base.identities,
        ),
        "pod": Inputs(base.policies, [*base.pods, added], base.identities),
    }


def plan(records: list[PodRecord], existing: Mapping[int, IdentityKey | None]) -> dict[IdentityKey, int]:
    return plan_identities({r.key for r in records}, existing, {}, 0.0, 60.0).assigned


def scratch_pass(inputs: Inputs) -> CompiledPolicies:
    records = pod_records(inputs.pods, NAMESPACES)
    assigned = plan(records, parse_identities(inputs.identities))
    return compile_policies(inputs.policies, records, assigned, NODES)


class MemoryPass:
    """The reconciler's policy work with its memories."""

    def __init__(self) -> None:
        self.records, self.reader, self.compiler = PodRecords(), IdentityReader(), IncrementalCompiler()

    def __call__(self, inputs: Inputs) -> CompiledPolicies:
        records = self.records(inputs.pods, NAMESPACES)
        assigned = plan(records, self.reader(inputs.identities))
        return self.compiler.compile(inputs.policies, records, assigned, NODES)


def timed(action: Callable[[], CompiledPolicies]) -> tuple[float, CompiledPolicies]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def same(a: CompiledPolicies, b: CompiledPolicies) -> bool:
    outcomes = [{r: o.__dict__ for r, o in c.policies.items()} for c in (a, b)]
    return a.nodes == b.nodes and a.slices == b.slices and outcomes[0] == outcomes[1]


def measure(size: int, repeats: int) -> list[dict[str, Any]]:
    client, server = Pod("client", "10.63.0.1", {"app": "client"}), Pod("server", "10.63.0.2", {"app": "server"})
    world = World(size, client, server)  # type: ignore[arg-type]
    base = Inputs(world.policies(), world.pods, [identity_body(n, k) for k, n in world.identities.items()])
    memory = MemoryPass()
    cold, _ = timed(lambda: memory(base))
    base_records = memory.records(base.pods, NAMESPACES)
    rows = []
    for change, inputs in changes(world, base).items():
        records = pod_records(inputs.pods, NAMESPACES)
        assigned = plan(records, parse_identities(inputs.identities))
        compiler = IncrementalCompiler()
        compiler.compile(base.policies, base_records, plan(base_records, parse_identities(base.identities)), NODES)
        times: dict[str, list[float]] = {k: [] for k in ("pass scratch", "pass incremental", "compile", "incremental")}
        for _ in range(repeats):
            seconds, expected = timed(lambda: scratch_pass(inputs))  # noqa: B023
            times["pass scratch"].append(seconds)
            seconds, actual = timed(lambda: memory(inputs))  # noqa: B023
            times["pass incremental"].append(seconds)
            if not same(actual, expected):
                raise SystemExit(f"N={size} {change}: incremental and from-scratch outputs differ")
            memory(base)
            times["compile"].append(timed(lambda: compile_policies(inputs.policies, records, assigned, NODES))[0])  # noqa: B023
            times["incremental"].append(timed(lambda: compiler.compile(inputs.policies, records, assigned, NODES))[0])  # noqa: B023
            compiler.compile(base.policies, base_records, plan(base_records, parse_identities(base.identities)), NODES)
        medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append(
            {
                "N": size,
                "change": change,
                "pass scratch ms": medians["pass scratch"],
                "pass incremental ms": medians["pass incremental"],
                "pass ratio": medians["pass scratch"] / medians["pass incremental"],
                "compile_policies ms": medians["compile"],
                "IncrementalCompiler ms": medians["incremental"],
                "compile ratio": medians["compile"] / medians["incremental"],
                "cold pass ms": cold * 1e3,
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
    print(" | ".join(rows[0]))
    print(" | ".join("---" for _ in rows[0]))
    for row in rows:
        print(" | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
