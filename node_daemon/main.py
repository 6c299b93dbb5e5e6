"""Entry point of the node daemon: watch this node's BpfNodeState and reconcile the kernel to it."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from beekeeper import kube
from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, GROUP, VERSION

log = logging.getLogger(__name__)


def run(node_name: str, kubeconfig: Path | str | None = None) -> None:
    """Watch only our own BpfNodeState (server-side field selector), until SIGTERM."""
    api = client.CustomObjectsApi(kube.api_client(kubeconfig))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("node daemon starting", extra={"node": node_name})
    selector = f"metadata.name={node_name}"
    resource_version: str | None = None
    while not stop.is_set():
        stream = watch.Watch()
        try:
            for event in stream.stream(
                api.list_cluster_custom_object,
                GROUP,
                VERSION,
                PLURAL,
                field_selector=selector,
                resource_version=resource_version,
                timeout_seconds=30,
            ):
                obj = event["object"]
                resource_version = obj["metadata"]["resourceVersion"]
                log.info(
                    "bpfnodestate event",
                    extra={"node": node_name, "type": event["type"], "generation": obj["metadata"].get("generation")},
                )
                if stop.is_set():
                    stream.stop()
        except ApiException as exc:
            if exc.status == 410:  # our resourceVersion is too old: relist
                resource_version = None
                continue
            log.warning("watch failed, retrying", extra={"node": node_name, "status": exc.status, "reason": exc.reason})
            stop.wait(2)
        except Exception as exc:  # network errors: keep the daemon alive and retry
            log.warning("watch interrupted, retrying", extra={"node": node_name, "error": str(exc)})
            stop.wait(2)
    log.info("node daemon stopped", extra={"node": node_name})
