"""What users' tools read about beekeeper objects, with the real clients on a real control plane.

kstatus (sigs.k8s.io/cli-utils, Flux's and kpt's health), the chart's Argo CD health scripts
in Lua 5.1, and kubectl (get -o wide, describe, explain) against live BpfPrograms and
NetworkIdentityPolicies: new (before the operator looked at them), edited while the operator
is down, progressing, failing and healthy. The operator is stopped and started by the tests,
so the control plane is this module's own.

BEEKEEPER_CAPTURE_HEALTH_TESTDATA=1 writes the live objects into the health scripts'
testdata/ (the files health_test.yaml names), which is how those files were made.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from status_clients import CUSTOMIZATIONS, health, kstatus
from support import Cluster, NodeDaemons, OperatorProcess, fresh_cluster, node_bpfprogram, running_pod, wait_for

from beekeeper import kube
from beekeeper.crds.identity import NAMESPACE_LABEL
from beekeeper.crds.names import BPF_PROGRAM_PLURAL, GROUP, NETWORK_IDENTITY_POLICY_PLURAL, VERSION
from beekeeper.operator.policy_compile import BUDGET_ENV

pytestmark = pytest.mark.integration

CAPTURE = bool(os.environ.get("BEEKEEPER_CAPTURE_HEALTH_TESTDATA"))
TRACEPOINT = [{"name": "count_openat", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_openat"}]
SOURCE = "int count_openat(void *ctx) { return 0; }\n"
BROKEN = "#error this program does not build\nint count_openat(void *ctx) { return 0; }\n"
BUDGET = 8
"""Kernel entries a policy may take per node here: the failing policy's ten ports exceed it."""
POD_NAME = "beekeeper-operator-7d9f-abcde"
"""What the chart's downward API would set: Events must name it as reportingInstance."""


@pytest.fixture(scope="module")
def plane() -> Iterator[Cluster]:
    with fresh_cluster("beekeeper-test-status-") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def operator(plane: Cluster) -> Iterator[OperatorProcess]:
    """Created stopped: each test starts it once its new objects were read without it."""
    proc = OperatorProcess.create(
        plane.kubeconfig, plane.control_plane.dir / "operator.log", {BUDGET_ENV: str(BUDGET), "POD_NAME": POD_NAME}
    )
    yield proc
    if proc.pid:
        proc.stop()


@pytest.fixture
def daemons(plane: Cluster, request: pytest.FixtureRequest) -> Iterator[NodeDaemons]:
    nodes = NodeDaemons(plane, plane.control_plane.dir / "components")
    yield nodes
    report = getattr(request.node, "rep_call", None)
    nodes.stop_all(show_logs=report is not None and report.failed)


def stopped(operator: OperatorProcess) -> None:
    if operator.pid:
        operator.stop()


def started(operator: OperatorProcess) -> None:
    if not operator.pid:
        operator.start()
    operator.wait_ready()


def apply(plane: Cluster, manifest: dict[str, Any]) -> None:
    plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))


