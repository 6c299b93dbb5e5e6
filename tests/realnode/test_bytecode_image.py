"""A BpfProgram from a digest-pinned OCI image on the real node, next to one from C source.

The chart is installed with the registry's CA (`bytecodeImages.registryCA`, a ConfigMap in the
release namespace); the image is built by buildah as bpfman builds bytecode images and pushed to
the session's registry, which the node reaches on the rig's host address. The daemon pod pulls
it, loads it with libbpf and exports its map on /metrics exactly as it exports a bcc-built
program's: both families parsed as Prometheus parses them, both counting.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest
import yaml
from core_objects import SYSCALL_COUNTER, compile_core
from registry_rig import OciRig, Registry
from support import READER_RULES, Cluster, check_exposition, service_account_token, wait_for

from beekeeper.crds.names import GROUP, VERSION
from beekeeper.devenv import chart_release
from beekeeper.devenv.chart_release import NAMESPACE, ChartRelease
from beekeeper.devenv.realnode import NODE_IP, RealNode

CA_CONFIGMAP = "registry-ca"
REPOSITORY = "bpf/realnode-counter"
TRACEPOINT = "raw_syscalls:sys_enter"
BCC_COUNTER = """
BPF_HASH(counts, u32, u64, 4);

int count_syscalls(void *ctx)
{
    u32 key = 7;
    u64 zero = 0, *value = counts.lookup_or_try_init(&key, &zero);
    if (value)
        __sync_fetch_and_add(value, 1);
    return 0;
}
"""
"""The same counter as C source, built by bcc on the node."""


def _program(name: str, code: dict, metric: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BpfProgram",
        "metadata": {"name": name},
        "spec": {
            **code,
            "programs": [{"name": "count_syscalls", "type": "tracepoint", "tracepoint": TRACEPOINT}],
            "metrics": [{"map": "counts", "name": metric, "type": "counter", "key": {"kind": "int", "label": "slot"}}],
        },
    }


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, oci_registry: OciRig, node_registry: Registry) -> str:
    """The counter as a bytecode image, referenced by digest on the address the node reaches."""
    obj = tmp_path_factory.mktemp("realnode-image") / "counter.o"
    obj.write_bytes(compile_core(SYSCALL_COUNTER.replace("VARIANT", "7"), "realnode_counter"))
    digest = oci_registry.builder.build_and_push(
        REPOSITORY, "v1", obj, {"count_syscalls": "tracepoint"}, {"counts": "hash"}
    )
    return f"{node_registry.address}/{REPOSITORY}@{digest}"


@pytest.fixture(scope="module")
def release(realnode: RealNode, node_cluster: Cluster, node_registry: Registry) -> Iterator[ChartRelease]:
    """The chart with the registry's CA given to the operator and the daemons."""
    rel = chart_release.prepare(realnode, print)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    node_cluster.kubectl("apply", "-f", "-", input=json.dumps(namespace))
    configmap = node_cluster.kubectl(
        "create",
        "configmap",
        CA_CONFIGMAP,
        "-n",
        NAMESPACE,
        f"--from-file=ca.crt={node_registry.ca}",
        "--dry-run=client",
        "-o",
        "yaml",
    ).stdout
    node_cluster.kubectl("apply", "-f", "-", input=configmap)
    try:
        rel.install(f"--set=bytecodeImages.registryCA.configMapName={CA_CONFIGMAP}")
        yield rel
        rel.uninstall(check=False)
    finally:
        node_cluster.kubectl("delete", "configmap", CA_CONFIGMAP, "-n", NAMESPACE, "--ignore-not-found", check=False)


def _metrics(token: str) -> dict[str, dict[tuple[str, tuple], float]]:
    """The node daemon's /metrics (host network: the node's address), parsed as Prometheus does."""
    request = urllib.request.Request(
        f"http://{NODE_IP}:{chart_values()['nodeDaemon']['metricsPort']}/metrics",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return check_exposition(resp.read().decode())


def chart_values() -> dict:
    return yaml.safe_load((chart_release.CHART / "values.yaml").read_text())


def _in_kernel(prog_id: int) -> bool:
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True).returncode == 0


def test_image_pinned_by_digest_runs_on_the_node_and_exports_metrics_like_source(
    release: ChartRelease, node_cluster: Cluster, realnode: RealNode, image: str, node_registry: Registry
) -> None:
    repository = REPOSITORY
    programs = {
        "realnode-image-counter": _program(
            "realnode-image-counter", {"bytecode": {"image": image}}, "image_syscalls_total"
        ),
        "realnode-source-counter": _program(
            "realnode-source-counter", {"source": {"inline": BCC_COUNTER}}, "source_syscalls_total"
        ),
    }
    try:
        for body in programs.values():
            node_cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
        node_cluster.kubectl("wait", "--for=condition=Ready", "bpfprogram", *programs, "--timeout=180s")
        status = json.loads(node_cluster.kubectl("get", "bpfprogram", "realnode-image-counter", "-o", "json").stdout)
        assert status["status"]["image"]["digest"] == image.rsplit("@", 1)[1]
        assert status["status"]["ready"] == "1/1"
        assert node_registry.fetches(repository) >= 2, "the node daemon pulled config and layer from the registry"

        state = json.loads(node_cluster.kubectl("get", "bpfnodestate", realnode.node_name, "-o", "json").stdout)
        entry = next(p for p in state["spec"]["programs"] if p["bpfProgram"] == "realnode-image-counter")
        assert entry["bytecode"]["image"] == image
        reports = {p["bpfProgram"]: p for p in state["status"]["programs"] if p["bpfProgram"] in programs}
        assert set(reports) == set(programs), reports
        ids = [i for p in reports.values() for i in p["programIds"]]
        assert len(ids) == 2 and all(_in_kernel(i) for i in ids), ids

        token = service_account_token(node_cluster.api(), "beekeeper-test-reader", READER_RULES)

        def both_counting() -> dict | None:
            families = _metrics(token)
            got = {name: families.get(name) for name in ("image_syscalls", "source_syscalls")}
            return got if all(s and any(v > 0 for v in s.values()) for s in got.values()) else None

        families = wait_for(both_counting, 60, "both programs' maps exported with counts")
        shapes = {name: sorted(dict(labels).get("slot") for _, labels in samples) for name, samples in families.items()}
        assert shapes == {"image_syscalls": ["7"], "source_syscalls": ["7"]}, families
    finally:
        node_cluster.kubectl("delete", "bpfprogram", *programs, "--ignore-not-found", "--timeout=120s", check=False)
