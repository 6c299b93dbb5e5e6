"""The node side of NetworkIdentityPolicy, end to end without the operator.

The tests write BpfNodeState.spec.networkPolicy themselves (the operator, which owns
that field, is paused for the module) for two simulated nodes with two pods each, and
check what real TCP and UDP traffic between the pods' network namespaces does, what the
daemons report in status and metrics, and how they explain drops. The daemons find each
pod's veth from the host route to its IP, as on a real node.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from netpol_rig import PodRig, Probe, SimPod, TruthTable, assert_table, percentile, probe, tcx_program_ids
from support import NodeDaemon, NodeDaemons, token_kubeconfig, wait_for

from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, GROUP, VERSION
from beekeeper.crds.nodestate import Endpoint, IpcacheEntry, NodeNetworkPolicy, PolicyRule

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

SERVER, CLIENT, OTHER = 1001, 1002, 1003
ALLOW_CLIENT = "p/allow-client"
DENY_UDP = "p/deny-udp-81"
EDIT = "p/edit"
PODS = {"p/s0": (0, SERVER), "p/c0": (0, CLIENT), "p/s1": (1, SERVER), "p/o1": (1, OTHER)}
"""key -> (node number, identity)."""


def rule(local: int, peer: int, policy: str, protocol: str = "TCP", port: int = 80, action: str = "allow") -> dict:
    ports = (0, 0) if protocol == "Any" else (port, port)
    return PolicyRule(
        local_identity=local,
        direction="Ingress",
        peer_identity=peer,
        protocol=protocol,
        port_start=ports[0],
        port_end=ports[1],
        action=action,
        policy=policy,
    ).to_dict()


BASE_RULES = [rule(SERVER, CLIENT, ALLOW_CLIENT)]


@dataclass
class Env:
    custom: client.CustomObjectsApi
    nodes: list[NodeDaemon]
    rig: PodRig
    identities: dict[str, int] = field(default_factory=dict)
    """pod key -> identity; a pod in here is an endpoint of its node."""
    node_of: dict[str, int] = field(default_factory=dict)
    rules: list[dict] = field(default_factory=list)

    @property
    def pods(self) -> dict[str, SimPod]:
        return self.rig.pods

    def spec(self, node: int) -> dict[str, Any]:
        endpoints = [
            Endpoint(
                namespace="p",
                pod=key.split("/")[1],
                ip=self.pods[key].ip,
                identity=identity,
                ingress_enforced=identity == SERVER,
            )
            for key, identity in self.identities.items()
            if self.node_of[key] == node
        ]
        ipcache = [IpcacheEntry(cidr=f"{self.pods[k].ip}/32", identity=i) for k, i in self.identities.items()]
        rules = [PolicyRule.model_validate(r) for r in self.rules]
        return NodeNetworkPolicy(endpoints=endpoints, ipcache=ipcache, cidr_identities=[], rules=rules).to_dict()

    def state(self, node: int) -> dict[str, Any]:
        return self.custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, self.nodes[node].node)

    def push(self, *nodes: int) -> dict[int, int]:
        """Write the current spec to the nodes (default all); returns node -> new generation."""
        generations = {}
        for n in nodes or range(len(self.nodes)):
            body = {"spec": {"networkPolicy": self.spec(n)}}
            obj = self.custom.patch_cluster_custom_object(
                GROUP, VERSION, BPF_NODE_STATE_PLURAL, self.nodes[n].node, body
            )
            generations[n] = obj["metadata"]["generation"]
        return generations

    def synced(self, generations: dict[int, int]) -> bool:
        for n, generation in generations.items():
            report = (self.state(n).get("status") or {}).get("networkPolicy") or {}
            if report.get("observedGeneration", 0) < generation:
                return False
        return True

    def policy_status(self, node: int) -> dict[str, Any]:
        return (self.state(node).get("status") or {}).get("networkPolicy") or {}

    def expected(self) -> TruthTable:
        """Servers accept only what the rules allow; everything else is open; loopback always."""
        table = TruthTable.full(self.pods)
        for key, identity in self.identities.items():
            if identity != SERVER:
                continue
            table.set(False, to=key)
            for r in self.rules:
                if r["action"] != "allow" or r["localIdentity"] != SERVER:
                    continue
                for src, src_id in self.identities.items():
                    if src_id == r["peerIdentity"]:
                        proto = None if r["protocol"] == "Any" else r["protocol"]
                        table.set(True, frm=src, to=key, port=r.get("portStart") or None, protocol=proto)
            for r in self.rules:
                if r["action"] == "deny" and r["localIdentity"] == SERVER:
                    for src, src_id in self.identities.items():
                        if src_id == r["peerIdentity"]:
                            table.set(False, frm=src, to=key, port=r.get("portStart") or None, protocol=r["protocol"])
            table.set(True, frm=key, to=key)
        return table


def policy_labels(ref: str) -> dict[str, str]:
    """The namespace and policy labels of a policy's counters."""
    namespace, policy = ref.split("/")
    return {"namespace": namespace, "policy": policy}


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def operator_paused(operator_process) -> Iterator[None]:
    """The operator owns BpfNodeState specs; this module writes them itself, so it must not run."""
    operator_process.stop()
    yield
    operator_process.start()


