"""The node daemon's figures about itself: builds, reconcile passes, status writes, programs by phase.

Kept apart from what the daemon exports for BpfPrograms and policies (metrics.py,
policy_metrics.py): these are the daemon's health, the same on every node, with small
fixed label sets (results, reasons, phases), so their series count does not grow with use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from beekeeper.node_daemon.backend import Phase, ProgramReport

BUILD_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
"""Seconds: a bcc build of a small program takes about a second, the compile timeout is 120 s."""
SYNC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class DaemonMetrics:
    """Registered in `registry` (None: counted but exported nowhere, e.g. in unit tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.builds = Counter(
            "beekeeper_node_builds",
            "BpfProgram builds (compile, verify, load, attach of a new content) by result",
            ["result"],
            **kw,
        )
        self.build_failures = Counter(
            "beekeeper_node_build_failures",
            "Failed BpfProgram builds by the reason reported on the program",
            ["reason"],
            **kw,
        )
        self.build_seconds = Histogram(
            "beekeeper_node_build_duration_seconds", "Time one BpfProgram build took", buckets=BUILD_BUCKETS, **kw
        )
        self.sync_seconds = Histogram(
            "beekeeper_node_sync_duration_seconds",
            "Time one pass converging the kernel took: full (a BpfNodeState change or resync: programs and "
            "policy) or policy (the policy datapath alone, also within a full pass)",
            ["part"],
            buckets=SYNC_BUCKETS,
            **kw,
        )
        self.sync_errors = Counter(
            "beekeeper_node_sync_errors", "Passes that ended in an unexpected error (retried), by part", ["part"], **kw
        )
        self.status_writes = Counter(
            "beekeeper_node_status_writes",
            "BpfNodeState status writes by result (ok, or the HTTP status)",
            ["result"],
            **kw,
        )
        self.programs = Gauge(
            "beekeeper_node_programs",
            "Functions of this node's BpfPrograms by phase, as last reported",
            ["phase"],
            **kw,
        )
        for part in ("full", "policy"):
            self.sync_seconds.labels(part)
            self.sync_errors.labels(part)
        for result in ("ok", "failed"):
            self.builds.labels(result)
        self.status_writes.labels("ok")
        self.set_programs([])

    @contextmanager
    def sync(self, part: str) -> Iterator[None]:
        """Time a pass; an exception counts as an error and propagates."""
        started = time.monotonic()
        try:
            yield
        except Exception:
            self.sync_errors.labels(part).inc()
            raise
        finally:
            self.sync_seconds.labels(part).observe(time.monotonic() - started)

    def built(self, reports: Sequence[ProgramReport], seconds: float) -> None:
        """One build of a new content, with the reports of its functions."""
        self.build_seconds.observe(seconds)
        failed = [r for r in reports if r.phase == Phase.FAILED]
        self.builds.labels("failed" if failed else "ok").inc()
        if failed:
            self.build_failures.labels(failed[0].reason or "Failed").inc()

    def set_programs(self, statuses: Sequence[dict[str, Any]]) -> None:
        """Every phase gets a series (0 included), so a phase emptying reads 0, not absent."""
        for phase in Phase:
            self.programs.labels(phase.value).set(sum(1 for s in statuses if s.get("phase") == phase.value))
