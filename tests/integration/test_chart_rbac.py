"""The chart's RBAC and admission policy on the real apiserver, with real service-account tokens.

The chart's ServiceAccounts, ClusterRoles and ValidatingAdmissionPolicy are applied for real; the
tokens come from the TokenRequest API bound to Pod objects on nodes A and B (no kubelet needed:
the apiserver puts the bound pod's node into the token, and into userInfo.extra when it is used).
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from chart_support import documents, render
from kubernetes import client
from kubernetes.client.rest import ApiException
from support import Process, node_bpfprogram, wait_for

from beekeeper import kube
from beekeeper.crds.generate import crd_manifests
from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION
from beekeeper.devenv.controlplane import ControlPlane
from beekeeper.node_daemon.runtime_events import PodEventPoster, event_reason

pytestmark = pytest.mark.integration

NODE_EXTRA = "authentication.kubernetes.io/node-name"


@dataclass
class Release:
    namespace: str
    release: str
    manifests: str

    @property
    def node_daemon_sa(self) -> str:
        return f"{self.release}-beekeeper-node-daemon"

    @property
    def operator_sa(self) -> str:
        return f"{self.release}-beekeeper-operator"


@pytest.fixture
def release(cluster, namespace: str) -> Iterator[Release]:
    """The chart's identities and policies applied for real (no workloads: nothing would run them)."""
    name = f"r{uuid.uuid4().hex[:6]}"
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    kinds |= {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    docs = [d for d in documents(render(namespace, release=name)) if d["kind"] in kinds]
    docs = [d for d in docs if "helm.sh/hook" not in d["metadata"].get("annotations", {})]
    manifests = yaml.safe_dump_all(docs)
    cluster.kubectl("apply", "-f", "-", input=manifests)
    yield Release(namespace, name, manifests)
    cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifests, check=False)


def nodestate(api: client.ApiClient, node: str) -> None:
    kube.register_node(api, node)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BpfNodeState", "metadata": {"name": node}}
    body["spec"] = {"nodeName": node}
    client.CustomObjectsApi(api).create_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, body)


def pod_token(api: client.ApiClient, namespace: str, service_account: str, node: str | None) -> str:
    """A token from the TokenRequest API, bound to a new Pod on `node` (or to nothing when node is None)."""
    core = client.CoreV1Api(api)
    spec = client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
    if node is not None:
        pod = core.create_namespaced_pod(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"daemon-{node}"},
                "spec": {
                    "nodeName": node,
                    "serviceAccountName": service_account,
                    "containers": [{"name": "node-daemon", "image": "beekeeper:test"}],
                },
            },
        )
        spec.bound_object_ref = client.V1BoundObjectReference(
            api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
        )
    request = client.AuthenticationV1TokenRequest(spec=spec)
    return core.create_namespaced_service_account_token(service_account, namespace, request).status.token


def as_token(admin: client.ApiClient, token: str) -> client.ApiClient:
    """A client with the admin's server and CA but authenticated by `token` only."""
    base = admin.configuration
    config = client.Configuration()
    config.host, config.ssl_ca_cert, config.verify_ssl = base.host, base.ssl_ca_cert, True
    config.api_key = {"authorization": token}
    config.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(config)


def patch_status(api: client.ApiClient, node: str) -> tuple[int, str]:
    body = {"status": {"attached": "0/0"}}
    try:
        client.CustomObjectsApi(api).patch_cluster_custom_object_status(
            GROUP, VERSION, BPF_NODE_STATE_PLURAL, node, body
        )
        return 200, ""
    except ApiException as exc:
        return exc.status, json.loads(exc.body).get("message", "")


def whoami(api: client.ApiClient) -> dict:
    review = client.AuthenticationV1Api(api).create_self_subject_review({"apiVersion": "authentication.k8s.io/v1"})
    return review.status.user_info.to_dict()


