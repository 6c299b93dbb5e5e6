"""kopf handlers: thin glue between API events, the cache and the reconciler.

Watch events only update the cache and wake the reconciler (handlers are async so they
run on the event loop that owns the cache's asyncio.Event; kopf runs sync ones in threads); the single decision-making
path lives in reconciler.py over the pure functions of desired_state.py, program_status.py,
identities.py, policy_compile.py and policy_status.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from beekeeper import kube
from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE_PLURAL,
    BPF_PROGRAM_PLURAL,
    GROUP,
    NETWORK_IDENTITY_PLURAL,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
)
from beekeeper.operator.cache import ClusterCache
from beekeeper.operator.reconciler import Reconciler

log = logging.getLogger(__name__)

FINALIZER = "beekeeper.dev/detach"


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Configure kopf, prime the cache with one full list, then start the reconcile loop."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="beekeeper.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="beekeeper.dev")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    memo.cache = ClusterCache()
    memo.reconciler = Reconciler(kube.api_client(), memo.cache)
    await memo.reconciler.prime()
    memo.loop_task = asyncio.create_task(memo.reconciler.run(), name="beekeeper-reconciler")


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("loop_task")
    if task is not None:
        task.cancel()


# (group, version, plural) -> cache kind: every watched input only updates the cache.
WATCHED = {
    (GROUP, VERSION, BPF_PROGRAM_PLURAL): "BpfProgram",
    ("", "v1", "nodes"): "Node",
    (GROUP, VERSION, BPF_NODE_STATE_PLURAL): "BpfNodeState",
    ("", "v1", "pods"): "Pod",
    ("", "v1", "namespaces"): "Namespace",
    (GROUP, VERSION, NETWORK_IDENTITY_POLICY_PLURAL): "NetworkIdentityPolicy",
    (GROUP, VERSION, NETWORK_IDENTITY_PLURAL): "NetworkIdentity",
    (GROUP, VERSION, BPF_POLICY_SLICE_PLURAL): "BpfPolicySlice",
}


def _observer(kind: str):
    async def observe(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
        memo.cache.observe(kind, event.get("type"), event["object"])

    return observe


for (group, version, plural), kind in WATCHED.items():
    kopf.on.event(group, version, plural, id=f"observe-{plural}")(_observer(kind))


def _referenced(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> bool:
    for body in memo.cache.bpfprograms.values():
        ref = ((body.get("spec") or {}).get("source") or {}).get("configMapRef") or {}
        if ref.get("name") == name and ref.get("namespace") == namespace:
            return True
    return False


@kopf.on.event("", "v1", "configmaps", when=_referenced)
async def configmap_event(memo: kopf.Memo, **_: Any) -> None:
    """A ConfigMap holding some BpfProgram's source changed: roll it out like a spec change."""
    memo.cache.changed.set()


@kopf.on.delete(GROUP, VERSION, BPF_PROGRAM_PLURAL)
async def detach_everywhere(name: str, memo: kopf.Memo, **_: Any) -> None:
    """Hold the finalizer until no existing node still reports the program."""
    memo.cache.changed.set()
    waiting = sorted(node for node in memo.cache.reports_for(name) if node in memo.cache.nodes)
    if waiting:
        shown = ", ".join(waiting[:5]) + (" ..." if len(waiting) > 5 else "")
        raise kopf.TemporaryError(f"waiting for {len(waiting)} node(s) to detach: {shown}", delay=1)
    log.info("detached from every node", extra={"bpfprogram": name})
