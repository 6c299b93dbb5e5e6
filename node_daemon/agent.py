"""The node daemon's reconcile step: one BpfNodeState in, kernel converged, status out.

The kernel work is the Backend's (BpfPrograms) and the PolicyAgent's (the
NetworkIdentityPolicy datapath); this module decides what to ask them and what to
report, and writes status only when it changed (a quiet node makes no API writes).
Without a PolicyAgent (the fake backend) a spec.networkPolicy is reported as not
enforced, so nobody mistakes such a node for one that filters traffic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from beekeeper import kube
from beekeeper.crds.common import Condition, now, set_condition, timestamp
from beekeeper.crds.names import BPF_NODE_STATE, BPF_NODE_STATE_PLURAL, GROUP, VERSION
from beekeeper.crds.nodestate import NetworkPolicyStatus, NodeProgram
from beekeeper.node_daemon import bytecode_image, translate
from beekeeper.node_daemon.backend import Backend, Phase, ProgramReport
from beekeeper.node_daemon.daemon_metrics import DaemonMetrics
from beekeeper.node_daemon.image_puller import ImagePuller, PullFailed
from beekeeper.node_daemon.metrics import BpfCollector

if TYPE_CHECKING:  # the kernel datapaths; a daemon without them (fake backend) never imports them
    from beekeeper.node_daemon.policy_agent import PolicyAgent
    from beekeeper.node_daemon.runtime_agent import RuntimeAgent

log = logging.getLogger(__name__)

_OK_PHASES = {Phase.ATTACHED.value, Phase.LOADED.value}
INTERIM_AFTER_SECONDS = 0.25
"""A build still running after this is reported as Compiling before its result."""


def _add_warnings(statuses: list[dict[str, Any]], warnings: Mapping[str, list[str]]) -> None:
    """Put each BpfProgram's warnings (metrics not exported) on the entry of its first function."""
    for bpf_program, items in warnings.items():
        first = next((s for s in statuses if s["bpfProgram"] == bpf_program), None)
        if first is not None and items:
            first["warnings"] = [w[:1024] for w in items]


