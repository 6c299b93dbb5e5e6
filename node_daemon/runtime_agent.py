"""The node daemon's runtime-security step: spec.runtimeSecurity in, maps filled, status out.

Each selected container becomes a scope: its kernel identities (cgroup ids, mount
namespace) point at the scope, and the scope's entries are the (device, inode) of every
listed path and prefix directory as resolved inside that container, with the verdict of
the strongest rule across the policies selecting it (Block over Audit over Allow). Audit
mode turns a Block into an Audit. The hook loads once; every change afterwards is a map
diff. Matches come back as events (ring buffer) and counters (a pinned map).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from beekeeper.crds.nodestate import NodeRuntimeSecurity
from beekeeper.node_daemon.runtime_maps import (
    DEFAULT_KEY,
    FILE_KEY,
    SCOPE_KEY,
    SCOPE_VALUE,
    SYNCED_MAPS,
    VERDICT,
    Action,
    Event,
    rule_id,
)
from beekeeper.node_daemon.runtime_pods import ContainerIdentity, cgroup_mounts, container_identity, resolve

log = logging.getLogger(__name__)

MAX_MISSING = 64
ACTIONS = {"Block": Action.BLOCK, "Audit": Action.AUDIT, "Allow": Action.ALLOW}
Identify = Callable[[str, str], ContainerIdentity | None]
"""(pod uid, container id) -> the container's kernel identity."""
Resolve = Callable[[int, str, bool], tuple[int, int] | None]
"""(pid, path, is a directory) -> (kernel dev, inode) inside that process's root."""


@dataclass(frozen=True)
class RuleInfo:
    policy: str
    rule: str
    configured: str
    """Block, Audit or Allow as written (or the defaultAction)."""
    action: Action
    """What the datapath does (Audit mode applied)."""
    mode: str


@dataclass(frozen=True)
class ScopeInfo:
    namespace: str
    pod: str
    container: str
    pod_uid: str
    """Events on the Pod name it: `kubectl describe pod` lists only Events whose involvedObject.uid is the pod's."""


@dataclass
class Compiled:
    """The maps' desired content and the tables that explain their numbers."""

    maps: dict[str, dict[bytes, bytes]] = field(default_factory=lambda: {name: {} for name in SYNCED_MAPS})
    rules: dict[int, RuleInfo] = field(default_factory=dict)
    scopes: dict[int, ScopeInfo] = field(default_factory=dict)
    containers: int = 0
    missing: list[str] = field(default_factory=list)


def _scope_id(uid: str, container: str, taken: Mapping[int, Any]) -> int:
    """Stable across restarts and pod churn (so a sync rewrites only what changed); never 0."""
    number = (zlib.crc32(f"{uid}/{container}".encode()) & 0x7FFFFFFF) or 1
    while number in taken:
        number = number % 0x7FFFFFFF + 1
    return number


def _effective(configured: Action, mode: str) -> Action:
    return Action.AUDIT if configured == Action.BLOCK and mode == "Audit" else configured


