"""The operator's one control loop: cache snapshot → pure desired state → minimal API writes.

Every change (BpfProgram, Node, BpfNodeState status, referenced ConfigMap, Pod, Namespace,
NetworkIdentityPolicy, NetworkIdentity, BpfPolicySlice) only wakes this loop; bursts coalesce into one pass.
The changes the operator's own writes cause come back as watch events too: they are
recognised by the resourceVersions the writes returned and wake nothing. A pass writes a
BpfNodeState only when its desired spec (programs and network policy) differs and a status
only when the aggregate differs, so restarts and resyncs cause no churn. Identities are
persisted before any node state names them, and collected only after the node states
stopped naming them.

The BpfProgram finalizer is the reconciler's too (level-based, no stored diffbase): added
on first sight, removed once no existing node reports the program, with small merge
patches guarded by resourceVersion, so deletion completes for any object the API accepts
(kopf's annotations would not fit beside a large client-side-applied source).

The loop is supervised: a failing pass is retried with back-off, an unexpected error in
the loop itself restarts it, and both show on the health endpoint (health.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from beekeeper import kube
from beekeeper.crds.bpfprogram import BpfProgramStatus
from beekeeper.crds.common import ApiModel, timestamp
from beekeeper.crds.names import (
    API_VERSION,
    BPF_NODE_STATE,
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE,
    BPF_POLICY_SLICE_PLURAL,
    BPF_PROGRAM,
    BPF_PROGRAM_PLURAL,
    GROUP,
    NETWORK_IDENTITY_PLURAL,
    NETWORK_IDENTITY_POLICY,
    RUNTIME_SECURITY_POLICY,
    VERSION,
    ResourceNames,
)
from beekeeper.crds.networkpolicy import NetworkIdentityPolicyStatus
from beekeeper.crds.nodestate import (
    NETWORK_POLICY_FIELDS,
    NodeNetworkPolicy,
    NodeProgram,
    NodeRuntimeSecurity,
    policy_revision,
)
from beekeeper.crds.runtimesecurity import RuntimeSecurityPolicyStatus
from beekeeper.operator import image_resolver, policy_status, runtime_status
from beekeeper.operator.cache import DELETED, ClusterCache, Snapshot, object_key, program_reports, stored
from beekeeper.operator.desired_state import node_programs, place
from beekeeper.operator.events import EventRecorder, Notice, policy_notice, program_notice
from beekeeper.operator.health import Health
from beekeeper.operator.identities import (
    IdentityKey,
    IdentityReader,
    gc_grace_seconds,
    identity_body,
    parse_identity,
    plan_identities,
)
from beekeeper.operator.metrics import OperatorMetrics
from beekeeper.operator.pods import PodRecord, PodRecords
from beekeeper.operator.policy_compile import address_slice_identity, expansion_budget, node_addresses
from beekeeper.operator.policy_incremental import IncrementalCompiler
from beekeeper.operator.policy_revisions import Owners, RevisionLog, listed_endpoints
from beekeeper.operator.program_status import aggregate
from beekeeper.operator.runtime_compile import compile_runtime

log = logging.getLogger(__name__)

RESYNC_ENV = "BEEKEEPER_RESYNC_SECONDS"
"""Seconds between passes when nothing changes (default 60); the liveness bound is three of them."""
DEBOUNCE_SECONDS = 0.05
"""A change within this of the last pass's end waits until then, so a burst is coalesced into one pass."""
SETTLE_SECONDS = 0.01
"""A change after a quiet spell waits only this (the events of one client's few calls arrive together):
the 50 ms of the debounce were a sixth of a policy edit's latency."""
RETRY_MAX_SECONDS = 30.0
FINALIZER = "beekeeper.dev/detach"
"""Holds a BpfProgram until every node has detached it (the name kopf used before, so old objects keep working)."""
NODE_WRITERS = 8
"""Concurrent node-state writes per pass (the client's connection pool holds 10)."""
IDENTITY_ALLOCATION_ROUNDS = 5
"""Re-plans after 409 conflicts (another writer took a number) before a pass gives up on the rest."""


