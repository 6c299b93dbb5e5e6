"""RuntimeSecurityPolicy on the real node: the chart installed, the example policy applied, and
`kubectl exec` into real pods (containerd, runc, the kubelet's cgroupfs layout on this cgroup v1
hybrid machine). The tests run in file order and share one release, namespace and pods.

A blocked exec is killed by the tracepoint hook before the program's first instruction, so
`kubectl exec` reports exit code 137 (SIGKILL) and the command prints nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from realnode_pods import pod_manifest
from support import Cluster, wait_for

from beekeeper.devenv import chart_release
from beekeeper.devenv.chart_release import ChartRelease
from beekeeper.devenv.realnode import RealNode
from beekeeper.node_daemon.runtime_maps import KEY_CGROUP, KEY_MNTNS
from beekeeper.node_daemon.runtime_pods import cgroup_mounts, container_identity

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "examples" / "runtimesecuritypolicy-no-shell-in-backend.yaml"
POLICY_NAME = yaml.safe_load(POLICY.read_text())["metadata"]["name"]
KILLED = 137
DESCRIBE_OUTPUT = os.environ.get("BEEKEEPER_RSP_DESCRIBE_OUTPUT")
"""When set, `kubectl describe pod` of the blocked pod is written there (the README shows it)."""


@pytest.fixture(scope="module")
def release(realnode: RealNode) -> Iterator[ChartRelease]:
    rel = chart_release.prepare(realnode, print)
    rel.install()
    yield rel
    rel.uninstall(check=False)


@pytest.fixture(scope="module")
def apps(release: ChartRelease, node_cluster: Cluster) -> Iterator[str]:
    """A namespace with a backend pod (selected by the example) and an other pod (not selected)."""
    with node_cluster.temp_namespace() as namespace:
        for name, labels in (("backend", {"app": "backend"}), ("other", {"app": "other"})):
            manifest = pod_manifest(namespace, name, ["pause"], labels)
            node_cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        node_cluster.kubectl("wait", "--for=condition=Ready", "pod", "backend", "other", "-n", namespace)
        yield namespace
        node_cluster.kubectl("delete", "pod", "--all", "-n", namespace, "--wait=false", check=False)


def _apply_policy(cluster: Cluster, namespace: str, mode: str = "Enforce") -> None:
    doc = yaml.safe_load(POLICY.read_text())
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["mode"] = mode
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))


def _policy(cluster: Cluster, namespace: str) -> dict:
    args = ("get", "runtimesecuritypolicy", POLICY_NAME, "-n", namespace, "-o", "json")
    return json.loads(cluster.kubectl(*args).stdout)


def _enforced(cluster: Cluster, namespace: str, pods: int) -> dict | None:
    """The policy's status once its current generation is enforced for `pods` selected pods."""
    policy = _policy(cluster, namespace)
    status = policy.get("status") or {}
    ready = [c for c in status.get("conditions") or [] if c["type"] == "Ready" and c["status"] == "True"]
    current = status.get("observedGeneration") == policy["metadata"]["generation"]
    return status if ready and current and status.get("selectedPods") == pods else None


def _why_not(cluster: Cluster, realnode: RealNode, namespace: str) -> str:
    """What the policy, the node and the daemon say, for a failure message."""
    state = json.loads(cluster.kubectl("get", "bpfnodestate", realnode.node_name, "-o", "json").stdout)
    selector = ("-l", "app.kubernetes.io/component=node-daemon", "--tail=30")
    logs = cluster.kubectl("logs", "-n", chart_release.NAMESPACE, *selector, check=False).stdout
    return (
        f"policy status: {_policy(cluster, namespace).get('status')}\n"
        f"node runtimeSecurity: {(state.get('status') or {}).get('runtimeSecurity')}\ndaemon log:\n{logs}"
    )


@pytest.fixture(scope="module")
def policy(node_cluster: Cluster, realnode: RealNode, apps: str) -> Iterator[dict]:
    _apply_policy(node_cluster, apps)
    try:
        status = wait_for(lambda: _enforced(node_cluster, apps, 1), 120, "the example policy enforced on backend")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_why_not(node_cluster, realnode, apps)}") from None
    yield status
    node_cluster.kubectl("delete", "runtimesecuritypolicy", POLICY_NAME, "-n", apps, "--ignore-not-found", check=False)


def _exec(cluster: Cluster, namespace: str, pod: str, *argv: str) -> tuple[int, str]:
    result = cluster.kubectl("exec", "-n", namespace, pod, "--", *argv, check=False)
    return result.returncode, result.stdout


