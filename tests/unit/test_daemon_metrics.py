"""The node daemon's figures about itself: builds, passes and phases, lint clean from the start."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from support import check_exposition

from beekeeper.node_daemon.backend import Phase, ProgramReport
from beekeeper.node_daemon.daemon_metrics import DaemonMetrics
from beekeeper.process_metrics import component_registry


def families(registry) -> dict[str, dict]:
    return check_exposition(generate_latest(registry).decode())


def values(found: dict[str, dict], family: str, label: str) -> dict[str, float]:
    return {dict(labels).get(label, name): v for (name, labels), v in found[family].items() if name.endswith("_total")}


def test_builds_count_by_result_and_reason() -> None:
    registry = component_registry("node-daemon")
    metrics = DaemonMetrics(registry)
    metrics.built([ProgramReport("fn", "xdp", Phase.ATTACHED)], 1.5)
    metrics.built([ProgramReport("fn", "xdp", Phase.FAILED, reason="CompileError")], 0.5)
    found = families(registry)
    assert values(found, "beekeeper_node_builds", "result") == {"ok": 1, "failed": 1}
    assert values(found, "beekeeper_node_build_failures", "reason") == {"CompileError": 1}
    assert found["beekeeper_node_build_duration_seconds"][("beekeeper_node_build_duration_seconds_sum", ())] == 2.0


def test_a_failing_pass_is_timed_and_counted_and_still_raises() -> None:
    registry = component_registry("node-daemon")
    metrics = DaemonMetrics(registry)
    with pytest.raises(RuntimeError), metrics.sync("policy"):
        raise RuntimeError("map full")
    with metrics.sync("full"):
        pass
    found = families(registry)
    assert values(found, "beekeeper_node_sync_errors", "part") == {"full": 0, "policy": 1}
    counts = {
        dict(labels)["part"]: v
        for (name, labels), v in found["beekeeper_node_sync_duration_seconds"].items()
        if name.endswith("_count")
    }
    assert counts == {"full": 1, "policy": 1}


def test_every_phase_has_a_series() -> None:
    registry = component_registry("node-daemon")
    metrics = DaemonMetrics(registry)
    metrics.set_programs([{"phase": "Attached"}, {"phase": "Attached"}, {"phase": "Failed"}])
    found = families(registry)
    phases = {dict(labels)["phase"]: v for (_, labels), v in found["beekeeper_node_programs"].items()}
    assert phases == {"Pending": 0, "Compiling": 0, "Loaded": 0, "Attached": 2, "Failed": 1}