def test_a_node_daemon_token_changes_only_its_own_nodes_state(cluster, release: Release) -> None:
    admin = cluster.api()
    node_a, node_b = (f"vap-{release.release}-{x}" for x in "ab")
    for node in (node_a, node_b):
        nodestate(admin, node)
    try:
        daemon_a = as_token(admin, pod_token(admin, release.namespace, release.node_daemon_sa, node_a))
        user = whoami(daemon_a)
        assert user["username"] == f"system:serviceaccount:{release.namespace}:{release.node_daemon_sa}"
        assert user["extra"][NODE_EXTRA] == [node_a], "the dev apiserver must put the node into bound tokens"

        # The policy is enforced once the apiserver has loaded it (a second or so after creation).
        def refused_on_b() -> tuple[int, str] | None:
            result = patch_status(daemon_a, node_b)
            return result if result[0] != 200 else None

        code, message = wait_for(refused_on_b, timeout=30, what="the admission policy to refuse node B")
        assert code == 403, message
        assert f"the beekeeper node daemon on node {node_a} may only change BpfNodeState {node_a}, not {node_b}" in (
            message
        )
        assert patch_status(daemon_a, node_a) == (200, "")

        # RBAC: read its state, but not write the spec (the operator's) nor anything else.
        custom = client.CustomObjectsApi(daemon_a)
        assert custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node_a)["spec"]
        with pytest.raises(ApiException) as spec_write:
            custom.patch_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node_a, {"spec": {}})
        assert spec_write.value.status == 403
        with pytest.raises(ApiException) as pods:
            client.CoreV1Api(daemon_a).list_pod_for_all_namespaces()
        assert pods.value.status == 403

        # RuntimeSecurityPolicy matches become Events on the Pod, in the pod's namespace: created,
        # then patched as more arrive (the daemon's own poster, with its token).
        poster = PodEventPoster(daemon_a, node_a)
        pod_uid = client.CoreV1Api(admin).read_namespaced_pod(f"daemon-{node_a}", release.namespace).metadata.uid
        match = {"namespace": release.namespace, "pod": f"daemon-{node_a}", "podUid": pod_uid, "policy": "p"}
        match |= {"rule": "r"}
        match |= {"action": "Blocked", "file": "/bin/sh", "container": "c", "parent": "/bin/bash"}
        for _ in range(2):
            poster.add(match)
            poster.flush()

        def event_count() -> int:
            events = client.CoreV1Api(admin).list_namespaced_event(release.namespace).items
            return sum(
                e.count for e in events if e.reason == event_reason("Blocked") and e.involved_object.uid == pod_uid
            )

        assert event_count() == 2, "the daemon could not create and patch its Event"
        with pytest.raises(ApiException) as policies:
            custom.list_namespaced_custom_object(GROUP, VERSION, release.namespace, "runtimesecuritypolicies")
        assert policies.value.status == 403  # its entries come compiled in its BpfNodeState

        # A token of the same service account bound to no pod has no node: refused everywhere.
        unbound = as_token(admin, pod_token(admin, release.namespace, release.node_daemon_sa, None))
        code, message = patch_status(unbound, node_a)
        assert code == 403 and "no node name in the token" in message

        # The operator's service account is not subject to the policy, and cannot write node status.
        operator = as_token(admin, pod_token(admin, release.namespace, release.operator_sa, None))
        assert patch_status(operator, node_b)[0] == 403  # RBAC: status is the daemons'
        body = {"spec": {"nodeName": node_b, "programs": []}}
        client.CustomObjectsApi(operator).patch_cluster_custom_object(
            GROUP, VERSION, BPF_NODE_STATE_PLURAL, node_b, body
        )
    finally:
        for node in (node_a, node_b):
            cluster.kubectl("delete", "bpfnodestate", node, "--ignore-not-found", check=False)
            cluster.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)


def denials(log: str) -> list[str]:
    """Log lines that report an RBAC denial. The apiserver's 403 always says Forbidden; a bare
    "403" also matches timestamps (".403Z") and resource versions, which made this flaky."""
    return [line for line in log.splitlines() if "forbidden" in line.lower()]


