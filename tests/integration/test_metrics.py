"""Both components' /metrics on live processes, checked by promlint (what `promtool check metrics` runs),
and who wrote what, as the apiserver's managedFields record it.

The operator's families are the ones controller-runtime users look for; the daemon's say how
its builds and passes go, and keep their cardinality bounded (array zero slots are no series,
a BpfProgram over its series budget is Degraded with MetricsNotExported, kernel program ids
sit on an _info series, not on the counters). Figures are printed (run with -s to see them).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from support import check_exposition, node_bpfprogram, wait_for

from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION

pytestmark = pytest.mark.integration

TRACEPOINT = [{"name": "count_openat", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_openat"}]
SOURCE = """
BPF_HASH(opens, u32, u64, 1024);
BPF_ARRAY(slots, u64, 256);
int count_openat(void *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    opens.increment(pid);
    int slot = 1 + pid % 3;
    u64 *count = slots.lookup(&slot);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}
"""
METRICS = [
    {"map": "opens", "name": "test_opens_by_pid_total", "type": "counter", "key": {"kind": "int", "label": "pid"}},
    {"map": "slots", "name": "test_opens_by_slot_total", "type": "counter", "key": {"kind": "int", "label": "slot"}},
]


def sample(families: dict[str, dict], family: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of `family` named `name` whose labels include `labels`."""
    for (sample_name, sample_labels), value in families.get(family, {}).items():
        if sample_name == name and labels.items() <= dict(sample_labels).items():
            return value
    return None


@pytest.fixture
def custom(cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api())


@pytest.fixture
def program(cluster, node_daemons) -> Iterator[dict[str, Any]]:
    """A BpfProgram on one fake-backend node, deleted afterwards; yields {name, daemon}."""
    daemon = node_daemons(backend="fake")
    name = f"m-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(node_bpfprogram(name, daemon.node, SOURCE, TRACEPOINT)))
    yield {"name": name, "daemon": daemon}
    cluster.kubectl("delete", "bpfprogram", name, "--ignore-not-found", "--wait=false")


def ready(custom: client.CustomObjectsApi, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body = custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name)
        return body if (body.get("status") or {}).get("phase") == "Ready" else None

    return wait_for(check, 60, f"BpfProgram {name} Ready")


OPERATOR_WRITES = (("bpfnodestates", "apply"), ("bpfprograms/status", "apply"), ("bpfprograms", "patch"))


def test_operator_metrics_are_lint_clean_and_count_its_work(operator_process, program, custom) -> None:
    ready(custom, program["name"])
    operator_process.wait_ready()
    writes = "beekeeper_operator_api_writes"

    def counted() -> tuple[str, dict] | None:
        """A write is counted once its answer is back, which can be after the test sees its effect."""
        text = operator_process.metrics()
        families = check_exposition(text)
        done = all(
            sample(families, writes, f"{writes}_total", resource=r, verb=v, code="200") for r, v in OPERATOR_WRITES
        )
        return (text, families) if done else None

    text, families = wait_for(counted, 30, "the operator's writes counted")
    print(f"\noperator /metrics: {len(families)} families, {sum(map(len, families.values()))} series")
    assert (
        sample(
            families,
            "beekeeper_operator_reconcile_passes",
            "beekeeper_operator_reconcile_passes_total",
            result="success",
        )
        >= 1
    )
    assert (
        sample(
            families,
            "beekeeper_operator_reconcile_duration_seconds",
            "beekeeper_operator_reconcile_duration_seconds_count",
        )
        >= 1
    )
    assert (
        sample(families, "beekeeper_operator_reconcile_errors", "beekeeper_operator_reconcile_errors_total") is not None
    )
    assert (
        sample(
            families,
            "beekeeper_operator_last_reconcile_timestamp_seconds",
            "beekeeper_operator_last_reconcile_timestamp_seconds",
        )
        > 0
    )
    for resource, verb in OPERATOR_WRITES:
        assert (sample(families, writes, f"{writes}_total", resource=resource, verb=verb, code="200") or 0) >= 1
    cached = "beekeeper_operator_cached_objects"
    assert sample(families, cached, cached, kind="BpfProgram") >= 1
    assert sample(families, cached, cached, kind="Node") >= 1
    assert sample(families, "beekeeper_operator_pending_changes", "beekeeper_operator_pending_changes") is not None
    assert sample(families, "beekeeper_operator_identities", "beekeeper_operator_identities") is not None
    assert sample(families, "beekeeper_build_info", "beekeeper_build_info", component="operator") == 1
    assert sample(families, "process_cpu_seconds", "process_cpu_seconds_total") > 0
    assert "python_gc_objects_collected" in families and "python_info" in families
    assert not [line for line in text.splitlines() if "_created" in line], "no _created series"


