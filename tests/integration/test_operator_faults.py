"""Operator fault tests on a control plane of their own (they kill its apiserver and operator).

The apiserver is SIGKILLed and restarted on the same port and etcd while policies change;
the operator is SIGKILLed and restarted; edits come in bursts; a large source is applied
client-side and deleted; the apiserver fails the operator's writes for a while. Each time
the state the nodes are told to enforce must equal the API, writes stay bounded and the
probes say the truth. Figures are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from support import (
    Cluster,
    NodeDaemons,
    OperatorProcess,
    fresh_cluster,
    node_bpfprogram,
    node_network_policy,
    running_pod,
    wait_for,
)

from beekeeper import kube
from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE_PLURAL,
    BPF_PROGRAM_PLURAL,
    GROUP,
    NETWORK_IDENTITY_PLURAL,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
)
from beekeeper.devenv import processes
from beekeeper.operator.reconciler import RESYNC_ENV

pytestmark = pytest.mark.integration

NODE_IP = "192.0.2.20"
TRACEPOINT = [{"name": "count_openat", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_openat"}]
SOURCE = """
BPF_HASH(opens, u32, u64, 1024);
int count_openat(void *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    opens.increment(pid);
    return 0;
}
"""


@pytest.fixture(scope="module")
def plane() -> Iterator[Cluster]:
    """A control plane only these tests use: killing its apiserver disturbs no other test."""
    with fresh_cluster("beekeeper-test-faults-") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def operator(plane: Cluster) -> Iterator[OperatorProcess]:
    proc = OperatorProcess.create(plane.kubeconfig, plane.control_plane.dir / "operator.log").start()
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture
def daemons(plane: Cluster, request: pytest.FixtureRequest) -> Iterator[NodeDaemons]:
    nodes = NodeDaemons(plane, plane.control_plane.dir / "components")
    yield nodes
    report = getattr(request.node, "rep_call", None)
    nodes.stop_all(show_logs=report is not None and report.failed)


class Api:
    """The test's view of the plane: typed clients and small helpers."""

    def __init__(self, plane: Cluster, namespace: str) -> None:
        self.plane = plane
        self.namespace = namespace
        api = plane.api()
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def apply(self, manifest: dict[str, Any]) -> None:
        """Client-side kubectl apply (the last-applied annotation holds the whole object)."""
        self.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def node(self) -> str:
        name = f"f-{uuid.uuid4().hex[:6]}"
        kube.register_node(self.plane.api(), name)
        self.core.patch_node_status(name, {"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}})
        return name

    def pod(self, name: str, app: str, node: str, ip: str) -> None:
        running_pod(self.core, self.namespace, name, app, node, ip)

    def nodestate(self, node: str) -> dict[str, Any]:
        try:
            return self.custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node)
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise

    def enforced(self, node: str) -> set[tuple[str, int]]:
        """(policy, port) of every allow rule on peer pods the node is told to enforce."""
        rules = node_network_policy(self.custom, node).get("rules") or []
        return {(r["policy"].split("/", 1)[1], r["portStart"]) for r in rules if r["peerIdentity"] != 1}

    def policy(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, NETWORK_IDENTITY_POLICY_PLURAL, name
        )

    def program(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def versions(self) -> dict[str, str]:
        """kind/name -> resourceVersion of every beekeeper object: equal maps mean nothing was written."""
        found = {}
        for plural in (
            BPF_PROGRAM_PLURAL,
            BPF_NODE_STATE_PLURAL,
            BPF_POLICY_SLICE_PLURAL,
            NETWORK_IDENTITY_POLICY_PLURAL,
            NETWORK_IDENTITY_PLURAL,
        ):
            for item in self.custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]:
                meta = item["metadata"]
                found[f"{plural}/{meta.get('namespace', '')}/{meta['name']}"] = meta["resourceVersion"]
        events = self.core.list_namespaced_event("default").items
        found["events"] = str(len(events))
        return found


@pytest.fixture
def api(plane: Cluster, operator: OperatorProcess) -> Iterator[Api]:
    namespace = f"f-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", namespace)
    yield Api(plane, namespace)
    plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def policy(namespace: str, name: str, port: int) -> dict[str, Any]:
    """Pods app=backend accept app=frontend on TCP `port`."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NetworkIdentityPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "backend"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                    "ports": [{"protocol": "TCP", "port": port}],
                }
            ],
        },
    }


def bpfprogram(name: str, node: str, source: str = SOURCE) -> dict[str, Any]:
    return node_bpfprogram(name, node, source, TRACEPOINT)


def two_pods(api: Api, node: str) -> None:
    api.pod("backend", "backend", node, "10.210.0.1")
    api.pod("frontend", "frontend", node, "10.210.0.2")


def test_apiserver_restart_with_changes_during_reconnect(plane: Cluster, api: Api) -> None:
    """Delete, create and edit while the operator's watches reconnect: the nodes' state equals the API."""
    node = api.node()
    two_pods(api, node)
    api.apply(policy(api.namespace, "deleted", 81))
    api.apply(policy(api.namespace, "edited", 80))
    wait_for(lambda: api.enforced(node) == {("deleted", 81), ("edited", 80)}, 30, "both policies on the node")

    plane.control_plane.kill_apiserver()
    plane.control_plane.restart_apiserver(lambda msg: None)
    changed = time.monotonic()
    custom = client.CustomObjectsApi(plane.api())  # new connections: the old ones died with the apiserver
    custom.delete_namespaced_custom_object(GROUP, VERSION, api.namespace, NETWORK_IDENTITY_POLICY_PLURAL, "deleted")
    custom.create_namespaced_custom_object(
        GROUP, VERSION, api.namespace, NETWORK_IDENTITY_POLICY_PLURAL, policy(api.namespace, "created", 82)
    )
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, api.namespace, NETWORK_IDENTITY_POLICY_PLURAL, "edited", policy(api.namespace, "edited", 8080)
    )
    wanted = {("created", 82), ("edited", 8080)}
    wait_for(lambda: api.enforced(node) == wanted, 15, "node state equal to the API after the restart")
    print(f"\napiserver restart: node state equal to the API {time.monotonic() - changed:.2f}s after the changes")


def settled(api: Api, operator: OperatorProcess) -> dict[str, str] | None:
    """The versions of all beekeeper objects if a whole pass after reading them wrote nothing."""
    before, passes = api.versions(), operator.probe("/healthz")[1]["passes"]
    api.core.patch_namespace(api.namespace, {"metadata": {"annotations": {"poke": uuid.uuid4().hex[:8]}}})
    wait_for(lambda: operator.probe("/healthz")[1]["passes"] > passes, 30, "a pass after the poke")
    return before if api.versions() == before else None


def test_operator_sigkill_writes_nothing_for_unchanged_state(
    api: Api, operator: OperatorProcess, daemons: NodeDaemons
) -> None:
    daemon = daemons(backend="fake")
    two_pods(api, daemon.node)
    api.apply(policy(api.namespace, "p", 80))
    name = f"k-{uuid.uuid4().hex[:6]}"
    api.apply(bpfprogram(name, daemon.node))
    try:
        wait_for(lambda: ((api.program(name) or {}).get("status") or {}).get("phase") == "Ready", 60, "program Ready")
        wait_for(lambda: api.policy("p").get("status", {}).get("observedGeneration") == 1, 30, "policy status")
        before = wait_for(lambda: settled(api, operator), 60, "nothing left to write")
        operator.restart(kill=True)
        passes = operator.probe("/healthz")[1]["passes"]
        assert passes >= 1
        assert api.versions() == before, "the restarted operator wrote unchanged state"
    finally:
        api.plane.kubectl("delete", "bpfprogram", name, "--wait=false", check=False)


def test_own_writes_do_not_trigger_passes(api: Api, operator: OperatorProcess) -> None:
    """Each edit costs one pass: the watch events of the operator's own writes wake nothing.

    Read from the operator's debug log, which names what woke each pass (other tests' leftovers
    being cleaned up on this plane wake passes too, so a bare pass count would not do).
    """
    node = api.node()
    two_pods(api, node)
    api.apply(policy(api.namespace, "p", 80))
    wait_for(lambda: api.policy("p").get("status", {}).get("observedGeneration") == 1, 30, "policy status")
    wait_for(lambda: api.enforced(node) == {("p", 80)}, 30, "rule on the node")
    offset = operator.log.stat().st_size
    for generation, port in ((2, 81), (3, 82)):
        api.apply(policy(api.namespace, "p", port))
        wait_for(lambda g=generation: api.policy("p").get("status", {}).get("observedGeneration") == g, 30, "status")
        assert api.enforced(node) == {("p", port)}
    api.core.patch_namespace(api.namespace, {"metadata": {"annotations": {"poke": "1"}}})  # a last foreign change
    wake = f"Namespace/{api.namespace}"
    wait_for(lambda: wake in operator.log.read_text()[offset:], 30, "the pass after the edits")
    passes = [line for line in operator.log.read_text()[offset:].splitlines() if 'msg="reconcile pass"' in line]
    ours = [line for line in passes if f"NetworkIdentityPolicy/{api.namespace}/p" in line]
    echoes = [line for line in passes if f"BpfNodeState/{node}" in line]  # no daemon writes there: only we do
    assert len(ours) == 2 and not echoes, "\n".join(passes)


def test_rapid_edits_converge_with_bounded_writes(api: Api, operator: OperatorProcess, daemons: NodeDaemons) -> None:
    daemon = daemons(backend="fake")
    two_pods(api, daemon.node)
    name = f"r-{uuid.uuid4().hex[:6]}"
    api.apply(bpfprogram(name, daemon.node))
    api.apply(policy(api.namespace, "p", 1000))
    edits = 150
    try:
        wait_for(lambda: ((api.program(name) or {}).get("status") or {}).get("phase") == "Ready", 60, "program Ready")
        wait_for(lambda: api.enforced(daemon.node) == {("p", 1000)}, 30, "first rule")
        generation = api.nodestate(daemon.node)["metadata"]["generation"]
        passes = operator.probe("/healthz")[1]["passes"]
        started = time.monotonic()
        for i in range(1, edits + 1):
            api.custom.patch_cluster_custom_object(
                GROUP, VERSION, BPF_PROGRAM_PLURAL, name, {"spec": {"source": {"inline": f"{SOURCE}// edit {i}\n"}}}
            )
            api.custom.patch_namespaced_custom_object(
                GROUP, VERSION, api.namespace, NETWORK_IDENTITY_POLICY_PLURAL, "p", policy(api.namespace, "p", 1000 + i)
            )
        final = api.program(name)["metadata"]["generation"]

        def converged() -> bool:
            state = api.nodestate(daemon.node)
            (entry,) = state["spec"]["programs"]
            status = api.program(name)["status"]
            return (
                entry["generation"] == final
                and status.get("observedGeneration") == final
                and status.get("phase") == "Ready"
                and api.enforced(daemon.node) == {("p", 1000 + edits)}
                and api.policy("p")["status"]["observedGeneration"] == edits + 1
            )

        wait_for(converged, 60, "convergence to the last edit")
        took = time.monotonic() - started
        writes = api.nodestate(daemon.node)["metadata"]["generation"] - generation
        passes = operator.probe("/healthz")[1]["passes"] - passes
        print(f"\n2x{edits} edits: converged in {took:.1f}s, {writes} node state writes, {passes} passes")
        assert writes <= 2 * edits and passes <= 2 * edits
        state = api.nodestate(daemon.node)
        assert [p["bpfProgram"] for p in state["status"]["programs"]] == [name]  # nothing left of older versions
        identities = api.custom.list_cluster_custom_object(GROUP, VERSION, NETWORK_IDENTITY_PLURAL)["items"]
        assert len([i for i in identities if i["spec"]["namespace"] == api.namespace]) == 2
    finally:
        api.plane.kubectl("delete", "bpfprogram", name, "--wait=false", check=False)


def test_large_source_applied_client_side_can_be_deleted(api: Api, daemons: NodeDaemons) -> None:
    """A 230 KB inline source with `kubectl apply` (last-applied annotation as large): delete completes."""
    daemon = daemons(backend="fake")
    filler = "".join(f"// filler line {i:06d} {'x' * 80}\n" for i in range(2400))
    source = filler + SOURCE
    assert 225_000 < len(source) < 256 * 1024
    name = f"big-{uuid.uuid4().hex[:6]}"
    api.apply(bpfprogram(name, daemon.node, source))
    wait_for(lambda: ((api.program(name) or {}).get("status") or {}).get("phase") == "Ready", 60, "program Ready")
    annotations = api.program(name)["metadata"].get("annotations") or {}
    assert len(annotations["kubectl.kubernetes.io/last-applied-configuration"]) > 225_000
    started = time.monotonic()
    api.plane.kubectl("delete", "bpfprogram", name, "--wait=false")
    wait_for(lambda: api.program(name) is None, 30, "the BpfProgram gone")
    print(f"\n{len(source)} byte source: deleted {time.monotonic() - started:.2f}s after kubectl delete")
    assert not [p for p in (api.nodestate(daemon.node).get("status") or {}).get("programs") or []]


def test_configmap_source_follows_the_configmap(api: Api, daemons: NodeDaemons) -> None:
    """A source from a ConfigMap: missing, created, edited, deleted — read from the watch, never per pass."""
    daemon = daemons(backend="fake")
    name = f"cm-{uuid.uuid4().hex[:6]}"
    program = bpfprogram(name, daemon.node)
    program["spec"]["source"] = {"configMapRef": {"namespace": api.namespace, "name": "src", "key": "prog.c"}}
    api.apply(program)

    def status_says(text: str) -> bool:
        return text in json.dumps((api.program(name) or {}).get("status") or {})

    def node_source() -> str | None:
        entries = (api.nodestate(daemon.node).get("spec") or {}).get("programs") or []
        return entries[0]["source"] if entries else None

    try:
        wait_for(lambda: status_says("ConfigMap " + api.namespace + "/src not found"), 30, "missing ConfigMap named")
        configmap = {"metadata": {"name": "src"}, "data": {"prog.c": SOURCE}}
        api.core.create_namespaced_config_map(api.namespace, configmap)
        wait_for(lambda: ((api.program(name) or {}).get("status") or {}).get("phase") == "Ready", 60, "Ready")
        assert node_source() == SOURCE
        api.core.patch_namespaced_config_map("src", api.namespace, {"data": {"prog.c": SOURCE + "// v2\n"}})
        wait_for(lambda: node_source() == SOURCE + "// v2\n", 30, "the edited source on the node")
        api.core.delete_namespaced_config_map("src", api.namespace)
        wait_for(lambda: status_says("not found"), 30, "the deleted ConfigMap named")
    finally:
        api.plane.kubectl("delete", "bpfprogram", name, "--wait=false", check=False)


def failing_webhook(port: int) -> dict[str, Any]:
    """Every BpfNodeState and BpfPolicySlice write goes through a webhook on a port nobody listens on: the
    apiserver fails it."""
    return {
        "metadata": {"name": f"beekeeper-test-failing-{port}"},
        "webhooks": [
            {
                "name": "fail.beekeeper.test",
                "clientConfig": {"url": f"https://127.0.0.1:{port}/validate"},
                "rules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": [VERSION],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": [BPF_NODE_STATE_PLURAL, BPF_POLICY_SLICE_PLURAL],
                    }
                ],
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 1,
            }
        ],
    }


def test_failing_passes_are_retried_and_shown_by_healthz(api: Api, operator: OperatorProcess) -> None:
    """The apiserver fails every node state write for a while: the loop retries, /healthz says 503, then 200."""
    original = operator.env
    operator.restart(env={**original, RESYNC_ENV: "1"})  # liveness bound: 3 s without a completed pass
    admission = client.AdmissionregistrationV1Api(api.plane.api())
    webhook = failing_webhook(processes.free_port())
    try:
        node = api.node()
        two_pods(api, node)
        api.apply(policy(api.namespace, "p", 80))
        wait_for(lambda: api.enforced(node) == {("p", 80)}, 30, "rule on the node")
        assert operator.probe("/healthz")[0] == 200
        admission.create_validating_webhook_configuration(webhook)
        api.apply(policy(api.namespace, "p", 81))
        _, report = wait_for(lambda: (r := operator.probe("/healthz")) and r[0] == 503 and r, 30, "503")
        print(f"\n/healthz while writes fail: {report}")
        assert report["consecutiveFailures"] >= 1 and "webhook" in report["lastError"], report
        assert api.enforced(node) == {("p", 80)}
        admission.delete_validating_webhook_configuration(webhook["metadata"]["name"])
        wait_for(lambda: api.enforced(node) == {("p", 81)}, 40, "the edit written once writes work again")
        _, report = wait_for(lambda: (r := operator.probe("/healthz")) and r[0] == 200 and r, 30, "200")
        assert report["consecutiveFailures"] == 0 and report["failures"] >= 1, report
    finally:
        try:
            admission.delete_validating_webhook_configuration(webhook["metadata"]["name"])
        except ApiException as exc:
            if exc.status != 404:
                raise
        operator.restart(env=original)


def ready_transitions(api: Api, name: str, stop: threading.Event, seen: list[tuple[str, str]]) -> None:
    """Record every (Ready status, reason) the policy shows until stop is set."""
    stream = watch.Watch()
    for event in stream.stream(
        api.custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        api.namespace,
        NETWORK_IDENTITY_POLICY_PLURAL,
        field_selector=f"metadata.name={name}",
        timeout_seconds=120,
    ):
        for cond in (event["object"].get("status") or {}).get("conditions") or []:
            if cond["type"] == "Ready" and (not seen or seen[-1] != (cond["status"], cond["reason"])):
                seen.append((cond["status"], cond["reason"]))
        if stop.is_set():
            stream.stop()


@pytest.mark.kernel
def test_unrelated_bpfprogram_does_not_flap_policy_ready(api: Api, daemons: NodeDaemons) -> None:
    """A BpfProgram applied and deleted on a node leaves its NetworkIdentityPolicy Ready throughout."""
    from netpol_rig import PodRig

    daemon = daemons()
    with PodRig(api.plane.api()) as rig:
        rig.add("b", api.namespace, "backend", daemon.node, {"app": "backend"})
        api.apply(policy(api.namespace, "p", 80))

        def ready() -> bool:
            conds = {c["type"]: c for c in (api.policy("p").get("status") or {}).get("conditions") or []}
            return conds.get("Ready", {}).get("status") == "True"

        wait_for(ready, 60, "policy Ready")
        seen: list[tuple[str, str]] = []
        stop = threading.Event()
        watcher = threading.Thread(target=ready_transitions, args=(api, "p", stop, seen), daemon=True)
        watcher.start()
        name = f"u-{uuid.uuid4().hex[:6]}"
        api.apply(bpfprogram(name, daemon.node))
        try:
            wait_for(lambda: ((api.program(name) or {}).get("status") or {}).get("phase") == "Ready", 120, "Ready")
        finally:
            api.plane.kubectl("delete", "bpfprogram", name, "--wait=false")
        wait_for(lambda: api.program(name) is None, 60, "BpfProgram gone")
        api.custom.patch_namespaced_custom_object(  # one more event for the watcher, then it stops
            GROUP, VERSION, api.namespace, NETWORK_IDENTITY_POLICY_PLURAL, "p", {"metadata": {"labels": {"done": "1"}}}
        )
        stop.set()
        watcher.join(30)
        assert all(status == "True" for status, _ in seen), f"Ready flapped: {seen}"