def token_kubeconfig(admin_kubeconfig: str, token: str, path: Path) -> None:
    """The admin kubeconfig's server and CA with a bearer token instead of the admin's certificate."""
    config = yaml.safe_load(Path(admin_kubeconfig).read_text())
    config["users"] = [{"name": "token", "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = "token"
    path.write_text(yaml.safe_dump(config))


def test_the_node_daemon_works_with_the_chart_identity_only(
    cluster, operator_process, release: Release, tmp_path
) -> None:
    """A real daemon (fake backend) with a token of the chart's ServiceAccount, bound to a pod on its node:
    its RBAC and the admission policy are enough to watch its state and report a program Ready."""
    admin = cluster.api()
    node = f"vap-{release.release}-daemon"
    kube.register_node(admin, node)
    kubeconfig = tmp_path / "node-daemon.kubeconfig"
    token_kubeconfig(
        str(cluster.kubeconfig), pod_token(admin, release.namespace, release.node_daemon_sa, node), kubeconfig
    )
    daemon = Process(
        "node-daemon (chart identity)",
        [
            *(sys.executable, "-m", "beekeeper.cli", "node-daemon", "--node-name", node),
            *("--kubeconfig", str(kubeconfig), "--backend", "fake", "--metrics-port", "0"),
            *("--state-dir", str(tmp_path / "state")),
        ],
        tmp_path / "node-daemon.log",
        {"BEEKEEPER_LOG_LEVEL": "debug"},
    ).start()
    name = f"chart-identity-{release.release}"
    program = node_bpfprogram(
        name,
        node,
        "int count(void *ctx) { return 0; }",
        [{"name": "count", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_getppid"}],
    )
    custom = client.CustomObjectsApi(admin)
    try:
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(program))

        def ready() -> dict | None:
            status = custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name).get("status") or {}
            return status if status.get("ready") == "1/1" else None

        wait_for(ready, 60, f"BpfProgram {name} Ready through the chart-identity daemon")
        log = daemon.log_tail(200)
        assert not denials(log), log
    finally:
        cluster.kubectl("delete", "bpfprogram", name, "--ignore-not-found", "--wait=false", check=False)
        daemon.stop()
        cluster.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def private_cluster(tmp_path: Path) -> Iterator[tuple[client.ApiClient, Path]]:
    """A control plane of its own: the session's operator must not reconcile next to the one under test."""
    control_plane = ControlPlane(tmp_path / "control-plane")
    control_plane.start(lambda _: None)
    try:
        api = kube.api_client(control_plane.kubeconfig)
        kube.install_crds(api, crd_manifests())
        yield api, control_plane.kubeconfig
    finally:
        control_plane.stop()


def test_the_operator_works_with_the_chart_identity_only(private_cluster, tmp_path: Path) -> None:
    """The real operator with a token of the chart's operator ServiceAccount (and a daemon with the
    daemon's): BpfPrograms go Ready and, deleted, through the detach finalizer; identities are
    allocated and the NetworkIdentityPolicy's and RuntimeSecurityPolicy's status written. No
    request is forbidden."""
    api, admin_kubeconfig = private_cluster
    namespace = "beekeeper-system"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy"}
    kinds.add("ValidatingAdmissionPolicyBinding")
    for doc in documents(render(namespace)):
        if doc["kind"] in kinds and "helm.sh/hook" not in doc["metadata"].get("annotations", {}):
            kube.apply(api, doc)
    kube.register_node(api, "n1")
    client.CoreV1Api(api).create_namespaced_pod(
        "default",
        {
            "metadata": {"name": "frontend", "labels": {"app": "frontend"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "app"}]},
        },
    )
    tokens = {
        "operator": pod_token(api, namespace, "beekeeper-operator", None),
        "node-daemon": pod_token(api, namespace, "beekeeper-node-daemon", "n1"),
    }
    for component, token in tokens.items():
        token_kubeconfig(str(admin_kubeconfig), token, tmp_path / f"{component}.kubeconfig")
    env = {"BEEKEEPER_LOG_LEVEL": "debug"}
    operator = Process(
        "operator (chart identity)",
        [sys.executable, "-m", "beekeeper.cli", "operator"],
        tmp_path / "operator.log",
        {**env, "KUBECONFIG": str(tmp_path / "operator.kubeconfig")},
    ).start()
    daemon = Process(
        "node-daemon (chart identity)",
        [
            *(sys.executable, "-m", "beekeeper.cli", "node-daemon", "--node-name", "n1", "--backend", "fake"),
            *("--metrics-port", "0", "--state-dir", str(tmp_path / "state")),
        ],
        tmp_path / "node-daemon.log",
        {**env, "KUBECONFIG": str(tmp_path / "node-daemon.kubeconfig")},
    ).start()
    custom = client.CustomObjectsApi(api)
    examples = Path(__file__).resolve().parents[2] / "examples"
    try:
        for path in sorted(examples.glob("*.yaml")):
            for doc in documents(path.read_text()):
                kube.apply(api, doc)

        def programs(ready: bool) -> list[str] | None:
            items = custom.list_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL)["items"]
            done = [p for p in items if ((p.get("status") or {}).get("phase") == "Ready") == ready]
            return [p["metadata"]["name"] for p in items] if len(done) == len(items) and items else None

        wait_for(lambda: programs(ready=True), 60, "every example BpfProgram Ready")

        def policy_ready(plural: str) -> bool:
            policies = custom.list_namespaced_custom_object(GROUP, VERSION, "default", plural)
            conditions = [c for p in policies["items"] for c in (p.get("status") or {}).get("conditions") or []]
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        wait_for(lambda: policy_ready("networkidentitypolicies"), 60, "the example NetworkIdentityPolicy Ready")
        wait_for(lambda: policy_ready("runtimesecuritypolicies"), 60, "the example RuntimeSecurityPolicy Ready")
        assert custom.list_cluster_custom_object(GROUP, VERSION, "networkidentities")["items"]
        for name in programs(ready=True) or []:
            custom.delete_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name)

        def gone() -> bool:
            return not custom.list_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL)["items"]

        wait_for(gone, 60, "the BpfPrograms deleted through the detach finalizer")
        for component in (operator, daemon):
            log = component.log_tail(10_000)
            assert not denials(log), f"{component.name}:\n{log}"
    finally:
        operator.stop()
        daemon.stop()
