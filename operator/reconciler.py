"""The operator's one control loop: cache snapshot → pure desired state → minimal API writes.

Every change (BpfProgram, Node, BpfNodeState status, referenced ConfigMap, Pod, Namespace,
NetworkIdentityPolicy, NetworkIdentity) only wakes this loop; bursts coalesce into one pass.
A pass writes a BpfNodeState only when its desired spec (programs and network policy)
differs and a status only when the aggregate differs, so restarts and resyncs cause no
churn. Identities are persisted before any node state names them, and collected only after
the node states stopped naming them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from beekeeper.crds.bpfprogram import BpfProgramStatus
from beekeeper.crds.common import ApiModel, timestamp
from beekeeper.crds.names import (
    BPF_NODE_STATE,
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE,
    BPF_POLICY_SLICE_PLURAL,
    BPF_PROGRAM_PLURAL,
    GROUP,
    NETWORK_IDENTITY_PLURAL,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
)
from beekeeper.crds.networkpolicy import NetworkIdentityPolicyStatus
from beekeeper.crds.nodestate import NodeNetworkPolicy, NodeProgram
from beekeeper.operator import policy_status
from beekeeper.operator.cache import ClusterCache, Snapshot, program_reports
from beekeeper.operator.desired_state import node_programs, place
from beekeeper.operator.identities import (
    IdentityKey,
    gc_grace_seconds,
    identity_body,
    parse_identities,
    parse_identity,
    plan_identities,
)
from beekeeper.operator.pods import PodRecord, pod_records
from beekeeper.operator.policy_compile import compile_policies, expansion_budget, node_addresses
from beekeeper.operator.program_status import aggregate

log = logging.getLogger(__name__)

RESYNC_SECONDS = 60.0
DEBOUNCE_SECONDS = 0.05
IDENTITY_ALLOCATION_ROUNDS = 5
"""Re-plans after 409 conflicts (another writer took a number) before a pass gives up on the rest."""
NETWORK_POLICY_FIELDS = ("endpoints", "ipcache", "cidrIdentities", "rules", "slices")
"""spec.networkPolicy lists; the operator writes all of them (a merge patch replaces only what it names)."""


@dataclass
class Notice:
    """A Kubernetes Event about a BpfProgram transition (shown by `kubectl describe`)."""

    body: Mapping[str, Any]
    type: str
    reason: str
    message: str


@dataclass
class PassResult:
    """What a pass hands back to the event loop."""

    notices: list[Notice] = field(default_factory=list)
    identities_created: list[dict[str, Any]] = field(default_factory=list)
    identities_deleted: list[str] = field(default_factory=list)
    wake_in: float | None = None
    """Seconds until an unused identity's grace period ends and a pass should collect it."""


@dataclass
class Identities:
    """One pass's persisted identities and the collection due after the node states are written."""

    assigned: dict[IdentityKey, int]
    created: list[dict[str, Any]]
    delete: list[int]
    next_gc: float | None