def test_operator_probes(operator_process) -> None:
    """/readyz after the first pass, /healthz while the loop runs; both JSON (the failing cases:
    test_operator_faults and the unit tests of health.py)."""
    code, report = operator_process.probe("/readyz")
    assert code == 200 and report["primed"] and report["passes"] >= 1
    code, report = operator_process.probe("/healthz")
    assert code == 200 and report["loop"] == "running" and report["secondsSinceLastPass"] <= report["stuckAfterSeconds"]


def test_daemon_self_metrics_are_lint_clean(operator_process, program, custom) -> None:
    ready(custom, program["name"])
    daemon = program["daemon"]

    def scraped() -> dict[str, dict] | None:
        families = check_exposition(daemon.metrics())
        return (
            families if sample(families, "beekeeper_node_builds", "beekeeper_node_builds_total", result="ok") else None
        )

    families = wait_for(scraped, 30, "a build counted on the daemon's /metrics")
    print(f"\nnode daemon /metrics (fake backend, one program): {sum(map(len, families.values()))} series")
    assert sample(families, "beekeeper_node_build_duration_seconds", "beekeeper_node_build_duration_seconds_count") >= 1
    assert (
        sample(
            families, "beekeeper_node_sync_duration_seconds", "beekeeper_node_sync_duration_seconds_count", part="full"
        )
        >= 1
    )
    assert sample(families, "beekeeper_node_programs", "beekeeper_node_programs", phase="Attached") == 1
    assert sample(families, "beekeeper_node_programs", "beekeeper_node_programs", phase="Failed") == 0
    assert sample(families, "beekeeper_node_status_writes", "beekeeper_node_status_writes_total", result="ok") >= 1
    assert sample(families, "beekeeper_build_info", "beekeeper_build_info", component="node-daemon") == 1
    assert sample(families, "process_resident_memory_bytes", "process_resident_memory_bytes") > 0
    info = families["beekeeper_bpf_program_info"]
    assert next(dict(labels) for _, labels in info).keys() == {"bpfprogram", "program", "id"}
    assert all("id" not in dict(labels) for _, labels in families["beekeeper_bpf_program_runs"])


