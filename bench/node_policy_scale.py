"""Policy state of one node at scale, through the real path: apiserver -> operator -> slices -> daemon -> kernel.

    sudo .venv/bin/python bench/node_policy_scale.py [--entries 10000,100000] [--keep]

One control plane, one operator and one node daemon with the real (CO-RE) datapath; three
simulated pods on the node (server, client, other; real veths, real traffic). For each size
E in turn it applies ceil(E / 8192) NetworkIdentityPolicies selecting the server, each one
at the default expansion budget (8 rules x 32 /32 ipBlocks x 32 TCP ports = 8192 entries),
plus one that lets the client reach the server on TCP/80, and reports:

- apply -> every policy Ready (the node's daemon reports the generation that lists them);
- the policy map entries in the kernel (counted in the pinned map), and the daemon's count;
- the BpfNodeState's size and the BpfPolicySlices' count and sizes (etcd's limit: 1.5 MiB);
- one port of one policy changed, --edits times: API write -> in the kernel (the pinned policy epoch,
  which the daemon moves after its map writes, has moved), -> node synced (the daemon reports the
  generation in its status) and -> every policy Ready, p50/p99/max;
- real traffic: client -> server TCP/80 passes, other -> server is dropped.

Everything it creates is removed at the end, also on Ctrl-C or a failure.

    sudo .venv/bin/python bench/node_policy_scale.py --daemon [--peers 1000,10000] [--rounds 30]

--daemon measures the node daemon alone (no apiserver, no operator process): the time from
a changed slice (or node spec) being handed to the daemon to its map writes done, side by
side in one run for the incremental PolicyAgent and the from-scratch path it replaced
(validate, translate and encode the whole state, diff every key, look at every link), each
on its own pinned datapath, for the world of bench/datapath.py (N peer identities, one
policy per 4000 peers, one for the client; two local pods on host veths with /32 routes).
Changes: one rule added to the client's policy, then removed; one peer pod added to a
4000-peer group, then removed. Rounds alternate which path goes first; ratios are taken
within a round. Both datapaths' maps are compared after every change.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes import client
from netpol_rig import PodRig, Probe, SimPod, probe
from support import NodeDaemons, Process, component_env, sh, wait_for

from beekeeper import kube
from beekeeper.crds.generate import crd_manifests
from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE_PLURAL,
    GROUP,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
)
from beekeeper.crds.nodestate import NodeNetworkPolicy
from beekeeper.devenv import build
from beekeeper.devenv.controlplane import ControlPlane
from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon import policy_syscalls as ps
from beekeeper.node_daemon.drops import DropLog
from beekeeper.node_daemon.policy_agent import PolicyAgent
from beekeeper.node_daemon.policy_datapath import PolicyDatapath
from beekeeper.node_daemon.policy_index import PolicyIndexes
from beekeeper.node_daemon.policy_slices import SliceReader
from beekeeper.node_daemon.policy_state import policy_names, translate
from beekeeper.node_daemon.routes import RouteTable
from beekeeper.operator.identities import plan_identities
from beekeeper.operator.pods import pod_records
from beekeeper.operator.policy_compile import CompiledPolicies, compile_policies
from bench import datapath as dpb  # the world of bench/datapath.py: pods, policies, compile
from bench.harness import progress, quantile

RULES, PEERS, PORTS = 8, 32, 32
PER_POLICY = RULES * PEERS * PORTS


@dataclass
class Cluster:
    """What tests/support.NodeDaemons needs of the tests' cluster fixture."""

    control_plane: ControlPlane

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def api(self) -> client.ApiClient:
        return kube.api_client(self.kubeconfig)

    def kubectl(self, *args: str, check: bool = True) -> None:
        import subprocess

        subprocess.run([str(build.binaries().kubectl), "--kubeconfig", str(self.kubeconfig), *args], check=check)


