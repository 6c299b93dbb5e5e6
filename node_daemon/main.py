"""Entry point of the node daemon: watch this node's BpfNodeState, converge the kernel to it.

Only our own objects are watched (server-side field selectors: the BpfNodeState on
metadata.name, the BpfPolicySlices on spec.nodeName), so the daemon's load does not grow
with the cluster. Events are coalesced: only the newest
object matters. A periodic resync re-applies it, which picks up interfaces that appeared
since (interface patterns) and repairs anything detached behind our back. Link and route
changes on the host and slice changes re-run only the policy part at once (a pod's veth appeared or was
recreated; a slice change costs the map entries it touches, a host change looks every endpoint's interface
up again), and while some endpoint has no interface yet it is looked for every few seconds.

bpffs layout under --bpffs-root: programs/ (BpfPrograms, one directory per unit) and
policy/ (the NetworkIdentityPolicy datapath); kept apart so no BpfProgram name can
collide with the policy's pins.

The fake backend (`--backend fake`) keeps programs in memory and has no policy datapath:
the same daemon then needs no kernel, bpffs or root, so one machine can stand in for
hundreds of nodes when the control plane is exercised at scale. `--fake-policy` adds the
real PolicyAgent over an in-memory datapath (node_daemon.fake_policy), so those nodes
enforce NetworkIdentityPolicies as far as the control plane can tell.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import tempfile
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
from beekeeper.node_daemon.image_puller import ImagePuller
from beekeeper.node_daemon.list_watch import list_watch
from beekeeper.node_daemon.metrics import SERIES_BUDGET, BpfCollector
from beekeeper.node_daemon.object_cache import ObjectCache
from beekeeper.node_daemon.oci_client import RegistryClient
from beekeeper.node_daemon.policy_slices import SliceStore, watch_slices
from beekeeper.node_daemon.routes import RouteWatcher
from beekeeper.node_daemon.runtime_events import FLUSH_SECONDS, ExecEventLog, PodEventPoster
from beekeeper.process_metrics import component_registry

if TYPE_CHECKING:  # imported with the kernel backend only (the fake backend has no policy datapath)
    from beekeeper.node_daemon.policy_agent import PolicyAgent
    from beekeeper.node_daemon.runtime_agent import RuntimeAgent

log = logging.getLogger(__name__)

RESYNC_SECONDS = 30.0
POLICY_RETRY_SECONDS = 2.0
DELETED = object()
HOST_CHANGED = object()
"""Queued by the route watcher (links or routes changed on the host): re-run the policy part, looking up every
endpoint's interface again."""
SLICES_CHANGED = object()
"""Queued by the slice watch: re-run the policy part (only changed slices are read, only touched entries written)."""
POLICY_EVENTS = (HOST_CHANGED, SLICES_CHANGED)


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
    fake_policy: bool = False,
) -> tuple[Backend, PolicyAgent | None]:
    """The backend for BpfPrograms and the policy datapath; the fake backend has one only with fake_policy."""
    if kind == "fake":
        from beekeeper.node_daemon.fake_backend import FakeBackend

        if not fake_policy:
            return FakeBackend(), None
        from beekeeper.node_daemon.fake_policy import FakePolicyDatapath, FakeRoutes
        from beekeeper.node_daemon.policy_agent import PolicyAgent

        state = Path(state_dir or Path(tempfile.gettempdir()) / f"beekeeper-fake-{os.getuid()}" / node_name)
        agent = PolicyAgent(node_name, state / "bpffs", state / "policy", drop_log, FakePolicyDatapath, FakeRoutes())
        return FakeBackend(), agent
    if fake_policy:
        raise ValueError("--fake-policy goes with --backend fake")
    if kind != "bcc":
        raise ValueError(f"unknown backend {kind!r}: bcc or fake")
    from beekeeper.node_daemon.kernel_backend import DEFAULT_BASE_DIR, DEFAULT_STATE_DIR, KernelBackend
    from beekeeper.node_daemon.policy_agent import PolicyAgent

    bpffs_root = Path(bpffs_root or DEFAULT_BASE_DIR)
    state_dir = Path(state_dir or DEFAULT_STATE_DIR)
    backend = KernelBackend(
        base_dir=str(bpffs_root / "programs"),
        state_dir=str(state_dir),
        collect_run_stats=True,
        compile_limits=compile_limits,
    )
    return backend, PolicyAgent(node_name, bpffs_root / "policy", state_dir / "policy", drop_log)


def image_cache_dir(backend_kind: str, state_dir: Path | None) -> Path:
    """Pulled bytecode lives beside the daemon's other state, so it survives restarts like the pins do."""
    if state_dir is not None:
        return Path(state_dir) / "images"
    if backend_kind == "fake":
        return Path(tempfile.gettempdir()) / f"beekeeper-fake-images-{os.getuid()}"
    from beekeeper.node_daemon.kernel_backend import DEFAULT_STATE_DIR

    return Path(DEFAULT_STATE_DIR) / "images"