def compile_maps(spec: NodeRuntimeSecurity, identify: Identify, resolve_in: Resolve) -> Compiled:
    """Pure given its two lookups: what the maps must hold for this spec on this node."""
    out = Compiled()
    verdicts: dict[bytes, tuple[Action, int, int]] = {}  # file key -> (action, rule, prefix)
    defaults: dict[int, tuple[Action, int]] = {}
    identities: dict[tuple[str, str], tuple[int, ContainerIdentity | None]] = {}
    for policy in spec.policies or []:
        for pod in policy.pods or []:
            for container in pod.containers:
                key = (pod.uid, container.name)
                if key not in identities:
                    ident = identify(pod.uid, container.container_id)
                    scope = _scope_id(pod.uid, container.name, out.scopes)
                    out.scopes[scope] = ScopeInfo(pod.namespace, pod.pod, container.name, pod.uid)
                    identities[key] = (scope, ident)
                    if ident is None or ident.pid is None:
                        if len(out.missing) < MAX_MISSING:
                            out.missing.append(f"{pod.namespace}/{pod.pod}/{container.name}")
                        continue
                    out.containers += 1
                    for kind, number in ident.keys:
                        out.maps["rs_scopes"][SCOPE_KEY.pack(kind, 0, number)] = SCOPE_VALUE.pack(scope)
                scope, ident = identities[key]
                if ident is None or ident.pid is None:
                    continue
                for rule in policy.rules:
                    configured = ACTIONS[rule.action.value]
                    action = _effective(configured, policy.mode.value)
                    rid = rule_id(policy.policy, rule.name, action, rule.action.value)
                    out.rules[rid] = RuleInfo(policy.policy, rule.name, rule.action.value, action, policy.mode.value)
                    for prefix, paths in ((0, rule.exec.paths or []), (1, rule.exec.path_prefixes or [])):
                        for path in paths:
                            found = resolve_in(ident.pid, path, bool(prefix))
                            if found is None:
                                continue
                            file_key = FILE_KEY.pack(scope, *found)
                            if (action, rid, prefix) > verdicts.get(file_key, (Action.ALLOW, 0, 0)):
                                verdicts[file_key] = (action, rid, prefix)
                if policy.default_action is not None:
                    configured = ACTIONS[policy.default_action.value]
                    action = _effective(configured, policy.mode.value)
                    rid = rule_id(policy.policy, "default", action, policy.default_action.value)
                    out.rules[rid] = RuleInfo(
                        policy.policy, "default", policy.default_action.value, action, policy.mode.value
                    )
                    if (action, rid) > defaults.get(scope, (Action.ALLOW, 0)):
                        defaults[scope] = (action, rid)
    for file_key, (action, rid, prefix) in verdicts.items():
        out.maps["rs_files"][file_key] = VERDICT.pack(rid, action, prefix)
    for scope, (action, rid) in defaults.items():
        out.maps["rs_defaults"][DEFAULT_KEY.pack(scope)] = VERDICT.pack(rid, action, 0)
    return out


