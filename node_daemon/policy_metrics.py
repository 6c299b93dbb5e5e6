"""Prometheus export of the policy datapath: verdicts per policy, default-deny drops per identity.

Read from the kernel's per-CPU counters at scrape time, like the BpfProgram metrics.
Counters are labelled by policy (`namespace` and `policy`, as kube-state-metrics labels
namespaced objects), never by pod, so the number of series follows the number of policies
and identities, not pod churn.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from beekeeper.node_daemon.policy_agent import PolicyAgent
from beekeeper.node_daemon.policy_maps import CounterKind


def policy_labels(name: str | None, index: int) -> tuple[str, str]:
    """(namespace, policy) of a counter's "namespace/name"; ("", "index:N") for one whose name is not known."""
    if not name:
        return "", f"index:{index}"
    namespace, _, policy = name.rpartition("/")
    return namespace, policy


class PolicyCollector:
    """A custom collector over one node's PolicyAgent."""

    def __init__(self, agent: PolicyAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        seen = self.agent.observe()
        if seen is None:
            return
        packets = CounterMetricFamily(
            "beekeeper_policy_packets",
            "Packets matched by a policy's allow or deny entries (the entry that decided the flow)",
            labels=["namespace", "policy", "verdict"],
        )
        volume = CounterMetricFamily(
            "beekeeper_policy_bytes",
            "Bytes matched by a policy's allow or deny entries",
            labels=["namespace", "policy", "verdict"],
        )
        default_deny = CounterMetricFamily(
            "beekeeper_policy_default_deny_packets",
            "Packets dropped because no policy allowed them, by identity of the isolated local endpoint",
            labels=["identity"],
        )
        other = CounterMetricFamily(
            "beekeeper_policy_dropped_packets",
            "Packets dropped for other reasons (spoofed source, not IPv4 while isolated, malformed)",
            labels=["reason"],
        )
        lost = CounterMetricFamily(
            "beekeeper_policy_drop_events_lost", "Drop events the ring buffer had no room for (counted, not explained)"
        )
        suppressed = CounterMetricFamily(
            "beekeeper_policy_drop_events_suppressed",
            "Drops left unreported by the per-flow drop event limit (each flow's next event says how many)",
        )
        lost_total = suppressed_total = 0
        for c in seen.counters:
            match c.kind:
                case CounterKind.ALLOW | CounterKind.DENY:
                    labels = [*policy_labels(c.name, c.id), c.kind.value]
                    packets.add_metric(labels, c.packets)
                    volume.add_metric(labels, c.bytes)
                case CounterKind.DEFAULT_DENY:
                    default_deny.add_metric([str(c.id)], c.packets)
                case CounterKind.DROP:
                    other.add_metric([c.name or str(c.id)], c.packets)
                case CounterKind.EVENTS_LOST:
                    lost_total += c.packets
                case CounterKind.EVENTS_SUPPRESSED:
                    suppressed_total += c.packets
        lost.add_metric([], lost_total)
        suppressed.add_metric([], suppressed_total)
        yield from (packets, volume, default_deny, other, lost, suppressed)

        rules = GaugeMetricFamily("beekeeper_policy_rules", "Policy rules in this node's maps, as last synced")
        rules.add_metric([], self.agent.rules)
        writes = CounterMetricFamily(
            "beekeeper_policy_map_writes",
            "Policy map entries written (update) and removed (delete) by syncs since the daemon started",
            labels=["operation"],
        )
        for operation, count in sorted(self.agent.map_writes.items()):
            writes.add_metric([operation], count)
        yield from (rules, writes)
        endpoints = GaugeMetricFamily(
            "beekeeper_policy_endpoints",
            "Local endpoints in spec, by whether their interface carries the policy",
            labels=["state"],
        )
        endpoints.add_metric(["attached"], seen.attached)
        endpoints.add_metric(["unresolved"], seen.unresolved)
        endpoints.add_metric(["other"], max(0, seen.endpoints - seen.attached - seen.unresolved))
        yield endpoints
        programs = GaugeMetricFamily(
            "beekeeper_policy_program_info",
            "Kernel ids of the policy programs (1 per program)",
            labels=["program", "id"],
        )
        for name, prog_id in sorted(seen.program_ids.items()):
            programs.add_metric([name, str(prog_id)], 1)
        yield programs
