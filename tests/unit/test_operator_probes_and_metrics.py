"""The operator's probes decide from what the loop reports (health.py), and its write counter labels requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from support import check_exposition

from beekeeper.operator.cache import KINDS, ClusterCache
from beekeeper.operator.health import STUCK_FACTOR, Health
from beekeeper.operator.metrics import CacheCollector, OperatorMetrics, write_labels
from beekeeper.process_metrics import component_registry


def test_liveness_fails_once_the_loop_stopped() -> None:
    health = Health(resync_seconds=60, started=0.0, loop_running=True)
    health.pass_done()
    assert health.live()[0]
    health.update(loop_running=False)
    ok, report = health.live()
    assert not ok and report["problem"] == "the reconcile loop has stopped"


def test_liveness_fails_when_no_pass_completes_for_three_resync_periods() -> None:
    health = Health(resync_seconds=10, started=0.0, loop_running=True)
    health.update(last_pass_end=100.0)
    assert health.live(now=100.0 + STUCK_FACTOR * 10)[0]
    health.pass_began()
    health.pass_failed("503 Service Unavailable: etcd")
    ok, report = health.live(now=100.0 + STUCK_FACTOR * 10 + 1)
    assert not ok and "no reconcile pass completed for 31s" in report["problem"]
    assert report["consecutiveFailures"] == 1 and report["lastError"].startswith("503")


def test_readiness_waits_for_the_primed_cache_and_a_first_pass() -> None:
    health = Health(resync_seconds=60)
    assert not health.ready()[0]
    health.update(primed=True)
    assert not health.ready()[0], "primed, but no pass yet"
    health.pass_done()
    assert health.ready() == (True, {"primed": True, "passes": 1})


def test_writes_are_labelled_by_resource_and_verb() -> None:
    base = "https://10.0.0.1:6443"
    apply = "application/apply-patch+yaml"
    assert write_labels("GET", f"{base}/api/v1/nodes/n1", None) is None
    assert write_labels("PATCH", f"{base}/apis/beekeeper.dev/v1alpha1/bpfnodestates/n1", apply) == (
        "bpfnodestates",
        "apply",
    )
    assert write_labels("PATCH", f"{base}/apis/beekeeper.dev/v1alpha1/bpfprograms/p/status?force=true", apply) == (
        "bpfprograms/status",
        "apply",
    )
    namespaced = f"{base}/apis/beekeeper.dev/v1alpha1/namespaces/ns/networkidentitypolicies/x/status"
    assert write_labels("PATCH", namespaced, "application/merge-patch+json") == (
        "networkidentitypolicies/status",
        "patch",
    )
    assert write_labels("POST", f"{base}/api/v1/namespaces/default/events", "application/json") == ("events", "create")
    assert write_labels("DELETE", f"{base}/apis/beekeeper.dev/v1alpha1/networkidentities/42", None) == (
        "networkidentities",
        "delete",
    )


def test_every_family_is_lint_clean_before_any_work() -> None:
    """Fixed label values are there from the start (a 0, not an absent series, for alerts)."""
    registry = component_registry("operator")
    OperatorMetrics(registry)
    cache = ClusterCache()
    cache.tables["Node"]["n1"] = {"metadata": {"name": "n1"}}
    registry.register(CacheCollector(cache))
    families = check_exposition(generate_latest(registry).decode())
    passes = families["beekeeper_operator_reconcile_passes"]
    assert {dict(labels)["result"]: v for (_, labels), v in passes.items()} == {"success": 0.0, "error": 0.0}
    cached = {dict(labels)["kind"]: v for (_, labels), v in families["beekeeper_operator_cached_objects"].items()}
    assert cached == {kind: (1.0 if kind == "Node" else 0.0) for kind in KINDS}
    (build,) = families["beekeeper_build_info"]
    assert dict(build[1]).keys() == {"component", "version", "python"}


def test_unregistered_metrics_count_without_exporting() -> None:
    """Reconcilers made by tests pass no registry: nothing is exported, nothing collides."""
    OperatorMetrics(None).passes.labels("success").inc()
    OperatorMetrics(None).passes.labels("success").inc()
    assert b"beekeeper_operator" not in generate_latest(CollectorRegistry())
