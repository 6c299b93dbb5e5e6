"""NetworkIdentityPolicy control plane at scale: real apiserver and operator, simulated policy-enforcing nodes.

    .venv/bin/python bench/policy_scale.py                      # 1k pods/10 nodes/50 policies, then 10k/100/500
    .venv/bin/python bench/policy_scale.py --pods 60 --nodes 3 --policies 5 --changes 2 --churn 3   # smoke

Each size gets Pod objects bound to its nodes (spec.nodeName, status.podIPs through the
status subresource; nothing runs), NetworkIdentityPolicies, a fresh operator and one
`--backend fake --fake-policy` node daemon per node: the daemon's real PolicyAgent
(validation, slice reading, incremental encoding and write plan) over in-memory maps.
A node enforces a change when its status says `enforcing` at `observedRevision` ==
`spec.networkPolicy.revision`.

Pods come in groups (label app=gK) of about 100 placed on 10 neighbouring nodes, and
policy i selects group i and allows group 7i+3 on its own port, so a change reaches the
nodes of the groups it touches, not the whole cluster. Measured, one change at a time:
apply -> every node whose revision moved enforces it (the latest such status event), and
the BpfNodeState and BpfPolicySlice writes the change cost; then churn (pods created and
deleted at --rate per second, label flips at a tenth of it, a policy edit a second) with
each node's spec-write -> enforced lag and the time the cluster needs to settle after.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import urllib3
from kubernetes import client

from beekeeper import kube
from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE_PLURAL,
    GROUP,
    NETWORK_IDENTITY_PLURAL,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import NO_METRICS, Harness, count, format_table, interrupt, progress, quantile, ratio, usage

NODESTATE, SLICE = BPF_NODE_STATE_PLURAL, BPF_POLICY_SLICE_PLURAL
GROUP_PODS = 100
GROUP_NODES = 10
SETTLE_SECONDS = 1.0
"""A change is over once no node state or slice was written for this long and every moved node enforces."""
NOTHING_MOVED_SECONDS = 15.0
"""A change that moved no node's revision in this long moved none (reported, not timed)."""
CONTROL_WRITES = tuple(f"{p}.{c}" for p in (NODESTATE, SLICE) for c in ("create", "spec", "meta", "delete"))
"""The operator's writes of what nodes read (a slice's content is its spec, so it counts as a spec write)."""
ETCD_LIMIT = 1.5 * 1024 * 1024
CHANGES = ("policy edit", "label flip", "pod create", "pod delete")


@dataclass(frozen=True)
class Size:
    pods: int
    nodes: int
    policies: int

    @property
    def groups(self) -> int:
        return max(2, self.pods // GROUP_PODS)

    @property
    def name(self) -> str:
        return f"{self.pods}p"


@dataclass
class Result:
    size: Size
    seconds: dict[str, float] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)
    """change kind -> apply -> enforced on every moved node, s."""
    moved: dict[str, list[int]] = field(default_factory=dict)
    writes: dict[str, list[int]] = field(default_factory=dict)
    churn_lag: list[float] = field(default_factory=list)
    churn_ops: float = 0.0
    operator_cpu: dict[str, float] = field(default_factory=dict)
    apiserver_cpu: dict[str, float] = field(default_factory=dict)
    rss_peak_mib: float = 0.0
    sizes: dict[str, list[int]] = field(default_factory=dict)


