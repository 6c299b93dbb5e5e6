"""Prometheus view of the runtime-security counters: execs matched per namespace, policy, rule, action.

Read from the pinned rs_counts map at scrape time, so the values survive daemon restarts
and never depend on the ring buffer keeping up. Labels stay bounded: no pod, pid or file.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from beekeeper.node_daemon.runtime_agent import RuntimeAgent


class RuntimeCollector(Collector):
    def __init__(self, agent: RuntimeAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "beekeeper_runtime_exec_matches",
            "Execs a RuntimeSecurityPolicy rule matched on this node (action: what was done).",
            labels=["namespace", "policy", "rule", "action"],
        )
        totals: dict[tuple[str, str, str, str], int] = {}
        for rule, namespace, count in self.agent.rule_counts():
            key = (namespace, rule.policy.split("/", 1)[1], rule.rule, rule.action.name.capitalize())
            totals[key] = totals.get(key, 0) + count
        for labels, value in sorted(totals.items()):
            family.add_metric(list(labels), value)
        yield family
