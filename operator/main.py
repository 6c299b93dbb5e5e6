"""Entry point of the operator process: kopf with beekeeper's handlers, and the probe endpoint."""

from __future__ import annotations

import asyncio
import logging
import os

import kopf

from beekeeper.operator.health import Health, serve
from beekeeper.operator.reconciler import resync_seconds

log = logging.getLogger(__name__)


def run(kubeconfig: str | None = None, health_port: int = 8081) -> None:
    """Run until SIGTERM/SIGINT. One replica: kopf peering is not leader election.

    health_port 0 serves no probes; a port that cannot be bound fails at once.
    """
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    import beekeeper.operator.handlers  # noqa: F401  (registers the handlers)

    health = Health(resync_seconds=resync_seconds())
    server = serve(health, health_port) if health_port else None
    log.info("operator starting")
    try:
        asyncio.run(kopf.operator(clusterwide=True, standalone=True, memo=kopf.Memo(health=health)))
    finally:
        if server is not None:
            server.shutdown()
