"""Entry point of the node daemon: watch this node's BpfNodeState, converge the kernel to it.

Only our own objects are watched (server-side field selectors: the BpfNodeState on
metadata.name, the BpfPolicySlices on spec.nodeName), so the daemon's load does not grow
with the cluster. Events are coalesced: only the newest
object matters. A periodic resync re-applies it, which picks up interfaces that appeared
since (interface patterns) and repairs anything detached behind our back. Link and route
changes on the host and slice changes re-run only the policy part at once (a pod's veth appeared or was
recreated), and while some endpoint has no interface yet it is looked for every few seconds.

bpffs layout under --bpffs-root: programs/ (BpfPrograms, one directory per unit) and
policy/ (the NetworkIdentityPolicy datapath); kept apart so no BpfProgram name can
collide with the policy's pins.

The fake backend (`--backend fake`) keeps programs in memory and has no policy datapath:
the same daemon then needs no kernel, bpffs or root, so one machine can stand in for
hundreds of nodes when the control plane is exercised at scale.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import client

from beekeeper import kube
from beekeeper.crds.names import BPF_NODE_STATE_PLURAL
from beekeeper.node_daemon import http_api
from beekeeper.node_daemon.access import ApiAccess
from beekeeper.node_daemon.agent import NodeAgent
from beekeeper.node_daemon.backend import Backend
from beekeeper.node_daemon.compile_limits import CompileLimits
from beekeeper.node_daemon.daemon_metrics import DaemonMetrics
from beekeeper.node_daemon.drops import DropLog
from beekeeper.node_daemon.list_watch import list_watch
from beekeeper.node_daemon.metrics import SERIES_BUDGET, BpfCollector
from beekeeper.node_daemon.policy_slices import SliceStore, watch_slices
from beekeeper.node_daemon.routes import RouteWatcher
from beekeeper.process_metrics import component_registry

if TYPE_CHECKING:  # imported by the bcc backend only: the policy datapath loads bcc
    from beekeeper.node_daemon.policy_agent import PolicyAgent

log = logging.getLogger(__name__)

RESYNC_SECONDS = 30.0
POLICY_RETRY_SECONDS = 2.0
DELETED = object()
HOST_CHANGED = object()
"""Queued by the route watcher (links or routes changed on the host) and the slice watch: re-run the policy part."""


def _watch(api: client.CustomObjectsApi, node: str, events: queue.Queue, stop: threading.Event) -> None:
    """List+watch our BpfNodeState forever, pushing each newest object (or DELETED) into `events`."""

    def listed(items: list[dict[str, Any]]) -> None:
        for item in items:
            events.put(item)

    def observed(event_type: str, obj: dict[str, Any]) -> None:
        events.put(DELETED if event_type == "DELETED" else obj)

    list_watch(api, BPF_NODE_STATE_PLURAL, f"metadata.name={node}", listed, observed, stop, "watch", node)


def _kernel(
    kind: str,
    node_name: str,
    bpffs_root: Path | None,
    state_dir: Path | None,
    drop_log: DropLog,
    compile_limits: CompileLimits | None = None,
) -> tuple[Backend, PolicyAgent | None]:
    """The backend for BpfPrograms and the policy datapath; the fake backend has no policy datapath."""
    if kind == "fake":
        from beekeeper.node_daemon.fake_backend import FakeBackend

        return FakeBackend(), None
    if kind != "bcc":
        raise ValueError(f"unknown backend {kind!r}: bcc or fake")
    from beekeeper.node_daemon.bcc_backend import DEFAULT_BASE_DIR, DEFAULT_STATE_DIR, BccBackend
    from beekeeper.node_daemon.policy_agent import PolicyAgent

    bpffs_root = Path(bpffs_root or DEFAULT_BASE_DIR)
    state_dir = Path(state_dir or DEFAULT_STATE_DIR)
    backend = BccBackend(
        base_dir=str(bpffs_root / "programs"),
        state_dir=str(state_dir),
        collect_run_stats=True,
        compile_limits=compile_limits,
    )
    return backend, PolicyAgent(node_name, bpffs_root / "policy", state_dir / "policy", drop_log)


def run(
    node_name: str,
    kubeconfig: Path | str | None = None,
    bpffs_root: Path | None = None,
    state_dir: Path | None = None,
    metrics_port: int = 9464,
    metrics_address: str = "0.0.0.0",
    backend_kind: str = "bcc",
    compile_limits: CompileLimits | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    client_ca_file: str | None = None,
    metrics_series_budget: int = SERIES_BUDGET,
) -> None:
    """Run until SIGTERM/SIGINT. Attachments stay in the kernel (pinned) when the daemon stops.

    The HTTP port speaks TLS with a serving certificate (tls_cert_file and tls_key_file), and
    then also accepts client certificates signed by client_ca_file.
    """
    if bool(tls_cert_file) != bool(tls_key_file):
        raise RuntimeError("--tls-cert-file and --tls-private-key-file go together")
    if client_ca_file and not tls_cert_file:
        raise RuntimeError("--client-ca-file needs TLS: give --tls-cert-file and --tls-private-key-file too")
    tls = http_api.tls_context(tls_cert_file, tls_key_file, client_ca_file) if tls_cert_file and tls_key_file else None
    api = kube.api_client(kubeconfig, manager=kube.NODE_DAEMON_MANAGER)
    drop_log = DropLog()
    backend, policy = _kernel(backend_kind, node_name, bpffs_root, state_dir, drop_log, compile_limits)
    collector = BpfCollector(backend, node_name, metrics_series_budget)
    registry = component_registry("node-daemon")
    slices = SliceStore()
    agent = NodeAgent(
        node_name,
        backend,
        api,
        collector,
        policy,
        policy_disabled=f"policy datapath disabled ({backend_kind} backend)",
        policy_slices=slices.snapshot,
        metrics=DaemonMetrics(registry),
    )
    if metrics_port:
        registry.register(collector)
        if policy is not None:
            from beekeeper.node_daemon.policy_metrics import PolicyCollector

            registry.register(PolicyCollector(policy))
        http_api.serve(registry, drop_log, node_name, metrics_port, metrics_address, ApiAccess(api), tls)

    stop = threading.Event()
    events: queue.Queue[Any] = queue.Queue()

    def terminate(*_: object) -> None:
        stop.set()
        # wake the loop; from a thread, as the handler may interrupt the loop inside the queue's lock
        threading.Thread(target=events.put, args=(HOST_CHANGED,), daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, terminate)
    threading.Thread(
        target=_watch, args=(client.CustomObjectsApi(api), node_name, events, stop), daemon=True, name="watch"
    ).start()
    # Policy slices and pod interfaces only matter to the policy datapath.
    if policy is not None:
        threading.Thread(
            target=watch_slices,
            args=(client.CustomObjectsApi(api), node_name, slices, lambda: events.put(HOST_CHANGED), stop),
            daemon=True,
            name="watch-slices",
        ).start()
    routes = RouteWatcher(lambda: events.put(HOST_CHANGED)) if policy is not None else None
    log.info(
        "node daemon started",
        extra={
            "node": node_name,
            "backend": backend_kind,
            "kernel": agent.capabilities["kernelVersion"],
            "adopted": len(backend.adopted()),
        },
    )

    current: dict[str, Any] | None = None
    resync_at = time.monotonic() + RESYNC_SECONDS
    while not stop.is_set():
        timeout = resync_at - time.monotonic()
        if agent.policy_retry_due():
            timeout = min(timeout, POLICY_RETRY_SECONDS)
        batch = []
        try:
            batch.append(events.get(timeout=max(timeout, 0.0)))
            while True:  # coalesce a burst: only the newest object matters
                batch.append(events.get_nowait())
        except queue.Empty:
            pass
        if stop.is_set():
            break
        objects = [item for item in batch if item is not HOST_CHANGED]
        try:
            if objects and objects[-1] is DELETED:
                current = None
                agent.remove_all()
            elif objects:
                current = objects[-1]
                agent.reconcile(current)
            if current is None:
                resync_at = time.monotonic() + RESYNC_SECONDS
            elif time.monotonic() >= resync_at:
                resync_at = time.monotonic() + RESYNC_SECONDS
                agent.reconcile(current, resync=True)
            elif len(objects) < len(batch) or (not batch and agent.policy_retry_due()):
                agent.reconcile_policy(current)
        except Exception:
            log.exception("reconcile failed; will retry at the next event or resync", extra={"node": node_name})
    if routes is not None:
        routes.close()
    if policy is not None:
        policy.close()
    log.info("node daemon stopped; attachments stay pinned", extra={"node": node_name})
