"""The operator's one control loop: cache snapshot → pure desired state → minimal API writes.

Every change (BpfProgram, Node, BpfNodeState status, referenced ConfigMap) only wakes this
loop; bursts coalesce into one pass. A pass writes a BpfNodeState only when its desired
spec differs and a BpfProgram status only when the aggregate differs, so restarts and
resyncs cause no churn.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from beekeeper.crds.bpfprogram import BpfProgramStatus
from beekeeper.crds.names import BPF_NODE_STATE, BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION
from beekeeper.crds.nodestate import NodeProgram
from beekeeper.operator.cache import ClusterCache
from beekeeper.operator.desired_state import node_programs, place
from beekeeper.operator.program_status import aggregate

log = logging.getLogger(__name__)

RESYNC_SECONDS = 60.0
DEBOUNCE_SECONDS = 0.05


@dataclass
class Notice:
    """A Kubernetes Event about a BpfProgram transition (shown by `kubectl describe`)."""

    body: Mapping[str, Any]
    type: str
    reason: str
    message: str


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _normal_programs(entries: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Stored entries carry apiserver defaults; round-trip through the model to compare like with like."""
    try:
        return [NodeProgram.model_validate(e).to_dict() for e in entries or []]
    except ValidationError:
        return [dict(e) for e in entries or []]


def _normal_status(status: Mapping[str, Any] | None) -> dict[str, Any]:
    try:
        return BpfProgramStatus.model_validate(status or {}).to_dict()
    except ValidationError:
        return dict(status or {})


