"""Matched execs after the ring buffer: a bounded log for the stream, and Events on the Pod.

The log keeps the last `capacity` events with increasing sequence numbers, so a follower
(`beekeeper events --follow`, long-polling GET /exec-events?since=N) sees each event once
and learns when it fell behind. Kubernetes Events are aggregated per (pod, policy, rule,
action, file) and written at most once per key and flush period, and at most
MAX_WRITES_PER_FLUSH per period: a pod exec-ing a blocked binary in a loop costs the API a
few patches, not one create per exec.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 4096
FLUSH_SECONDS = 5.0
MAX_WRITES_PER_FLUSH = 20
FILTERS = ("namespace", "pod", "policy", "container", "action")


class ExecEventLog:
    """The last `capacity` matched execs, each with a sequence number; thread-safe."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._events: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._next = 1
        self._cond = threading.Condition()

    def add(self, event: Mapping[str, Any]) -> None:
        with self._cond:
            self._events.append({"seq": self._next, **event})
            self._next += 1
            self._cond.notify_all()

    def query(
        self, since: int = 0, limit: int = 100, wait: float = 0.0, **filters: str | None
    ) -> tuple[list[dict[str, Any]], int]:
        """Events after `since` matching every given filter, oldest first, and the next `since`.

        With `wait`, blocks up to that many seconds for a first matching event.
        """
        wanted = {k: v for k, v in filters.items() if v}
        with self._cond:
            while True:
                found = [
                    e for e in self._events if e["seq"] > since and all(str(e.get(k)) == v for k, v in wanted.items())
                ][:limit]
                last = self._next - 1
                if found or wait <= 0:
                    break
                if not self._cond.wait(timeout=wait):
                    wait = 0
        return found, (found[-1]["seq"] if len(found) == limit else last)


@dataclass
class _Pending:
    count: int
    first: dict[str, Any]
    last_time: str


def event_reason(action: str) -> str:
    return {"Blocked": "ExecBlocked", "Audited": "ExecAudited"}.get(action, "ExecMatched")


def event_message(event: Mapping[str, Any]) -> str:
    """What `kubectl describe pod` shows, e.g. Blocked exec of /bin/sh by RuntimeSecurityPolicy shop/no-shells."""
    verb = {"Blocked": "Blocked", "Audited": "Audited"}.get(event.get("action") or "", "Matched")
    would = " (Audit mode: it would have been blocked)" if event.get("mode") == "Audit" and verb == "Audited" else ""
    container = f" in container {event['container']}" if event.get("container") else ""
    return (
        f"{verb} exec of {event.get('file') or event.get('comm')}{container} by RuntimeSecurityPolicy "
        f"{event.get('policy')} (rule {event.get('rule')}; parent {event.get('parent')}){would}"
    )


class PodEventPoster:
    """Aggregates matched execs into core/v1 Events on their Pods, written every flush period."""

    def __init__(self, api: client.ApiClient, node: str, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.core = client.CoreV1Api(api)
        self.node = node
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._pending: dict[tuple[str, ...], _Pending] = {}
        self._posted: dict[tuple[str, ...], tuple[str, int]] = {}
        """key -> (Event name, count written)."""
        self._lock = threading.Lock()

    def add(self, event: Mapping[str, Any]) -> None:
        if not event.get("namespace") or not event.get("pod"):
            return
        key = tuple(str(event.get(k)) for k in ("namespace", "pod", "policy", "rule", "action", "file"))
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = _Pending(1, dict(event), event.get("time") or "")
            else:
                pending.count += 1
                pending.last_time = event.get("time") or pending.last_time

    def flush(self) -> int:
        """Write up to MAX_WRITES_PER_FLUSH aggregated Events; the rest wait for the next flush."""
        with self._lock:
            keys = list(self._pending)[:MAX_WRITES_PER_FLUSH]
            batch = {k: self._pending.pop(k) for k in keys}
        for key, pending in batch.items():
            try:
                self._write(key, pending)
            except ApiException as exc:
                log.warning("pod event not written", extra={"pod": f"{key[0]}/{key[1]}", "status": exc.status})
            except Exception as exc:  # transport errors: the next match writes again
                log.warning("pod event not written", extra={"pod": f"{key[0]}/{key[1]}", "error": str(exc)[:200]})
        return len(batch)

    def _write(self, key: tuple[str, ...], pending: _Pending) -> None:
        namespace, pod = key[0], key[1]
        now = self._clock()
        posted = self._posted.get(key)
        if posted is not None:
            name, count = posted
            try:
                self.core.patch_namespaced_event(
                    name, namespace, {"count": count + pending.count, "lastTimestamp": now.isoformat()}
                )
                self._posted[key] = (name, count + pending.count)
                return
            except ApiException as exc:
                if exc.status != 404:  # expired (events have a TTL): create a new one
                    raise
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{pod}.", namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version="v1", kind="Pod", name=pod, namespace=namespace, uid=pending.first.get("podUid")
            ),
            type="Warning" if pending.first.get("action") == "Blocked" else "Normal",
            reason=event_reason(pending.first.get("action") or ""),
            message=event_message(pending.first)[:1024],
            source=client.V1EventSource(component="beekeeper-node-daemon", host=self.node),
            reporting_component="beekeeper.dev/node-daemon",
            reporting_instance=self.node,
            first_timestamp=now,
            last_timestamp=now,
            count=pending.count,
        )
        written = self.core.create_namespaced_event(namespace, event)
        self._posted[key] = (str(written.metadata.name), pending.count)
