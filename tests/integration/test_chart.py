"""The Helm chart lints, renders to valid manifests (offline, kubeconform), and the real apiserver accepts them.

kubeconform's schemas come from the test apiserver's OpenAPI (built-in kinds) and from the CRDs
generated from the models (beekeeper's kinds, checked on examples/). `kubectl apply
--dry-run=server` then runs the apiserver's own validation and admission on the rendered chart,
CEL of the admission policy included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import CHART, KUBE_VERSION, documents, helm, kubeconform, render, write_schemas

from beekeeper.crds.generate import crd_manifests

pytestmark = pytest.mark.integration

EXAMPLES = sorted((CHART.parents[1] / "examples").rglob("*.yaml"))


@pytest.fixture(scope="module")
def schemas(cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    def openapi(path: str) -> dict[str, Any]:
        return json.loads(cluster.kubectl("get", "--raw", path).stdout)

    return write_schemas(tmp_path_factory.mktemp("kubeconform"), openapi, crd_manifests())


def by_kind(text: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents(text)}


def test_helm_lint_strict() -> None:
    result = helm("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART))
    assert "0 chart(s) failed" in result.stdout, result.stdout


def test_values_schema_rejects_bad_values() -> None:
    result = helm("template", "x", str(CHART), "--set", "nodeDaemon.metricsPort=0", check=False)
    assert result.returncode != 0 and "/nodeDaemon/metricsPort" in result.stderr
    result = helm("template", "x", str(CHART), "--set", "operator.replicas=2", check=False)
    assert result.returncode != 0 and "replicas" in result.stderr, "unknown values are refused, not ignored"


def test_rendered_chart_and_examples_are_valid_offline(schemas: Path) -> None:
    chart = render("beekeeper-system", "metrics.serviceMonitor.enabled=true", crds=True)
    examples = "\n---\n".join(path.read_text() for path in EXAMPLES)
    # ServiceMonitor is prometheus-operator's CRD: no schema for it on this machine.
    result = kubeconform(schemas, chart + "\n---\n" + examples, "-skip", "ServiceMonitor")
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = len(documents(chart)) + sum(len(documents(p.read_text())) for p in EXAMPLES)
    assert f"Valid: {rendered - 2}, Invalid: 0, Errors: 0, Skipped: 2" in result.stdout, result.stdout


def test_service_monitor_scrapes_with_a_token_the_daemon_can_review() -> None:
    """The daemon's /metrics needs a caller the API authenticates: Prometheus sends its own token.
    The operator's is scraped without one, through its own Service on the probe port."""
    docs = documents(render("beekeeper-system", "metrics.serviceMonitor.enabled=true"))
    monitors = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "ServiceMonitor"
    }
    assert set(monitors) == {"node-daemon", "operator"}
    (endpoint,) = monitors["node-daemon"]["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["bearerTokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    (endpoint,) = monitors["operator"]["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics" and "bearerTokenFile" not in endpoint
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    service = services["beekeeper-operator-metrics"]["spec"]
    assert service["selector"] == monitors["operator"]["spec"]["selector"]["matchLabels"]
    assert service["ports"] == [{"name": "metrics", "port": 8081, "targetPort": "health"}]


def test_kubeconform_with_these_schemas_catches_mistakes(schemas: Path) -> None:
    """The offline validation can fail: a wrong type in a built-in kind, an unknown field in ours."""
    docs = documents(render("beekeeper-system"))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["replicas"] = "one"
    bpfprogram = yaml.safe_load(EXAMPLES[0].read_text())
    bpfprogram["spec"]["programs"][0]["attachTo"] = "eth0"
    result = kubeconform(schemas, yaml.safe_dump_all([deployment, bpfprogram]))
    assert result.returncode != 0
    assert "Invalid: 2" in result.stdout, result.stdout


def test_the_apiserver_accepts_the_rendered_chart(cluster, namespace: str) -> None:
    manifests = render(namespace, "metrics.serviceMonitor.enabled=false", crds=True)
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=manifests)
    applied = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(applied) == len(documents(manifests))
    assert all(line.endswith("(server dry run)") for line in applied), result.stdout


def test_defaults_are_what_a_cluster_needs() -> None:
    objects = by_kind(render("beekeeper-system"))
    operator = objects["Deployment", "beekeeper-operator"]["spec"]
    assert operator["replicas"] == 1 and operator["strategy"]["type"] == "Recreate"
    container = operator["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["operator", "--health-port", "8081"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert operator["template"]["spec"]["securityContext"]["runAsNonRoot"] is True

    daemon = objects["DaemonSet", "beekeeper-node-daemon"]["spec"]
    assert daemon["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    pod = daemon["template"]["spec"]
    assert pod["hostNetwork"] and pod["hostPID"]
    assert {"operator": "Exists"} in pod["tolerations"]
    container = pod["containers"][0]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]
    caps = container["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE"]}
    assert "privileged" not in container["securityContext"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert {"/sys/fs/bpf", "/sys/kernel/tracing", "/lib/modules", "/usr/src", "/var/lib/beekeeper"} <= set(mounts)
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"

    privileged = by_kind(render("beekeeper-system", "nodeDaemon.privileged=true"))
    container = privileged["DaemonSet", "beekeeper-node-daemon"]["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["privileged"] is True
    assert {m["mountPath"]: m for m in container["volumeMounts"]}["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"


def test_uninstall_cleanup_is_a_pre_delete_hook_only() -> None:
    """Upgrades must keep programs attached: the cleanup runs on helm uninstall, and nothing else."""
    objects = by_kind(render("beekeeper-system"))
    job = objects["Job", "beekeeper-uninstall-cleanup"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] == "uninstall-cleanup"
    hooks = {key for key, obj in objects.items() if "helm.sh/hook" in obj["metadata"].get("annotations", {})}
    assert all(objects[key]["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete" for key in hooks)
    assert not by_kind(render("beekeeper-system", "uninstall.cleanup=false")).keys() & hooks


def test_image_verification_mounts_keys_and_registry_ca_without_secret_rbac() -> None:
    """The policy and its keys reach the operator as a mount (no RBAC on Secrets); the CA reaches both components."""
    text = render(
        "beekeeper-system",
        "bytecodeImages.verification=require",
        "bytecodeImages.verificationKeys.secretName=image-keys",
        "bytecodeImages.registryCA.configMapName=registry-ca",
    )
    docs = by_kind(text)
    operator = docs[("Deployment", "beekeeper-operator")]["spec"]["template"]["spec"]
    daemon = docs[("DaemonSet", "beekeeper-node-daemon")]["spec"]["template"]["spec"]
    args = operator["containers"][0]["args"]
    assert "--image-verification=require" in args
    assert "--image-verification-keys=/etc/beekeeper/image-keys" in args
    assert "--registry-ca-file=/etc/beekeeper/registry-ca/ca.crt" in args
    assert {"name": "image-keys", "secret": {"secretName": "image-keys"}} in operator["volumes"]
    assert "--registry-ca-file=/etc/beekeeper/registry-ca/ca.crt" in daemon["containers"][0]["args"]
    assert {"name": "registry-ca", "configMap": {"name": "registry-ca"}} in daemon["volumes"]
    for doc in documents(text):
        if doc["kind"] in ("ClusterRole", "Role"):
            assert not any("secrets" in rule.get("resources", []) for rule in doc.get("rules") or []), doc["metadata"]
    result = helm("template", "x", str(CHART), "--set", "bytecodeImages.verification=warn", check=False)
    assert result.returncode != 0 and "verificationKeys" in result.stderr
    result = helm("template", "x", str(CHART), "--set", "bytecodeImages.verification=maybe", check=False)
    assert result.returncode != 0 and "verification" in result.stderr


def test_argocd_health_checks_are_offered_under_argocd_cm_keys() -> None:
    """Off by default; on, a ConfigMap whose keys are argocd-cm's and whose values are the scripts, byte for byte."""
    assert not [
        d for d in documents(render("beekeeper-system")) if d["metadata"]["name"].endswith("argocd-health-checks")
    ]
    objects = by_kind(render("beekeeper-system", "argocd.healthChecks.configMap=true"))
    data = objects["ConfigMap", "beekeeper-argocd-health-checks"]["data"]
    scripts = CHART / "argocd" / "resource_customizations" / "beekeeper.dev"
    assert data == {
        f"resource.customizations.health.beekeeper.dev_{kind}": (scripts / kind / "health.lua").read_text()
        for kind in ("BpfProgram", "NetworkIdentityPolicy")
    }
    operator = objects["Deployment", "beekeeper-operator"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in operator["env"]