def big_policy(namespace: str, index: int, edited: bool = False) -> dict[str, Any]:
    """8192 entries: rule i allows 32 distinct /32s on 32 distinct TCP ports; edited moves one port."""

    def port(i: int, k: int) -> int:
        return 60000 if edited and (i, k) == (0, 0) else 1024 + PORTS * i + k

    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NetworkIdentityPolicy",
        "metadata": {"name": f"big-{index}", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [
                {
                    "from": [
                        {"ipBlock": {"cidr": f"{100 + index // 256}.{index % 256}.{i}.{j}/32"}} for j in range(PEERS)
                    ],
                    "ports": [{"protocol": "TCP", "port": port(i, k)} for k in range(PORTS)],
                }
                for i in range(RULES)
            ],
        },
    }


def client_policy(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NetworkIdentityPolicy",
        "metadata": {"name": "client", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 80}]},
            ],
        },
    }


def all_ready(custom: client.CustomObjectsApi, namespace: str, names: set[str]) -> bool:
    listing = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, NETWORK_IDENTITY_POLICY_PLURAL)
    items = cast(dict[str, Any], listing)["items"]
    ready = set()
    for body in items:
        status = body.get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
        if status.get("observedGeneration") == body["metadata"]["generation"] and conditions.get("Ready") == "True":
            ready.add(body["metadata"]["name"])
    return names <= ready


def kernel_entries(bpffs_root: Path) -> int:
    pin = bpffs_root / "policy" / "maps" / pm.POLICY_ALLOW.name
    with bpf.obj_get(str(pin)) as fd:
        return sum(1 for _ in bpf.map_items(fd.fd, pm.POLICY_KEY.size, pm.POLICY_VALUE.size))


def kernel_epoch(bpffs_root: Path) -> int:
    """The policy epoch in the pinned map: the daemon moves it once a sync's map writes are done."""
    pin = bpffs_root / "policy" / "maps" / pm.POLICY_EPOCH.name
    with bpf.obj_get(str(pin)) as fd:
        return int.from_bytes(bpf.map_lookup(fd.fd, pm.EPOCH_KEY.pack(0), 4), "little")


def measure(
    custom: client.CustomObjectsApi,
    api: client.ApiClient,
    rig: PodRig,
    node: Any,
    namespace: str,
    entries: int,
    edits: int,
) -> dict[str, Any]:
    policies = math.ceil(entries / PER_POLICY)
    names = {f"big-{i}" for i in range(policies)} | {"client"}
    started = time.monotonic()
    kube.apply(api, client_policy(namespace))
    for i in range(policies):
        kube.apply(api, big_policy(namespace, i))
    wait_for(lambda: all_ready(custom, namespace, names), 900, f"{len(names)} policies Ready", interval=0.5)
    to_ready = time.monotonic() - started
    state = cast(dict[str, Any], custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node.node))
    slices = cast(
        dict[str, Any],
        custom.list_cluster_custom_object(
            GROUP, VERSION, BPF_POLICY_SLICE_PLURAL, field_selector=f"spec.nodeName={node.node}"
        ),
    )["items"]
    sizes = [len(json.dumps(s)) for s in slices]
    report = (state.get("status") or {}).get("networkPolicy") or {}

    # One port of one policy, `edits` times (moved there and back): API write -> kernel -> node synced -> Ready.
    to_kernel: list[float] = []
    to_synced: list[float] = []
    to_edit_ready: list[float] = []
    for k in range(edits):
        generation = cast(
            dict[str, Any], custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node.node)
        )["metadata"]["generation"]

        def synced(generation: int = generation) -> bool:
            current = cast(
                dict[str, Any], custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node.node)
            )
            seen = ((current.get("status") or {}).get("networkPolicy") or {}).get("observedGeneration") or 0
            return seen > generation

        def epoch_moved(epoch: int = kernel_epoch(node.bpffs_root)) -> bool:
            return kernel_epoch(node.bpffs_root) != epoch

        started = time.monotonic()
        kube.apply(api, big_policy(namespace, 0, edited=k % 2 == 0))
        wait_for(epoch_moved, 300, "edit in the kernel", interval=0.001)
        to_kernel.append(time.monotonic() - started)
        wait_for(synced, 300, "edit synced", interval=0.005)
        to_synced.append(time.monotonic() - started)
        wait_for(lambda: all_ready(custom, namespace, names), 300, "edit Ready", interval=0.02)
        to_edit_ready.append(time.monotonic() - started)
        progress(
            f"size {entries}: edit {k + 1}/{edits} in the kernel in {to_kernel[-1] * 1000:.0f} ms,"
            f" synced in {to_synced[-1] * 1000:.0f} ms"
        )

    flows = {Probe("p/client", "p/server", 80, "TCP"): True, Probe("p/other", "p/server", 80, "TCP"): False}
    observed = probe(rig.pods, flows, 1.0)
    in_kernel = kernel_entries(node.bpffs_root)
    for name in names:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, NETWORK_IDENTITY_POLICY_PLURAL, name)
    wait_for(
        lambda: (
            not cast(
                dict[str, Any],
                custom.list_cluster_custom_object(
                    GROUP, VERSION, BPF_POLICY_SLICE_PLURAL, field_selector=f"spec.nodeName={node.node}"
                ),
            )["items"]
        ),
        300,
        "slices removed",
    )
    return {
        "policies": len(names),
        "kernel policy_allow entries": in_kernel,
        "daemon rules": report.get("rules"),
        "apply -> all Ready, s": round(to_ready, 1),
        "one port edit -> in the kernel p50, ms": round(quantile(to_kernel, 0.5) * 1000),
        "one port edit -> in the kernel p99, ms": round(quantile(to_kernel, 0.99) * 1000),
        "one port edit -> in the kernel max, ms": round(max(to_kernel) * 1000),
        "one port edit -> node synced p50, ms": round(quantile(to_synced, 0.5) * 1000),
        "one port edit -> node synced p99, ms": round(quantile(to_synced, 0.99) * 1000),
        "one port edit -> node synced max, ms": round(max(to_synced) * 1000),
        "one port edit -> all Ready p50, ms": round(quantile(to_edit_ready, 0.5) * 1000),
        "one port edit -> all Ready max, ms": round(max(to_edit_ready) * 1000),
        "BpfNodeState bytes": len(json.dumps(state)),
        "slices": len(slices),
        "largest slice bytes": max(sizes, default=0),
        "all slices bytes": sum(sizes),
        "traffic as expected": observed == flows,
    }