def _shell_runs(cluster: Cluster, namespace: str, pod: str) -> bool:
    code, out = _exec(cluster, namespace, pod, "/bin/sh", "-c", "id")
    assert code in (0, KILLED), (code, out)
    return code == 0 and "uid=0" in out


def test_the_hook_in_force_is_the_tracepoint(node_cluster: Cluster, realnode: RealNode, policy: dict) -> None:
    """LSM programs are refused on this kernel (EPERM on load), so the node reports the tracepoint."""
    assert policy["hooks"] == {"tracepoint": 1}, policy
    assert policy["nodesEnforcing"] == 1, policy
    state = json.loads(node_cluster.kubectl("get", "bpfnodestate", realnode.node_name, "-o", "json").stdout)
    assert state["status"]["capabilities"]["execEnforcement"] == "tracepoint", state["status"]["capabilities"]


def test_a_shell_is_blocked_however_it_is_named(node_cluster: Cluster, apps: str, policy: dict) -> None:
    assert _exec(node_cluster, apps, "backend", "/bin/sh", "-c", "id") == (KILLED, "")
    assert _exec(node_cluster, apps, "backend", "sh", "-c", "id") == (KILLED, "")  # PATH lookup
    assert _exec(node_cluster, apps, "backend", "/bin/ln", "-sf", "/bin/sh", "/shell-link")[0] == 0
    assert _exec(node_cluster, apps, "backend", "/shell-link", "-c", "id") == (KILLED, "")
    assert _exec(node_cluster, apps, "backend", "/bin/cp", "/bin/dash", "/tmp/copied-shell")[0] == 0
    assert _exec(node_cluster, apps, "backend", "/tmp/copied-shell", "-c", "id") == (KILLED, "")  # /tmp/ prefix
    code, out = _exec(node_cluster, apps, "backend", "/bin/id")
    assert code == 0 and out.startswith("uid=0"), (code, out)


def test_a_pod_the_policy_does_not_select_is_untouched(node_cluster: Cluster, apps: str, policy: dict) -> None:
    assert _shell_runs(node_cluster, apps, "other")
    assert _exec(node_cluster, apps, "other", "/bin/cp", "/bin/dash", "/tmp/copied-shell")[0] == 0
    code, out = _exec(node_cluster, apps, "other", "/tmp/copied-shell", "-c", "echo ran")
    assert (code, out.strip()) == (0, "ran")


def test_the_block_is_an_event_on_the_pod(node_cluster: Cluster, apps: str, policy: dict) -> None:
    """`kubectl describe pod` names the file, the policy and the rule (the daemon aggregates and posts)."""
    _exec(node_cluster, apps, "backend", "/bin/sh", "-c", "id")

    def described() -> str | None:
        out = node_cluster.kubectl("describe", "pod", "-n", apps, "backend").stdout
        return out if f"by RuntimeSecurityPolicy {apps}/{POLICY_NAME}" in out else None

    out = wait_for(described, 60, "the ExecBlocked Event in kubectl describe pod")
    blocked = f"Blocked exec of /bin/sh in container main by RuntimeSecurityPolicy {apps}/{POLICY_NAME}"
    assert re.search(rf"Warning\s+ExecBlocked\s+.*{re.escape(blocked)} \(rule no-shells; parent ", out), out
    listed = node_cluster.kubectl("get", "rsp", "-n", apps).stdout
    if DESCRIBE_OUTPUT:
        Path(DESCRIBE_OUTPUT).write_text(f"$ kubectl get rsp\n{listed}$ kubectl describe pod backend\n{out}")
    print(listed, out)
    # Every block so far (4 in the test before, 1 here) is counted, as the node's reports reach the operator.
    wait_for(lambda: ((_policy(node_cluster, apps).get("status") or {}).get("matches") or 0) >= 5, 60, "matches >= 5")


def test_relabelling_turns_enforcement_on_and_off(node_cluster: Cluster, apps: str, policy: dict) -> None:
    node_cluster.kubectl("label", "pod", "other", "-n", apps, "app=backend", "--overwrite")
    wait_for(lambda: not _shell_runs(node_cluster, apps, "other"), 60, "the relabelled pod blocked")
    wait_for(lambda: _enforced(node_cluster, apps, 2), 60, "the policy enforced on both pods")
    node_cluster.kubectl("label", "pod", "other", "-n", apps, "app=other", "--overwrite")
    wait_for(lambda: _shell_runs(node_cluster, apps, "other"), 60, "the pod labelled back allowed again")
    assert not _shell_runs(node_cluster, apps, "backend")


def _events(cluster: Cluster, namespace: str, reason: str) -> list[dict]:
    args = ("get", "events", "-n", namespace, "--field-selector", f"reason={reason}", "-o", "json")
    return json.loads(cluster.kubectl(*args).stdout)["items"]


