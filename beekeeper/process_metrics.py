"""What every beekeeper process says about itself on /metrics: build info, process and runtime figures.

Both components start their registry here, so both export the same standard families
(`process_*` from /proc, `python_info`, `python_gc_*`) and one `beekeeper_build_info` that
dashboards join on to tell versions apart during a rollout.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from beekeeper.version import version


class BuildInfo:
    """beekeeper_build_info{component, version, python} 1."""

    def __init__(self, component: str) -> None:
        self.labels = {"component": component, "version": version(), "python": platform.python_version()}

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "beekeeper_build_info", "Version of the running beekeeper component (always 1)", labels=list(self.labels)
        )
        info.add_metric(list(self.labels.values()), 1)
        yield info


def component_registry(component: str) -> CollectorRegistry:
    """A fresh registry with build info, process and Python runtime collectors (not the global one).

    Counters get no `_created` series: they would double every counter's series for a start
    time that process_start_time_seconds already gives.
    """
    disable_created_metrics()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(BuildInfo(component))
    return registry