# --- the daemon alone: incremental vs from scratch ---------------------------------------------------


@dataclass(frozen=True)
class LocalPod:
    """A local pod as bench/datapath.World reads it (name, ip, labels), on a host veth with a /32 route."""

    name: str
    ip: str
    labels: dict[str, str]
    veth: str


class FromScratch:
    """The daemon's policy path before incremental sync: the whole spec and every slice validated (slices
    cached per resourceVersion, as SliceReader did), translated and encoded, every key diffed, every link read."""

    def __init__(self, bpffs: Path, state_dir: Path) -> None:
        self.datapath = PolicyDatapath(bpffs)
        self.reader = SliceReader()
        self.indexes = PolicyIndexes(state_dir / "indexes.json")
        self.routes = RouteTable()

    def reconcile(self, raw: dict[str, Any], slices: dict[str, dict[str, Any]]) -> int:
        spec = NodeNetworkPolicy.model_validate(raw)
        listed, waiting, unreadable = self.reader.resolve(spec.slices or [], slices)
        if waiting or unreadable:
            raise SystemExit(f"from scratch: slices {waiting} {unreadable}")
        interfaces = {ep.ip: self.routes.pod_interface(ep.ip) for ep in spec.endpoints or []}
        plan = translate(spec, interfaces, self.indexes.assign(policy_names(spec, listed.values())), listed)
        before = {a.ifindex: a.prog_ids for a in self.datapath.attached().values()}
        result = self.datapath.sync(plan.state)
        for ifindex in plan.interfaces:
            if before.get(ifindex) != self.datapath.prog_ids:
                self.datapath.attach(ifindex)
        self.datapath.prune()
        self.datapath.attached()
        return result.updates + result.deletes

    def close(self) -> None:
        self.datapath.remove()
        self.routes.close()


def node_input(compiled: CompiledPolicies) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """This node's spec.networkPolicy and its slices as the watches hand them over (a resourceVersion per content)."""
    raw = compiled.nodes[dpb.NODE]
    assert raw is not None
    slices = {
        name: {"metadata": {"name": name, "resourceVersion": spec["contentHash"][:16]}, "spec": spec}
        for name, spec in (compiled.slices.get(dpb.NODE) or {}).items()
    }
    return raw, slices