@pytest.fixture(scope="module")
def env(cluster, workdir, operator_paused) -> Iterator[Env]:
    daemons = NodeDaemons(cluster, workdir)
    custom = client.CustomObjectsApi(cluster.api())
    rig = PodRig(None)
    ok = False
    try:
        nodes = [daemons(), daemons()]
        e = Env(custom, nodes, rig, rules=list(BASE_RULES))
        for key, (node, identity) in PODS.items():
            rig.add(key, "p", key.split("/")[1], nodes[node].node, {})
            e.identities[key], e.node_of[key] = identity, node
        rig.wait_servers()
        for n, daemon in enumerate(nodes):
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "BpfNodeState",
                "metadata": {"name": daemon.node},
                "spec": {"nodeName": daemon.node, "networkPolicy": e.spec(n)},
            }
            custom.create_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, body)
        yield e
        ok = True
    finally:
        rig.close()
        for daemon in daemons.started:
            try:
                custom.delete_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, daemon.node)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
        daemons.stop_all(show_logs=not ok)


def test_policy_is_enforced_on_real_traffic_and_reported(env: Env) -> None:
    wait_for(lambda: env.synced({0: 1, 1: 1}), 60, "both nodes synced their first policy")
    for n in (0, 1):
        status = env.policy_status(n)
        assert status["enforcing"] is True and status["endpoints"] == 2 and status["attached"] == 2, status
        assert status["rules"] == 1 and status["observedGeneration"] == env.state(n)["metadata"]["generation"]
        assert status["lastSyncTime"] and "missing" not in status and "message" not in status
        ready = {c["type"]: c for c in env.state(n)["status"]["conditions"]}["Ready"]
        assert ready["status"] == "True", ready
    expected = env.expected()
    assert not expected.cells[Probe("p/o1", "p/s0", 80, "TCP")] and expected.cells[Probe("p/c0", "p/s1", 80, "TCP")]
    assert_table(env.pods, expected, "client may reach servers on TCP/80 only")
    for key, pod in env.pods.items():
        ids = tcx_program_ids(pod.host_if)
        assert len(ids["ingress"]) == 1 and len(ids["egress"]) == 1, (key, ids)


def test_metrics_count_verdicts_per_policy_and_default_deny_per_identity(env: Env) -> None:
    probe(env.pods, [Probe("p/c0", "p/s1", 80, "TCP"), Probe("p/o1", "p/s1", 81, "UDP")], 0.5)

    def counted() -> str | None:
        text = env.nodes[1].metrics()
        allowed = metric_value(text, "beekeeper_policy_packets_total", **policy_labels(ALLOW_CLIENT), verdict="allow")
        denied = metric_value(text, "beekeeper_policy_default_deny_packets_total", identity=str(SERVER))
        return text if allowed and denied else None

    text = wait_for(counted, 20, "allow and default-deny counters on node 1")
    assert metric_value(text, "beekeeper_policy_endpoints", state="attached") == 2
    assert metric_value(text, "beekeeper_policy_program_info", program="policy_to_pod") == 1


