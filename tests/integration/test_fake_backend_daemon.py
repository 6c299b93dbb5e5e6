"""The fake-backend node daemon through the real apiserver and operator: no kernel, no root.

The scale benchmark (bench/scale.py) stands on this path, so it is kept from rotting here.
"""

from __future__ import annotations

import uuid

import pytest
import yaml
from kubernetes import client
from support import node_bpfprogram, wait_for

from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION

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
