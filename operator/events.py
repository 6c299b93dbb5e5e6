"""Kubernetes Events about status transitions of BpfPrograms and NetworkIdentityPolicies.

`kubectl describe` shows Events as a table, one row per event: the message is kept to one
short line (the full text, e.g. a compiler's output, stays on the object's status). An event is
named after what it announces (object uid, generation, type, reason, message), so

- the same transition again within one operator run bumps `count` and `lastTimestamp` of
  the existing event instead of adding a row (what client-go's event aggregation does);
- a transition an earlier operator run already announced for the same generation is not
  announced again after a restart (the create answers 409 and nothing else is written).

`reportingInstance` names this operator instance: the pod name (POD_NAME, set by the chart
from the downward API), else the host name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from beekeeper.crds.names import GROUP, VERSION

log = logging.getLogger(__name__)

COMPONENT = "beekeeper-operator"
REPORTING_CONTROLLER = "beekeeper.dev/operator"
POD_NAME_ENV = "POD_NAME"
MESSAGE_MAX = 256
"""Characters of an event message; the status carries the rest."""
REMEMBERED = 4096
"""Event names this run posted (for aggregation); the oldest are forgotten first."""
CLUSTER_SCOPED_NAMESPACE = "default"
"""Where events about cluster-scoped objects go, as kubectl describe looks for them."""


@dataclass(frozen=True)
class Notice:
    """One Event to post: about `body` (the object as read, of `kind`), with a type, a reason and a message."""

    kind: str
    body: Mapping[str, Any]
    type: str
    reason: str
    message: str


def one_line(message: str, limit: int = MESSAGE_MAX) -> str:
    """The message's lines joined by "; " and shortened to `limit` characters (saying so when shortened)."""
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    suffix = " ... (full text in status)"
    if len(text) <= limit:
        return text
    return text[: limit - len(suffix)].rstrip() + suffix


def program_notice(body: Mapping[str, Any], status: Mapping[str, Any]) -> Notice:
    """The Event for a BpfProgram whose phase just changed to status["phase"]."""
    phase = status["phase"]
    cond = {c["type"]: c for c in status["conditions"]}
    if phase == "Degraded":
        return Notice("BpfProgram", body, "Warning", "Degraded", cond["Degraded"]["message"])
    return Notice("BpfProgram", body, "Normal", phase, cond["Ready"]["message"])


def _policy_summary(status: Mapping[str, Any] | None) -> tuple[str, str, str, str] | None:
    """(event type, reason, message, key) of a NetworkIdentityPolicy status; None without conditions."""
    cond = {c["type"]: c for c in (status or {}).get("conditions") or []}
    valid, ready = cond.get("Valid"), cond.get("Ready")
    if valid is None or ready is None:
        return None
    if valid["status"] != "True":
        return "Warning", valid["reason"], valid["message"], f"Valid/{valid['reason']}"
    if ready["reason"] == "NodeStateNotWritten":
        return "Warning", ready["reason"], ready["message"], f"Ready/{ready['reason']}"
    return "Normal", ready["reason"], ready["message"], f"Ready/{ready['reason']}"


def policy_notice(
    body: Mapping[str, Any], status: Mapping[str, Any], previous: Mapping[str, Any] | None
) -> Notice | None:
    """The Event for a NetworkIdentityPolicy whose validity or Ready reason changed; None if neither did."""
    now, before = _policy_summary(status), _policy_summary(previous)
    if now is None or (before is not None and before[3] == now[3]):
        return None
    return Notice("NetworkIdentityPolicy", body, now[0], now[1], now[2])


def reporting_instance() -> str:
    """This operator instance: its pod (downward API) or, outside a cluster, its host."""
    return os.environ.get(POD_NAME_ENV) or socket.gethostname()


def event_name(notice: Notice) -> str:
    """A name per (object, generation, type, reason, one-line message): the same announcement maps to one Event."""
    meta = notice.body["metadata"]
    key = "\0".join(
        str(part)
        for part in (
            notice.kind,
            meta.get("namespace"),
            meta["name"],
            meta.get("uid"),
            meta.get("generation"),
            notice.type,
            notice.reason,
            one_line(notice.message),
        )
    )
    return f"{meta['name'][:200]}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"


class EventRecorder:
    """Posts Events, aggregating repeats; failures are logged, never raised (the status already says it)."""

    def __init__(self, core: client.CoreV1Api, instance: str | None = None) -> None:
        self.core = core
        self.instance = instance or reporting_instance()
        self._posted: OrderedDict[str, None] = OrderedDict()

    def post(self, notice: Notice) -> None:
        meta = notice.body["metadata"]
        namespace = meta.get("namespace") or CLUSTER_SCOPED_NAMESPACE
        name = event_name(notice)
        try:
            if name in self._posted and self._repeat(namespace, name):
                self._posted.move_to_end(name)
            elif self._create(namespace, name, notice):
                self._remember(name)
            else:  # announced by an earlier run for this generation: not again
                self._remember(name)
                log.debug("event already announced", extra={"event": name, "reason": notice.reason})
        except ApiException as exc:
            log.warning("posting event failed", extra={"reason": notice.reason, "status": exc.status})
        except Exception as exc:  # transport errors: an Event is informational
            log.warning("posting event failed", extra={"reason": notice.reason, "error": str(exc)[:300]})

    def _remember(self, name: str) -> None:
        self._posted[name] = None
        while len(self._posted) > REMEMBERED:
            self._posted.popitem(last=False)

    def _create(self, namespace: str, name: str, notice: Notice) -> bool:
        """False when an Event of that name exists already."""
        meta = notice.body["metadata"]
        now = dt.datetime.now(dt.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=notice.kind,
                name=meta["name"],
                namespace=meta.get("namespace"),
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            type=notice.type,
            reason=notice.reason,
            message=one_line(notice.message),
            source=client.V1EventSource(component=COMPONENT),
            reporting_component=REPORTING_CONTROLLER,
            reporting_instance=self.instance,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self.core.create_namespaced_event(namespace, event)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def _repeat(self, namespace: str, name: str) -> bool:
        """The same announcement again in this run: one more on the existing Event's count (False: it expired)."""
        try:
            existing = self.core.read_namespaced_event(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return False
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {
            "count": (existing.count or 1) + 1,
            "lastTimestamp": now,
            "metadata": {"resourceVersion": existing.metadata.resource_version},
        }
        self.core.patch_namespaced_event(name, namespace, patch)
        return True
