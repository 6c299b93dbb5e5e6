"""From (RuntimeSecurityPolicies, Pods) to each node's spec.runtimeSecurity: pure functions.

A policy selects pods of its own namespace only (never another's), and of those the
running containers (by name when spec.containers is given; init and ephemeral containers
too, so `kubectl debug` is no way around a policy). A node carries only the policies that
select one of its pods, each with just those pods. While some valid policy exists, every
node gets a spec.runtimeSecurity (possibly empty), so the datapath is loaded once and a
new pod or policy is a map update; with none, the key is absent and nodes unload it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from beekeeper.crds.nodestate import CONTAINER_ID_PATTERN
from beekeeper.crds.runtimesecurity import RuntimeSecurityPolicy
from beekeeper.operator.pods import TERMINAL_PHASES
from beekeeper.operator.selectors import matches

Body = Mapping[str, Any]
CONTAINER_ID_RE = re.compile(CONTAINER_ID_PATTERN)
"""IDs the node state would refuse (another runtime's spelling) are left out rather than failing the node."""
STATUS_LISTS = ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")


@dataclass
class RuntimeOutcome:
    """What compilation found for one policy: an error, or its selected pods and their nodes."""

    namespace: str
    name: str
    generation: int | None
    error: str | None = None
    selected: list[str] = field(default_factory=list)
    """namespace/name of the selected live pods (scheduled or not)."""
    nodes: set[str] = field(default_factory=set)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class RuntimeCompiled:
    policies: dict[str, RuntimeOutcome] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """node -> spec.runtimeSecurity (wire form, revision included); absent when no valid policy exists."""


def _error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}"[:1024]


def running_containers(pod: Body, names: Iterable[str] | None) -> list[dict[str, str]]:
    """(name, containerID) of the pod's containers that have one, narrowed to `names` when given."""
    wanted = set(names) if names is not None else None
    status = pod.get("status") or {}
    out: dict[str, str] = {}
    for key in STATUS_LISTS:
        for entry in status.get(key) or []:
            name, cid = entry.get("name"), entry.get("containerID")
            if not name or not cid or (wanted is not None and name not in wanted):
                continue
            if CONTAINER_ID_RE.match(cid):
                out.setdefault(name, cid)
    return [{"name": n, "containerId": c} for n, c in sorted(out.items())]


def revision(runtime_security: Mapping[str, Any]) -> str:
    """sha256 over spec.runtimeSecurity's wire form (revision excluded)."""
    canonical = json.dumps(
        {k: v for k, v in runtime_security.items() if k != "revision"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def compile_runtime(policies: Iterable[Body], pods: Iterable[Body], nodes: Iterable[str]) -> RuntimeCompiled:
    """Per node the policies selecting its pods; per policy what was selected (or why it is invalid)."""
    result = RuntimeCompiled()
    live = [p for p in pods if (p.get("status") or {}).get("phase") not in TERMINAL_PHASES]
    live = [p for p in live if not (p.get("metadata") or {}).get("deletionTimestamp")]
    by_namespace: dict[str, list[Body]] = {}
    for pod in live:
        by_namespace.setdefault(pod["metadata"].get("namespace", ""), []).append(pod)
    per_node: dict[str, list[dict[str, Any]]] = {}
    valid = 0
    for body in sorted(policies, key=lambda b: (b["metadata"]["namespace"], b["metadata"]["name"])):
        meta = body["metadata"]
        outcome = RuntimeOutcome(meta["namespace"], meta["name"], meta.get("generation"))
        result.policies[outcome.ref] = outcome
        try:
            policy = RuntimeSecurityPolicy.model_validate({**body, "status": None})
        except ValidationError as exc:
            outcome.error = _error(exc)
            continue
        valid += 1
        spec = policy.spec
        selector = spec.pod_selector.to_dict()
        local: dict[str, list[dict[str, Any]]] = {}
        for pod in sorted(by_namespace.get(outcome.namespace, []), key=lambda p: p["metadata"]["name"]):
            pmeta = pod["metadata"]
            if not matches(selector, pmeta.get("labels")):
                continue
            outcome.selected.append(f"{outcome.namespace}/{pmeta['name']}")
            node = (pod.get("spec") or {}).get("nodeName")
            if not node or not pmeta.get("uid"):
                continue
            outcome.nodes.add(node)
            local.setdefault(node, []).append(
                {
                    "namespace": outcome.namespace,
                    "pod": pmeta["name"],
                    "uid": pmeta["uid"],
                    "containers": running_containers(pod, spec.containers),
                }
            )
        entry = {
            "policy": outcome.ref,
            "generation": outcome.generation or 1,
            "mode": spec.mode.value,
            **({"defaultAction": spec.default_action.value} if spec.default_action else {}),
            "rules": [r.to_dict() for r in spec.rules],
        }
        for node, local_pods in local.items():
            per_node.setdefault(node, []).append({**entry, "pods": local_pods})
    if valid:
        for node in nodes:
            wire: dict[str, Any] = {"policies": per_node.get(node, [])}
            result.nodes[node] = {**wire, "revision": revision(wire)}
    return result