@dataclass
class PassResult:
    """What a pass hands back to the event loop."""

    notices: list[Notice] = field(default_factory=list)
    written: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    """(kind, key, the object as written or None when deleted): the pass's own writes, for the cache."""
    wake_in: float | None = None
    """Seconds until an unused identity's grace period ends and a pass should collect it."""
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds of the pass's stages (compile, nodes, statuses), for its debug log line."""


@dataclass
class Identities:
    """One pass's persisted identities and the collection due after the node states are written."""

    assigned: dict[IdentityKey, int]
    delete: list[int]
    next_gc: float | None


def _normal_programs(entries: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Stored entries carry apiserver defaults; round-trip through the model to compare like with like."""
    try:
        return [NodeProgram.model_validate(e).to_dict() for e in entries or []]
    except ValidationError:
        return [dict(e) for e in entries or []]


def _holds(stored: Mapping[str, Any] | None, content_hash: str) -> bool:
    """Whether a cached slice (cache.stored form) declares this contentHash and its entries really hash to it."""
    return stored is not None and stored.get("entriesHash") == content_hash == (stored.get("spec") or {}).get(
        "contentHash"
    )


def _same_slice(stored: Mapping[str, Any] | None, desired: Mapping[str, Any] | None) -> bool:
    """A slice spec is its contentHash (over policy and entries) plus the node it is for."""
    if stored is None or desired is None:
        return stored is desired
    return _holds(stored, desired["contentHash"]) and stored["spec"].get("nodeName") == desired.get("nodeName")


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


def _same_runtime_security(stored: Mapping[str, Any] | None, desired: Mapping[str, Any] | None) -> bool:
    """Whether the stored spec.runtimeSecurity is the desired one (read through the model: apiserver defaults)."""
    if stored is None or desired is None:
        return stored is desired
    if stored == desired:
        return True
    try:
        return NodeRuntimeSecurity.model_validate(stored).to_dict() == desired
    except ValidationError:
        return False


def _normal(model: type[ApiModel], status: Mapping[str, Any] | None) -> dict[str, Any]:
    """A status as the model writes it, so a stored and a computed one compare like with like."""
    try:
        return model.model_validate(status or {}).to_dict()
    except ValidationError:
        return dict(status or {})


def _ready(status: Mapping[str, Any]) -> dict[str, str]:
    """The Ready condition's status and reason, for a status log line."""
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    return {"ready": ready["status"], "reason": ready["reason"]}


def _describe(exc: Exception) -> str:
    """One line for logs and /healthz: the apiserver's words for a refused request."""
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}: {kube.api_message(exc)}"[:1024]
    return f"{type(exc).__name__}: {exc}"[:1024]


def resync_seconds() -> float:
    return float(os.environ.get(RESYNC_ENV) or 60)


def _slice_path(name: str | None) -> str:
    """Slices are the operator's most frequent writes: they take the client's thin JSON path (kube.request_json)."""
    return kube.custom_object_path(API_VERSION, BPF_POLICY_SLICE_PLURAL, name)


