"""`beekeeper uninstall-cleanup` (the chart's pre-delete hook) against the real apiserver and operator.

Node daemons with the fake backend stand in for the nodes: what is checked here is the API side
(the resources go, the operator's finalizer waits for the nodes, the nodes report nothing left);
the real-node tests check the kernel side with helm uninstall.
"""

from __future__ import annotations

import uuid

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException
from support import node_bpfprogram, wait_for

from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION
from beekeeper.uninstall import cleanup

pytestmark = pytest.mark.integration

SOURCE = "int count(void *ctx) { return 0; }"


def bpfprogram(name: str, node: str) -> dict:
    return node_bpfprogram(
        name, node, SOURCE, [{"name": "count", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_getppid"}]
    )


def attached(custom: client.CustomObjectsApi, node: str) -> list:
    """What the node reports attached ([] before the operator created its BpfNodeState)."""
    try:
        state = custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node)
    except ApiException as exc:
        if exc.status == 404:
            return []
        raise
    return (state.get("status") or {}).get("programs") or []


def test_cleanup_detaches_everything_and_waits_for_the_nodes(cluster, operator_process, node_daemons) -> None:
    daemons = [node_daemons(backend="fake") for _ in range(2)]
    custom = client.CustomObjectsApi(cluster.api())
    names = [f"uninstall-{uuid.uuid4().hex[:6]}" for _ in daemons]
    for name, daemon in zip(names, daemons, strict=True):
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(bpfprogram(name, daemon.node)))
    for daemon in daemons:
        wait_for(lambda d=daemon: attached(custom, d.node), 60, f"a program attached on {daemon.node}")

    messages: list[str] = []
    cleanup(cluster.api(), timeout=60, progress=messages.append)

    assert custom.list_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL)["items"] == []
    for daemon in daemons:
        assert attached(custom, daemon.node) == []
    assert messages[-1] == "every node has detached beekeeper's programs and policies"


def test_cleanup_fails_naming_a_node_whose_daemon_is_gone(cluster, operator_process, node_daemons) -> None:
    daemon = node_daemons(backend="fake")
    custom = client.CustomObjectsApi(cluster.api())
    name = f"uninstall-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(bpfprogram(name, daemon.node)))
    wait_for(lambda: attached(custom, daemon.node), 60, f"a program attached on {daemon.node}")
    daemon.stop()  # the node still exists, but nothing would detach its programs

    with pytest.raises(TimeoutError) as failure:
        cleanup(cluster.api(), timeout=3, poll=0.5, progress=lambda _: None)
    message = str(failure.value)
    assert f"node {daemon.node} still reports 1 program(s) of {name}" in message
    assert f"BpfProgram {name} is being detached" in message, "the finalizer holds it until the node detached"
    assert "--no-hooks" in message
