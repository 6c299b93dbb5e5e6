"""Prometheus export: the maps BpfPrograms name in `metrics`, plus per-program kernel stats.

Maps are read at scrape time (no polling loop): a scrape costs one map walk per exported
metric, and values are exactly what the kernel holds at that moment.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as PromMetric

from beekeeper.crds.bpfprogram import MetricType
from beekeeper.crds.nodestate import NodeProgram
from beekeeper.node_daemon.backend import Backend, MapNotFound, UnitNotFound
from beekeeper.node_daemon.translate import key_layout, label_names, label_values

log = logging.getLogger(__name__)


class BpfCollector:
    """A custom collector over the node's current programs (swapped in by the reconciler)."""

    def __init__(self, backend: Backend, node: str) -> None:
        self.backend = backend
        self.node = node
        self._entries: list[NodeProgram] = []
        self._lock = threading.Lock()

    def set_programs(self, entries: list[NodeProgram]) -> None:
        with self._lock:
            self._entries = list(entries)

    def collect(self) -> Iterator[PromMetric]:
        with self._lock:
            entries = list(self._entries)
        families: dict[str, PromMetric] = {}
        for entry in entries:
            for metric in entry.metrics or []:
                try:
                    rows = self.backend.read_map(entry.bpf_program, metric.map_name, key_layout(metric))
                except (UnitNotFound, MapNotFound) as exc:
                    log.debug("map not readable", extra={"bpfprogram": entry.bpf_program, "error": str(exc)})
                    continue
                except Exception:
                    log.exception("reading map failed", extra={"bpfprogram": entry.bpf_program, "map": metric.map_name})
                    continue
                labels = ["bpfprogram", *label_names(metric)]
                family = families.get(metric.name)
                if family is None:
                    kind = CounterMetricFamily if metric.type == MetricType.COUNTER else GaugeMetricFamily
                    family = kind(metric.name, metric.help or f"BPF map {metric.map_name}", labels=labels)
                    families[metric.name] = family
                for row in rows:
                    try:
                        values = [entry.bpf_program, *label_values(metric, row.key)]
                    except (KeyError, TypeError):
                        continue
                    family.add_metric(values, float(row.values[0] if row.values else 0))
        yield from families.values()
        yield from self._program_stats(entries)

    def _program_stats(self, entries: list[NodeProgram]) -> Iterator[PromMetric]:
        runs = CounterMetricFamily(
            "beekeeper_bpf_program_runs", "Times the kernel ran the program", labels=["bpfprogram", "program", "id"]
        )
        run_time = CounterMetricFamily(
            "beekeeper_bpf_program_run_time_seconds",
            "Time the kernel spent in the program (needs kernel.bpf_stats_enabled=1)",
            labels=["bpfprogram", "program", "id"],
        )
        for entry in entries:
            try:
                stats = self.backend.program_stats(entry.bpf_program)
            except UnitNotFound:
                continue
            for stat in stats:
                labels = [entry.bpf_program, stat.name, str(stat.program_id)]
                runs.add_metric(labels, stat.run_count)
                run_time.add_metric(labels, stat.run_time_ns / 1e9)
        yield runs
        yield run_time