def _normal_programs(entries: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Stored entries carry apiserver defaults; round-trip through the model to compare like with like."""
    try:
        return [NodeProgram.model_validate(e).to_dict() for e in entries or []]
    except ValidationError:
        return [dict(e) for e in entries or []]


def _same_network_policy(stored: Mapping[str, Any] | None, desired: Mapping[str, Any] | None) -> bool:
    """Whether the stored spec.networkPolicy already is the desired one (which names every list).

    The stored form is normally byte for byte what was written, so that is compared first;
    only when it differs is it read through the model (apiserver defaults, hand edits).
    """
    if stored is None or desired is None:
        return stored is desired
    if {k: stored.get(k) or [] for k in NETWORK_POLICY_FIELDS} == desired:
        return True
    try:
        wire = NodeNetworkPolicy.model_validate(stored).to_dict()
    except ValidationError:
        return False
    return {k: wire.get(k) or [] for k in NETWORK_POLICY_FIELDS} == desired


def _normal(model: type[ApiModel], status: Mapping[str, Any] | None) -> dict[str, Any]:
    """A status as the model writes it, so a stored and a computed one compare like with like."""
    try:
        return model.model_validate(status or {}).to_dict()
    except ValidationError:
        return dict(status or {})


class Reconciler:
    """Computes and writes desired state; beyond the cache it only remembers since when identities are unused."""

    def __init__(self, api: client.ApiClient, cache: ClusterCache) -> None:
        self.cache = cache
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.identity_gc_grace = gc_grace_seconds()
        self.expansion_budget = expansion_budget()
        self._unused_since: dict[int, float] = {}
        """Identity number -> time.monotonic() it was first seen unused (touched by the pass thread only)."""

    async def prime(self) -> None:
        """One full list of every input before the first decision."""

        def list_all() -> dict[str, list[dict[str, Any]]]:
            def custom(plural: str) -> list[dict[str, Any]]:
                return self.custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]

            def core(items: Iterable[Any]) -> list[dict[str, Any]]:
                return [self.core.api_client.sanitize_for_serialization(i) for i in items]

            return {
                "BpfProgram": custom(BPF_PROGRAM_PLURAL),
                "BpfNodeState": custom(BPF_NODE_STATE_PLURAL),
                "NetworkIdentityPolicy": custom(NETWORK_IDENTITY_POLICY_PLURAL),
                "NetworkIdentity": custom(NETWORK_IDENTITY_PLURAL),
                "BpfPolicySlice": custom(BPF_POLICY_SLICE_PLURAL),
                "Node": core(self.core.list_node().items),
                "Namespace": core(self.core.list_namespace().items),
                "Pod": core(self.core.list_pod_for_all_namespaces().items),
            }

        for kind, items in (await asyncio.to_thread(list_all)).items():
            self.cache.replace(kind, items)
        self.cache.primed.set()
        log.info(
            "cache primed",
            extra={kind.lower(): len(table) for kind, table in self.cache.tables.items()},
        )

    async def run(self) -> None:
        """Forever: wait for a change (or the resync period), coalesce, reconcile once."""
        await self.cache.primed.wait()
        timeout = RESYNC_SECONDS
        while True:
            with contextlib.suppress(TimeoutError):  # the resync period passed: reconcile anyway
                await asyncio.wait_for(self.cache.changed.wait(), timeout=timeout)
            await asyncio.sleep(DEBOUNCE_SECONDS)
            self.cache.changed.clear()
            try:
                result = await asyncio.to_thread(self.reconcile, self.cache.snapshot())
            except Exception:
                log.exception("reconcile pass failed; retrying")
                await asyncio.sleep(1)
                self.cache.changed.set()
                continue
            # Our own identity writes, so the next pass sees them even before their watch events.
            for body in result.identities_created:
                self.cache.observe("NetworkIdentity", "ADDED", body, wake=False)
            for name in result.identities_deleted:
                self.cache.observe("NetworkIdentity", "DELETED", {"metadata": {"name": name}}, wake=False)
            timeout = min(RESYNC_SECONDS, result.wake_in) if result.wake_in is not None else RESYNC_SECONDS
            for notice in result.notices:
                await asyncio.to_thread(self._post, notice)

    def reconcile(self, snapshot: Snapshot) -> PassResult:
        """One pass; returns the Events to post and the cache updates. Runs in a worker thread (blocking client)."""
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

        bpfprograms, nodestates = snapshot.bpfprograms, snapshot.nodestates
        node_labels = snapshot.node_labels()
        placements = place(bpfprograms, node_labels, configmap)
        desired = node_programs(placements, node_labels)

        pods = pod_records(snapshot.pods, snapshot.namespaces)
        identities = self._allocate(pods, snapshot.identities)
        compiled = compile_policies(
            snapshot.policies,
            pods,
            identities.assigned,
            {node: node_addresses(snapshot.nodes[node]) for node in node_labels},
            self.expansion_budget,
        )
        slices_by_node: dict[str, dict[str, Mapping[str, Any]]] = {}
        for name, body in snapshot.policy_slices.items():
            slices_by_node.setdefault((body.get("spec") or {}).get("nodeName", ""), {})[name] = body
        enforcement: dict[str, policy_status.NodeEnforcement] = {}
        for node, programs in desired.items():
            existing = nodestates.get(node)
            stored_slices = slices_by_node.pop(node, {})
            network_policy, slice_errors = self._write_slices(
                node,
                compiled.nodes.get(node),
                compiled.slices.get(node) or {},
                stored_slices,
                existing,
                snapshot.nodes[node],
            )
            try:
                generation = self._write_nodestate(node, programs, network_policy, existing)
                error = None
                self._delete_slices(
                    set(stored_slices) - {r["name"] for r in (network_policy or {}).get("slices") or []}
                )
            except ApiException as exc:
                if exc.status is None or not 400 <= exc.status < 500:
                    raise
                generation, error = None, f"{exc.status} {exc.reason}"
                log.error("bpfnodestate not written", extra={"node": node, "status": exc.status, "reason": exc.reason})
            reported = ((existing or {}).get("status") or {}).get("networkPolicy")
            enforcement[node] = policy_status.NodeEnforcement(generation, reported, error, slice_errors)
        for node in sorted(set(nodestates) - set(node_labels)):
            self._delete_nodestate(node)
        for stale in slices_by_node.values():  # of nodes that are gone
            self._delete_slices(set(stale))

        reports = {p["metadata"]["name"]: p for p in bpfprograms}
        result = PassResult(identities_created=identities.created)
        now = timestamp()
        for placement in placements:
            body = reports[placement.name]
            previous = body.get("status") or {}
            node_reports = program_reports(nodestates, placement.name)
            status = aggregate(placement, node_reports, previous, placement.deleting, now)
            if _normal(BpfProgramStatus, status) == _normal(BpfProgramStatus, previous):
                continue
            self._patch_status(placement.name, status)
            if status["phase"] != previous.get("phase"):
                result.notices.append(self._notice(body, status))

        previous_policy_status = {
            f"{b['metadata']['namespace']}/{b['metadata']['name']}": b.get("status") for b in snapshot.policies
        }
        for ref, outcome in compiled.policies.items():
            previous = previous_policy_status.get(ref)
            status = policy_status.aggregate(outcome, enforcement, previous, now)
            if _normal(NetworkIdentityPolicyStatus, status) != _normal(NetworkIdentityPolicyStatus, previous):
                self._patch_policy_status(outcome.namespace, outcome.name, status)

        result.identities_deleted = self._collect(identities.delete)
        if identities.next_gc is not None:
            result.wake_in = max(0.0, identities.next_gc - time.monotonic())
        return result

    def _allocate(self, pods: list[PodRecord], identity_bodies: list[dict[str, Any]]) -> Identities:
        """Give every pod's label set a persisted number before anything names it.

        A 409 means another writer took the number: adopt it if it stands for the same label
        set, otherwise re-plan around it. A label set the API refuses (e.g. too many labels)
        gets no identity, so its pods are left out of the datapath rather than failing the pass.
        """
        existing = parse_identities(identity_bodies)
        wanted = {pod.key for pod in pods}
        created: list[dict[str, Any]] = []
        for _ in range(IDENTITY_ALLOCATION_ROUNDS):
            plan = plan_identities(wanted, existing, self._unused_since, time.monotonic(), self.identity_gc_grace)
            conflicts = False
            for number, key in plan.create.items():
                body = self._create_identity(number, key)
                if body is None:
                    wanted.discard(key)
                    continue
                parsed = parse_identity(body)
                existing[number] = parsed[1] if parsed else None
                if existing[number] == key:
                    created.append(body)
                else:
                    conflicts = True
            if not conflicts:
                break
        self._unused_since = plan.unused_since
        assigned = {key: number for key, number in plan.assigned.items() if existing.get(number) == key}
        return Identities(assigned, created, plan.delete, plan.next_gc)

    def _create_identity(self, number: int, key: IdentityKey) -> dict[str, Any] | None:
        """The object now holding `number` (ours, or another writer's on 409); None if the API refuses ours."""
        extra = {"identity": number, "namespace": key.namespace, "labels": len(key.labels)}
        try:
            body = self.custom.create_cluster_custom_object(
                GROUP, VERSION, NETWORK_IDENTITY_PLURAL, identity_body(number, key)
            )
            log.info("identity allocated", extra=extra)
            return body
        except ApiException as exc:
            if exc.status == 409:
                try:
                    return self.custom.get_cluster_custom_object(GROUP, VERSION, NETWORK_IDENTITY_PLURAL, str(number))
                except ApiException as again:
                    if again.status != 404:
                        raise
                    return {"metadata": {"name": str(number)}}  # gone meanwhile: unusable for this pass only
            if exc.status is not None and 400 <= exc.status < 500:
                log.error("identity refused by the API", extra={**extra, "status": exc.status, "reason": exc.reason})
                return None
            raise

    def _collect(self, numbers: list[int]) -> list[str]:
        """Delete identities unused for the whole grace period; returns the names gone."""
        gone = []
        for number in numbers:
            try:
                self.custom.delete_cluster_custom_object(GROUP, VERSION, NETWORK_IDENTITY_PLURAL, str(number))
                log.info("identity released", extra={"identity": number})
            except ApiException as exc:
                if exc.status != 404:
                    raise
            gone.append(str(number))
        return gone

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

    def _write_slices(
        self,
        node: str,
        network_policy: dict[str, Any] | None,
        desired: Mapping[str, dict[str, Any]],
        stored: Mapping[str, Mapping[str, Any]],
        existing: Mapping[str, Any] | None,
        node_body: Mapping[str, Any],
    ) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """Create or update the node's BpfPolicySlices that differ, before the node state lists them.

        A slice the API refuses fails only its own policy on this node (policy ref -> error):
        the node state then keeps listing that policy's previous slices, if it had any.
        Returns spec.networkPolicy with the slices list as it can be written.
        """
        errors: dict[str, str] = {}
        written: set[str] = set()
        for name, spec in sorted(desired.items()):
            if (stored.get(name) or {}).get("spec") == spec:
                continue
            try:
                self._put_slice(node, name, spec, node_body, exists=name in stored)
                written.add(name)
            except ApiException as exc:
                if exc.status is None or not 400 <= exc.status < 500:
                    raise
                errors[spec["policy"]] = f"BpfPolicySlice {name}: {exc.status} {exc.reason}"
                log.error("bpfpolicyslice not written", extra={"node": node, "slice": name, "status": exc.status})
        if not errors or network_policy is None:
            return network_policy, errors
        refs = [r for r in network_policy["slices"] if desired[r["name"]]["policy"] not in errors]
        old = (((existing or {}).get("spec") or {}).get("networkPolicy") or {}).get("slices") or []
        for policy in errors:
            # The policy's previous slices, if all of them are still as listed; else none of it.
            mine = [r for r in old if (stored.get(r["name"], {}).get("spec") or {}).get("policy") == policy]
            if all(
                r["name"] not in written and stored[r["name"]]["spec"].get("contentHash") == r["contentHash"]
                for r in mine
            ):
                refs += mine
        return {**network_policy, "slices": sorted(refs, key=lambda r: r["name"])}, errors

    def _put_slice(
        self, node: str, name: str, spec: dict[str, Any], node_body: Mapping[str, Any], exists: bool
    ) -> None:
        """Every list named (None clears one a merge patch would otherwise keep)."""
        if exists:
            patch = {"spec": {"rules": None, "ipcache": None, "cidrIdentities": None, **spec}}
            self.custom.patch_cluster_custom_object(GROUP, VERSION, BPF_POLICY_SLICE_PLURAL, name, patch)
            log.info("bpfpolicyslice updated", extra={"node": node, "slice": name, "policy": spec["policy"]})
            return
        meta = node_body.get("metadata") or {}
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": BPF_POLICY_SLICE.kind,
            "metadata": {
                "name": name,
                "labels": {"app.kubernetes.io/managed-by": "beekeeper"},
                # Gone with its Node, even if the operator is down.
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": meta.get("uid")}],
            },
            "spec": spec,
        }
        if not meta.get("uid"):
            del body["metadata"]["ownerReferences"]
        try:
            self.custom.create_cluster_custom_object(GROUP, VERSION, BPF_POLICY_SLICE_PLURAL, body)
            log.info("bpfpolicyslice created", extra={"node": node, "slice": name, "policy": spec["policy"]})
        except ApiException as exc:
            if exc.status != 409:
                raise
            self._put_slice(node, name, spec, node_body, exists=True)

    def _delete_slices(self, names: set[str]) -> None:
        """After the node states stopped listing them."""
        for name in sorted(names):
            try:
                self.custom.delete_cluster_custom_object(GROUP, VERSION, BPF_POLICY_SLICE_PLURAL, name)
                log.info("bpfpolicyslice deleted", extra={"slice": name})
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def _write_nodestate(
        self,
        node: str,
        programs: list[dict[str, Any]],
        network_policy: dict[str, Any] | None,
        existing: Mapping[str, Any] | None,
    ) -> int | None:
        """Write the node's spec if it differs; returns the state's metadata.generation afterwards."""
        spec = {"programs": programs, "networkPolicy": network_policy}
        extra = {
            "node": node,
            "bpfprograms": len(programs),
            "endpoints": len((network_policy or {}).get("endpoints") or []),
            "slices": len((network_policy or {}).get("slices") or []),
        }
        if existing is not None:
            old = existing.get("spec") or {}
            if _normal_programs(old.get("programs")) == programs and _same_network_policy(
                old.get("networkPolicy"), network_policy
            ):
                return existing["metadata"].get("generation")
            written = self.custom.patch_cluster_custom_object(
                GROUP, VERSION, BPF_NODE_STATE_PLURAL, node, {"spec": spec}
            )
            log.info("bpfnodestate updated", extra=extra)
            return written["metadata"].get("generation")
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
            "spec": {"nodeName": node, **{k: v for k, v in spec.items() if v is not None}},
        }
        try:
            written = self.custom.create_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, body)
            log.info("bpfnodestate created", extra=extra)
        except ApiException as exc:
            if exc.status != 409:
                raise
            written = self.custom.patch_cluster_custom_object(
                GROUP, VERSION, BPF_NODE_STATE_PLURAL, node, {"spec": spec}
            )
        return written["metadata"].get("generation")

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

    def _patch_policy_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, NETWORK_IDENTITY_POLICY_PLURAL, name, {"status": status}
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                raise
            return
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        log.info(
            "networkidentitypolicy status",
            extra={
                "policy": f"{namespace}/{name}",
                "ready": ready["status"],
                "reason": ready["reason"],
                "endpoints": status["selectedEndpoints"],
                "nodes": status["nodesEnforcing"],
            },
        )
