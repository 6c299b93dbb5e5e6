"""The Helm chart on a real node: install, examples in the kernel, policy on real pods, upgrade,
a killed daemon, uninstall. The tests run in file order and share one release.

Probe-loop pods (a connection every 100 ms from an allowed and from a denied frontend) run
from the policy test on; the upgrade and kill tests count their wrong verdicts in the window
of the disruption: an allowed connection that failed or a denied one that succeeded. Both
must be 0: the daemon re-adopts the pinned programs, so enforcement has no gap.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from realnode_pods import now_ms, pod_manifest, probe_verdicts
from support import Cluster, wait_for

from beekeeper.devenv import chart_release
from beekeeper.devenv.chart_release import NAMESPACE, ChartRelease
from beekeeper.devenv.realnode import BPFFS_ROOT, RealNode

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/bpfprogram-*.yaml"))
POLICY = ROOT / "examples" / "networkidentitypolicy-frontend-backend.yaml"
APPS = "default"  # the example policy's namespace
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def release(realnode: RealNode, node_cluster: Cluster) -> Iterator[ChartRelease]:
    started = time.monotonic()
    rel = chart_release.prepare(realnode, print)
    TIMINGS["tools_images_import_s"] = round(time.monotonic() - started, 2)
    TIMINGS["install_s"] = round(rel.install(), 2)
    yield rel
    rel.uninstall(check=False)
    print(f"real-node chart timings: {TIMINGS}")


def _pods(cluster: Cluster, namespace: str, selector: str = "") -> list[dict]:
    args = ["get", "pods", "-n", namespace, "-o", "json", *(["-l", selector] if selector else [])]
    return json.loads(cluster.kubectl(*args).stdout)["items"]


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def _daemon_pod(cluster: Cluster) -> dict | None:
    pods = [p for p in _pods(cluster, NAMESPACE) if p["metadata"]["name"].startswith("beekeeper-node-daemon")]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return live[0] if len(live) == 1 and _ready(live[0]) else None


def _node_state(cluster: Cluster, node: str) -> dict:
    return json.loads(cluster.kubectl("get", "bpfnodestate", node, "-o", "json").stdout)


def _program_ids(cluster: Cluster, node: str) -> dict[str, list[int]]:
    programs = _node_state(cluster, node).get("status", {}).get("programs") or []
    return {f"{p['bpfProgram']}/{p['name']}": p.get("programIds") or [] for p in programs}


def _veth_links(realnode: RealNode, pod_ip: str) -> dict[str, tuple[int, int]]:
    """The policy's tcx links on a pod's host-side veth: pin name -> (link id, program id)."""
    dev = realnode.node_exec("ip", "-o", "route", "get", pod_ip).stdout.split(" dev ")[1].split()[0]
    ifindex = json.loads(realnode.node_exec("ip", "-j", "link", "show", "dev", dev).stdout)[0]["ifindex"]
    links = {}
    for direction in ("from_pod", "to_pod"):
        pin = f"{BPFFS_ROOT}/policy/links/{ifindex}_{direction}"
        info = json.loads(
            subprocess.run(
                ["bpftool", "-j", "link", "show", "pinned", pin], capture_output=True, text=True, check=True
            ).stdout
        )
        links[direction] = (info["id"], info["prog_id"])
    return links


def _in_kernel(prog_id: int) -> bool:
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True).returncode == 0


def test_install_runs_the_operator_and_a_daemon_on_the_node(release: ChartRelease, node_cluster: Cluster) -> None:
    waiting: list[str] = []

    def all_ready() -> bool:
        pods = _pods(node_cluster, NAMESPACE)
        waiting[:] = [p["metadata"]["name"] for p in pods if not _ready(p)] if pods else ["no pods"]
        return not waiting

    # helm's --wait counts a DaemonSet ready with maxUnavailable (1) pods not ready: on one node, none.
    try:
        wait_for(all_ready, 120, "every beekeeper pod Ready")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; not Ready: {waiting}") from None
    assert _daemon_pod(node_cluster) is not None


def test_examples_become_ready_with_their_programs_in_the_kernel(
    release: ChartRelease, node_cluster: Cluster, realnode: RealNode
) -> None:
    started = time.monotonic()
    for example in EXAMPLES:
        node_cluster.kubectl("apply", "-f", str(example))
    node_cluster.kubectl("wait", "--for=condition=Ready", "bpfprograms", "--all", "--timeout=180s")
    TIMINGS["examples_apply_to_ready_s"] = round(time.monotonic() - started, 2)
    ids = _program_ids(node_cluster, realnode.node_name)
    assert len(ids) >= len(EXAMPLES) and all(ids.values()), ids
    assert all(_in_kernel(i) for prog in ids.values() for i in prog), ids


@pytest.fixture(scope="module")
def policy_pods(release: ChartRelease, node_cluster: Cluster) -> Iterator[dict[str, str]]:
    """backend, frontend, quarantined frontend, other; two probe loops; the example policy. name -> IP"""
    specs = {
        "backend": (["serve", "8080", "8081"], {"app": "backend"}),
        "frontend": (["pause"], {"app": "frontend"}),
        "quarantined": (["pause"], {"app": "frontend", "quarantine": "true"}),
        "other": (["pause"], {"app": "other"}),
    }
    for name, (args, labels) in specs.items():
        node_cluster.kubectl("apply", "-f", "-", input=json.dumps(pod_manifest(APPS, name, args, labels)))
    node_cluster.kubectl("wait", "--for=condition=Ready", "pod", *specs, "-n", APPS, "--timeout=60s")
    ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in _pods(node_cluster, APPS)}
    target = f"{ips['backend']}:8080"
    for name, labels in (("allowed-loop", {"app": "frontend"}), ("denied-loop", {"app": "other"})):
        manifest = pod_manifest(APPS, name, ["probe-loop", target, "100", "300"], labels)
        node_cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    node_cluster.kubectl(
        "wait", "--for=condition=Ready", "pod", "allowed-loop", "denied-loop", "-n", APPS, "--timeout=60s"
    )
    node_cluster.kubectl("apply", "-f", str(POLICY))
    node_cluster.kubectl(
        "wait", "--for=condition=Ready", "networkidentitypolicy", "--all", "-n", APPS, "--timeout=120s"
    )
    yield ips
    node_cluster.kubectl("delete", "-f", str(POLICY), "--ignore-not-found", check=False)
    node_cluster.kubectl("delete", "pod", "-n", APPS, "--all", "--wait=false", check=False)


def _probe(cluster: Cluster, source: str, target: str) -> str:
    return cluster.kubectl(
        "exec", "-n", APPS, source, "--", "/testpod", "probe", target, "1000", check=False
    ).stdout.strip()


def test_example_policy_allows_and_denies_real_connections(node_cluster: Cluster, policy_pods: dict[str, str]) -> None:
    backend = policy_pods["backend"]
    expected = {
        ("frontend", 8080): True,
        ("frontend", 8081): False,  # only 8080 is allowed
        ("quarantined", 8080): False,  # deny beats allow
        ("other", 8080): False,  # not selected by the allow rule: default deny
    }
    seen = {key: _probe(node_cluster, key[0], f"{backend}:{key[1]}") for key in expected}
    assert {key: verdict.startswith("ok") for key, verdict in seen.items()} == expected, seen
    assert seen[("frontend", 8080)] == "ok backend"


def _wrong_verdicts(cluster: Cluster, since: int, until: int) -> tuple[int, int, list[str]]:
    allowed = probe_verdicts(cluster, APPS, "allowed-loop", since, until)
    denied = probe_verdicts(cluster, APPS, "denied-loop", since, until)
    wrong = allowed.failed + denied.ok
    return wrong, allowed.ok + allowed.failed + denied.ok + denied.failed, allowed.failures


def test_upgrade_replaces_the_daemon_and_keeps_programs_and_enforcement(
    release: ChartRelease, node_cluster: Cluster, realnode: RealNode, policy_pods: dict[str, str]
) -> None:
    before_pod = _daemon_pod(node_cluster)
    assert before_pod is not None
    programs = _program_ids(node_cluster, realnode.node_name)
    links = _veth_links(realnode, policy_pods["backend"])
    new_tag = f"{release.tag}-upgrade"
    realnode.ctr("images", "tag", "--force", f"{release.repository}:{release.tag}", f"{release.repository}:{new_tag}")
    since = now_ms()
    TIMINGS["upgrade_s"] = round(release.upgrade(new_tag), 2)
    after_pod = wait_for(
        lambda: (p := _daemon_pod(node_cluster)) and p["metadata"]["uid"] != before_pod["metadata"]["uid"] and p,
        120,
        "a new Ready daemon pod",
    )
    assert after_pod["spec"]["containers"][0]["image"].endswith(f":{new_tag}")
    wait_for(lambda: _program_ids(node_cluster, realnode.node_name) == programs, 60, "programs re-adopted")
    time.sleep(1)  # let the probe loops log past the end of the upgrade
    until = now_ms()
    assert _veth_links(realnode, policy_pods["backend"]) == links, "the pod veth must keep the same links and programs"
    wrong, probes, failures = _wrong_verdicts(node_cluster, since, until)
    TIMINGS["upgrade_wrong_verdicts"] = wrong
    print(f"upgrade: {wrong} wrong verdicts out of {probes} probes")
    assert probes > 20 and wrong == 0, failures


def test_killed_daemon_is_restarted_and_enforcement_never_stops(
    release: ChartRelease, node_cluster: Cluster, realnode: RealNode, policy_pods: dict[str, str]
) -> None:
    pod = _daemon_pod(node_cluster)
    assert pod is not None
    status = pod["status"]["containerStatuses"][0]
    links = _veth_links(realnode, policy_pods["backend"])
    since = now_ms()
    realnode.ctr("tasks", "kill", "--signal", "SIGKILL", status["containerID"].removeprefix("containerd://"))

    def restarted() -> bool:
        now = _daemon_pod(node_cluster)
        return bool(now) and now["status"]["containerStatuses"][0]["restartCount"] > status["restartCount"]

    wait_for(restarted, 120, "the kubelet to restart the daemon container")
    time.sleep(1)
    until = now_ms()
    assert _veth_links(realnode, policy_pods["backend"]) == links
    wrong, probes, failures = _wrong_verdicts(node_cluster, since, until)
    TIMINGS["kill_wrong_verdicts"] = wrong
    print(f"daemon kill: {wrong} wrong verdicts out of {probes} probes")
    assert probes > 10 and wrong == 0, failures


def _as_token(realnode: RealNode, token: str, method: str, path: str, body: dict) -> tuple[int, str]:
    """One API request with a bearer token (no kubeconfig user), as a pod's client would make it."""
    pki_ca = realnode.control_plane.dir / "pki" / "ca.crt"
    server = yaml.safe_load(realnode.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    request = urllib.request.Request(
        f"{server}{path}?dryRun=All",
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
    )
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(pki_ca)), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_daemon_token_bound_to_this_node_cannot_change_another_nodes_state(
    release: ChartRelease, node_cluster: Cluster, realnode: RealNode
) -> None:
    pod = _daemon_pod(node_cluster)
    assert pod is not None
    token = node_cluster.kubectl(
        "exec",
        "-n",
        NAMESPACE,
        pod["metadata"]["name"],
        "--",
        "cat",
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
    ).stdout.strip()
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["kubernetes.io"]["node"]["name"] == realnode.node_name, "a pod's token is bound to its node"
    other = "node-b"  # a Node object only: no kubelet, no kubernetes.io/os label, so no daemon pod
    node_cluster.kubectl(
        "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": other}})
    )
    try:
        state = {
            "apiVersion": "beekeeper.dev/v1alpha1",
            "kind": "BpfNodeState",
            "metadata": {"name": other},
            "spec": {"nodeName": other},
        }
        # The operator makes one for every Node; create it first if it has not yet.
        created = node_cluster.kubectl("create", "-f", "-", input=json.dumps(state), check=False)
        assert created.returncode == 0 or "AlreadyExists" in created.stderr, created.stderr
        body = {"status": {"attached": "0/0"}}
        own, _ = _as_token(
            realnode, token, "PATCH", f"/apis/beekeeper.dev/v1alpha1/bpfnodestates/{realnode.node_name}/status", body
        )
        theirs, message = _as_token(
            realnode, token, "PATCH", f"/apis/beekeeper.dev/v1alpha1/bpfnodestates/{other}/status", body
        )
        assert own == 200
        assert theirs in (403, 422) and "ValidatingAdmissionPolicy" in message, (theirs, message)
    finally:
        node_cluster.kubectl("delete", "node", other, "--ignore-not-found", check=False)
        node_cluster.kubectl("delete", "bpfnodestate", other, "--ignore-not-found", check=False)


def test_uninstall_detaches_everything_while_programs_and_policies_exist(
    release: ChartRelease, node_cluster: Cluster, realnode: RealNode, policy_pods: dict[str, str]
) -> None:
    programs = [i for ids in _program_ids(node_cluster, realnode.node_name).values() for i in ids]
    links = _veth_links(realnode, policy_pods["backend"])
    assert programs and node_cluster.kubectl("get", "bpfprograms", "-o", "name").stdout.strip()
    TIMINGS["uninstall_s"] = round(release.uninstall(), 2)
    assert not [i for i in programs if _in_kernel(i)], "programs beekeeper loaded must be gone from the kernel"
    assert not [prog for _, prog in links.values() if _in_kernel(prog)], "the policy programs must be detached"
    left = subprocess.run(["find", BPFFS_ROOT, "-mindepth", "1", "-not", "-type", "d"], capture_output=True, text=True)
    assert not left.stdout.strip(), f"pins left after uninstall:\n{left.stdout}"
    # Pods keep talking: without beekeeper the node falls back to no policy at all.
    assert _probe(node_cluster, "other", f"{policy_pods['backend']}:8080") == "ok backend"
    assert not release.installed()
