"""/metrics of BpfProgram maps: one family per name whatever the programs ask, and what is left out is said."""

from __future__ import annotations

import struct
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from support import check_exposition

from beekeeper.crds.nodestate import NodeProgram, content_hash
from beekeeper.node_daemon import translate
from beekeeper.node_daemon.fake_backend import FakeBackend
from beekeeper.node_daemon.metrics import BpfCollector, plan_exports

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
