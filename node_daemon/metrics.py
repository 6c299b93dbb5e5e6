"""Prometheus export: the maps BpfPrograms name in `metrics`, plus per-program kernel stats.

Maps are read at scrape time (no polling loop): a scrape costs one map walk per exported
metric, and values are exactly what the kernel holds at that moment.

One BpfProgram must never break another's metrics: a family name appears once on /metrics.
Admission rejects what one object can get wrong (the reserved beekeeper_ prefix and
bpfprogram label, two metrics of one family); across BpfPrograms the first entry in spec
order keeps a contested family (the operator lists the oldest BpfProgram first), later ones
are not exported and say so in status. Programs exporting the same metric (name, type and
labels) share its family: their series differ in the bpfprogram label.

Cardinality is bounded: an array's zero slots are not series (its slots always exist, so
a 256-slot array with three used slots is three series, not 256), and one BpfProgram gets
at most `series_budget` series on a node (its largest values; a map keyed by e.g. comm
grows without bound). Going over says so in the program's status (MetricsNotExported).
Kernel program ids are not labels of the run counters (a reload would start new series)
but of beekeeper_bpf_program_info.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as PromMetric

from beekeeper.crds.bpfprogram import Metric, MetricType, metric_family
from beekeeper.crds.nodestate import NodeProgram
from beekeeper.node_daemon.backend import Backend, MapEntry, MapNotFound, UnitNotFound
from beekeeper.node_daemon.translate import key_layout, label_names, label_values

log = logging.getLogger(__name__)

SERIES_BUDGET = 2000
"""Series one BpfProgram's maps may export on one node (--metrics-series-budget)."""


@dataclass(frozen=True)
class Export:
    """One metric of one BpfProgram that /metrics serves."""

    bpf_program: str
    metric: Metric


def plan_exports(entries: Sequence[NodeProgram]) -> tuple[list[Export], dict[str, list[str]]]:
    """(what to export, per BpfProgram the metrics left out and why); first in order wins a family."""
    owners: dict[str, Export] = {}
    exports: list[Export] = []
    left_out: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        for metric in entry.metrics or []:
            family = metric_family(metric.name)
            owner = owners.setdefault(family, Export(entry.bpf_program, metric))
            if owner.metric is metric or (owner.bpf_program != entry.bpf_program and _shareable(owner.metric, metric)):
                exports.append(Export(entry.bpf_program, metric))
                continue
            theirs = "this BpfProgram" if owner.bpf_program == entry.bpf_program else f"BpfProgram {owner.bpf_program}"
            left_out[entry.bpf_program].append(
                f"metric {metric.name}: not exported: family {family} is exported by {theirs} on this node "
                f"(metric {owner.metric.name}, {owner.metric.type.value}, labels "
                f"{', '.join(label_names(owner.metric))}); rename it, or match its type and labels to share it"
            )
    return exports, dict(left_out)


def _shareable(a: Metric, b: Metric) -> bool:
    return a.name == b.name and a.type == b.type and label_names(a) == label_names(b)


def series_rows(rows: Sequence[MapEntry]) -> list[MapEntry]:
    """The entries that are series: all of a hash map's, an array's non-zero slots."""
    return [row for row in rows if not row.array_slot or any(row.values)]


def within_budget(rows: Sequence[tuple[Export, list[MapEntry]]], budget: int) -> list[tuple[Export, list[MapEntry]]]:
    """One BpfProgram's series cut to `budget`, keeping the largest values (what topk would show)."""
    if sum(len(r) for _, r in rows) <= budget:
        return list(rows)
    ranked = sorted(
        ((row.values[0] if row.values else 0, n, i) for n, (_, r) in enumerate(rows) for i, row in enumerate(r)),
        key=lambda item: -item[0],
    )
    keep = {(n, i) for _, n, i in ranked[:budget]}
    return [(export, [row for i, row in enumerate(r) if (n, i) in keep]) for n, (export, r) in enumerate(rows)]


def budget_warning(series: int, budget: int) -> str:
    return (
        f"metrics: {series} series, more than the {budget} one BpfProgram may export on a node: only the "
        f"{budget} largest values are exported; bound the map (max_entries) or key it by fewer distinct values"
    )