def managers(body: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(manager, operation, subresource) -> the fields it owns, from metadata.managedFields."""
    return {
        (m["manager"], m["operation"], m.get("subresource", "")): m.get("fieldsV1") or {}
        for m in body["metadata"].get("managedFields") or []
    }


def test_each_component_owns_its_part_under_its_own_name(cluster, operator_process, program, custom) -> None:
    """The operator applies the node state's spec and the BpfProgram's status, the daemon applies the
    node state's status; nothing is written as the client's default `OpenAPI-Generator`."""
    name, node = program["name"], program["daemon"].node
    ready(custom, name)
    state = custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node)
    owned = managers(state)
    print(f"\nBpfNodeState {node} managedFields: {sorted(owned)}")
    assert set(owned) == {("beekeeper-operator", "Apply", ""), ("beekeeper-node-daemon", "Apply", "status")}
    spec = owned["beekeeper-operator", "Apply", ""]
    assert {"f:spec", "f:metadata"} <= set(spec) and "f:status" not in spec
    assert {"f:programs", "f:nodeName"} <= set(spec["f:spec"])
    assert "f:ownerReferences" in spec["f:metadata"]
    status = owned["beekeeper-node-daemon", "Apply", "status"]
    assert set(status) == {"f:status"} and {"f:programs", "f:conditions", "f:capabilities"} <= set(status["f:status"])

    body = custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name)
    owned = managers(body)
    print(f"BpfProgram {name} managedFields: {sorted(owned)}")
    assert set(owned["beekeeper-operator", "Apply", "status"]) == {"f:status"}
    assert "f:finalizers" in owned["beekeeper-operator", "Update", ""]["f:metadata"]
    assert not [m for m in owned if m[0].startswith("OpenAPI-Generator")]

    events = client.CoreV1Api(cluster.api()).list_namespaced_event(
        "default", field_selector=f"involvedObject.name={name}"
    )
    assert {m.manager for e in events.items for m in e.metadata.managed_fields or []} == {"beekeeper-operator"}


def test_status_fields_a_component_stops_writing_are_removed(cluster, operator_process, program, custom) -> None:
    """Server-side apply removes what the owner leaves out, and a field another writer set in the owner's
    part (a writer before server-side apply) is removed too: here a stale report on the BpfProgram."""
    name = program["name"]
    ready(custom, name)
    custom.patch_cluster_custom_object_status(
        GROUP, VERSION, BPF_PROGRAM_PLURAL, name, {"status": {"warnings": ["stale"], "phase": "Degraded"}}
    )

    def repaired() -> dict[str, Any] | None:
        status = custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name).get("status") or {}
        return status if status.get("phase") == "Ready" and "warnings" not in status else None

    wait_for(repaired, 30, "the operator's status back, without the stale warnings")


@pytest.mark.kernel
def test_daemon_exports_bounded_series_from_real_maps(
    cluster, operator_process, node_daemons, custom, tmp_path: Path
) -> None:
    """A 256-slot array exports only its used slots; a hash keyed by pid grows past the program's series
    budget: the largest values are exported and the BpfProgram says so (Degraded, MetricsNotExported)."""
    budget = 6
    daemon = node_daemons(args=["--metrics-series-budget", str(budget)])
    name = f"mk-{uuid.uuid4().hex[:6]}"
    manifest = node_bpfprogram(name, daemon.node, SOURCE, TRACEPOINT)
    manifest["spec"]["metrics"] = METRICS
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    try:
        ready(custom, name)  # attached: opens made before that are not counted
        target = tmp_path / "f"
        target.write_text("x")
        for _ in range(2 * budget):  # distinct pids opening files
            subprocess.run(["python3", "-c", f"open({str(target)!r}).close()"], check=True)

        def degraded() -> dict[str, Any] | None:
            status = custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name).get("status") or {}
            return status if status.get("phase") == "Degraded" else None

        status = wait_for(degraded, 90, "the series budget reported on the BpfProgram")
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Degraded"]["reason"] == "MetricsNotExported" and status["ready"] == "1/1"
        (warning,) = status["warnings"]
        assert f"more than the {budget} one BpfProgram may export on a node" in warning, warning

        families = check_exposition(daemon.metrics())
        by_pid, by_slot = families.get("test_opens_by_pid", {}), families.get("test_opens_by_slot", {})
        print(f"\nseries: by pid {len(by_pid)}, by slot {len(by_slot)} of 256 slots (budget {budget})")
        assert 1 <= len(by_slot) <= 3, by_slot
        assert len(by_pid) + len(by_slot) == budget
        assert all(value > 0 for value in by_slot.values())
        (info,) = families["beekeeper_bpf_program_info"].items()
        assert dict(info[0][1])["id"].isdigit()
        assert sample(families, "beekeeper_node_builds", "beekeeper_node_builds_total", result="ok") >= 1
    finally:
        cluster.kubectl("delete", "bpfprogram", name, "--ignore-not-found", "--wait=false")