def _drops(daemon: NodeDaemon, **query: Any) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{daemon.metrics_port}/drops?" + "&".join(f"{k}={v}" for k, v in query.items())
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {daemon.token}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.load(resp)["drops"]


def test_why_dropped_names_default_deny_and_the_deny_policy(env: Env, cluster, tmp_path) -> None:
    """The CLI shows the daemon the credentials of its kubeconfig (here a ServiceAccount token)."""
    other, server, client_pod = env.pods["p/o1"], env.pods["p/s0"], env.pods["p/c0"]
    assert probe(env.pods, [Probe("p/o1", "p/s0", 80, "TCP")], 0.5) == {Probe("p/o1", "p/s0", 80, "TCP"): False}
    query = {"src": other.ip, "dst": server.ip, "port": 80, "protocol": "tcp"}
    (drop,) = wait_for(lambda: _drops(env.nodes[0], **query), 10, "drop recorded")
    assert drop["reason"] == "DefaultDeny" and drop["direction"] == "ingress" and drop["endpoint"] == "p/s0"
    assert drop["protocol"] == "TCP" and drop["peerIdentity"] == OTHER and drop["count"] >= 1
    assert "default deny" in drop["explanation"] and f"identity {OTHER}" in drop["explanation"]

    env.rules = [
        *BASE_RULES,
        rule(SERVER, CLIENT, ALLOW_CLIENT, "Any"),
        rule(SERVER, CLIENT, DENY_UDP, "UDP", 81, "deny"),
    ]
    generations = env.push()
    wait_for(lambda: env.synced(generations), 30, "deny rule synced")
    assert_table(env.pods, env.expected(), "deny rule wins over the allow-any rule")
    assert probe(env.pods, [Probe("p/c0", "p/s0", 81, "UDP")], 0.5)[Probe("p/c0", "p/s0", 81, "UDP")] is False
    url = f"http://127.0.0.1:{env.nodes[0].metrics_port}"
    kubeconfig = token_kubeconfig(cluster.kubeconfig, env.nodes[0].token, tmp_path / "reader.kubeconfig")
    out = wait_for(
        lambda: "denied by" in (text := why_dropped(url, client_pod.ip, server.ip, "81", "udp", kubeconfig)) and text,
        10,
        "the CLI to explain the UDP/81 drop",
    )
    print(f"\n$ beekeeper why-dropped --url {url} --src {client_pod.ip} --dst {server.ip} --port 81 --protocol udp")
    print(out)
    assert f"denied by {DENY_UDP}" in out and "ingress of p/s0" in out
    assert "no recorded drops match src=10.240.255.254" in why_dropped(url, "10.240.255.254", kubeconfig=kubeconfig)


def why_dropped(
    url: str,
    src: str,
    dst: str | None = None,
    port: str | None = None,
    proto: str | None = None,
    kubeconfig: Path | None = None,
) -> str:
    argv = [sys.executable, "-m", "beekeeper.cli", "why-dropped", "--url", url, "--src", src]
    argv += ["--kubeconfig", str(kubeconfig)] if kubeconfig else []
    for flag, value in (("--dst", dst), ("--port", port), ("--protocol", proto)):
        if value:
            argv += [flag, value]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_policy_edits_are_map_updates_only(env: Env) -> None:
    """Repeated edits flip real traffic with the same kernel programs; prints apply->enforced latency."""
    env.rules = list(BASE_RULES)
    wait_for(lambda: env.synced(env.push()), 30, "base rules back")
    ids_before = {k: tcx_program_ids(p.host_if) for k, p in env.pods.items()}
    flip = Probe("p/o1", "p/s0", 80, "TCP")
    to_status: list[float] = []
    to_traffic: list[float] = []
    for i in range(20):
        allow = i % 2 == 0
        env.rules = [*BASE_RULES, rule(SERVER, OTHER, EDIT)] if allow else list(BASE_RULES)
        started = time.monotonic()
        generations = env.push(0)
        while probe(env.pods, [flip], 0.02)[flip] is not allow:
            assert time.monotonic() - started < 20, f"edit {i}: traffic did not follow"
        to_traffic.append(time.monotonic() - started)
        wait_for(lambda g=generations: env.synced(g), 20, f"edit {i} reported", interval=0.01)
        to_status.append(time.monotonic() - started)
    ids_after = {k: tcx_program_ids(p.host_if) for k, p in env.pods.items()}
    assert ids_after == ids_before, "a policy edit reloaded or reattached programs"
    print(
        f"\nnode-only apply->enforced over {len(to_traffic)} edits (BpfNodeState write -> traffic follows): "
        f"p50 {percentile(to_traffic, 0.5) * 1000:.0f} ms, p99 {percentile(to_traffic, 0.99) * 1000:.0f} ms; "
        f"-> status observedGeneration: p50 {percentile(to_status, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(to_status, 0.99) * 1000:.0f} ms"
    )