class BpfCollector:
    """A custom collector over the node's current programs (swapped in by the reconciler)."""

    def __init__(self, backend: Backend, node: str, series_budget: int = SERIES_BUDGET) -> None:
        self.backend = backend
        self.node = node
        self.series_budget = series_budget
        self._entries: list[NodeProgram] = []
        self._exports: list[Export] = []
        self._lock = threading.Lock()

    def set_programs(self, entries: list[NodeProgram]) -> dict[str, list[str]]:
        """Serve these programs' metrics from now on; returns, per BpfProgram, metrics not exported and why."""
        exports, problems = plan_exports(entries)
        with self._lock:
            self._entries = list(entries)
            self._exports = exports
        series: dict[str, int] = defaultdict(int)
        for export in exports:
            try:
                rows = self.backend.read_map(export.bpf_program, export.metric.map_name, key_layout(export.metric))
                series[export.bpf_program] += len(series_rows(rows))
            except UnitNotFound:
                continue  # not loaded (its failure is reported on the program)
            except MapNotFound as exc:
                problems.setdefault(export.bpf_program, []).append(f"metric {export.metric.name}: not exported: {exc}")
            except ValueError as exc:  # a key that does not decode with spec.metrics[].key
                problems.setdefault(export.bpf_program, []).append(
                    f"metric {export.metric.name}: map {export.metric.map_name} does not decode with its key: {exc}"
                )
        for bpf_program, count in series.items():
            if count > self.series_budget:
                problems.setdefault(bpf_program, []).append(budget_warning(count, self.series_budget))
        return problems

    def collect(self) -> Iterator[PromMetric]:
        with self._lock:
            entries, exports = list(self._entries), list(self._exports)
        read: dict[str, list[tuple[Export, list[MapEntry]]]] = defaultdict(list)
        for export in exports:
            metric = export.metric
            try:
                rows = self.backend.read_map(export.bpf_program, metric.map_name, key_layout(metric))
            except (UnitNotFound, MapNotFound) as exc:  # reported in status when the programs were set
                log.debug("map not readable", extra={"bpfprogram": export.bpf_program, "error": str(exc)})
                continue
            except Exception:
                log.exception("reading map failed", extra={"bpfprogram": export.bpf_program, "map": metric.map_name})
                continue
            read[export.bpf_program].append((export, series_rows(rows)))
        budgeted = [item for program_rows in read.values() for item in within_budget(program_rows, self.series_budget)]
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for export, rows in budgeted:
            metric = export.metric
            family = families.get(metric_family(metric.name))
            if family is None:
                kind = CounterMetricFamily if metric.type == MetricType.COUNTER else GaugeMetricFamily
                labels = ["bpfprogram", *label_names(metric)]
                family = kind(metric.name, metric.help or f"BPF map {metric.map_name}", labels=labels)
                families[metric_family(metric.name)] = family
            for row in rows:
                try:
                    values = [export.bpf_program, *label_values(metric, row.key)]
                except (KeyError, TypeError):
                    continue
                family.add_metric(values, float(row.values[0] if row.values else 0))
        yield from families.values()
        yield from self._program_stats(entries)

    def _program_stats(self, entries: list[NodeProgram]) -> Iterator[PromMetric]:
        runs = CounterMetricFamily(
            "beekeeper_bpf_program_runs", "Times the kernel ran the program", labels=["bpfprogram", "program"]
        )
        run_time = CounterMetricFamily(
            "beekeeper_bpf_program_run_time_seconds",
            "Time the kernel spent in the program (needs kernel.bpf_stats_enabled=1)",
            labels=["bpfprogram", "program"],
        )
        info = GaugeMetricFamily(
            "beekeeper_bpf_program_info",
            "Kernel program id of each loaded function (1 per function; a reload changes the id)",
            labels=["bpfprogram", "program", "id"],
        )
        for entry in entries:
            try:
                stats = self.backend.program_stats(entry.bpf_program)
            except UnitNotFound:
                continue
            for stat in stats:
                labels = [entry.bpf_program, stat.name]
                runs.add_metric(labels, stat.run_count)
                run_time.add_metric(labels, stat.run_time_ns / 1e9)
                info.add_metric([*labels, str(stat.program_id)], 1)
        yield runs
        yield run_time
        yield info
