"""The rig is a real node: Ready, runs pods from imported images, routes pods to Services."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

from realnode_pods import HOST_SYSCTLS
from support import Cluster, wait_for

from beekeeper.devenv import realnode as rn


def test_node_is_ready_with_the_pinned_kubelet_and_containerd(node_cluster: Cluster, realnode: rn.RealNode) -> None:
    node = json.loads(node_cluster.kubectl("get", "node", realnode.node_name, "-o", "json").stdout)
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.34.4"
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert {"type": "InternalIP", "address": rn.NODE_IP} in node["status"]["addresses"]
    assert not node["spec"].get("taints"), "the node lifecycle controller lifts the not-ready taint"


def test_pod_from_an_imported_image_runs_and_logs(node_cluster: Cluster, node_namespace: str, run_pod) -> None:
    started = time.monotonic()
    pod = run_pod("server", ["serve", "8080"])
    print(f"pod Running {time.monotonic() - started:.2f}s after create")
    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(rn.POD_CIDR)
    logs = wait_for(lambda: node_cluster.kubectl("logs", "-n", node_namespace, "server").stdout, 20, "pod logs")
    assert "serving on 8080" in logs


def test_pods_reach_the_kubernetes_service_and_each_other(node_cluster: Cluster, node_namespace: str, run_pod) -> None:
    server = run_pod("server", ["serve", "8080"])
    run_pod("client", ["pause"])

    def probe(target: str) -> str:
        return node_cluster.kubectl(
            "exec", "-n", node_namespace, "client", "--", "/testpod", "probe", target, "2000", check=False
        ).stdout.strip()

    # kube-proxy (nftables) translates the Service IP to the apiserver on the rig's host address.
    assert probe("10.96.0.1:443") == "ok -"
    assert probe(f"{server['status']['podIP']}:8080") == "ok server"
    assert probe(f"{server['status']['podIP']}:8081").startswith("fail")


def test_the_node_changes_no_machine_wide_state(realnode: rn.RealNode, host_sysctls_before: dict[str, str]) -> None:
    now = {name: Path("/proc/sys", name).read_text() for name in HOST_SYSCTLS}
    assert now == host_sysctls_before
    # The kubelet did set its sysctls, but inside the rig they are the rig's files.
    assert (realnode.dir / "sysctl" / "vm.overcommit_memory").read_text().strip() == "1"
    assert realnode.node_exec("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    host_mounts = Path("/proc/self/mountinfo").read_text()
    # Pod rootfs overlays, volumes and netns pins exist, but only in the rig's mount namespace.
    assert str(realnode.dir) not in host_mounts, "containerd/kubelet mounts must stay in the rig's mount namespace"
    assert str(realnode.dir) in realnode.node_exec("cat", "/proc/self/mountinfo").stdout