def _boot_offset() -> float:
    """Wall time minus boot time: turns the datapath's bpf_ktime_get_boot_ns into a timestamp."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class RuntimeAgent:
    """Owns the runtime datapath of one node. Not thread-safe except poll_events (its own thread)."""

    def __init__(self, node: str, bpffs_dir: Path) -> None:
        self.node = node
        self.bpffs_dir = Path(bpffs_dir)
        self.datapath: Any = None
        self.error: str | None = None
        self.hook: str | None = None
        self._compiled = Compiled()
        self._seen: dict[int, RuleInfo] = {}
        """Every rule id this daemon has written: counters of rules since changed still count for their policy."""
        self._reader: Any = None
        self._reader_lock = threading.Lock()
        """poll_events runs in the event thread; remove and close must not free the reader under it."""
        self._pending: list[Event] = []

    def _open(self) -> None:
        from beekeeper.node_daemon.runtime_datapath import RuntimeDatapath  # needs bpffs and libbpf

        if self.datapath is None:
            self.datapath = RuntimeDatapath(self.bpffs_dir)
            self.hook = self.datapath.hook

    def adopt(self) -> None:
        """At start-up: keep a pinned datapath (and its enforcement) without waiting for the spec."""
        if (self.bpffs_dir / "link").exists():
            self._open()

    def reconcile(self, raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Converge to spec.runtimeSecurity; returns status.runtimeSecurity (None when spec has none)."""
        if raw is None:
            self.remove()
            return None
        try:
            spec = NodeRuntimeSecurity.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            return {"enforcing": False, "message": f"spec not understood: {first['loc']}: {first['msg']}"[:2048]}
        try:
            self._open()
        except Exception as exc:  # no hook on this node: report it, keep the rest of the daemon going
            log.error("runtime security datapath unavailable", extra={"node": self.node, "error": str(exc)[:300]})
            return {"enforcing": False, "message": f"no exec hook: {exc}"[:2048]}
        v2, v1 = cgroup_mounts()
        self_mntns = os.stat("/proc/self/ns/mnt").st_ino

        denied: list[str] = []

        def identify(uid: str, container_id: str) -> ContainerIdentity | None:
            try:
                return container_identity(uid, container_id, v2, v1, self_mntns)
            except PermissionError as exc:
                denied.append(f"{exc.strerror}: {exc.filename}")
                return None

        def resolve_in(pid: int, path: str, directory: bool) -> tuple[int, int] | None:
            try:
                return resolve(f"/proc/{pid}/root", path, directory)
            except OSError:
                return None

        compiled = compile_maps(spec, identify, resolve_in)
        writes = self.datapath.sync(compiled.maps)
        self._compiled = compiled
        self._seen.update(compiled.rules)
        if writes:
            log.info(
                "runtime security maps synced",
                extra={"node": self.node, "writes": writes, "containers": compiled.containers},
            )
        status: dict[str, Any] = {
            "enforcing": not compiled.missing,
            "hook": self.hook,
            "containers": compiled.containers,
            "observedRevision": spec.revision,
            "matches": self.matches(),
        }
        if compiled.missing:
            status["missing"] = compiled.missing
            status["message"] = f"{len(compiled.missing)} selected containers not found on the node yet"
            if denied:
                status["message"] += f"; {denied[0]} (reading a container's /proc entries needs CAP_SYS_PTRACE)"
        return status

    def matches(self) -> dict[str, int]:
        """Policy -> execs matched, from the pinned counters of the rules in the current spec."""
        if self.datapath is None:
            return {}
        out: dict[str, int] = {}
        for rid, count in self.datapath.counts().items():
            info = self._seen.get(rid)
            if info is not None:
                out[info.policy] = out.get(info.policy, 0) + count
        return out

    def rule_counts(self) -> list[tuple[RuleInfo, str, int]]:
        """(rule, namespace, count) for the metrics."""
        if self.datapath is None:
            return []
        rules = self._seen
        return [
            (rules[rid], rules[rid].policy.split("/", 1)[0], count)
            for rid, count in self.datapath.counts().items()
            if rid in rules
        ]

    def describe(self, event: Event, offset: float | None = None) -> dict[str, Any]:
        """An event as the stream and the CLI show it."""
        scope = self._compiled.scopes.get(event.scope)
        rule = self._seen.get(event.rule)
        wall = event.boot_ns / 1e9 + (offset if offset is not None else _boot_offset())
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z",
            "node": self.node,
            "namespace": scope.namespace if scope else None,
            "pod": scope.pod if scope else None,
            "podUid": scope.pod_uid if scope else None,
            "container": scope.container if scope else None,
            "pid": event.pid,
            "ppid": event.ppid,
            "file": event.filename,
            "inode": event.ino,
            "comm": event.comm,
            "parent": event.parent_exe or event.parent_comm,
            "policy": rule.policy if rule else None,
            "rule": rule.rule if rule else None,
            "configuredAction": rule.configured if rule else None,
            "action": {Action.BLOCK: "Blocked", Action.AUDIT: "Audited"}.get(event.action, "Allowed"),
            "mode": rule.mode if rule else None,
            "match": event.match,
            "hook": event.hook,
        }

    def poll_events(self, timeout_ms: int) -> list[dict[str, Any]]:
        """Matched execs since the last call (waits up to timeout_ms for the first)."""
        with self._reader_lock:
            if self.datapath is not None and self._reader is None:
                self._reader = self.datapath.events_reader(lambda raw: self._pending.append(Event.decode(raw)))
            if self._reader is not None:
                self._reader.poll(timeout_ms)
            events, self._pending = self._pending, []
        if self._reader is None:
            time.sleep(timeout_ms / 1000)
        offset = _boot_offset()
        return [self.describe(e, offset) for e in events]

    def remove(self) -> None:
        """No valid policy anywhere: detach the hook and unpin its maps."""
        self._close_reader()
        if self.datapath is None and (self.bpffs_dir / "link").exists():
            self._open()
        if self.datapath is not None:
            self.datapath.remove()
            log.info("runtime security datapath removed", extra={"node": self.node})
        self.datapath = None
        self.hook = None
        self._compiled = Compiled()
        self._seen = {}

    def close(self) -> None:
        """Daemon stops: everything stays pinned and enforcing."""
        self._close_reader()
        if self.datapath is not None:
            self.datapath.close()

    def _close_reader(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
