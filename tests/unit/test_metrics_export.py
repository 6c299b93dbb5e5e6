"""/metrics of BpfProgram maps: one family per name whatever the programs ask, what is left out is said,
and the number of series stays bounded."""

from __future__ import annotations

import struct
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from support import check_exposition

from beekeeper.crds.bpfprogram import Metric
from beekeeper.crds.nodestate import NodeProgram, content_hash
from beekeeper.node_daemon import translate
from beekeeper.node_daemon.backend import MapEntry
from beekeeper.node_daemon.fake_backend import FakeBackend
from beekeeper.node_daemon.metrics import (
    BpfCollector,
    Export,
    budget_warning,
    plan_exports,
    series_rows,
    within_budget,
)
from beekeeper.node_daemon.policy_metrics import policy_labels

SOURCE = "BPF_HASH(counts, u32, u64);\nint fn(void *ctx) { return 0; }\n"
PROGRAMS = [{"name": "fn", "type": "tracepoint", "tracepoint": "raw_syscalls:sys_enter"}]


def metric(name: str, type_: str = "counter", label: str = "id", map_: str = "counts") -> dict[str, Any]:
    return {"map": map_, "name": name, "type": type_, "key": {"kind": "int", "label": label}}


def entry(program: str, *metrics: dict[str, Any]) -> NodeProgram:
    return NodeProgram.model_validate(
        {
            "bpfProgram": program,
            "uid": f"uid-{program}",
            "generation": 1,
            "contentHash": content_hash(SOURCE, None, []),
            "source": SOURCE,
            "programs": PROGRAMS,
            "metrics": list(metrics),
        }
    )


def scrape(entries: list[NodeProgram]) -> tuple[dict[str, list[str]], str, str]:
    """(warnings, text format, OpenMetrics) of a collector over a fake node running `entries`."""
    backend = FakeBackend()
    for item in entries:
        backend.apply(translate.program_unit(item))
        backend.set_map(item.bpf_program, "counts", {struct.pack("<I", 7): (3,)})
    collector = BpfCollector(backend, "n1")
    warnings = collector.set_programs(entries)
    registry = CollectorRegistry()
    registry.register(collector)
    return warnings, generate_latest(registry).decode(), generate_openmetrics(registry).decode()


def test_colliding_programs_keep_metrics_parseable_and_the_older_one_wins() -> None:
    older = entry("older", metric("requests_total"), metric("inflight", "gauge"))
    entries = [
        older,
        entry("newer", metric("requests", "gauge")),  # counter requests_total is exposed as family requests
        entry("relabel", metric("requests_total", label="pid")),  # same name, other labels
        entry("twin", metric("requests_total")),  # same name, type and labels: shares the family
    ]
    warnings, text, openmetrics = scrape(entries)

    families = check_exposition(text)
    check_exposition(openmetrics, openmetrics=True)
    assert families["requests"] == {
        ("requests_total", (("bpfprogram", "older"), ("id", "7"))): 3.0,
        ("requests_total", (("bpfprogram", "twin"), ("id", "7"))): 3.0,
    }
    assert families["inflight"] == {("inflight", (("bpfprogram", "older"), ("id", "7"))): 3.0}
    assert set(warnings) == {"newer", "relabel"}
    (newer,) = warnings["newer"]
    assert newer.startswith("metric requests: not exported: family requests is exported by BpfProgram older")
    assert "counter, labels bpfprogram" not in newer and "labels id" in newer
    assert "BpfProgram older" in warnings["relabel"][0]


def test_plan_keeps_the_first_of_two_metrics_of_one_family_in_one_program() -> None:
    """Admission rejects this; an object stored before the rule still must not break /metrics."""
    exports, warnings = plan_exports([entry("old", metric("a_total"), metric("a", "gauge"))])
    assert [e.metric.name for e in exports] == ["a_total"]
    assert warnings == {"old": [warnings["old"][0]]} and "exported by this BpfProgram" in warnings["old"][0]


def test_a_metric_naming_a_missing_map_is_reported() -> None:
    warnings, text, _ = scrape([entry("p", metric("hits_total"), metric("misses_total", map_="missed"))])
    assert warnings == {"p": ["metric misses_total: not exported: unit p has no map 'missed' (it has: counts)"]}
    assert "hits" in check_exposition(text) and "misses" not in check_exposition(text)


def test_array_zero_slots_are_not_series() -> None:
    rows = [MapEntry(i, (i % 2,), b"", array_slot=True) for i in range(256)] + [MapEntry(999, (0,), b"")]
    kept = series_rows(rows)
    assert len(kept) == 129 and MapEntry(999, (0,), b"") in kept, "a hash entry of 0 stays: its key was stored"


def test_a_program_over_its_series_budget_exports_its_largest_values_and_says_so() -> None:
    item = entry("big", metric("by_pid_total", label="pid"))
    backend = FakeBackend()
    backend.apply(translate.program_unit(item))
    backend.set_map("big", "counts", {struct.pack("<I", pid): (pid,) for pid in range(1, 11)})
    collector = BpfCollector(backend, "n1", series_budget=4)
    warnings = collector.set_programs([item])
    assert warnings["big"] == [budget_warning(10, 4)] and "more than the 4" in warnings["big"][0]
    registry = CollectorRegistry()
    registry.register(collector)
    families = check_exposition(generate_latest(registry).decode())
    assert sorted(dict(labels)["pid"] for _, labels in families["by_pid"]) == ["10", "7", "8", "9"]


def test_budget_keeps_the_largest_across_a_programs_metrics() -> None:
    a, b = (Export("p", Metric.model_validate(metric(name))) for name in ("a_total", "b_total"))
    rows = [(a, [MapEntry(i, (v,), b"") for i, v in enumerate((5, 1, 9))]), (b, [MapEntry(0, (7,), b"")])]
    kept = within_budget(rows, 2)
    assert [[r.values[0] for r in r_] for _, r_ in kept] == [[9], [7]]
    assert within_budget(rows, 4) == rows


def test_kernel_program_ids_are_an_info_series_not_a_counter_label() -> None:
    _, text, _ = scrape([entry("p", metric("hits_total"))])
    families = check_exposition(text)
    (runs,) = families["beekeeper_bpf_program_runs"]
    assert dict(runs[1]) == {"bpfprogram": "p", "program": "fn"}
    (info,) = families["beekeeper_bpf_program_info"].items()
    assert dict(info[0][1]).keys() == {"bpfprogram", "program", "id"} and info[1] == 1


def test_policy_counters_are_labelled_by_namespace_and_name() -> None:
    assert policy_labels("team-a/allow-web", 3) == ("team-a", "allow-web")
    assert policy_labels(None, 3) == ("", "index:3")
