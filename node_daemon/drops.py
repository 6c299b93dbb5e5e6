"""Why was this flow dropped: the policy datapath's drop events, kept and explained.

The datapath reports every dropped packet on a ring buffer with the flow as policy
judged it (the tuple of its first packet), the local endpoint, the peer's identities and
the deciding policy or "default deny". A reader thread keeps the most recent events in
a bounded log; queries group repeated drops of one flow (retransmits, every packet of a
revoked connection) into one answer with a count, newest first.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from beekeeper.node_daemon.policy_maps import Direction, DropEvent, DropReason

log = logging.getLogger(__name__)

PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}
PROTOCOL_NUMBERS = {name: number for number, name in PROTOCOL_NAMES.items()}
DEFAULT_CAPACITY = 8192


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


@dataclass(frozen=True)
class DropRecord:
    """One drop event with what the daemon knew when it read it."""

    wall_time: float
    event: DropEvent
    endpoint: str | None
    """namespace/pod of the local endpoint whose interface dropped it."""


def explain(event: DropEvent, endpoint: str | None) -> str:
    """One sentence a person can act on: who decided, in which direction, for which peer."""
    where = f"pod {endpoint}" if endpoint else f"the pod on interface {event.ifindex}"
    side = "into" if event.direction is Direction.INGRESS else "out of"
    service = protocol_name(event.protocol) + (f"/{event.dport}" if event.protocol in (6, 17, 132) else "")
    peer = f"identity {event.peer_identity}"
    if event.peer_cidr_identity:
        peer += f" (CIDR identity {event.peer_cidr_identity})"
    match event.reason:
        case DropReason.DENY_RULE:
            text = f"denied by {event.policy or f'policy index {event.policy_index}'}: a deny rule matches this flow "
            text += f"{side} {where} (deny rules win over allows)"
        case DropReason.DEFAULT_DENY:
            text = f"default deny: {where} is isolated for {event.direction.value} and no policy allows "
            text += f"{peer} on {service}"
        case DropReason.SPOOFED_SOURCE:
            text = f"the source address is not the IP of {where}"
        case DropReason.UNSUPPORTED_L3:
            text = f"not IPv4: {where} is isolated for {event.direction.value} and only IPv4 is evaluated"
        case DropReason.MALFORMED:
            text = f"malformed IPv4 packet {side} {where}"
        case _:
            text = f"dropped {side} {where} for an unknown reason"
    if event.revoked:
        text += "; the flow was established, then revoked by a policy change"
    return text


class DropLog:
    """The last `capacity` drop records, safe to add to and query from different threads."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._records: deque[DropRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, record: DropRecord) -> None:
        with self._lock:
            self._records.append(record)

    def query(
        self,
        src: str | None = None,
        dst: str | None = None,
        port: int | None = None,
        protocol: int | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Matching drops grouped by flow and verdict, newest first (src/dst: the flow's initiator/responder)."""
        with self._lock:
            records = list(self._records)
        groups: dict[tuple, dict[str, Any]] = {}
        for record in reversed(records):
            ev = record.event
            if (
                (src and ev.saddr != src)
                or (dst and ev.daddr != dst)
                or (port is not None and ev.dport != port)
                or (protocol is not None and ev.protocol != protocol)
            ):
                continue
            key: tuple[object, ...]
            key = (ev.ifindex, ev.direction, ev.saddr, ev.daddr, ev.dport, ev.protocol, ev.reason, ev.policy_index)
            key += (ev.revoked, ev.peer_identity, ev.peer_cidr_identity)
            group = groups.get(key)
            if group is None:
                if len(groups) == limit:
                    continue
                groups[key] = group = _describe(record)
            group["count"] += 1
            group["firstSeen"] = _iso(record.wall_time)
        return list(groups.values())


def _iso(wall_time: float) -> str:
    return dt.datetime.fromtimestamp(wall_time, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _describe(record: DropRecord) -> dict[str, Any]:
    ev = record.event
    return {
        "lastSeen": _iso(record.wall_time),
        "firstSeen": _iso(record.wall_time),
        "count": 0,
        "src": ev.saddr,
        "dst": ev.daddr,
        "port": ev.dport,
        "protocol": protocol_name(ev.protocol),
        "direction": ev.direction.value,
        "endpoint": record.endpoint,
        "localIdentity": ev.local_identity,
        "peerIdentity": ev.peer_identity,
        "peerCidrIdentity": ev.peer_cidr_identity or None,
        "reason": ev.reason.value,
        "policy": ev.policy,
        "revoked": ev.revoked,
        "explanation": explain(ev, record.endpoint),
    }


class DropSource(Protocol):
    def drops(self, timeout: float = 0.0) -> Iterator[DropEvent]: ...


class DropRecorder:
    """A thread moving a datapath's drop events into a DropLog until stopped.

    The ring buffer has a single consumer position, so this is the only reader; stop it
    before closing the datapath.
    """

    POLL_SECONDS = 0.25

    def __init__(self, source: DropSource, drop_log: DropLog, endpoint_of: Callable[[int], str | None]) -> None:
        self._source = source
        self._log = drop_log
        self._endpoint_of = endpoint_of
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drop-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for event in self._source.drops(timeout=self.POLL_SECONDS):
                    # the event's clock is CLOCK_MONOTONIC; its age gives the wall time
                    wall = time.time() - (time.monotonic_ns() - event.timestamp_ns) / 1e9
                    self._log.add(DropRecord(wall, event, self._endpoint_of(event.ifindex)))
            except Exception:
                log.exception("reading drop events failed; retrying")
                self._stop.wait(1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
