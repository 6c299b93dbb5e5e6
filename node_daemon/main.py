"""Entry point of the node daemon: watch this node's BpfNodeState, converge the kernel to it.

Only our own object is watched (server-side field selector on metadata.name), so the
daemon's load does not grow with the cluster. Events are coalesced: only the newest
object matters. A periodic resync re-applies it, which picks up interfaces that appeared
since (interface patterns) and repairs anything detached behind our back.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from beekeeper import kube
from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, GROUP, VERSION
from beekeeper.node_daemon.agent import NodeAgent
from beekeeper.node_daemon.metrics import BpfCollector, serve

log = logging.getLogger(__name__)

RESYNC_SECONDS = 30.0
DELETED = object()


def _watch(api: client.CustomObjectsApi, node: str, events: queue.Queue, stop: threading.Event) -> None:
    """List+watch our BpfNodeState forever, pushing each newest object (or DELETED) into `events`."""
    selector = f"metadata.name={node}"
    while not stop.is_set():
        try:
            listing = api.list_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, field_selector=selector)
            for item in listing["items"]:
                events.put(item)
            version = listing["metadata"]["resourceVersion"]
            stream = watch.Watch()
            for event in stream.stream(
                api.list_cluster_custom_object,
                GROUP,
                VERSION,
                BPF_NODE_STATE_PLURAL,
                field_selector=selector,
                resource_version=version,
                timeout_seconds=300,
                allow_watch_bookmarks=True,
            ):
                if stop.is_set():
                    stream.stop()
                    break
                if event["type"] == "ERROR":
                    break  # e.g. 410 Gone: relist
                if event["type"] == "BOOKMARK":
                    continue
                events.put(DELETED if event["type"] == "DELETED" else event["object"])
        except ApiException as exc:
            log.warning("watch failed, retrying", extra={"node": node, "status": exc.status, "reason": exc.reason})
            stop.wait(2)
        except Exception as exc:  # connection resets: keep going
            log.warning("watch interrupted, retrying", extra={"node": node, "error": str(exc)})
            stop.wait(2)


def run(
    node_name: str,
    kubeconfig: Path | str | None = None,
    bpffs_root: Path | None = None,
    state_dir: Path | None = None,
    metrics_port: int = 9464,
    metrics_address: str = "0.0.0.0",
) -> None:
    """Run until SIGTERM/SIGINT. Attachments stay in the kernel (pinned) when the daemon stops."""
    from beekeeper.node_daemon.bcc_backend import DEFAULT_BASE_DIR, DEFAULT_STATE_DIR, BccBackend

    api = kube.api_client(kubeconfig)
    backend = BccBackend(
        base_dir=str(bpffs_root or DEFAULT_BASE_DIR),
        state_dir=str(state_dir or DEFAULT_STATE_DIR),
        collect_run_stats=True,
    )
    collector = BpfCollector(backend, node_name)
    agent = NodeAgent(node_name, backend, api, collector)
    if metrics_port:
        serve(collector, metrics_port, metrics_address)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    events: queue.Queue[Any] = queue.Queue()
    threading.Thread(
        target=_watch, args=(client.CustomObjectsApi(api), node_name, events, stop), daemon=True, name="watch"
    ).start()
    log.info(
        "node daemon started",
        extra={"node": node_name, "kernel": agent.capabilities["kernelVersion"], "adopted": len(backend.adopted())},
    )

    current: dict[str, Any] | None = None
    while not stop.is_set():
        try:
            item = events.get(timeout=RESYNC_SECONDS)
            while True:  # coalesce a burst: only the newest object matters
                try:
                    item = events.get_nowait()
                except queue.Empty:
                    break
            resync = False
        except queue.Empty:
            item, resync = current, True
        if stop.is_set():
            break
        if item is DELETED:
            current = None
            agent.remove_all()
        elif item is not None:
            current = item
            try:
                agent.reconcile(item, resync=resync)
            except Exception:
                log.exception("reconcile failed; will retry at the next event or resync", extra={"node": node_name})
    log.info("node daemon stopped; attachments stay pinned", extra={"node": node_name})
