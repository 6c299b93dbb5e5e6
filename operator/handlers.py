"""kopf handlers: start and stop the operator's parts; kopf itself watches nothing.

Reads come from the operator's own informers (informers.py: list+watch per kind, with
relists that replace the cache), the single decision-making path lives in reconciler.py
over the pure functions of desired_state.py, program_status.py, identities.py,
policy_compile.py and policy_status.py, and the finalizer is the reconciler's. So kopf
keeps no state on the objects: no diffbase or progress annotations, which could not be
written beside a large client-side-applied object and then blocked its deletion.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from beekeeper import kube
from beekeeper.operator import informers
from beekeeper.operator.cache import ClusterCache
from beekeeper.operator.metrics import CacheCollector
from beekeeper.operator.reconciler import Reconciler

log = logging.getLogger(__name__)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Start the informers and the supervised reconcile loop (main.run put Health, metrics and registry in memo)."""
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = True  # no resource handlers: kopf need not discover or watch CRDs
    api = kube.api_client(manager=kube.OPERATOR_MANAGER)
    memo.metrics.count_writes(api)
    memo.cache = ClusterCache()
    memo.registry.register(CacheCollector(memo.cache))
    memo.reconciler = Reconciler(api, memo.cache, memo.metrics)
    memo.informers = informers.start(api, memo.cache, asyncio.get_running_loop())
    memo.loop_task = asyncio.create_task(memo.reconciler.supervise(memo.health), name="beekeeper-reconciler")


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("loop_task")
    if task is not None:
        task.cancel()
    for informer in memo.get("informers") or []:
        informer.stopping.set()
