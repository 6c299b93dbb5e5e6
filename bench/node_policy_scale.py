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
- one port of one policy changed: API write -> node synced (observedGeneration) and Ready;
- real traffic: client -> server TCP/80 passes, other -> server is dropped.

Everything it creates is removed at the end, also on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kubernetes import client
from netpol_rig import PodRig, Probe, probe
from support import NodeDaemons, Process, component_env, wait_for

from beekeeper import kube
from beekeeper.crds.generate import crd_manifests
from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE_PLURAL,
    GROUP,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
)
from beekeeper.devenv import build
from beekeeper.devenv.controlplane import ControlPlane
from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import policy_maps as pm

RULES, PEERS, PORTS = 8, 32, 32
PER_POLICY = RULES * PEERS * PORTS
_START = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


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


def measure(
    custom: client.CustomObjectsApi, api: client.ApiClient, rig: PodRig, node: Any, namespace: str, entries: int
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

    # One port of one policy: API write -> the node's maps hold it -> Ready.
    generation = state["metadata"]["generation"]
    started = time.monotonic()
    kube.apply(api, big_policy(namespace, 0, edited=True))

    def synced() -> bool:
        current = cast(
            dict[str, Any], custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node.node)
        )
        seen = ((current.get("status") or {}).get("networkPolicy") or {}).get("observedGeneration") or 0
        return seen > generation

    wait_for(synced, 300, "edit synced", interval=0.02)
    to_synced = time.monotonic() - started
    wait_for(lambda: all_ready(custom, namespace, names), 300, "edit Ready", interval=0.05)
    edit_ready = time.monotonic() - started

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
        "one port edit -> node synced, s": round(to_synced, 2),
        "one port edit -> Ready, s": round(edit_ready, 2),
        "BpfNodeState bytes": len(json.dumps(state)),
        "slices": len(slices),
        "largest slice bytes": max(sizes, default=0),
        "all slices bytes": sum(sizes),
        "traffic as expected": observed == flows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", default="10000,100000", help="comma-separated kernel entry targets")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
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
            {**component_env(cluster.kubeconfig), "BEEKEEPER_LOG_LEVEL": "info"},
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
            results[entries] = measure(custom, api, rig, node, namespace, entries)
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
