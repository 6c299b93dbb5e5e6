"""The operator's /metrics: what controller-runtime users look for, for beekeeper's one reconcile loop.

    beekeeper_operator_reconcile_passes_total{result}       passes by result (success, error)
    beekeeper_operator_reconcile_errors_total               failed passes (retried with back-off)
    beekeeper_operator_reconcile_loop_restarts_total        the loop itself failed and was restarted
    beekeeper_operator_reconcile_duration_seconds           pass duration histogram
    beekeeper_operator_last_reconcile_timestamp_seconds     end of the last completed pass (alert on age)
    beekeeper_operator_pending_changes                      changes seen but not yet reconciled (queue depth)
    beekeeper_operator_api_writes_total{resource,verb,code} writes to the API (create, patch, apply, delete)
    beekeeper_operator_identities                           NetworkIdentities allocated now
    beekeeper_operator_identity_changes_total{change}       identities allocated and released
    beekeeper_operator_cached_objects{kind}                 objects in the informers' cache per kind

plus process_*, python_* and beekeeper_build_info (beekeeper.process_metrics).

Served without authentication on the probe port, unlike the node daemon's: these are counts
with fixed label values (no object, namespace or policy names), and checking callers would
need the operator to be granted TokenReview and SubjectAccessReview creation cluster-wide.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from kubernetes import client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from beekeeper.operator.cache import KINDS, ClusterCache

PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_RESOURCE = re.compile(
    r"^/(?:api/v1|apis/[^/]+/[^/]+)(?:/namespaces/[^/]+)?/(?P<plural>[a-z0-9.-]+)(?:/[^/]+(?:/(?P<sub>[a-z]+))?)?$"
)


def write_labels(method: str, url: str, content_type: str | None) -> tuple[str, str] | None:
    """(resource, verb) of a write request, None for reads; resource is plural[/subresource]."""
    verbs = {"POST": "create", "PUT": "update", "DELETE": "delete", "PATCH": "patch"}
    verb = verbs.get(method.upper())
    if verb is None:
        return None
    if verb == "patch" and (content_type or "").startswith("application/apply-patch"):
        verb = "apply"
    path = url.split("://", 1)[-1]
    path = "/" + path.split("/", 1)[1] if "/" in path else "/"
    match = _RESOURCE.match(path.split("?", 1)[0])
    if match is None:
        return "other", verb
    return match["plural"] + (f"/{match['sub']}" if match["sub"] else ""), verb


class OperatorMetrics:
    """The operator's figures; registry None counts without exporting (unit tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.passes = Counter(
            "beekeeper_operator_reconcile_passes", "Reconcile passes by result (success, error)", ["result"], **kw
        )
        self.errors = Counter(
            "beekeeper_operator_reconcile_errors", "Reconcile passes that failed (retried with back-off)", **kw
        )
        self.restarts = Counter(
            "beekeeper_operator_reconcile_loop_restarts", "Times the reconcile loop failed and was restarted", **kw
        )
        self.duration = Histogram(
            "beekeeper_operator_reconcile_duration_seconds", "Time one reconcile pass took", buckets=PASS_BUCKETS, **kw
        )
        self.last_pass = Gauge(
            "beekeeper_operator_last_reconcile_timestamp_seconds",
            "Unix time the last reconcile pass completed (0 before the first)",
            **kw,
        )
        self.writes = Counter(
            "beekeeper_operator_api_writes",
            "Requests that change the API, by resource, verb and HTTP status code (0: no response)",
            ["resource", "verb", "code"],
            **kw,
        )
        self.identity_changes = Counter(
            "beekeeper_operator_identity_changes", "NetworkIdentities allocated and released", ["change"], **kw
        )
        for result in ("success", "error"):
            self.passes.labels(result)
        for change in ("allocated", "released"):
            self.identity_changes.labels(change)

    def count_writes(self, api: client.ApiClient) -> None:
        """Count every write made through `api` at its REST layer, whoever in the operator makes it."""
        request: Callable[..., Any] = api.rest_client.request

        def counted(method: str, url: str, headers: Mapping[str, str] | None = None, *args: Any, **kwargs: Any) -> Any:
            labels = write_labels(method, url, (headers or {}).get("Content-Type"))
            if labels is None:
                return request(method, url, headers, *args, **kwargs)
            try:
                response = request(method, url, headers, *args, **kwargs)
            except Exception:
                self.writes.labels(*labels, "0").inc()
                raise
            self.writes.labels(*labels, str(response.status)).inc()
            return response

        setattr(api.rest_client, "request", counted)  # noqa: B010 (mypy forbids assigning to a method)


class CacheCollector:
    """Scrape-time figures of the informers' cache: objects per kind, pending changes, identities."""

    def __init__(self, cache: ClusterCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        cached = GaugeMetricFamily(
            "beekeeper_operator_cached_objects", "Objects in the operator's cache, per kind", labels=["kind"]
        )
        for kind in KINDS:
            cached.add_metric([kind], len(self.cache.tables[kind]))
        yield cached
        yield GaugeMetricFamily(
            "beekeeper_operator_pending_changes",
            "Changes observed and not yet taken by a reconcile pass (own writes' echoes included until then)",
            value=len(self.cache.dirty),
        )
        yield GaugeMetricFamily(
            "beekeeper_operator_identities",
            "NetworkIdentities that exist (allocated label-set numbers)",
            value=len(self.cache.tables["NetworkIdentity"]),
        )