def test_departed_endpoint_is_detached_and_late_interface_attached(env: Env) -> None:
    other = env.pods["p/o1"]
    del env.identities["p/o1"]
    generations = env.push()
    wait_for(lambda: env.synced(generations) and env.policy_status(1)["attached"] == 1, 30, "o1 removed")
    assert tcx_program_ids(other.host_if) == {"ingress": [], "egress": []}
    assert env.policy_status(1)["endpoints"] == 1

    late = env.rig.add("p/late", "p", "late", env.nodes[1].node, {}, wired=False)
    env.identities["p/late"], env.node_of["p/late"] = CLIENT, 1
    generations = env.push()
    wait_for(
        lambda: env.synced(generations) and env.policy_status(1).get("missing") == [late.ip], 30, "late IP missing"
    )
    status = env.policy_status(1)
    assert status["enforcing"] is True and status["attached"] == 1 and status["endpoints"] == 2, status
    started = time.monotonic()
    env.rig.complete("p/late")
    wait_for(
        lambda: env.policy_status(1)["attached"] == 2 and "missing" not in env.policy_status(1), 20, "late pod attached"
    )
    print(f"\nveth + route created -> endpoint attached and reported: {(time.monotonic() - started) * 1000:.0f} ms")
    ids = tcx_program_ids(late.host_if)
    assert len(ids["ingress"]) == 1 and len(ids["egress"]) == 1


def test_daemon_restart_keeps_enforcing_without_reload(env: Env) -> None:
    node = env.nodes[0]
    server = env.pods["p/s0"]
    ids_before = tcx_program_ids(server.host_if)
    status_before = env.policy_status(0)
    allowed_before = allowed_packets(node)
    starts = node.log.read_text().count("node daemon started")
    node.kill()
    denied = Probe("p/c0", "p/s0", 81, "TCP")
    allowed = Probe("p/c0", "p/s0", 80, "TCP")
    assert probe(env.pods, [denied, allowed], 0.5) == {denied: False, allowed: True}, "pins keep enforcing"
    node.start()
    wait_for(lambda: node.log.read_text().count("node daemon started") > starts, 30, "daemon restarted")
    wait_for(lambda: allowed_packets(node), 30, "datapath adopted")
    assert tcx_program_ids(server.host_if) == ids_before
    assert env.policy_status(0) == status_before, "nothing changed: status untouched"
    probe(env.pods, [allowed], 0.5)
    after = allowed_packets(node)
    assert after is not None and allowed_before is not None and after > allowed_before, "same index, same counter"


def allowed_packets(node: NodeDaemon) -> float | None:
    return metric_value(
        node.metrics(), "beekeeper_policy_packets_total", **policy_labels(ALLOW_CLIENT), verdict="allow"
    )


def test_node_state_deleted_removes_the_datapath(env: Env) -> None:
    node = env.nodes[1]
    server = env.pods["p/s1"]
    env.custom.delete_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node.node)
    wait_for(lambda: not (node.bpffs_root / "policy").exists(), 30, "policy pins removed")
    assert tcx_program_ids(server.host_if) == {"ingress": [], "egress": []}
    wide_open = Probe("p/c0", "p/s1", 81, "UDP")
    assert probe(env.pods, [wide_open], 0.5) == {wide_open: True}
