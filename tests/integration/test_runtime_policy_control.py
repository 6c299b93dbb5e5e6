"""RuntimeSecurityPolicy control plane against the real apiserver and operator process (no kernel).

The node's report is written as its daemon writes it (server-side apply of the BpfNodeState
status as beekeeper-node-daemon), so the operator's aggregate is seen without a kernel.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from support import running_pod, wait_for

from beekeeper import kube
from beekeeper.crds.names import API_VERSION, BPF_NODE_STATE, GROUP, RUNTIME_SECURITY_POLICY, VERSION

pytestmark = pytest.mark.integration


@pytest.fixture
def node(cluster) -> Iterator[str]:
    """A Node object with no daemon: the test reports for it."""
    name = f"rsp-{uuid.uuid4().hex[:6]}"
    kube.register_node(cluster.api(), name)
    yield name
    cluster.kubectl("delete", "node", name, "--wait=false", check=False)


def report(custom: client.CustomObjectsApi, node: str, runtime_security: dict[str, Any]) -> None:
    body = {
        "apiVersion": API_VERSION,
        "kind": BPF_NODE_STATE.kind,
        "metadata": {"name": node},
        "status": {"runtimeSecurity": runtime_security},
    }
    kube.apply_custom(custom, BPF_NODE_STATE.plural, body, kube.NODE_DAEMON_MANAGER, status=True)


def test_status_follows_the_reports_and_drops_what_they_stop_saying(
    cluster, operator_process, namespace: str, node: str
) -> None:
    """A hook no node uses any more leaves status.hooks (and hooks goes once none is in force): the status
    is the operator's server-side apply, not a merge patch that would keep the old keys."""
    api = cluster.api()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    name, ref = "no-shells", f"{namespace}/no-shells"
    policy = {
        "apiVersion": API_VERSION,
        "kind": RUNTIME_SECURITY_POLICY.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "backend"}},
            "rules": [{"name": "no-shells", "exec": {"paths": ["/bin/sh"]}, "action": "Block"}],
        },
    }
    running_pod(core, namespace, "backend", "backend", node, "10.250.9.2")
    try:
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(policy))

        def revision() -> str | None:
            try:
                state = custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE.plural, node)
            except client.ApiException as exc:
                if exc.status == 404:  # the operator has not written it yet
                    return None
                raise
            return ((state.get("spec") or {}).get("runtimeSecurity") or {}).get("revision")

        written = wait_for(revision, 30, "spec.runtimeSecurity on the node state")

        seen: list[dict[str, Any]] = [{}]

        def status_where(check: Any, what: str) -> dict[str, Any]:
            def probe() -> dict[str, Any] | None:
                seen[0] = custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, RUNTIME_SECURITY_POLICY.plural, name
                )
                return seen[0] if check(seen[0].get("status") or {}) else None

            try:
                return wait_for(probe, 30, what)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; last status: {seen[0].get('status')}") from None

        enforcing = {"enforcing": True, "containers": 0, "observedRevision": written, "matches": {ref: 2}}
        report(custom, node, {**enforcing, "hook": "lsm"})
        status_where(lambda s: s.get("hooks") == {"lsm": 1} and s.get("matches") == 2, "hooks lsm")

        report(custom, node, {**enforcing, "hook": "tracepoint", "matches": {ref: 5}})
        body = status_where(lambda s: s.get("matches") == 5, "the second report aggregated")
        assert body["status"]["hooks"] == {"tracepoint": 1}, body["status"]

        report(custom, node, {"enforcing": False, "message": "no exec hook: tracepoint refused"})
        body = status_where(lambda s: s.get("nodesEnforcing") == 0, "the hookless report aggregated")
        assert "hooks" not in body["status"], body["status"]
        stalled = next(c for c in body["status"]["conditions"] if c["type"] == "Stalled")
        assert (stalled["status"], stalled["reason"]) == ("True", "NoExecHook")

        owned = {
            (m["manager"], m["operation"], m.get("subresource", "")): (m.get("fieldsV1") or {}).get("f:status") or {}
            for m in body["metadata"]["managedFields"]
        }
        applied = owned.get((kube.OPERATOR_MANAGER, "Apply", "status"))
        assert applied is not None, sorted(owned)
        assert {"f:conditions", "f:matches", "f:nodesEnforcing", "f:selectedPods"} <= set(applied), applied
    finally:
        cluster.kubectl("delete", "-f", "-", "--wait=false", input=yaml.safe_dump(policy), check=False)
        core.delete_namespaced_pod("backend", namespace, grace_period_seconds=0)