def verdicts(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """(kstatus status, Argo CD health status) of one live object."""
    (computed,) = kstatus([obj])
    return computed["status"], health(kind, obj)["status"]


def capture(kind: str, case: str, obj: dict[str, Any]) -> None:
    """Store a live object as the health script's test input (without the fields that only add noise)."""
    if not CAPTURE:
        return
    obj = yaml.safe_load(yaml.safe_dump(obj))
    meta = obj["metadata"]
    meta.pop("managedFields", None)
    (meta.get("annotations") or {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
    if not meta.get("annotations"):
        meta.pop("annotations", None)
    path = CUSTOMIZATIONS / kind / "testdata" / f"{case}.yaml"
    path.write_text(yaml.safe_dump(obj, sort_keys=False))


def expected_health(kind: str, case: str) -> str:
    """The status health_test.yaml expects for a captured case (so the files and the live run agree)."""
    cases = yaml.safe_load((CUSTOMIZATIONS / kind / "health_test.yaml").read_text())["tests"]
    return next(c["healthStatus"]["status"] for c in cases if Path(c["inputPath"]).stem == case)


def check(kind: str, case: str, obj: dict[str, Any], want_kstatus: str, want_health: str) -> None:
    capture(kind, case, obj)
    assert verdicts(kind, obj) == (want_kstatus, want_health), (case, obj.get("status"))
    assert expected_health(kind, case) == want_health


def one_row_events(plane: Cluster, args: list[str]) -> list[str]:
    """The rows of the Events table `kubectl describe` prints (fails if a row spills onto a second line)."""
    out = plane.kubectl("describe", *args).stdout
    table = out.split("\nEvents:", 1)[1].splitlines()
    assert table[1].split() == ["Type", "Reason", "Age", "From", "Message"], out
    rows = [line for line in table[3:] if line.strip()]
    for row in rows:
        assert row.split()[0] in ("Normal", "Warning"), f"an event message spans lines:\n{out}"
    return rows


def events_of(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, tuple[str, int, str]]:
    """Event name -> (reason, count, reportingInstance) of every event about `name`."""
    items = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return {e.metadata.name: (e.reason, e.count, e.reporting_instance) for e in items}


def test_bpfprogram_states_as_kstatus_argocd_and_kubectl_read_them(
    plane: Cluster, operator: OperatorProcess, daemons: NodeDaemons
) -> None:
    stopped(operator)
    custom, core = client.CustomObjectsApi(plane.api()), client.CoreV1Api(plane.api())
    daemon = daemons(backend="fake")
    absent = f"no-daemon-{uuid.uuid4().hex[:6]}"
    kube.register_node(plane.api(), absent)
    tag = uuid.uuid4().hex[:6]
    healthy, failing, progressing = f"healthy-{tag}", f"failing-{tag}", f"progressing-{tag}"

    def get(name: str) -> dict[str, Any]:
        return custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name)

    # New, the operator down: the apiserver stored status.observedGeneration 0, so not Current.
    apply(plane, node_bpfprogram(healthy, daemon.node, SOURCE, TRACEPOINT))
    new = get(healthy)
    assert new["metadata"]["generation"] == 1 and new["status"] == {"observedGeneration": 0}
    check("BpfProgram", "not-observed", new, "InProgress", "Progressing")
    # As Argo CD sees an object stored before the default existed: no status at all.
    check("BpfProgram", "no-status", {k: v for k, v in new.items() if k != "status"}, "Current", "Progressing")

    started(operator)
    apply(plane, node_bpfprogram(failing, daemon.node, BROKEN, TRACEPOINT))
    apply(plane, node_bpfprogram(progressing, absent, SOURCE, TRACEPOINT))
    ready = wait_for(lambda: (o := get(healthy)).get("status", {}).get("phase") == "Ready" and o, 60, "Ready")
    check("BpfProgram", "healthy", ready, "Current", "Healthy")
    degraded = wait_for(lambda: (o := get(failing)).get("status", {}).get("phase") == "Degraded" and o, 60, "failed")
    check("BpfProgram", "degraded", degraded, "Failed", "Degraded")
    assert "CompileError" in health("BpfProgram", degraded)["message"]
    pending = wait_for(lambda: (o := get(progressing)).get("status", {}).get("observedGeneration") == 1 and o, 60, "")
    check("BpfProgram", "progressing", pending, "InProgress", "Progressing")

    # kubectl: -o wide adds the failure count, the reason and the program types.
    wide = plane.kubectl("get", "bpfprogram", failing, healthy, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "READY", "STATUS", "FAILED", "REASON", "TYPES", "AGE"], wide
    rows = {line.split()[0]: line.split()[1:6] for line in wide[1:]}
    assert rows[failing] == ["0/1", "Degraded", "1", "CompileError", "tracepoint"], wide
    assert rows[healthy] == ["1/1", "Ready", "0", "NoFailures", "tracepoint"], wide
    header = plane.kubectl("get", "bpfnodestate", daemon.node).stdout.splitlines()[0].split()
    assert header == ["NAME", "PROGRAMS", "READY", "KERNEL", "AGE"], header  # Ready without -o wide

    # Events: one line each, from this operator instance; the compile error's full text stays on the status.
    rows = wait_for(lambda: [r for r in one_row_events(plane, ["bpfprogram", failing]) if "Degraded" in r], 30, "")
    assert "this program does not build" in rows[0], rows
    assert set(r for _, _, r in events_of(core, "default", failing).values()) == {POD_NAME}
    assert "\n" in degraded["status"]["failingNodes"][0]["message"]

    # Edited while the operator is down: the status describes generation 1, so not Current any more.
    before = {name: events_of(core, "default", name) for name in (healthy, failing, progressing)}
    stopped(operator)
    apply(plane, node_bpfprogram(healthy, daemon.node, SOURCE + "// edited\n", TRACEPOINT))
    edited = get(healthy)
    assert (edited["metadata"]["generation"], edited["status"]["observedGeneration"]) == (2, 1)
    check("BpfProgram", "generation-not-observed", edited, "InProgress", "Progressing")
    started(operator)
    wait_for(lambda: verdicts("BpfProgram", get(healthy)) == ("Current", "Healthy"), 60, "healthy again")

    # The restart announced nothing about the unchanged programs, and the edit's Ready is a new event.
    wait_for(lambda: len(events_of(core, "default", healthy)) > len(before[healthy]), 30, "the edit's event")
    for name in (failing, progressing):
        assert events_of(core, "default", name) == before[name], name
    for name in (healthy, failing, progressing):
        custom.delete_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name)
    plane.kubectl("delete", "node", absent, "--wait=false")


def policy(namespace: str, name: str, ports: list[int] | None = None, app: str = "backend") -> dict[str, Any]:
    """Pods `app` accept app=frontend on TCP `ports` (default: ingress isolation only)."""
    spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"]}
    if ports:
        spec["ingress"] = [
            {
                "from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                "ports": [{"protocol": "TCP", "port": port} for port in ports],
            }
        ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NetworkIdentityPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def test_networkidentitypolicy_states_as_kstatus_argocd_and_kubectl_read_them(
    plane: Cluster, operator: OperatorProcess
) -> None:
    stopped(operator)
    custom, core = client.CustomObjectsApi(plane.api()), client.CoreV1Api(plane.api())
    ns = f"s-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", ns)
    node = f"no-daemon-{uuid.uuid4().hex[:6]}"  # no daemon: policies on it keep waiting
    kube.register_node(plane.api(), node)
    running_pod(core, ns, "backend", "backend", node, "10.230.0.1")
    running_pod(core, ns, "frontend", "frontend", node, "10.230.0.2")

    def get(name: str) -> dict[str, Any]:
        return custom.get_namespaced_custom_object(GROUP, VERSION, ns, NETWORK_IDENTITY_POLICY_PLURAL, name)

    def judged(name: str) -> dict[str, Any]:
        return wait_for(lambda: (o := get(name))["status"].get("observedGeneration") == 1 and o, 60, f"{name} judged")

    apply(plane, policy(ns, "healthy", app="nobody"))
    new = get("healthy")
    assert new["status"] == {"observedGeneration": 0}
    check("NetworkIdentityPolicy", "not-observed", new, "InProgress", "Progressing")
    check(
        "NetworkIdentityPolicy", "no-status", {k: v for k, v in new.items() if k != "status"}, "Current", "Progressing"
    )

    started(operator)
    apply(plane, policy(ns, "waiting", [80]))
    apply(plane, policy(ns, "oversized", list(range(8000, 8000 + 3 * BUDGET))))
    check("NetworkIdentityPolicy", "healthy", judged("healthy"), "Current", "Healthy")
    check("NetworkIdentityPolicy", "progressing", judged("waiting"), "InProgress", "Progressing")
    oversized = judged("oversized")
    check("NetworkIdentityPolicy", "degraded", oversized, "Failed", "Degraded")
    assert "ExpansionBudgetExceeded" in health("NetworkIdentityPolicy", oversized)["message"]

    wide = plane.kubectl("get", "nip", "-n", ns, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "VALID", "READY", "ENDPOINTS", "NODES", "REASON", "TYPES", "AGE"], wide
    rows = {line.split()[0]: line.split()[1:7] for line in wide[1:]}
    assert rows["oversized"] == ["False", "False", "0", "0", "ExpansionBudgetExceeded", '["Ingress"]'], wide
    assert rows["waiting"][4] == "NodesNotEnforcing" and rows["healthy"][4] == "NoSelectedEndpoints", wide

    # Events, in the policy's namespace, one line each.
    rows = wait_for(lambda: one_row_events(plane, ["nip", "-n", ns, "oversized"]), 30, "the oversized policy's event")
    assert rows[0].split()[:2] == ["Warning", "ExpansionBudgetExceeded"], rows
    # The same transition again in one run is one event with a count of 2.
    core.delete_namespaced_pod("backend", ns, grace_period_seconds=0)
    wait_for(lambda: get("waiting")["status"]["selectedEndpoints"] == 0, 30, "the backend pod gone")
    running_pod(core, ns, "backend", "backend", node, "10.230.0.1")
    wait_for(lambda: get("waiting")["status"]["selectedEndpoints"] == 1, 30, "the backend pod back")
    waiting_events = wait_for(
        lambda: (e := events_of(core, ns, "waiting")) and max(c for _, c, _ in e.values()) == 2 and e,
        30,
        "a NodesNotEnforcing event counted twice",
    )
    assert sorted(r for r, _, _ in waiting_events.values()) == ["NoSelectedEndpoints", "NodesNotEnforcing"]
    assert {i for _, _, i in waiting_events.values()} == {POD_NAME}

    # After an operator restart, a transition already announced for this generation is not announced
    # again: the backend pod goes while the operator is down, so "waiting" is NoSelectedEndpoints again.
    before = {name: events_of(core, ns, name) for name in ("healthy", "waiting", "oversized")}
    stopped(operator)
    core.delete_namespaced_pod("backend", ns, grace_period_seconds=0)
    started(operator)  # ready: its first pass is done; its events follow within moments
    wait_for(lambda: get("waiting")["status"]["selectedEndpoints"] == 0, 30, "the restarted operator's status")
    time.sleep(2)
    assert {name: events_of(core, ns, name) for name in before} == before

    # NetworkIdentities: cluster-scoped without a NAMESPACE column, filterable by their pods' namespace.
    listed = plane.kubectl("get", "nid", "--field-selector", f"spec.namespace={ns}").stdout.splitlines()
    assert listed[0].split() == ["NAME", "POD-NAMESPACE", "AGE"], listed
    assert len(listed) == 3 and all(line.split()[1] == ns for line in listed[1:]), listed
    labelled = plane.kubectl("get", "nid", "-l", f"{NAMESPACE_LABEL}={ns}", "-o", "name").stdout.split()
    assert len(labelled) == 2, labelled
    plane.kubectl("delete", "namespace", ns, "--wait=false")
    plane.kubectl("delete", "node", node, "--wait=false")


def test_kubectl_explain_descriptions_are_not_broken_mid_sentence(plane: Cluster) -> None:
    """kubectl wraps explain text itself; a hard line break in a description shows as a stub line."""
    out = plane.kubectl("explain", "networkidentity").stdout
    description = out.split("DESCRIPTION:", 1)[1].split("FIELDS:", 1)[0]
    paragraphs = [p.splitlines() for p in re.split(r"\n\s*\n", description.strip())]
    assert any("pod churn never rewrites" in " ".join(line.strip() for line in p) for p in paragraphs), out
    for lines in paragraphs:
        for line in lines[:-1]:  # every line but a paragraph's last fills most of the width
            assert len(line.strip()) > 50, f"short line mid-paragraph: {line!r}\n{out}"