def _runtime(kind: str, node_name: str, bpffs_root: Path | None) -> RuntimeAgent | None:
    """The runtime-security agent (kernel backend only); a pinned hook is adopted at once, so a
    restarted daemon never leaves a gap while it waits for its spec."""
    if kind == "fake":
        return None
    from beekeeper.node_daemon.kernel_backend import DEFAULT_BASE_DIR
    from beekeeper.node_daemon.runtime_agent import RuntimeAgent

    runtime = RuntimeAgent(node_name, Path(bpffs_root or DEFAULT_BASE_DIR) / "runtime")
    try:
        runtime.adopt()
    except Exception:
        log.exception("adopting the pinned runtime-security datapath failed", extra={"node": node_name})
    return runtime


def _pump_exec_events(
    runtime: RuntimeAgent, exec_log: ExecEventLog, poster: PodEventPoster, stop: threading.Event
) -> None:
    """Ring buffer -> event log and Pod Events, until the daemon stops."""
    flush_at = time.monotonic() + FLUSH_SECONDS
    while not stop.is_set():
        try:
            for event in runtime.poll_events(200):
                exec_log.add(event)
                poster.add(event)
                log.info("exec matched", extra={k: event[k] for k in ("namespace", "pod", "file", "policy", "action")})
            if time.monotonic() >= flush_at:
                poster.flush()
                flush_at = time.monotonic() + FLUSH_SECONDS
        except Exception:
            log.exception("exec event pump failed; retrying")
            stop.wait(1.0)


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
    registry_ca_file: str | None = None,
    metrics_series_budget: int = SERIES_BUDGET,
    fake_policy: bool = False,
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
    backend, policy = _kernel(backend_kind, node_name, bpffs_root, state_dir, drop_log, compile_limits, fake_policy)
    collector = BpfCollector(backend, node_name, metrics_series_budget)
    registry = component_registry("node-daemon")
    slices = SliceStore()
    images = ImagePuller(
        RegistryClient(ca_file=registry_ca_file), ObjectCache(image_cache_dir(backend_kind, state_dir))
    )
    runtime = _runtime(backend_kind, node_name, bpffs_root)
    exec_log = ExecEventLog()
    agent = NodeAgent(
        node_name,
        backend,
        api,
        collector,
        policy,
        policy_disabled=f"policy datapath disabled ({backend_kind} backend)",
        policy_slices=slices.snapshot,
        images=images,
        runtime=runtime,
        metrics=DaemonMetrics(registry),
    )
    if metrics_port:
        registry.register(collector)
        if policy is not None:
            from beekeeper.node_daemon.policy_metrics import PolicyCollector

            registry.register(PolicyCollector(policy))
        if runtime is not None:
            from beekeeper.node_daemon.runtime_metrics import RuntimeCollector

            registry.register(RuntimeCollector(runtime))
        http_api.serve(
            registry, drop_log, node_name, metrics_port, metrics_address, ApiAccess(api), tls, exec_events=exec_log
        )

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
            args=(client.CustomObjectsApi(api), node_name, slices, lambda: events.put(SLICES_CHANGED), stop),
            daemon=True,
            name="watch-slices",
        ).start()
    # a fake node's interfaces never change
    routes = RouteWatcher(lambda: events.put(HOST_CHANGED)) if policy is not None and not fake_policy else None
    if runtime is not None:
        poster = PodEventPoster(api, node_name)
        threading.Thread(
            target=_pump_exec_events, args=(runtime, exec_log, poster, stop), daemon=True, name="exec-events"
        ).start()
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
        pull_retry = images.retry_in()
        if pull_retry is not None and current is not None:
            timeout = min(timeout, pull_retry)
        batch = []
        try:
            batch.append(events.get(timeout=max(timeout, 0.0)))
            while True:  # coalesce a burst: only the newest object matters
                batch.append(events.get_nowait())
        except queue.Empty:
            pass
        if stop.is_set():
            break
        objects = [item for item in batch if all(item is not e for e in POLICY_EVENTS)]
        host_changed = any(item is HOST_CHANGED for item in batch)
        try:
            if objects and objects[-1] is DELETED:
                current = None
                agent.remove_all()
            elif objects:
                current = objects[-1]
                # our own status write (same generation) is skipped: a slice or host change in the same
                # batch still needs the policy part
                if not agent.reconcile(current, rescan=host_changed) and len(objects) < len(batch):
                    agent.reconcile_policy(current, rescan=host_changed)
            if current is None:
                resync_at = time.monotonic() + RESYNC_SECONDS
            elif time.monotonic() >= resync_at:
                resync_at = time.monotonic() + RESYNC_SECONDS
                agent.reconcile(current, resync=True)
            elif not objects and pull_retry is not None and (images.retry_in() or 0.0) <= 0.05:
                agent.reconcile(current, resync=True)  # a failed image pull is due again
            elif not objects and (len(objects) < len(batch) or (not batch and agent.policy_retry_due())):
                agent.reconcile_policy(current, rescan=host_changed)
        except Exception:
            log.exception("reconcile failed; will retry at the next event or resync", extra={"node": node_name})
    if routes is not None:
        routes.close()
    if policy is not None:
        policy.close()
    if runtime is not None:
        runtime.close()
    log.info("node daemon stopped; attachments stay pinned", extra={"node": node_name})
