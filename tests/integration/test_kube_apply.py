"""kube.apply_custom against the real apiserver: the one write path of the operator's and the daemon's objects."""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client
from support import Cluster, node_bpfprogram

from beekeeper import kube
from beekeeper.crds.names import BPF_PROGRAM_PLURAL, GROUP, VERSION

pytestmark = pytest.mark.integration

TRACEPOINT = [{"name": "count", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_openat"}]


def test_apply_creates_updates_and_drops_what_it_leaves_out(cluster: Cluster) -> None:
    custom = client.CustomObjectsApi(kube.api_client(cluster.kubeconfig))
    name = f"apply-{uuid.uuid4().hex[:6]}"
    body = node_bpfprogram(name, "no-such-node", "int count(void *ctx) { return 0; }", TRACEPOINT)
    try:
        # A create answers 201, which the generated client does not map to the object.
        created = kube.apply_custom(custom, BPF_PROGRAM_PLURAL, body, kube.OPERATOR_MANAGER)
        assert created["metadata"]["name"] == name and created["spec"]["programs"] == TRACEPOINT

        status = {"apiVersion": body["apiVersion"], "kind": "BpfProgram", "metadata": {"name": name}}
        first = {**status, "status": {"observedGeneration": 1, "phase": "Degraded", "warnings": ["w"]}}
        kube.apply_custom(custom, BPF_PROGRAM_PLURAL, first, kube.OPERATOR_MANAGER, status=True)
        second = {**status, "status": {"observedGeneration": 1, "phase": "Ready"}}
        written = kube.apply_custom(custom, BPF_PROGRAM_PLURAL, second, kube.OPERATOR_MANAGER, status=True)
        assert written["status"]["phase"] == "Ready" and "warnings" not in written["status"]

        stored = custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name)
        managers = {(m["manager"], m.get("subresource", "")) for m in stored["metadata"]["managedFields"]}
        assert {(kube.OPERATOR_MANAGER, ""), (kube.OPERATOR_MANAGER, "status")} <= managers
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name)
