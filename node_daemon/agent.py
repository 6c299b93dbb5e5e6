"""The node daemon's reconcile step: one BpfNodeState in, kernel converged, status out.

The kernel work is the Backend's (BpfPrograms) and the PolicyAgent's (the
NetworkIdentityPolicy datapath); this module decides what to ask them and what to
report, and writes status only when it changed (a quiet node makes no API writes).
Without a PolicyAgent (the fake backend) a spec.networkPolicy is reported as not
enforced, so nobody mistakes such a node for one that filters traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from beekeeper.crds.common import Condition, now, set_condition, timestamp
from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, GROUP, VERSION
from beekeeper.crds.nodestate import NetworkPolicyStatus, NodeProgram
from beekeeper.node_daemon import translate
from beekeeper.node_daemon.backend import Backend, Phase, ProgramReport
from beekeeper.node_daemon.metrics import BpfCollector

if TYPE_CHECKING:  # the policy datapath loads bcc; a daemon without it (fake backend) never imports it
    from beekeeper.node_daemon.policy_agent import PolicyAgent

log = logging.getLogger(__name__)

_OK_PHASES = {Phase.ATTACHED.value, Phase.LOADED.value}
POLICY_STATUS_KEYS = [field.alias or name for name, field in NetworkPolicyStatus.model_fields.items()]


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
    ) -> None:
        self.node = node
        self.backend = backend
        self.custom = client.CustomObjectsApi(api)
        self.collector = collector
        self.policy = policy
        self.policy_disabled = policy_disabled
        """status.networkPolicy.message when spec asks for a policy and there is no PolicyAgent."""
        self.policy_slices = policy_slices
        """This node's BpfPolicySlices as last watched (name -> object)."""
        self.capabilities = translate.capabilities(backend.capabilities())
        self._written: dict[str, Any] | None = None
        self._applied: dict[str, str] = {}
        self._generation: int | None = None
        self._policy_status: dict[str, Any] | None = None

    def reconcile(self, obj: Mapping[str, Any], resync: bool = False) -> None:
        """Make the kernel match obj.spec and report obj.status.

        Events that only carry our own status writes (same generation) are skipped, or the
        daemon would rebuild failing programs in a loop; the periodic resync retries them.
        """
        generation = obj["metadata"].get("generation")
        if not resync and generation == self._generation:
            return
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
            self._write_status(generation, interim + broken, interim=True)
            previous = {(p["bpfProgram"], p["name"]): p for p in (self._written or {}).get("programs") or []}

        statuses: list[dict[str, Any]] = []
        for entry in entries:
            reports = self._apply(entry)
            self._applied[entry.bpf_program] = entry.content_hash
            statuses += translate.program_statuses(entry, reports, previous, timestamp())
        desired = {e.bpf_program for e in entries}
        for key in sorted(set(self.backend.adopted()) - desired):
            log.info("removing program no longer desired", extra={"node": self.node, "bpfprogram": key})
            self.backend.remove(key)
            self._applied.pop(key, None)
        _add_warnings(statuses, self.collector.set_programs(entries))
        self._reconcile_policy(spec, generation)
        self._write_status(generation, statuses + broken)

    def reconcile_policy(self, obj: Mapping[str, Any]) -> None:
        """Only the policy datapath, e.g. after pod interfaces or routes changed on the host."""
        if self.policy is None:
            return
        if self._written is None or self._generation != obj["metadata"].get("generation"):
            self.reconcile(obj)
            return
        self._reconcile_policy(obj.get("spec") or {}, self._generation)
        self._write_status(self._generation, list(self._written.get("programs") or []))

    def policy_retry_due(self) -> bool:
        """Some endpoint still has no interface: worth looking again soon."""
        return self.policy is not None and self.policy.unresolved > 0

    def _reconcile_policy(self, spec: Mapping[str, Any], generation: int | None) -> None:
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
            self._policy_status = self.policy.reconcile(
                spec.get("networkPolicy"), generation, previous, self.policy_slices()
            )
        except Exception as exc:  # keep reporting the programs; the next event or resync retries
            log.exception("policy reconcile failed", extra={"node": self.node})
            self._policy_status = {**(previous or {}), "enforcing": False, "message": f"internal error: {exc}"[:2048]}

    def remove_all(self) -> None:
        """Our BpfNodeState was deleted (node leaving the cluster): detach everything."""
        for key in sorted(self.backend.adopted()):
            log.info("removing program, node state deleted", extra={"node": self.node, "bpfprogram": key})
            self.backend.remove(key)
        if self.policy is not None:
            self.policy.remove()
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

    def _apply(self, entry: NodeProgram) -> list[ProgramReport]:
        try:
            return self.backend.apply(translate.program_unit(entry))
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
        if policy is not None or "networkPolicy" in (self._written or {}):
            status["networkPolicy"] = policy  # None clears a stale report (merge patch)
        if status == self._written:
            return
        body = dict(status)
        if policy is not None:  # a merge patch keeps keys it does not mention: clear dropped ones explicitly
            body["networkPolicy"] = {**dict.fromkeys(POLICY_STATUS_KEYS), **policy}
        try:
            self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, BPF_NODE_STATE_PLURAL, self.node, {"status": body}
            )
            self._written = status
            log.info(
                "status written",
                extra={"node": self.node, "attached": status["attached"], "failed": len(failed), "interim": interim},
            )
        except ApiException as exc:
            log.warning("status write failed", extra={"node": self.node, "status": exc.status, "reason": exc.reason})