class Reconciler:
    """Computes and writes desired state; beyond the cache it only remembers since when identities are unused."""

    def __init__(self, api: client.ApiClient, cache: ClusterCache, metrics: OperatorMetrics | None = None) -> None:
        self.cache = cache
        self.metrics = metrics or OperatorMetrics()
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.events = EventRecorder(self.core)
        self.identity_gc_grace = gc_grace_seconds()
        self.expansion_budget = expansion_budget()
        self.policy_compiler = IncrementalCompiler()
        self.pod_records = PodRecords()
        self.identity_reader = IdentityReader()
        self._revisions = RevisionLog()
        self._known_same: dict[tuple[str, str], tuple[str, Mapping[str, Any]]] = {}
        """(kind, name) -> (stored resourceVersion, desired object) found or written equal: a pass whose
        compiler returned that very object for a still-unchanged stored one skips comparing them."""
        self.images = image_resolver.from_environment()
        self.resync = resync_seconds()
        self._unused_since: dict[int, float] = {}
        """Identity number -> time.monotonic() it was first seen unused (touched by the pass thread only)."""
        self._written: list[tuple[str, str, dict[str, Any] | None]] = []
        """The current pass's own writes (the pass thread and its node writers)."""
        self._writers = ThreadPoolExecutor(NODE_WRITERS, thread_name_prefix="node-writer")
        """Node states (and statuses) are written NODE_WRITERS at a time: a rollout is bound by round trips,
        not CPU."""
        self._announcer = ThreadPoolExecutor(1, thread_name_prefix="event-poster")
        """Events are posted in order behind the loop, not by it: the first pass at 10k pods announces 500
        policies Ready, 1.4 s of posts a policy edit waited behind before its pass could start."""

    async def supervise(self, health: Health) -> None:
        """Run the loop forever: an unexpected error restarts it (with back-off) instead of ending it."""
        health.update(loop_running=True)
        try:
            while True:
                try:
                    await self.run(health)
                except Exception as exc:
                    delay = min(RETRY_MAX_SECONDS, 2.0**health.restarts)
                    health.update(restarts=health.restarts + 1, last_error=_describe(exc))
                    self.metrics.restarts.inc()
                    log.exception(
                        "reconcile loop failed; restarting", extra={"restarts": health.restarts, "retryIn": delay}
                    )
                    await asyncio.sleep(delay)
        finally:
            health.update(loop_running=False)

    async def run(self, health: Health) -> None:
        """Wait for a foreign change (or the resync period), coalesce, reconcile once; again."""
        due_at = time.monotonic()  # a first pass as soon as the cache is primed, even in an empty cluster
        quiet_at = 0.0
        while True:
            try:
                await asyncio.wait_for(self.cache.changed.wait(), timeout=max(0.0, due_at - time.monotonic()))
                due = False
            except TimeoutError:  # the resync period (or a retry back-off, or an identity's grace) passed
                due = True
            await asyncio.sleep(max(SETTLE_SECONDS, quiet_at - time.monotonic()))
            if not self.cache.primed.is_set():
                log.info("waiting for the informers' listings")
                await self.cache.primed.wait()
            if not health.primed:
                health.update(primed=True)
                log.info("cache primed", extra={kind.lower(): len(t) for kind, t in self.cache.tables.items()})
            dirty = self.cache.take_dirty()
            if not dirty and not due:
                continue  # only the operator's own writes came back
            health.pass_began()
            started = time.monotonic()
            try:
                result = await asyncio.to_thread(self.reconcile, self.cache.snapshot())
            except Exception as exc:
                health.pass_failed(_describe(exc))
                self.metrics.duration.observe(time.monotonic() - started)
                self.metrics.passes.labels("error").inc()
                self.metrics.errors.inc()
                delay = min(RETRY_MAX_SECONDS, 2.0 ** (health.consecutive_failures - 1))
                log.error(
                    "reconcile pass failed; retrying",
                    exc_info=True,
                    extra={"failures": health.consecutive_failures, "retryIn": delay, "changes": len(dirty)},
                )
                await asyncio.sleep(delay)
                due_at = time.monotonic()
                continue
            for kind, key, body in result.written:  # seen by the next pass even before their watch events
                self.cache.record_own(kind, body, key)
            health.pass_done()
            quiet_at = time.monotonic() + DEBOUNCE_SECONDS
            self.metrics.duration.observe(time.monotonic() - started)
            self.metrics.passes.labels("success").inc()
            self.metrics.last_pass.set_to_current_time()
            shown = ", ".join(f"{kind}/{key}" for kind, key in sorted(dirty)[:5])
            log.debug(
                "reconcile pass",
                extra={
                    "seconds": round(time.monotonic() - started, 3),
                    "changes": len(dirty),
                    "changed": shown,
                    "writes": len(result.written),
                    **{f"{stage}Seconds": round(seconds, 3) for stage, seconds in result.stages.items()},
                },
            )
            wait = min(self.resync, result.wake_in) if result.wake_in is not None else self.resync
            due_at = time.monotonic() + wait
            for notice in result.notices:
                self._announcer.submit(self.events.post, notice)  # post() logs its failures, never raises

    def _wrote(self, kind: str, answer: object, spec: Mapping[str, Any] | None = None) -> None:
        """Note an own write: its watch event must not wake the loop, the next pass must see it.

        spec: what was written, kept in place of the answer's copy of it (a slice's endpoints are the
        compiler's very objects then, not a second copy of every node's pods)."""
        body = cast(Mapping[str, Any], answer)  # the client types its JSON answers `object`
        key = object_key(kind, body)
        self.cache.own.expect(kind, key, str(body["metadata"]["resourceVersion"]))
        # Kept as the cache will store it: a first pass at 10k pods writes 5,000 slices, whose answers
        # held whole until the pass ended were the operator's peak memory.
        kept = body if spec is None else {"metadata": body["metadata"], "spec": spec}
        self._written.append((kind, key, stored(kind, kept, own=True)))

    def _deleted(self, kind: str, key: str) -> None:
        self.cache.own.expect(kind, key, DELETED)
        self._written.append((kind, key, None))

    def reconcile(self, snapshot: Snapshot) -> PassResult:
        """One pass; returns the Events to post and the cache updates. Runs in a worker thread (blocking client)."""
        self._written = []
        result = PassResult()
        began = time.monotonic()
        bpfprograms, nodestates = snapshot.bpfprograms, snapshot.nodestates
        for body in bpfprograms:
            self._hold(body)
        node_labels = snapshot.node_labels()
        placements = place(bpfprograms, node_labels, snapshot.configmap, snapshot.binary_configmap, self.images.resolve)

        def running(node: str, name: str) -> Mapping[str, Any] | None:
            spec = (nodestates.get(node) or {}).get("spec") or {}
            return next((e for e in spec.get("programs") or [] if e.get("bpfProgram") == name), None)

        desired = node_programs(placements, node_labels, running)

        pods = self.pod_records(snapshot.pods, snapshot.namespaces)
        identities = self._allocate(pods, snapshot.identities)
        compiled = self.policy_compiler.compile(
            snapshot.policies,
            pods,
            identities.assigned,
            {node: node_addresses(snapshot.nodes[node]) for node in node_labels},
            self.expansion_budget,
        )
        runtime = compile_runtime(snapshot.runtime_policies, snapshot.pods, node_labels)
        slices_by_node: dict[str, dict[str, Mapping[str, Any]]] = {}
        for name, body in snapshot.policy_slices.items():
            slices_by_node.setdefault((body.get("spec") or {}).get("nodeName", ""), {})[name] = body

        selected = {ref: outcome.selected for ref, outcome in compiled.policies.items()}

        def sync(node: str) -> policy_status.NodeEnforcement:
            """One node's slices and node state (nodes are independent: several are written at once)."""
            existing = nodestates.get(node)
            stored_slices = slices_by_node.get(node, {})
            desired_slices = compiled.slices.get(node) or {}
            readers = compiled.readers.get(node) or {}

            def owners(name: str) -> set[str]:
                """The policies a slice of this node concerns (its own; for addresses, those naming them)."""
                spec = desired_slices.get(name) or (stored_slices.get(name) or {}).get("spec") or {}
                if spec.get("policy"):
                    return {spec["policy"]}
                identity = address_slice_identity(name)
                return readers.get(identity, set()) if identity is not None else set()

            network_policy, slice_errors = self._write_slices(
                node,
                compiled.nodes.get(node),
                desired_slices,
                stored_slices,
                existing,
                snapshot.nodes[node],
                owners,
            )
            try:
                node_uid = (snapshot.nodes[node].get("metadata") or {}).get("uid")
                generation, revision = self._write_nodestate(
                    node, desired[node], network_policy, existing, node_uid, runtime.nodes.get(node)
                )
                old_policy = ((existing or {}).get("spec") or {}).get("networkPolicy")
                if network_policy is not None and revision != (old_policy or {}).get("revision"):
                    held = {n: b["spec"] for n, b in stored_slices.items() if _holds(b, b["spec"].get("contentHash"))}
                    endpoints = (
                        listed_endpoints(old_policy, held),
                        listed_endpoints(network_policy, desired_slices, held),
                    )
                    new_policy = {**network_policy, "revision": revision}
                    self._revisions.record(node, old_policy, new_policy, owners, selected, endpoints)
                error = None
                self._delete_slices(
                    set(stored_slices) - {r["name"] for r in (network_policy or {}).get("slices") or []}
                )
            except ApiException as exc:
                if exc.status is None or not 400 <= exc.status < 500:
                    raise
                generation, revision, error = None, None, _describe(exc)
                log.error("bpfnodestate not written", extra={"node": node, "error": error})
            reported = ((existing or {}).get("status") or {}).get("networkPolicy")
            return policy_status.NodeEnforcement(
                generation, reported, error, revision, slice_errors, self._revisions.node(node)
            )

        # One task per writer, each taking every NODE_WRITERS-th node: a pass whose nodes mostly need
        # no write then costs a few thread hand-offs, not one per node.
        def sync_share(nodes: list[str]) -> list[tuple[str, policy_status.NodeEnforcement]]:
            return [(node, sync(node)) for node in nodes]

        shares = [list(desired)[i::NODE_WRITERS] for i in range(NODE_WRITERS)]
        compiled_at = time.monotonic()
        enforcement = dict(pair for pairs in self._writers.map(sync_share, shares) for pair in pairs)
        written_at = time.monotonic()
        for node in desired:
            slices_by_node.pop(node, None)
        for node in sorted(set(nodestates) - set(node_labels)):
            self._delete_nodestate(node)
        for stale in slices_by_node.values():  # of nodes that are gone
            self._delete_slices(set(stale))

        reports = {p["metadata"]["name"]: p for p in bpfprograms}
        now = timestamp()
        for placement in placements:
            body = reports[placement.name]
            if placement.deleting and self._release(body, nodestates, snapshot.nodes):
                continue
            previous = body.get("status") or {}
            node_reports = program_reports(nodestates, placement.name)
            status = aggregate(placement, node_reports, previous, placement.deleting, now)
            if _normal(BpfProgramStatus, status) == _normal(BpfProgramStatus, previous):
                continue
            self._apply_status(
                BPF_PROGRAM,
                {"name": placement.name},
                status,
                {"bpfprogram": placement.name, "phase": status["phase"], "ready": status["ready"]},
            )
            if status["phase"] != previous.get("phase"):
                result.notices.append(program_notice(body, status))

        policy_bodies = {f"{b['metadata']['namespace']}/{b['metadata']['name']}": b for b in snapshot.policies}
        statuses: list[tuple[dict[str, str], dict[str, Any], dict[str, Any]]] = []
        for ref, outcome in compiled.policies.items():
            previous = policy_bodies[ref].get("status") if ref in policy_bodies else None
            status = policy_status.aggregate(outcome, enforcement, previous, now)
            if _normal(NetworkIdentityPolicyStatus, status) != _normal(NetworkIdentityPolicyStatus, previous):
                summary = {
                    "policy": ref,
                    **_ready(status),
                    "endpoints": status["selectedEndpoints"],
                    "nodes": status["nodesEnforcing"],
                }
                statuses.append(({"name": outcome.name, "namespace": outcome.namespace}, status, summary))
                notice = policy_notice(policy_bodies[ref], status, previous) if ref in policy_bodies else None
                if notice is not None:
                    result.notices.append(notice)
        # Independent objects, written NODE_WRITERS at a time: 500 policies going Ready took 3.5 s one by one.
        list(self._writers.map(lambda item: self._apply_status(NETWORK_IDENTITY_POLICY, *item), statuses))

        reported_runtime = {n: (b.get("status") or {}).get("runtimeSecurity") for n, b in nodestates.items()}
        previous_runtime_status = {
            f"{b['metadata']['namespace']}/{b['metadata']['name']}": b.get("status") for b in snapshot.runtime_policies
        }
        for ref, runtime_outcome in runtime.policies.items():
            previous = previous_runtime_status.get(ref)
            status = runtime_status.aggregate(runtime_outcome, runtime.nodes, reported_runtime, previous, now)
            if _normal(RuntimeSecurityPolicyStatus, status) != _normal(RuntimeSecurityPolicyStatus, previous):
                self._apply_status(
                    RUNTIME_SECURITY_POLICY,
                    {"name": runtime_outcome.name, "namespace": runtime_outcome.namespace},
                    status,
                    {
                        "policy": ref,
                        **_ready(status),
                        "pods": status["selectedPods"],
                        "nodes": status["nodesEnforcing"],
                        "matches": status["matches"],
                    },
                )

        result.stages = {
            "compile": compiled_at - began,
            "nodes": written_at - compiled_at,
            "statuses": time.monotonic() - written_at,
        }
        self._collect(identities.delete)
        result.written = self._written
        if identities.next_gc is not None:
            result.wake_in = max(0.0, identities.next_gc - time.monotonic())
        image_retry = self.images.retry_in()
        if image_retry is not None:  # a registry call failed: the next pass tries again after its back-off
            result.wake_in = min(result.wake_in if result.wake_in is not None else image_retry, image_retry)
        return result

    def _allocate(self, pods: list[PodRecord], identity_bodies: list[dict[str, Any]]) -> Identities:
        """Give every pod's label set a persisted number before anything names it.

        A 409 means another writer took the number: adopt it if it stands for the same label
        set, otherwise re-plan around it. A label set the API refuses (e.g. too many labels)
        gets no identity, so its pods are left out of the datapath rather than failing the pass.
        """
        existing = self.identity_reader(identity_bodies)
        wanted = {pod.key for pod in pods}
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
                if existing[number] != key:
                    conflicts = True
            if not conflicts:
                break
        self._unused_since = plan.unused_since
        assigned = {key: number for key, number in plan.assigned.items() if existing.get(number) == key}
        return Identities(assigned, plan.delete, plan.next_gc)

    def _create_identity(self, number: int, key: IdentityKey) -> dict[str, Any] | None:
        """The object now holding `number` (ours, or another writer's on 409); None if the API refuses ours."""
        extra = {"identity": number, "namespace": key.namespace, "labels": len(key.labels)}
        try:
            body = self.custom.create_cluster_custom_object(
                GROUP, VERSION, NETWORK_IDENTITY_PLURAL, identity_body(number, key)
            )
            self._wrote("NetworkIdentity", body)
            self.metrics.identity_changes.labels("allocated").inc()
            log.info("identity allocated", extra=extra)
            return cast(dict[str, Any], body)
        except ApiException as exc:
            if exc.status == 409:
                try:
                    body = self.custom.get_cluster_custom_object(GROUP, VERSION, NETWORK_IDENTITY_PLURAL, str(number))
                    return cast(dict[str, Any], body)
                except ApiException as again:
                    if again.status != 404:
                        raise
                    return {"metadata": {"name": str(number)}}  # gone meanwhile: unusable for this pass only
            if exc.status is not None and 400 <= exc.status < 500:
                log.error("identity refused by the API", extra={**extra, "status": exc.status, "reason": exc.reason})
                return None
            raise

    def _collect(self, numbers: list[int]) -> None:
        """Delete identities unused for the whole grace period."""
        for number in numbers:
            try:
                self.custom.delete_cluster_custom_object(GROUP, VERSION, NETWORK_IDENTITY_PLURAL, str(number))
                self.metrics.identity_changes.labels("released").inc()
                log.info("identity released", extra={"identity": number})
            except ApiException as exc:
                if exc.status != 404:
                    raise
            self._deleted("NetworkIdentity", str(number))

    def _hold(self, body: Mapping[str, Any]) -> None:
        """Add the finalizer to a BpfProgram that lacks it (before any node is told to run it)."""
        meta = body["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp") or FINALIZER in finalizers:
            return
        self._patch_finalizers(meta, [*finalizers, FINALIZER])

    def _release(self, body: Mapping[str, Any], nodestates: Mapping[str, Any], nodes: Mapping[str, Any]) -> bool:
        """Remove the finalizer of a deleted BpfProgram once no existing node reports it; True when done."""
        meta = body["metadata"]
        waiting = sorted(node for node in program_reports(nodestates, meta["name"]) if node in nodes)
        if waiting:
            log.debug("waiting for nodes to detach", extra={"bpfprogram": meta["name"], "nodes": len(waiting)})
            return False
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER in finalizers:
            self._patch_finalizers(meta, [f for f in finalizers if f != FINALIZER])
            log.info("detached from every node", extra={"bpfprogram": meta["name"]})
        return True

    def _patch_finalizers(self, meta: Mapping[str, Any], finalizers: list[str]) -> None:
        """A merge patch of metadata.finalizers only, guarded by resourceVersion (409: the change wakes a pass)."""
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        try:
            written = self.custom.patch_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, meta["name"], patch)
        except ApiException as exc:
            if exc.status in (404, 409):  # gone, or changed meanwhile: its watch event brings the next pass
                return
            raise
        self._wrote("BpfProgram", written)

    def _write_slices(
        self,
        node: str,
        network_policy: dict[str, Any] | None,
        desired: Mapping[str, dict[str, Any]],
        stored: Mapping[str, Mapping[str, Any]],
        existing: Mapping[str, Any] | None,
        node_body: Mapping[str, Any],
        owners: Owners,
    ) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """Create or update the node's BpfPolicySlices that differ, before the node state lists them.

        A slice the API refuses fails only the policies it concerns on this node (policy ref ->
        error). The node state then keeps listing the previous version of what failed, where it is
        still stored as listed: all of a failed policy's own slices or none of them (their rules
        together are the policy), an identity's address slices one by one (addresses are
        independent entries).
        Returns spec.networkPolicy with the slices list as it can be written.
        """
        errors: dict[str, str] = {}
        failed: set[str] = set()
        written: set[str] = set()
        for name, spec in sorted(desired.items()):
            if self._same(("BpfPolicySlice", name), stored.get(name), spec, _same_slice):
                continue
            try:
                self._put_slice(node, name, spec, node_body, exists=name in stored)
                written.add(name)
            except ApiException as exc:
                if exc.status is None or not 400 <= exc.status < 500:
                    raise
                failed.add(name)
                for ref in owners(name):
                    errors.setdefault(ref, f"BpfPolicySlice {name}: {exc.status} {exc.reason}")
                log.error("bpfpolicyslice not written", extra={"node": node, "slice": name, "status": exc.status})
        if not failed or network_policy is None:
            return network_policy, errors
        policies = {desired[name]["policy"] for name in failed if desired[name].get("policy")}
        refs = [
            r
            for r in network_policy["slices"]
            if r["name"] not in failed and desired[r["name"]].get("policy") not in policies
        ]
        old = (((existing or {}).get("spec") or {}).get("networkPolicy") or {}).get("slices") or []

        def kept(ref: Mapping[str, Any]) -> bool:
            return ref["name"] not in written and _holds(stored.get(ref["name"]), ref["contentHash"])

        for policy in policies:
            mine = [r for r in old if (stored.get(r["name"], {}).get("spec") or {}).get("policy") == policy]
            if all(kept(r) for r in mine):
                refs += mine
        refs += [r for r in old if r["name"] in failed and not desired[r["name"]].get("policy") and kept(r)]
        return {**network_policy, "slices": sorted(refs, key=lambda r: r["name"])}, errors

    def _same(
        self,
        key: tuple[str, str],
        stored: Mapping[str, Any] | None,
        desired: Mapping[str, Any] | None,
        compare: Callable[[Mapping[str, Any] | None, Mapping[str, Any] | None], bool],
    ) -> bool:
        """compare(stored, desired), skipped when both are what an earlier pass found (or wrote) equal."""
        version = ((stored or {}).get("metadata") or {}).get("resourceVersion")
        known = self._known_same.get(key)
        if desired is not None and known is not None and known[0] == version and known[1] is desired:
            return True
        if not compare(stored, desired):
            return False
        if desired is not None and version is not None:
            self._known_same[key] = (version, desired)
        return True

    def _written_same(self, key: tuple[str, str], written: object, desired: Mapping[str, Any]) -> None:
        body = cast(Mapping[str, Any], written)  # the client types its JSON answers `object`
        self._known_same[key] = (str(body["metadata"]["resourceVersion"]), desired)

    def _put_slice(
        self, node: str, name: str, spec: dict[str, Any], node_body: Mapping[str, Any], exists: bool
    ) -> None:
        """Every list named (None clears one a merge patch would otherwise keep)."""
        if exists:
            patch = {"spec": {"rules": None, "ipcache": None, "cidrIdentities": None, "endpoints": None, **spec}}
            api = self.custom.api_client
            written = kube.request_json(api, "PATCH", _slice_path(name), patch, content_type=kube.MERGE_PATCH)
            self._wrote("BpfPolicySlice", written, spec)
            self._written_same(("BpfPolicySlice", name), written, spec)
            log.info("bpfpolicyslice updated", extra={"node": node, "slice": name, "policy": spec.get("policy")})
            return
        meta = node_body.get("metadata") or {}
        body: dict[str, Any] = {
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
            written = kube.request_json(self.custom.api_client, "POST", _slice_path(None), body)
            self._wrote("BpfPolicySlice", written, spec)
            self._written_same(("BpfPolicySlice", name), written, spec)
            log.info("bpfpolicyslice created", extra={"node": node, "slice": name, "policy": spec.get("policy")})
        except ApiException as exc:
            if exc.status != 409:
                raise
            self._put_slice(node, name, spec, node_body, exists=True)

    def _delete_slices(self, names: set[str]) -> None:
        """After the node states stopped listing them."""
        for name in sorted(names):
            try:
                kube.request_json(self.custom.api_client, "DELETE", _slice_path(name))
                log.info("bpfpolicyslice deleted", extra={"slice": name})
            except ApiException as exc:
                if exc.status != 404:
                    raise
            self._deleted("BpfPolicySlice", name)
            self._known_same.pop(("BpfPolicySlice", name), None)

    def _write_nodestate(
        self,
        node: str,
        programs: list[dict[str, Any]],
        network_policy: dict[str, Any] | None,
        existing: Mapping[str, Any] | None,
        node_uid: str | None,
        runtime_security: dict[str, Any] | None = None,
    ) -> tuple[int | None, str | None]:
        """Write the node's spec if it differs; returns its generation and networkPolicy.revision afterwards."""
        old_policy = ((existing or {}).get("spec") or {}).get("networkPolicy")
        same_policy = self._same(
            ("BpfNodeState", node),
            existing,
            network_policy,
            lambda _, desired: _same_network_policy(old_policy, desired),
        )
        revision = None
        if network_policy is not None:  # hashed only when it changed: the stored revision stands for it otherwise
            revision = ((old_policy or {}).get("revision") if same_policy else None) or policy_revision(network_policy)
        written_policy = None if network_policy is None else {**network_policy, "revision": revision}
        spec = {"programs": programs, "networkPolicy": written_policy, "runtimeSecurity": runtime_security}
        extra = {
            "node": node,
            "bpfprograms": len(programs),
            "endpoints": len((network_policy or {}).get("endpoints") or []),
            "slices": len((network_policy or {}).get("slices") or []),
        }
        if existing is not None:
            old = existing.get("spec") or {}
            if (
                _normal_programs(old.get("programs")) == programs
                and same_policy
                and (old_policy or {}).get("revision") == revision
                and _same_runtime_security(old.get("runtimeSecurity"), runtime_security)
            ):
                return existing["metadata"].get("generation"), revision
        # One server-side apply creates or updates it: the spec and these metadata fields are the
        # operator's (a networkPolicy left out is removed), the status stays the daemon's.
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": BPF_NODE_STATE.kind,
            "metadata": {
                "name": node,
                "labels": {"app.kubernetes.io/managed-by": "beekeeper"},
                # The garbage collector removes the state with its Node, even if the operator is down.
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}],
            },
            "spec": {"nodeName": node, **spec},
        }
        if not node_uid:
            del body["metadata"]["ownerReferences"]
        written = kube.apply_custom(self.custom, BPF_NODE_STATE_PLURAL, body, kube.OPERATOR_MANAGER)
        self._wrote("BpfNodeState", written)
        if network_policy is not None:
            self._written_same(("BpfNodeState", node), written, network_policy)
        log.info("bpfnodestate created" if existing is None else "bpfnodestate updated", extra=extra)
        return written["metadata"].get("generation"), revision

    def _delete_nodestate(self, node: str) -> None:
        try:
            self.custom.delete_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node)
            log.info("bpfnodestate deleted with its node", extra={"node": node})
        except ApiException as exc:
            if exc.status != 404:
                raise
        self._deleted("BpfNodeState", node)
        self._known_same.pop(("BpfNodeState", node), None)
        self._revisions.forget(node)

    def _apply_status(
        self, names: ResourceNames, meta: dict[str, str], status: dict[str, Any], summary: dict[str, Any]
    ) -> None:
        """Server-side apply one resource's whole status as the operator, the same way for every kind.

        The status is the operator's alone: a field (or map key, e.g. a hook no node uses any more)
        it leaves out is removed, where a merge patch would keep it. `summary` goes to the log line.
        """
        body = {"apiVersion": API_VERSION, "kind": names.kind, "metadata": meta, "status": status}
        try:
            written = kube.apply_custom(self.custom, names.plural, body, kube.OPERATOR_MANAGER, status=True)
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                raise
            return
        self._wrote(names.kind, written)
        log.info(f"{names.singular} status", extra=summary)