def test_audit_mode_reports_without_blocking(node_cluster: Cluster, apps: str, policy: dict) -> None:
    _apply_policy(node_cluster, apps, mode="Audit")
    wait_for(lambda: _enforced(node_cluster, apps, 1), 60, "the Audit generation enforced")
    assert _shell_runs(node_cluster, apps, "backend")

    def audited() -> list[dict]:
        return [e for e in _events(node_cluster, apps, "ExecAudited") if e["involvedObject"]["name"] == "backend"]

    event = wait_for(audited, 60, "an ExecAudited Event on the backend pod")[0]
    assert event["message"].startswith("Audited exec of /bin/sh in container main"), event
    assert event["message"].endswith("(Audit mode: it would have been blocked)"), event
    _apply_policy(node_cluster, apps, mode="Enforce")
    wait_for(lambda: _enforced(node_cluster, apps, 1), 60, "the Enforce generation enforced")
    assert not _shell_runs(node_cluster, apps, "backend")


def test_a_real_containers_processes_carry_its_unified_cgroup(
    node_cluster: Cluster, realnode: RealNode, apps: str, policy: dict
) -> None:
    """On this v1 hybrid machine runc also puts each container into the cgroup2 (unified) hierarchy,
    under the kubelet's cgroupfs path: bpf_get_current_cgroup_id() of its processes is the inode of
    that directory, which is what the daemon maps (and the container's mount namespace beside it)."""
    pod = json.loads(node_cluster.kubectl("get", "pod", "backend", "-n", apps, "-o", "json").stdout)
    container_id = pod["status"]["containerStatuses"][0]["containerID"]
    task = realnode.ctr("tasks", "ls").stdout
    pid = int(next(line.split()[1] for line in task.splitlines() if line.startswith(container_id.split("//")[1])))
    unified = next(line.partition("::")[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                   if line.startswith("0::"))  # fmt: skip
    cgroup2, cgroup1 = cgroup_mounts()
    assert pod["metadata"]["uid"] in unified and container_id.split("//")[1] in unified, unified
    cgroup_id = os.stat(f"{cgroup2[0]}{unified}").st_ino
    ident = container_identity(
        pod["metadata"]["uid"], container_id, cgroup2, cgroup1, os.stat("/proc/self/ns/mnt").st_ino
    )
    assert ident is not None
    assert (KEY_CGROUP, cgroup_id) in ident.keys, (cgroup_id, ident)
    assert (KEY_MNTNS, os.stat(f"/proc/{pid}/ns/mnt").st_ino) in ident.keys, ident
    print(f"container {container_id}: pid {pid}, unified cgroup {unified} (id {cgroup_id}), keys {ident.keys}")


def test_a_killed_daemon_leaves_enforcement_in_place(
    node_cluster: Cluster, realnode: RealNode, apps: str, policy: dict
) -> None:
    """The hook and its maps are pinned: while the kubelet restarts the daemon, shells stay blocked."""
    daemon = json.loads(
        node_cluster.kubectl(
            "get", "pods", "-n", chart_release.NAMESPACE, "-l", "app.kubernetes.io/component=node-daemon", "-o", "json"
        ).stdout
    )["items"][0]
    status = daemon["status"]["containerStatuses"][0]
    realnode.ctr("tasks", "kill", "--signal", "SIGKILL", status["containerID"].removeprefix("containerd://"))
    assert _exec(node_cluster, apps, "backend", "/bin/sh", "-c", "id") == (KILLED, "")

    def restarted() -> bool:
        args = ("get", "pod", daemon["metadata"]["name"], "-n", chart_release.NAMESPACE, "-o", "json")
        now = json.loads(node_cluster.kubectl(*args).stdout)["status"]["containerStatuses"][0]
        return now["restartCount"] > status["restartCount"] and bool(now.get("ready"))

    wait_for(restarted, 120, "the daemon restarted and Ready")
    assert _exec(node_cluster, apps, "backend", "/bin/sh", "-c", "id") == (KILLED, "")
    assert _shell_runs(node_cluster, apps, "other")


def test_deleting_the_policy_restores_everything(node_cluster: Cluster, apps: str, policy: dict) -> None:
    node_cluster.kubectl("delete", "runtimesecuritypolicy", POLICY_NAME, "-n", apps)
    wait_for(lambda: _shell_runs(node_cluster, apps, "backend"), 60, "the shell allowed once the policy is gone")
    code, out = _exec(node_cluster, apps, "backend", "/tmp/copied-shell", "-c", "echo ran")
    assert (code, out.strip()) == (0, "ran")
