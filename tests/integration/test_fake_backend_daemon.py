"""The fake-backend node daemon through the real apiserver and operator: no kernel, no root.

The scale benchmarks (bench/scale.py, bench/policy_scale.py) stand on this path, so it is kept from rotting here.
"""

from __future__ import annotations

import uuid

import pytest
import yaml
from kubernetes import client
from support import node_bpfprogram, running_pod, wait_for

from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_PROGRAM_PLURAL,
    GROUP,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
)

pytestmark = pytest.mark.integration

SOURCE = """
BPF_HASH(opens, u32, u64, 1024);
int count_openat(void *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    opens.increment(pid);
    return 0;
}
"""


def test_fake_backend_daemon_makes_a_bpfprogram_ready(cluster, operator_process, node_daemons) -> None:
    daemon = node_daemons(backend="fake")
    name = f"fake-{uuid.uuid4().hex[:6]}"
    program = node_bpfprogram(
        name,
        daemon.node,
        SOURCE,
        [{"name": "count_openat", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_openat"}],
    )
    custom = client.CustomObjectsApi(cluster.api())
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(program))
    try:

        def ready() -> dict | None:
            status = custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name).get("status") or {}
            return status if status.get("ready") == "1/1" and status.get("phase") == "Ready" else None

        wait_for(ready, 60, f"BpfProgram {name} READY 1/1")
        state = custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, daemon.node)["status"]
        assert state["capabilities"]["kernelVersion"].endswith("-fake")
        (report,) = state["programs"]
        assert report["phase"] == "Attached" and report["attachPoints"] == ["tracepoint:syscalls:sys_enter_openat"]
        assert "networkPolicy" not in state
    finally:
        cluster.kubectl("delete", "bpfprogram", name, "--ignore-not-found", "--wait=false")


def test_fake_policy_daemon_enforces_the_current_revision(cluster, operator_process, node_daemons) -> None:
    """--fake-policy: the real policy agent over in-memory maps reports enforcing at spec's revision,
    and follows a policy edit to its new revision."""
    daemon = node_daemons(backend="fake", args=["--fake-policy"])
    api = cluster.api()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    with cluster.temp_namespace() as ns:
        running_pod(core, ns, "server", "server", daemon.node, "10.77.0.2")
        running_pod(core, ns, "client", "client", daemon.node, "10.77.0.3")
        policy = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "NetworkIdentityPolicy",
            "metadata": {"name": "allow-client", "namespace": ns},
            "spec": {
                "podSelector": {"matchLabels": {"app": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 8080}]}],
            },
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, NETWORK_IDENTITY_POLICY_PLURAL, policy)

        def enforcing(not_revision: str | None = None) -> tuple[str, dict] | None:
            state = custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, daemon.node)
            revision = ((state.get("spec") or {}).get("networkPolicy") or {}).get("revision")
            report = (state.get("status") or {}).get("networkPolicy") or {}
            done = revision and revision != not_revision and report.get("observedRevision") == revision
            return (revision, report) if done and report.get("enforcing") else None

        first, report = wait_for(enforcing, 60, "the fake node enforcing the policy")
        assert report["endpoints"] == 2 and report["attached"] == 2 and report["rules"] >= 1, report
        patch = {"spec": {"ingress": [{"from": policy["spec"]["ingress"][0]["from"], "ports": [{"port": 9090}]}]}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, NETWORK_IDENTITY_POLICY_PLURAL, "allow-client", patch)
        _, report = wait_for(lambda: enforcing(first), 60, "the fake node enforcing the edit")
        assert not report.get("message"), report