class World:
    """The pods and policies of one size, deterministic; churn adds and removes pods on top."""

    def __init__(self, size: Size, index: int) -> None:
        self.size = size
        self.namespace = f"bench-{size.name}"
        self.nodes = [f"pol-{size.name}-{i:03d}" for i in range(size.nodes)]
        self._base = int(ipaddress.IPv4Address("10.0.0.0")) + (index + 1) * (1 << 20)
        self._next = size.pods
        self.labels: dict[str, str] = {}
        """pod -> its app label, as last written."""
        self.random = random.Random(index)

    def pod(self, j: int) -> tuple[str, str, str, str]:
        """(name, node, ip, app) of pod number j."""
        group = j % self.size.groups
        spread = min(self.size.nodes, GROUP_NODES)
        node = self.nodes[(group * 7 + (j // self.size.groups) % spread) % self.size.nodes]
        return f"p{j}", node, str(ipaddress.IPv4Address(self._base + j + 1)), f"g{group}"

    def new_pod(self) -> int:
        self._next += 1
        return self._next - 1

    def policy(self, i: int, port_shift: int = 0) -> dict[str, Any]:
        groups = self.size.groups
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "NetworkIdentityPolicy",
            "metadata": {"name": f"np{i}", "namespace": self.namespace},
            "spec": {
                "podSelector": {"matchLabels": {"app": f"g{i % groups}"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"app": f"g{(7 * i + 3) % groups}"}}}],
                        "ports": [{"protocol": "TCP", "port": 1000 + (i + port_shift) % 60000}],
                    }
                ],
            },
        }