class NodeAgent:
    """Converges one node. Not thread-safe: the daemon calls it from one loop."""

    def __init__(
        self,
        node: str,
        backend: Backend,
        api: client.ApiClient,
        collector: BpfCollector,
        policy: PolicyAgent | None = None,
        policy_disabled: str = "policy datapath disabled",
        policy_slices: Callable[[], Mapping[str, Mapping[str, Any]]] = dict,
        images: ImagePuller | None = None,
        runtime: RuntimeAgent | None = None,
        metrics: DaemonMetrics | None = None,
    ) -> None:
        self.node = node
        self.metrics = metrics or DaemonMetrics()
        self.backend = backend
        self.custom = client.CustomObjectsApi(api)
        self.collector = collector
        self.policy = policy
        self.policy_disabled = policy_disabled
        """status.networkPolicy.message when spec asks for a policy and there is no PolicyAgent."""
        self.policy_slices = policy_slices
        """This node's BpfPolicySlices as last watched (name -> object)."""
        self.images = images
        """Pulls (and caches) the bytecode of image entries; None: such entries fail with ImagePullFailed."""
        self.capabilities = translate.capabilities(backend.capabilities())
        self._written: dict[str, Any] | None = None
        self._applied: dict[str, str] = {}
        self._generation: int | None = None
        self._policy_status: dict[str, Any] | None = None
        self.runtime = runtime
        self._runtime_status: dict[str, Any] | None = None

    def reconcile(self, obj: Mapping[str, Any], resync: bool = False, rescan: bool = False) -> bool:
        """Make the kernel match obj.spec and report obj.status; False when there was nothing to do.

        Events that only carry our own status writes (same generation) are skipped, or the
        daemon would rebuild failing programs in a loop; the periodic resync retries them.
        A resync (or rescan: the host changed) also looks up every policy endpoint's interface again.
        """
        generation = obj["metadata"].get("generation")
        if not resync and generation == self._generation:
            return False
        with self.metrics.sync("full"):
            self._reconcile(obj, generation, resync or rescan)
        return True

    def _reconcile(self, obj: Mapping[str, Any], generation: int | None, rescan: bool) -> None:
        self._generation = generation
        spec = obj.get("spec") or {}
        old_status = obj.get("status") or {}
        if self._written is None:
            self._written = dict(old_status)
        previous = {(p["bpfProgram"], p["name"]): p for p in (self._written.get("programs") or [])}

        entries: list[NodeProgram] = []
        broken: list[dict[str, Any]] = []
        for raw in spec.get("programs") or []:
            try:
                entries.append(NodeProgram.model_validate(raw))
            except ValidationError as exc:
                broken.extend(self._invalid_entry(raw, exc, previous))

        changed = [
            e for e in entries if self._applied.get(e.bpf_program) != e.content_hash and not self._running(e, previous)
        ]
        compiling: threading.Timer | None = None
        if changed:
            interim = [
                s
                for e in entries
                for s in (
                    translate.pending_statuses(e, Phase.COMPILING, previous, timestamp())
                    if e in changed
                    else [previous[(e.bpf_program, p.name)] for p in e.programs]
                )
            ]
            # Compiling is reported only for builds still running after a moment: a fast load (or the
            # fake backend) then costs one status write, not two (the apiserver's work per node change).
            compiling = threading.Timer(
                INTERIM_AFTER_SECONDS, self._write_status, (generation, interim + broken), {"interim": True}
            )
            compiling.start()
            # Transition times as if Compiling had been reported, whether or not it was.
            previous = {(p["bpfProgram"], p["name"]): p for p in interim + broken}

        statuses: list[dict[str, Any]] = []
        rebuilt = {e.bpf_program for e in changed}
        for entry in entries:
            started = time.monotonic()
            reports = self._apply(entry)
            if entry.bpf_program in rebuilt:
                self.metrics.built(reports, time.monotonic() - started)
            self._applied[entry.bpf_program] = entry.content_hash
            statuses += translate.program_statuses(entry, reports, previous, timestamp())
        if compiling is not None:
            compiling.cancel()
            compiling.join()  # a Compiling write under way lands before the result
        desired = {e.bpf_program for e in entries}
        for key in sorted(set(self.backend.adopted()) - desired):
            log.info("removing program no longer desired", extra={"node": self.node, "bpfprogram": key})
            self.backend.remove(key)
            self._applied.pop(key, None)
        if self.images is not None:
            self.images.forget({e.bytecode.image for e in entries if e.bytecode is not None and e.bytecode.image})
        _add_warnings(statuses, self.collector.set_programs(entries))
        self._reconcile_policy(spec, generation, rescan)
        self._reconcile_runtime(spec)
        self._write_status(generation, statuses + broken)

    def reconcile_policy(self, obj: Mapping[str, Any], rescan: bool = True) -> None:
        """Only the policy and runtime datapaths, e.g. after pod interfaces or routes changed on the host
        (rescan: look every endpoint's interface up again), a policy slice changed, or while selected
        containers are not found yet."""
        if self.policy is None and self.runtime is None:
            return
        if self._written is None or self._generation != obj["metadata"].get("generation"):
            self.reconcile(obj, rescan=rescan)
            return
        if self.policy is not None:
            self._reconcile_policy(obj.get("spec") or {}, self._generation, rescan)
        if self.runtime is not None:
            self._reconcile_runtime(obj.get("spec") or {})
        self._write_status(self._generation, list(self._written.get("programs") or []))

    def policy_retry_due(self) -> bool:
        """Some endpoint still has no interface, or some selected container was not found: look again soon."""
        if self.runtime is not None and (self._runtime_status or {}).get("missing"):
            return True
        return self.policy is not None and self.policy.unresolved > 0

    def _reconcile_policy(self, spec: Mapping[str, Any], generation: int | None, rescan: bool) -> None:
        if self.policy is None:
            raw = spec.get("networkPolicy")
            self._policy_status = (
                None
                if raw is None
                else NetworkPolicyStatus(
                    enforcing=False, endpoints=len(raw.get("endpoints") or []), message=self.policy_disabled
                ).to_dict()
            )
            return
        previous = (self._written or {}).get("networkPolicy")
        try:
            with self.metrics.sync("policy"):
                self._policy_status = self.policy.reconcile(
                    spec.get("networkPolicy"), generation, previous, self.policy_slices(), rescan
                )
        except Exception as exc:  # keep reporting the programs; the next event or resync retries
            log.exception("policy reconcile failed", extra={"node": self.node})
            self._policy_status = {**(previous or {}), "enforcing": False, "message": f"internal error: {exc}"[:2048]}

    def _reconcile_runtime(self, spec: Mapping[str, Any]) -> None:
        raw = spec.get("runtimeSecurity")
        if self.runtime is None:
            self._runtime_status = (
                None if raw is None else {"enforcing": False, "message": "runtime security needs the kernel backend"}
            )
            return
        try:
            self._runtime_status = self.runtime.reconcile(raw)
        except Exception as exc:  # keep reporting the programs; the next event or resync retries
            log.exception("runtime security reconcile failed", extra={"node": self.node})
            self._runtime_status = {"enforcing": False, "message": f"internal error: {exc}"[:2048]}
        hook = self.runtime.hook
        if hook != self.capabilities.get("execEnforcement"):
            self.capabilities = {**self.capabilities, "execEnforcement": hook}

    def remove_all(self) -> None:
        """Our BpfNodeState was deleted (node leaving the cluster): detach everything."""
        for key in sorted(self.backend.adopted()):
            log.info("removing program, node state deleted", extra={"node": self.node, "bpfprogram": key})
            self.backend.remove(key)
        if self.policy is not None:
            self.policy.remove()
        if self.runtime is not None:
            self.runtime.remove()
        self._runtime_status = None
        self.collector.set_programs([])
        self._written = None
        self._applied.clear()
        self._generation = None
        self._policy_status = None

    def _running(self, entry: NodeProgram, previous: Mapping[tuple[str, str], Mapping[str, Any]]) -> bool:
        """Already converged on this content (e.g. re-adopted after a restart): no Compiling flash."""
        for program in entry.programs:
            seen = previous.get((entry.bpf_program, program.name))
            if not seen or seen.get("contentHash") != entry.content_hash or seen.get("phase") not in _OK_PHASES:
                return False
        return entry.bpf_program in self.backend.adopted()

    def _pull(self, entry: NodeProgram) -> bytes | list[ProgramReport] | None:
        """The object of an image entry (None for other entries), or the reports of why it cannot be had.

        A failed pull leaves the backend alone: a build already attached for this BpfProgram keeps running.
        """
        image = entry.bytecode.image if entry.bytecode is not None else None
        if image is None:
            return None

        def failed(reason: str, message: str) -> list[ProgramReport]:
            return [
                ProgramReport(p.name, p.type.value, Phase.FAILED, reason=reason, message=message[:2048])
                for p in entry.programs
            ]

        if self.images is None:
            return failed("ImagePullFailed", "this node daemon pulls no images")
        try:
            pulled = self.images.fetch(image)
        except PullFailed as exc:
            return failed(exc.reason, str(exc))
        missing = bytecode_image.missing_programs(pulled.labels, [p.name for p in entry.programs])
        if missing:  # the unit cannot load as asked: no half of it
            offered = ", ".join(sorted(pulled.labels.programs))
            return failed("FunctionNotFound", f"{', '.join(missing)}: not in the image (io.ebpf.programs: {offered})")
        return pulled.elf

    def _apply(self, entry: NodeProgram) -> list[ProgramReport]:
        pulled = self._pull(entry)
        if isinstance(pulled, list):
            return pulled
        try:
            return self.backend.apply(translate.program_unit(entry, pulled))
        except Exception as exc:  # a backend bug must not take the other programs down
            log.exception("apply failed", extra={"node": self.node, "bpfprogram": entry.bpf_program})
            return [
                ProgramReport(p.name, p.type.value, Phase.FAILED, reason="InternalError", message=str(exc)[:2048])
                for p in entry.programs
            ]

    def _invalid_entry(
        self, raw: Mapping[str, Any], exc: ValidationError, previous: Mapping[tuple[str, str], Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        first = exc.errors()[0]
        message = f"spec entry not understood by this daemon: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        names = [p.get("name", "?") for p in raw.get("programs") or []] or ["?"]
        bpf_program, failed, now = raw.get("bpfProgram", "?"), Phase.FAILED.value, timestamp()
        return [
            {
                "bpfProgram": bpf_program,
                "name": name,
                "phase": failed,
                "reason": "InvalidSpec",
                "message": message[:2048],
                "lastTransitionTime": translate.transition_time(previous.get((bpf_program, name)) or {}, failed, now),
            }
            for name in names
        ]

    def _write_status(self, generation: int | None, programs: list[dict[str, Any]], interim: bool = False) -> None:
        total = len(programs)
        ok = sum(1 for p in programs if p["phase"] in _OK_PHASES)
        failed = [p for p in programs if p["phase"] == Phase.FAILED.value]
        policy = self._policy_status
        if interim:
            ready, reason, message = False, "Reconciling", "compiling and attaching"
        elif failed:
            ready, reason = False, "ProgramsFailed"
            message = f"{len(failed)} of {total} failed; first: {failed[0]['bpfProgram']}/{failed[0]['name']}: "
            message += failed[0].get("reason", "")
        elif policy is not None and not policy.get("enforcing"):
            ready, reason = False, "PolicyNotEnforced"
            message = f"network policy: {policy.get('message', 'not enforcing')}"[:2048]
        elif self._runtime_status is not None and not self._runtime_status.get("enforcing"):
            ready, reason = False, "RuntimeSecurityNotEnforced"
            message = f"runtime security: {self._runtime_status.get('message', 'not enforcing')}"[:2048]
        else:
            ready, reason, message = True, "Converged", f"{ok}/{total} attached"
        old_ready = [
            Condition.model_validate(c) for c in (self._written or {}).get("conditions") or [] if c["type"] == "Ready"
        ]
        ready_condition = Condition(
            type="Ready",
            status="True" if ready else "False",
            reason=reason,
            message=message,
            observed_generation=generation,
            last_transition_time=now(),
        )
        status = {
            "observedGeneration": generation,
            "conditions": [c.to_dict() for c in set_condition(old_ready, ready_condition)],
            "capabilities": self.capabilities,
            "programs": programs,
            "attached": f"{ok}/{total}",
        }
        if policy is not None:
            status["networkPolicy"] = policy
        runtime = self._runtime_status
        if runtime is not None:
            status["runtimeSecurity"] = runtime
        self.metrics.set_programs(programs)
        if status == self._written:
            return
        # Server-side apply: what this daemon left out (a dropped report, a cleared message) goes away.
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": BPF_NODE_STATE.kind, "metadata": {"name": self.node}}
        try:
            kube.apply_custom(
                self.custom, BPF_NODE_STATE_PLURAL, {**body, "status": status}, kube.NODE_DAEMON_MANAGER, status=True
            )
            self._written = status
            self.metrics.status_writes.labels("ok").inc()
            log.info(
                "status written",
                extra={"node": self.node, "attached": status["attached"], "failed": len(failed), "interim": interim},
            )
        except ApiException as exc:
            self.metrics.status_writes.labels(str(exc.status)).inc()
            log.warning("status write failed", extra={"node": self.node, "status": exc.status, "reason": exc.reason})