class Reconciler:
    """Computes and writes desired state; holds no state of its own beyond the cache."""

    def __init__(self, api: client.ApiClient, cache: ClusterCache) -> None:
        self.cache = cache
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    async def prime(self) -> None:
        """One full list of every input before the first decision."""

        def list_all() -> dict[str, list[dict[str, Any]]]:
            return {
                "BpfProgram": self.custom.list_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL)["items"],
                "BpfNodeState": self.custom.list_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL)["items"],
                "Node": [self.core.api_client.sanitize_for_serialization(n) for n in self.core.list_node().items],
            }

        for kind, items in (await asyncio.to_thread(list_all)).items():
            self.cache.replace(kind, items)
        self.cache.primed.set()
        log.info(
            "cache primed",
            extra={
                "bpfprograms": len(self.cache.bpfprograms),
                "nodes": len(self.cache.nodes),
                "bpfnodestates": len(self.cache.nodestates),
            },
        )

    async def run(self) -> None:
        """Forever: wait for a change (or the resync period), coalesce, reconcile once."""
        await self.cache.primed.wait()
        while True:
            with contextlib.suppress(TimeoutError):  # the resync period passed: reconcile anyway
                await asyncio.wait_for(self.cache.changed.wait(), timeout=RESYNC_SECONDS)
            await asyncio.sleep(DEBOUNCE_SECONDS)
            self.cache.changed.clear()
            snapshot = (
                list(self.cache.bpfprograms.values()),
                self.cache.node_labels(),
                dict(self.cache.nodestates),
            )
            try:
                notices = await asyncio.to_thread(self.reconcile, *snapshot)
            except Exception:
                log.exception("reconcile pass failed; retrying")
                await asyncio.sleep(1)
                self.cache.changed.set()
                continue
            for notice in notices:
                await asyncio.to_thread(self._post, notice)

    def reconcile(
        self,
        bpfprograms: list[dict[str, Any]],
        node_labels: dict[str, dict[str, str]],
        nodestates: dict[str, dict[str, Any]],
    ) -> list[Notice]:
        """One pass; returns the Events to post. Runs in a worker thread (blocking client)."""
        configmaps: dict[tuple[str, str], Mapping[str, str] | None] = {}

        def configmap(namespace: str, name: str) -> Mapping[str, str] | None:
            if (namespace, name) not in configmaps:
                try:
                    configmaps[namespace, name] = self.core.read_namespaced_config_map(name, namespace).data or {}
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    configmaps[namespace, name] = None
            return configmaps[namespace, name]

        placements = place(bpfprograms, node_labels, configmap)
        desired = node_programs(placements, node_labels)
        for node, programs in desired.items():
            self._write_nodestate(node, programs, nodestates.get(node))
        for node in sorted(set(nodestates) - set(node_labels)):
            self._delete_nodestate(node)

        reports = {p["metadata"]["name"]: p for p in bpfprograms}
        notices = []
        now = _now()
        for placement in placements:
            body = reports[placement.name]
            node_reports: dict[str, list[Mapping[str, Any]]] = {}
            for node in placement.nodes:
                entries = [
                    e
                    for e in ((nodestates.get(node) or {}).get("status") or {}).get("programs") or []
                    if e.get("bpfProgram") == placement.name
                ]
                node_reports[node] = entries
            previous = body.get("status") or {}
            status = aggregate(placement, node_reports, previous, placement.deleting, now)
            if _normal_status(status) == _normal_status(previous):
                continue
            self._patch_status(placement.name, status)
            if status["phase"] != previous.get("phase"):
                notices.append(self._notice(body, status))
        return notices

    def _post(self, notice: Notice) -> None:
        """Create a core/v1 Event; events of cluster-scoped objects live in `default`, as kubectl expects."""
        meta = notice.body["metadata"]
        now = dt.datetime.now(dt.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace="default"),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}", kind="BpfProgram", name=meta["name"], uid=meta.get("uid")
            ),
            type=notice.type,
            reason=notice.reason,
            message=notice.message[:1024],
            source=client.V1EventSource(component="beekeeper-operator"),
            reporting_component="beekeeper.dev/operator",
            reporting_instance="beekeeper-operator",
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self.core.create_namespaced_event("default", event)
        except ApiException as exc:
            log.warning("posting event failed", extra={"reason": notice.reason, "status": exc.status})

    def _notice(self, body: Mapping[str, Any], status: Mapping[str, Any]) -> Notice:
        phase = status["phase"]
        cond = {c["type"]: c for c in status["conditions"]}
        if phase == "Degraded":
            return Notice(body, "Warning", "Degraded", cond["Degraded"]["message"])
        if phase == "Ready":
            return Notice(body, "Normal", "Ready", cond["Ready"]["message"])
        return Notice(body, "Normal", phase, cond["Ready"]["message"])

    def _write_nodestate(self, node: str, programs: list[dict[str, Any]], existing: Mapping[str, Any] | None) -> None:
        if existing is not None:
            if _normal_programs((existing.get("spec") or {}).get("programs")) == programs:
                return
            body = {"spec": {"programs": programs}}
            self.custom.patch_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node, body)
            log.info("bpfnodestate updated", extra={"node": node, "bpfprograms": len(programs)})
            return
        node_obj = self.core.read_node(node)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": BPF_NODE_STATE.kind,
            "metadata": {
                "name": node,
                "labels": {"app.kubernetes.io/managed-by": "beekeeper"},
                # The garbage collector removes the state with its Node, even if the operator is down.
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_obj.metadata.uid}],
            },
            "spec": {"nodeName": node, "programs": programs},
        }
        try:
            self.custom.create_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, body)
            log.info("bpfnodestate created", extra={"node": node, "bpfprograms": len(programs)})
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.custom.patch_cluster_custom_object(
                GROUP, VERSION, BPF_NODE_STATE_PLURAL, node, {"spec": {"programs": programs}}
            )

    def _delete_nodestate(self, node: str) -> None:
        try:
            self.custom.delete_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node)
            log.info("bpfnodestate deleted with its node", extra={"node": node})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _patch_status(self, name: str, status: dict[str, Any]) -> None:
        try:
            self.custom.patch_cluster_custom_object_status(GROUP, VERSION, BPF_PROGRAM_PLURAL, name, {"status": status})
            log.info(
                "bpfprogram status", extra={"bpfprogram": name, "phase": status["phase"], "ready": status["ready"]}
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                raise
