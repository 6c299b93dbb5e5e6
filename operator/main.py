"""Entry point of the operator process: kopf with beekeeper's handlers, and the probe and metrics endpoint."""

from __future__ import annotations

import asyncio
import gc
import logging
import os

import kopf

from beekeeper.operator.health import Health, serve
from beekeeper.operator.metrics import OperatorMetrics
from beekeeper.operator.reconciler import resync_seconds
from beekeeper.process_metrics import component_registry

log = logging.getLogger(__name__)


def run(kubeconfig: str | None = None, health_port: int = 8081) -> None:
    """Run until SIGTERM/SIGINT. One replica: kopf peering is not leader election.

    health_port 0 serves no probes and no /metrics; a port that cannot be bound fails at once.
    """
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    import beekeeper.operator.handlers  # noqa: F401  (registers the handlers)

    health = Health(resync_seconds=resync_seconds())
    registry = component_registry("operator")
    metrics = OperatorMetrics(registry)
    server = serve(health, health_port, registry=registry) if health_port else None
    # What the imports made lives as long as the process: frozen, the collector's full passes (which a
    # policy pass over thousands of objects sets off) do not walk its 80k objects each time again.
    gc.freeze()
    log.info("operator starting")
    memo = kopf.Memo(health=health, metrics=metrics, registry=registry)
    try:
        asyncio.run(kopf.operator(clusterwide=True, standalone=True, memo=memo))
    finally:
        if server is not None:
            server.shutdown()
