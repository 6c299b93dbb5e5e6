"""Entry point of the operator process: kopf with beekeeper's handlers."""

from __future__ import annotations

import asyncio
import logging
import os

import kopf

log = logging.getLogger(__name__)


def run(kubeconfig: str | None = None) -> None:
    """Run until SIGTERM/SIGINT. One replica: kopf peering is not leader election."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    import beekeeper.operator.handlers  # noqa: F401  (registers the handlers)

    log.info("operator starting")
    asyncio.run(kopf.operator(clusterwide=True, standalone=True))