class Bench(Harness):
    def __init__(self, root: Path, timeout: float, changes: int, churn: float, rate: float) -> None:
        super().__init__(root, timeout, (NODESTATE, SLICE))
        self.changes, self.churn, self.rate = changes, churn, rate
        self.enforced_at: dict[str, tuple[str, float]] = {}
        """node -> (revision, time its status first showed it enforced)."""
        self.written_at: dict[str, dict[str, float]] = {}
        """node -> revision -> time the operator wrote it."""
        self.lags: list[float] | None = None
        """While churning: every node's spec write -> enforced lag, s."""
        self.recorder.listeners.append(self._observe)

    def _observe(self, plural: str, change: str, obj: dict[str, Any], now: float) -> None:
        if plural != NODESTATE or change == "delete":
            return
        node = obj["metadata"]["name"]
        revision = _revision(obj)
        if revision is None:
            return
        written = self.written_at.setdefault(node, {})
        written.setdefault(revision, now)
        if _enforces(obj) and self.enforced_at.get(node, ("", 0.0))[0] != revision:
            self.enforced_at[node] = (revision, now)
            if self.lags is not None and revision in written:
                self.lags.append(now - written[revision])
            self.written_at[node] = {revision: written[revision]}

    # --- the world through the API ------------------------------------------------------------

    def _create_pod(self, core: client.CoreV1Api, world: World, j: int) -> None:
        name, node, ip, app = world.pod(j)
        body = {
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}]},
        }
        core.create_namespaced_pod(world.namespace, body)  # type: ignore[arg-type]  # a dict is sent as it is
        status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
        core.patch_namespaced_pod_status(name, world.namespace, status)
        world.labels[name] = app

    def _delete_pod(self, core: client.CoreV1Api, world: World, name: str) -> None:
        core.delete_namespaced_pod(name, world.namespace, grace_period_seconds=0)
        world.labels.pop(name, None)

    def _flip(self, core: client.CoreV1Api, world: World, name: str) -> None:
        others = [g for g in range(world.size.groups) if f"g{g}" != world.labels.get(name)]
        app = f"g{world.random.choice(others)}"  # another group: a new identity
        core.patch_namespaced_pod(name, world.namespace, {"metadata": {"labels": {"app": app}}})
        world.labels[name] = app

    def _edit(self, custom: client.CustomObjectsApi, world: World, i: int, shift: int) -> None:
        body = world.policy(i, shift)
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, world.namespace, NETWORK_IDENTITY_POLICY_PLURAL, f"np{i}", {"spec": body["spec"]}
        )

    # --- one size -----------------------------------------------------------------------------

    def run(self, size: Size, index: int) -> Result:
        result = Result(size)
        world = World(size, index)
        core, custom = client.CoreV1Api(self.api), client.CustomObjectsApi(self.api)
        progress(f"{size}: {size.nodes} nodes, {size.pods} pods, {size.policies} policies")
        for node in world.nodes:
            kube.register_node(self.api, node)
        core.create_namespace({"metadata": {"name": world.namespace}})  # type: ignore[arg-type]
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda j: self._create_pod(core, world, j), range(size.pods)))
            list(
                pool.map(
                    lambda i: custom.create_namespaced_custom_object(
                        GROUP, VERSION, world.namespace, NETWORK_IDENTITY_POLICY_PLURAL, world.policy(i)
                    ),
                    range(size.policies),
                )
            )
        result.seconds["objects created"] = time.monotonic() - started
        operator = self.spawn(f"operator-{size.name}", "operator")
        daemons = [
            self.spawn(
                f"node-daemon-{node}",
                *("node-daemon", "--node-name", node, "--backend", "fake", "--fake-policy", *NO_METRICS),
                *("--state-dir", str(self.root / "nodes" / node)),
            )
            for node in world.nodes
        ]
        progress(f"{size}: operator and {size.nodes} daemons started; waiting for every node to enforce")
        started = time.monotonic()
        with self._phase("initial", result, operator):
            self._settle("initial sync", world.nodes, None)
            result.seconds["start to all enforcing"] = time.monotonic() - started - SETTLE_SECONDS
            # Single changes are timed from here: the statuses of the first sync are written by now.
            self.wait("policies Ready", partial(self._policies_ready, custom, world, {}))
        result.seconds["start to all policies Ready"] = time.monotonic() - started

        pods = [world.pod(j)[0] for j in range(size.pods)]
        with self._phase("changes", result, operator):
            for n in range(self.changes):
                for kind in CHANGES:
                    change: Callable[[], object]
                    if kind == "policy edit":
                        i = world.random.randrange(size.policies)
                        change = partial(self._edit, custom, world, i, n + 1)
                    elif kind == "label flip":
                        name = world.random.choice(pods)
                        change = partial(self._flip, core, world, name)
                    elif kind == "pod create":
                        j = world.new_pod()
                        pods.append(world.pod(j)[0])
                        change = partial(self._create_pod, core, world, j)
                    else:
                        victim = pods.pop(world.random.randrange(len(pods)))
                        change = partial(self._delete_pod, core, world, victim)
                    latency, moved, writes = self._measure(f"{kind} {n + 1}/{self.changes}", world.nodes, change)
                    if latency is not None:
                        result.latency.setdefault(kind, []).append(latency)
                    result.moved.setdefault(kind, []).append(moved)
                    result.writes.setdefault(kind, []).append(writes)

        if self.churn > 0:
            progress(f"{size}: churn for {self.churn:.0f}s at {self.rate:.0f} pod ops/s")
            with self._phase("churn", result, operator):
                result.churn_ops = self._churn(core, custom, world, pods)
                started = time.monotonic()
                self._settle("settling after churn", world.nodes, None)
                # 0 when the nodes had caught up and gone quiet before the last op returned
                result.seconds["settle after churn"] = max(0.0, time.monotonic() - started - SETTLE_SECONDS)
        result.rss_peak_mib = usage(operator).peak_rss_mib
        for plural in (NODESTATE, SLICE):
            with self.recorder._cond:  # the watch threads change these dicts
                objects = list(self.recorder.objects[plural].values())
            result.sizes[plural] = sorted(len(json.dumps(o, separators=(",", ":"))) for o in objects)

        result.churn_lag, self.lags = list(self.lags or []), None
        progress(f"{size} done:\n{table([result])}")  # kept in the log should the teardown or a later size fail
        progress(f"{size}: tearing down")
        # The operator goes first: reacting to 10k pod deletes with passes and writes made the
        # apiserver's one-worker collection delete take many minutes. What it would clean up is
        # owned by the Nodes (node states, slices) or cluster-scoped: deleted here, so the next
        # size starts clean and sooner than the garbage collector would.
        self.stop([*daemons, operator])
        try:
            core.delete_collection_namespaced_pod(world.namespace, grace_period_seconds=0, _request_timeout=(10, 300))
        except (client.ApiException, urllib3.exceptions.HTTPError) as exc:
            progress(f"{size}: deleting the pods: {exc}; they are left to the namespace"[:300])
        for i in range(size.policies):
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, world.namespace, NETWORK_IDENTITY_POLICY_PLURAL, f"np{i}"
            )
        custom.delete_collection_cluster_custom_object(GROUP, VERSION, NETWORK_IDENTITY_PLURAL)
        core.delete_namespace(world.namespace)
        for node in world.nodes:
            core.delete_node(node)
        for plural in (BPF_POLICY_SLICE_PLURAL, BPF_NODE_STATE_PLURAL):
            custom.delete_collection_cluster_custom_object(GROUP, VERSION, plural, _request_timeout=(10, 300))
        states = self.recorder.objects[NODESTATE]
        self.wait("node states removed", lambda: count(sum(n not in states for n in world.nodes), size.nodes, "gone"))
        return result

    def _measure(self, what: str, nodes: list[str], change: Callable[[], object]) -> tuple[float | None, int, int]:
        """Apply one change and wait until every node whose revision moved enforces it.

        Returns (apply -> the last moved node's enforcing status event, None if no node moved;
        nodes moved; control writes).
        """
        states = self.recorder.objects[NODESTATE]
        with self.recorder._cond:
            before = {n: _revision(states.get(n)) for n in nodes}
        writes = self.recorder.snapshot()
        progress(f"  {what}")
        started = time.monotonic()
        change()
        moved = self._settle(what, nodes, before, started)
        spent = self.recorder.snapshot() - writes
        latest = max((self.enforced_at[n][1] for n in moved), default=None)
        latency = None if latest is None else latest - started
        control = sum(spent[k] for k in CONTROL_WRITES)
        shown = "nothing moved" if latency is None else f"{1000 * latency:.0f} ms"
        progress(f"  {what}: {shown}, {len(moved)} nodes moved, {control} writes")  # an outlier, found in the log
        return latency, len(moved), control

    def _settle(
        self, what: str, nodes: list[str], before: dict[str, str | None] | None, started: float = 0.0
    ) -> list[str]:
        """Until the moved nodes (all with a policy, when before is None) enforce their revision and no
        node state or slice was written for SETTLE_SECONDS; returns the moved nodes (none when
        nothing moved within NOTHING_MOVED_SECONDS of started)."""
        states = self.recorder.objects[NODESTATE]

        def moved() -> list[str]:
            return [
                n
                for n in nodes
                if _revision(states.get(n)) is not None
                and (before is None or _revision(states.get(n)) != before.get(n))
            ]

        def check() -> tuple[bool, str]:
            found = moved()
            done = sum(1 for n in found if _enforces(states.get(n)))
            quiet = time.monotonic() - max((self.recorder.last.get(k, 0.0) for k in CONTROL_WRITES), default=0.0)
            some = bool(found) or (before is not None and time.monotonic() - started > NOTHING_MOVED_SECONDS)
            return some and done == len(found) and quiet >= SETTLE_SECONDS, f"{done}/{len(found)} enforcing"

        self.wait(what, check)
        with self.recorder._cond:
            return moved()

    @staticmethod
    def _policies_ready(custom: client.CustomObjectsApi, world: World, seen: dict[str, float]) -> tuple[bool, str]:
        """Every NetworkIdentityPolicy says Ready; listed at most once a second (check runs on every event)."""
        if time.monotonic() - seen.get("at", 0.0) >= 1.0:
            plural = NETWORK_IDENTITY_POLICY_PLURAL
            listed = custom.list_namespaced_custom_object(GROUP, VERSION, world.namespace, plural)
            items = cast(dict[str, Any], listed)["items"]  # the client types its JSON answers `object`
            seen.update(at=time.monotonic(), total=len(items), ready=sum(_ready(item) for item in items))
        ready, total = int(seen["ready"]), int(seen["total"])
        return total > 0 and ready == total, f"{ready}/{total} policies Ready"

    def _churn(self, core: client.CoreV1Api, custom: client.CustomObjectsApi, world: World, pods: list[str]) -> float:
        """Pods created and deleted at self.rate/s (taking turns), label flips at a tenth of it, a policy
        edit a second; returns the operations per second the apiserver took."""
        self.lags = []
        done = Counter[str]()
        lock = threading.Lock()

        def run(kind: str, op: Callable[[], object]) -> None:
            op()
            with lock:
                done[kind] += 1

        ticks = int(self.churn * self.rate)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            for tick in range(ticks):
                time.sleep(max(0.0, started + tick / self.rate - time.monotonic()))
                if tick % 2 == 0:
                    j = world.new_pod()
                    pods.append(world.pod(j)[0])
                    pool.submit(run, "create", partial(self._create_pod, core, world, j))
                else:
                    victim = pods.pop(world.random.randrange(len(pods) - 1))
                    pool.submit(run, "delete", partial(self._delete_pod, core, world, victim))
                if tick % 10 == 5:
                    name = world.random.choice(pods[: world.size.pods // 2])
                    pool.submit(run, "flip", partial(self._flip, core, world, name))
                if tick % int(self.rate) == 7 % int(self.rate):
                    i = world.random.randrange(world.size.policies)
                    pool.submit(run, "edit", partial(self._edit, custom, world, i, 7 + tick))
        elapsed = time.monotonic() - started
        self.all_alive()
        return (done["create"] + done["delete"]) / elapsed

    @contextmanager
    def _phase(self, name: str, result: Result, operator: int) -> Iterator[None]:
        cpu, api_cpu = usage(operator).cpu_seconds, self.apiserver_cpu()
        yield
        result.operator_cpu[name] = usage(operator).cpu_seconds - cpu
        result.apiserver_cpu[name] = self.apiserver_cpu() - api_cpu


def _revision(state: dict[str, Any] | None) -> str | None:
    return (((state or {}).get("spec") or {}).get("networkPolicy") or {}).get("revision")


def _ready(policy: dict[str, Any]) -> bool:
    conditions = (policy.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _enforces(state: dict[str, Any] | None) -> bool:
    """The node's daemon enforces the state's current policy revision."""
    report = ((state or {}).get("status") or {}).get("networkPolicy") or {}
    return bool(report.get("enforcing")) and report.get("observedRevision") == _revision(state) is not None


# --- report ---------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    everything = lambda r: [v for vs in r.latency.values() for v in vs]  # noqa: E731
    rows: list[tuple[str, Callable[[Result], float], str]] = [
        ("nodes", lambda r: r.size.nodes, "{:.0f}"),
        ("pods", lambda r: r.size.pods, "{:.0f}"),
        ("policies", lambda r: r.size.policies, "{:.0f}"),
        ("create pods+policies (bench client), s", lambda r: r.seconds["objects created"], "{:.1f}"),
        ("operator+daemons start to all enforcing, s", lambda r: r.seconds["start to all enforcing"], "{:.1f}"),
        ("start to all policies Ready, s", lambda r: r.seconds["start to all policies Ready"], "{:.1f}"),
        ("apply->enforced p50, all changes, ms", lambda r: 1000 * quantile(everything(r), 0.5), "{:.0f}"),
        ("apply->enforced p99, all changes, ms", lambda r: 1000 * quantile(everything(r), 0.99), "{:.0f}"),
    ]
    for kind in CHANGES:
        rows += [
            (f"{kind}: apply->enforced p50, ms", partial(_latency, kind=kind, q=0.5), "{:.0f}"),
            (f"{kind}: apply->enforced max, ms", partial(_latency, kind=kind, q=1.0), "{:.0f}"),
            (f"{kind}: nodes moved (median)", partial(_moved, kind=kind), "{:.1f}"),
            (f"{kind}: writes/moved node", partial(_per_node, kind=kind), "{:.2f}"),
        ]
    rows += [
        ("churn: pod ops/s achieved", lambda r: r.churn_ops, "{:.1f}"),
        ("churn: node spec write->enforced p50, ms", lambda r: 1000 * quantile(r.churn_lag, 0.5), "{:.0f}"),
        ("churn: node spec write->enforced p99, ms", lambda r: 1000 * quantile(r.churn_lag, 0.99), "{:.0f}"),
        ("churn: settle after the last op, s", lambda r: r.seconds.get("settle after churn", 0.0), "{:.2f}"),
        ("operator CPU, initial sync, s", lambda r: r.operator_cpu["initial"], "{:.2f}"),
        ("operator CPU per single change, ms", lambda r: _cpu_per_change(r), "{:.0f}"),
        ("operator CPU, churn, s", lambda r: r.operator_cpu.get("churn", 0.0), "{:.2f}"),
        ("apiserver+etcd CPU, churn, s", lambda r: r.apiserver_cpu.get("churn", 0.0), "{:.2f}"),
        ("operator RSS (peak), MiB", lambda r: r.rss_peak_mib, "{:.0f}"),
        ("BpfNodeState size max, KiB", lambda r: max(r.sizes[NODESTATE], default=0) / 1024, "{:.1f}"),
        ("BpfNodeState size median, KiB", lambda r: _median(r.sizes[NODESTATE]) / 1024, "{:.1f}"),
        ("BpfPolicySlices", lambda r: len(r.sizes[SLICE]), "{:.0f}"),
        ("BpfPolicySlice size max, KiB", lambda r: max(r.sizes[SLICE], default=0) / 1024, "{:.1f}"),
        (
            "largest object / etcd's 1.5 MiB",
            lambda r: max([0, *r.sizes[NODESTATE], *r.sizes[SLICE]]) / ETCD_LIMIT,
            "{:.3f}",
        ),
    ]
    first = results[0]
    header = ["metric", *(r.size.name for r in results), *(f"{r.size.name}/{first.size.name}" for r in results[1:])]
    lines = []
    for label, value, fmt in rows:
        values = [float(value(r)) for r in results]
        lines.append([label, *(fmt.format(v) for v in values), *(ratio(v, values[0]) for v in values[1:])])
    return format_table(header, lines)


def _latency(r: Result, kind: str, q: float) -> float:
    return 1000 * quantile(r.latency.get(kind, []), q)


def _moved(r: Result, kind: str) -> float:
    return float(statistics.median(r.moved.get(kind, [0])))


def _largest(r: Result) -> float:
    return max([0, *r.sizes[NODESTATE], *r.sizes[SLICE]]) / ETCD_LIMIT


def _per_node(r: Result, kind: str) -> float:
    moved = sum(r.moved.get(kind, []))
    return sum(r.writes.get(kind, [])) / moved if moved else 0.0


def _cpu_per_change(r: Result) -> float:
    n = sum(len(v) for v in r.latency.values())
    return 1000 * r.operator_cpu["changes"] / n if n else 0.0


def _median(values: list[int]) -> float:
    return statistics.median(values) if values else 0.0


def _sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=_sizes, default=[1000, 10000], help="pods per size (default 1000,10000)")
    parser.add_argument("--nodes", type=_sizes, default=[10, 100], help="nodes per size (default 10,100)")
    parser.add_argument("--policies", type=_sizes, default=[50, 500], help="policies per size (default 50,500)")
    parser.add_argument("--changes", type=int, default=10, help="single changes of each kind per size (default 10)")
    parser.add_argument("--churn", type=float, default=20.0, help="seconds of churn per size (0: none; default 20)")
    parser.add_argument("--rate", type=float, default=50.0, help="pod creates+deletes per second in churn")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds any one wait may take (default 600)")
    parser.add_argument("--keep", action="store_true", help="keep the state directory (logs) for inspection")
    args = parser.parse_args(argv)
    if not len(args.pods) == len(args.nodes) == len(args.policies):
        parser.error("--pods, --nodes and --policies need as many sizes each")
    sizes = [Size(*t) for t in zip(args.pods, args.nodes, args.policies, strict=True)]

    signal.signal(signal.SIGTERM, interrupt)
    root = Path(tempfile.mkdtemp(prefix="beekeeper-policy-bench-"))
    bench = Bench(root, args.timeout, args.changes, args.churn, args.rate)
    results = bench.run_sizes(sizes, bench.run, args.keep)
    if results is None:
        return 130
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