def policy_maps_of(bpffs: Path) -> dict[str, dict[bytes, bytes]]:
    out = {}
    for spec in pm.SYNCED_MAPS:
        with bpf.obj_get(str(bpffs / "maps" / spec.name)) as fd:
            out[spec.name] = dict(bpf.map_items(fd.fd, spec.key_size, spec.value_size))
    return out


def changes(world: dpb.World) -> dict[str, tuple[CompiledPolicies, CompiledPolicies]]:
    """change -> (base, changed) compiled states."""
    base = world.compile()
    extra = dpb.pod_body("peer-new", dpb.ELSEWHERE, "10.63.255.250", {"peer": "new", "group": "0"})
    records = world.records + pod_records([extra], {dpb.NAMESPACE: {"kubernetes.io/metadata.name": dpb.NAMESPACE}})
    existing = {number: key for key, number in world.identities.items()}
    identities = plan_identities({r.key for r in records}, existing, {}, 0.0, 60.0).assigned
    nodes: dict[str, list[str]] = {dpb.NODE: [], dpb.ELSEWHERE: []}
    return {
        "one rule": (base, world.compile(extra_peer=True)),
        "one peer pod": (base, compile_policies(world.policies(), records, identities, nodes)),
    }


def daemon_delta(peers: list[int], rounds: int) -> list[dict[str, Any]]:
    tag = uuid.uuid4().hex[:6]
    root = Path(tempfile.mkdtemp(prefix="beekeeper-bench-delta-"))
    pods = [
        LocalPod("client", "10.253.0.2", {"app": "client"}, f"bkdl{tag}c"),
        LocalPod("server", "10.253.0.3", {"app": "server"}, f"bkdl{tag}s"),
    ]
    bpffs = [Path(f"/sys/fs/bpf/beekeeper-bench-delta-{tag}-{side}") for side in ("scratch", "delta")]
    rows: list[dict[str, Any]] = []
    scratch = agent = None
    try:
        for pod in pods:
            sh("ip", "link", "add", pod.veth, "type", "veth", "peer", "name", f"{pod.veth}p")
            sh("ip", "link", "set", pod.veth, "up")
            sh("ip", "link", "set", f"{pod.veth}p", "up")
            sh("ip", "route", "add", f"{pod.ip}/32", "dev", pod.veth)
        for n in peers:
            progress(f"daemon, N={n}: compiling")
            # World reads name, ip and labels of its pods, which LocalPod has
            world = dpb.World(n, cast(SimPod, pods[0]), cast(SimPod, pods[1]))
            scratch = FromScratch(bpffs[0], root / f"scratch-{n}")
            agent = PolicyAgent(dpb.NODE, bpffs[1], root / f"delta-{n}", DropLog())
            generation = 0
            for change, (base, changed) in changes(world).items():
                states = [node_input(c) for c in (base, changed)]
                scratch.reconcile(*states[0])  # the starting state, not timed
                generation += 1
                agent.reconcile(states[0][0], generation, None, states[0][1])
                samples: dict[str, list[float]] = {"scratch": [], "delta": []}
                ratios, writes = [], []
                for r in range(rounds):
                    raw, objects = states[1 - r % 2]  # the change, then back
                    generation += 1
                    timings = {}
                    for side in ("scratch", "delta") if r % 4 < 2 else ("delta", "scratch"):
                        started = time.perf_counter()
                        if side == "scratch":
                            scratch.reconcile(raw, objects)
                        else:
                            before = sum(agent.map_writes.values())
                            status = agent.reconcile(raw, generation, None, objects, rescan=False)
                            writes.append(sum(agent.map_writes.values()) - before)
                            if (status or {}).get("message"):
                                raise SystemExit(f"incremental path: {status}")
                        timings[side] = time.perf_counter() - started
                    for side, seconds in timings.items():
                        samples[side].append(seconds)
                    ratios.append(timings["scratch"] / timings["delta"])
                    if policy_maps_of(bpffs[0]) != policy_maps_of(bpffs[1]):
                        raise SystemExit(f"N={n} {change}: the two paths left different maps")
                row: dict[str, Any] = {"peers": n, "change": change, "map writes/change": statistics.median(writes)}
                for side in ("scratch", "delta"):
                    ordered = sorted(samples[side])
                    row[f"{side} p50 ms"] = round(statistics.median(ordered) * 1e3, 2)
                    row[f"{side} max ms"] = round(ordered[-1] * 1e3, 2)
                row["scratch/delta (per round)"] = round(statistics.median(ratios), 1)
                rows.append(row)
                progress(f"daemon, N={n}: {row}")
            key = pm.POLICY_KEY.pack(pm.PREFIX_FULL, 7, 7, pm.DIR_INGRESS, pm.PROTO_TCP, (9).to_bytes(2, "big"))
            with bpf.obj_get(str(bpffs[1] / "maps" / pm.POLICY_ALLOW.name)) as fd:
                raw_write = []
                for _ in range(200):
                    started = time.perf_counter()
                    ps.map_update(fd.fd, key, pm.POLICY_VALUE.pack(0))
                    raw_write.append(time.perf_counter() - started)
                ps.map_delete(fd.fd, key)
            rows.append(
                {"peers": n, "change": "raw map write", "delta p50 ms": round(statistics.median(raw_write) * 1e3, 4)}
            )
            scratch.close()
            agent.remove()
            agent.close()
            scratch = agent = None
    finally:
        if scratch is not None:
            scratch.close()
        if agent is not None:
            agent.remove()
            agent.close()
        for pod in pods:
            sh("ip", "link", "del", pod.veth, check=False)
        for path in bpffs:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
    print("  ".join(f"{c:>{widths[c]}}" for c in columns))
    for row in rows:
        print("  ".join(f"{row.get(c, '')!s:>{widths[c]}}" for c in columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", default="10000,100000", help="comma-separated kernel entry targets")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--edits", type=int, default=20, help="one-port edits timed per size")
    parser.add_argument("--daemon", action="store_true", help="the node daemon alone: incremental vs from scratch")
    parser.add_argument("--peers", default="1000,10000", help="--daemon: comma-separated peer identity counts")
    parser.add_argument("--rounds", type=int, default=30, help="--daemon: changes timed per case")
    args = parser.parse_args(argv)
    if args.daemon:
        print_rows(daemon_delta([int(n) for n in args.peers.split(",")], args.rounds))
        return 0
    sizes = [int(s) for s in args.entries.split(",")]
    root = Path(tempfile.mkdtemp(prefix="beekeeper-bench-nodepolicy-"))
    control_plane = ControlPlane(root)
    operator = daemons = rig = None
    results: dict[int, dict[str, Any]] = {}
    try:
        control_plane.start(progress)
        cluster = Cluster(control_plane)
        api = cluster.api()
        kube.install_crds(api, crd_manifests())
        workdir = root / "components"
        workdir.mkdir()
        operator = Process(
            "operator",
            [sys.executable, "-m", "beekeeper.cli", "operator"],
            workdir / "operator.log",
            {**component_env(cluster.kubeconfig), "BEEKEEPER_LOG_LEVEL": os.environ.get("BEEKEEPER_LOG_LEVEL", "info")},
        ).start()
        daemons = NodeDaemons(cluster, workdir)
        node = daemons()
        namespace = f"p-{uuid.uuid4().hex[:5]}"
        client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})  # type: ignore[arg-type]  # sent as is
        rig = PodRig(api)
        for name in ("server", "client", "other"):
            rig.add(f"p/{name}", namespace, name, node.node, {"app": name})
        rig.wait_servers()
        custom = client.CustomObjectsApi(api)
        for entries in sizes:
            progress(f"size {entries}: applying")
            results[entries] = measure(custom, api, rig, node, namespace, entries, args.edits)
            progress(f"size {entries}: {results[entries]}")
    finally:
        if rig is not None:
            rig.close()
        if daemons is not None:
            daemons.stop_all()
        if operator is not None:
            operator.stop()
        control_plane.stop()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    metrics = list(next(iter(results.values())))
    width = max(len(m) for m in metrics)
    print(f"{'metric':<{width}}  " + "  ".join(f"{f'E={e}':>10}" for e in results))
    for metric in metrics:
        print(f"{metric:<{width}}  " + "  ".join(f"{results[e][metric]!s:>10}" for e in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
