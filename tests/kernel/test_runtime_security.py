"""RuntimeSecurityPolicy in the real kernel: simulated pods, real execs, real SIGKILLs.

A simulated pod is laid out as the kubelet (cgroupfs driver) lays it out in the cgroup v2
hierarchy, kubepods/burstable/pod<uid>/<container id>, below a per-test parent, with a
long-running process in the container's cgroup standing for the container (its root is
the host's here, so paths resolve to the host's files). Execs are started in that cgroup;
the same execs outside it are the host's and must never be touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon.capabilities import find_mount
from beekeeper.node_daemon.runtime_agent import RuntimeAgent
from beekeeper.node_daemon.runtime_maps import MAP_SPECS
from beekeeper.operator.runtime_compile import revision

pytestmark = pytest.mark.kernel

SH = os.path.realpath("/bin/sh")
ID = shutil.which("id") or "/usr/bin/id"


@dataclass
class SimPod:
    namespace: str
    name: str
    uid: str
    container_id: str
    cgroup: Path
    sleeper: subprocess.Popen[bytes]

    def run(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """argv started inside the container's cgroup (as `kubectl exec` would start it)."""
        procs = self.cgroup / "cgroup.procs"
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
            preexec_fn=lambda: procs.write_text(str(os.getpid())),
        )

    def entry(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "pod": self.name,
            "uid": self.uid,
            "containers": [{"name": "app", "containerId": f"containerd://{self.container_id}"}],
        }


@pytest.fixture
def pods() -> Iterator[Any]:
    root = find_mount("cgroup2")
    if root is None:
        pytest.skip("no cgroup v2 mount")
    base = Path(root) / f"beekeeper-test-{secrets.token_hex(4)}"
    made: list[SimPod] = []

    def make(name: str, namespace: str = "shop") -> SimPod:
        uid = str(uuid.uuid4())
        cid = secrets.token_hex(32)
        cgroup = base / "kubepods" / "burstable" / f"pod{uid}" / cid
        cgroup.mkdir(parents=True)
        procs = cgroup / "cgroup.procs"
        sleeper = subprocess.Popen(["sleep", "600"], preexec_fn=lambda: procs.write_text(str(os.getpid())))
        pod = SimPod(namespace, name, uid, cid, cgroup, sleeper)
        made.append(pod)
        return pod

    yield make
    for pod in made:
        pod.sleeper.kill()
        pod.sleeper.wait()
    for directory in sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True) if base.exists() else []:
        if directory.is_dir():
            directory.rmdir()
    if base.exists():
        base.rmdir()


@pytest.fixture
def agent(bpffs_dir: Path) -> Iterator[RuntimeAgent]:
    runtime = RuntimeAgent("node-1", bpffs_dir / "runtime")
    yield runtime
    runtime.remove()


def spec(*policies: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"policies": list(policies)}
    return {**body, "revision": revision(body)}


def policy(
    pods: list[SimPod], rules: list[dict[str, Any]], mode: str = "Enforce", name: str = "no-shells", **extra: Any
) -> dict[str, Any]:
    return {
        "policy": f"shop/{name}",
        "generation": 1,
        "mode": mode,
        "rules": rules,
        "pods": [p.entry() for p in pods],
        **extra,
    }


NO_SHELLS = [{"name": "shells", "exec": {"paths": ["/bin/sh"]}, "action": "Block"}]
NO_TMP = [{"name": "tmp", "exec": {"pathPrefixes": ["/tmp/"]}, "action": "Block"}]


def assert_killed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == "" and result.stderr == ""  # not a single instruction of the program ran


def test_shell_is_blocked_by_every_name_and_only_in_the_pod(agent: RuntimeAgent, pods: Any, tmp_path: Path) -> None:
    web = pods("web-1")
    status = agent.reconcile(spec(policy([web], NO_SHELLS)))
    assert status is not None and status["enforcing"], status
    assert status["hook"] in ("lsm", "tracepoint") and status["containers"] == 1

    assert_killed(web.run("/bin/sh", "-c", "echo ran; id"))
    assert_killed(web.run("sh", "-c", "echo ran", env={"PATH": "/usr/bin:/bin"}))  # PATH lookup
    link = tmp_path / "innocent"
    link.symlink_to("/bin/sh")
    assert_killed(web.run(str(link), "-c", "echo ran"))  # symlink
    os.chdir("/usr/bin")
    try:
        assert_killed(web.run(f"./{os.path.basename(SH)}", "-c", "echo ran"))  # relative path
    finally:
        os.chdir("/")
    hard = Path(SH).parent.parent / "lib" / f"beekeeper-test-{secrets.token_hex(3)}"
    if os.stat(Path(SH).parent).st_dev == os.stat(hard.parent).st_dev:
        os.link(SH, hard)  # a hard link is the same inode under another name
        try:
            assert_killed(web.run(str(hard), "-c", "echo ran"))
        finally:
            hard.unlink()

    allowed = web.run(ID, "-u")
    assert allowed.returncode == 0 and allowed.stdout.strip() == str(os.getuid())
    host = subprocess.run(["/bin/sh", "-c", "echo host"], capture_output=True, text=True)
    assert host.returncode == 0 and host.stdout == "host\n"  # the host is never matched
    other = pods("front-1")
    assert other.run("/bin/sh", "-c", "echo other").stdout == "other\n"  # an unselected pod


def test_prefix_rule_blocks_copies_under_it_across_mounts(agent: RuntimeAgent, pods: Any) -> None:
    web = pods("web-1")
    agent.reconcile(spec(policy([web], NO_SHELLS + NO_TMP)))
    work = Path(f"/tmp/beekeeper-test-{secrets.token_hex(3)}")
    (work / "mnt").mkdir(parents=True)
    mounted = False
    try:
        copy = work / "mysh"
        shutil.copy(SH, copy)  # a new inode: only the prefix can catch it
        assert_killed(web.run(str(copy), "-c", "echo ran"))
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(work / "mnt")], check=True)
        mounted = True
        inner = work / "mnt" / "sh2"
        shutil.copy(SH, inner)
        assert_killed(web.run(str(inner), "-c", "echo ran"))  # beneath a mount inside the prefix
        outside = Path("/var/tmp") / f"beekeeper-test-{secrets.token_hex(3)}"
        shutil.copy(SH, outside)
        try:
            assert web.run(str(outside), "-c", "echo ran").stdout == "ran\n"  # a copy elsewhere is another file
        finally:
            outside.unlink()
    finally:
        if mounted:
            subprocess.run(["umount", str(work / "mnt")], check=True)
        shutil.rmtree(work)


def test_allow_list_blocks_everything_else(agent: RuntimeAgent, pods: Any) -> None:
    web = pods("web-1")
    rules = [{"name": "tools", "exec": {"paths": [ID]}, "action": "Allow"}]
    agent.reconcile(spec(policy([web], rules, defaultAction="Block")))
    assert web.run(ID, "-u").returncode == 0
    assert_killed(web.run("/bin/true"))
    assert subprocess.run(["/bin/true"]).returncode == 0


def test_audit_mode_reports_without_blocking_and_events_say_who(agent: RuntimeAgent, pods: Any) -> None:
    web = pods("web-1")
    agent.reconcile(spec(policy([web], NO_SHELLS, mode="Audit")))
    result = web.run("/bin/sh", "-c", "echo ran")
    assert result.returncode == 0 and result.stdout == "ran\n"
    events = poll(agent, 1)
    assert events[0] | {"time": None, "pid": None, "ppid": None, "inode": None} == {
        "time": None,
        "node": "node-1",
        "namespace": "shop",
        "pod": "web-1",
        "podUid": web.uid,
        "container": "app",
        "pid": None,
        "ppid": None,
        "file": "/bin/sh",
        "inode": None,
        "comm": "sh",
        "parent": events[0]["parent"],
        "policy": "shop/no-shells",
        "rule": "shells",
        "configuredAction": "Block",
        "action": "Audited",
        "mode": "Audit",
        "match": "path",
        "hook": agent.hook,
    }
    assert events[0]["parent"].startswith("python")
    assert events[0]["inode"] == os.stat(SH).st_ino
    assert agent.matches() == {"shop/no-shells": 1}

    agent.reconcile(spec(policy([web], NO_SHELLS)))  # Audit -> Enforce is a map update
    assert_killed(web.run("/bin/sh", "-c", "echo ran"))
    assert poll(agent, 1)[0]["action"] == "Blocked"
    assert agent.matches() == {"shop/no-shells": 2}


def poll(agent: RuntimeAgent, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    while len(events) < count and time.monotonic() < deadline:
        events += agent.poll_events(100)
    assert len(events) == count, events
    return events


def test_relabel_and_delete_restore_and_restart_keeps_enforcing(bpffs_dir: Path, pods: Any) -> None:
    web = pods("web-1")
    first = RuntimeAgent("node-1", bpffs_dir / "runtime")
    try:
        first.reconcile(spec(policy([web], NO_SHELLS)))
        prog_id = first.datapath.prog_id
        assert_killed(web.run("/bin/sh", "-c", "echo ran"))
        first.reconcile(spec())  # the pod was relabelled out of the policy: same program, emptier maps
        assert web.run("/bin/sh", "-c", "echo ran").stdout == "ran\n"
        assert first.datapath.prog_id == prog_id
        first.reconcile(spec(policy([web], NO_SHELLS)))  # relabelled back in
        assert_killed(web.run("/bin/sh", "-c", "echo ran"))
        first.close()  # the daemon stops: nothing is unpinned, so nothing is lost
        assert_killed(web.run("/bin/sh", "-c", "echo ran"))

        second = RuntimeAgent("node-1", bpffs_dir / "runtime")  # restarted: adopts before any spec
        second.adopt()
        assert second.datapath.prog_id == prog_id
        assert_killed(web.run("/bin/sh", "-c", "echo ran"))
        status = second.reconcile(spec(policy([web], NO_SHELLS)))
        assert status is not None and status["enforcing"] and status["matches"] == {"shop/no-shells": 4}
        second.reconcile(None)  # the last policy was deleted: unloaded everywhere
        assert web.run("/bin/sh", "-c", "echo ran").stdout == "ran\n"
        assert not (bpffs_dir / "runtime").exists()
        with pytest.raises(bpf.BpfError):
            bpf.obj_get(str(bpffs_dir / "runtime" / "link"))
    finally:
        first.remove()


def test_missing_container_is_reported(agent: RuntimeAgent, pods: Any) -> None:
    web = pods("web-1")
    ghost = {"namespace": "shop", "pod": "ghost", "uid": str(uuid.uuid4())}
    ghost["containers"] = [{"name": "app", "containerId": "containerd://" + "0" * 64}]
    entry = policy([web], NO_SHELLS)
    entry["pods"].append(ghost)
    status = agent.reconcile(spec(entry))
    assert status is not None and not status["enforcing"]
    assert status["missing"] == ["shop/ghost/app"] and status["containers"] == 1
    assert_killed(web.run("/bin/sh", "-c", "echo ran"))  # the others are enforced meanwhile


def test_layouts_match_the_object(agent: RuntimeAgent, pods: Any) -> None:
    agent.reconcile(spec(policy([pods("web-1")], NO_SHELLS)))
    for map_spec in MAP_SPECS:
        with bpf.obj_get(str(agent.bpffs_dir / "maps" / map_spec.name)) as fd:
            info = bpf.map_info(fd.fd)
        assert (info.key_size, info.value_size, info.max_entries) == (
            map_spec.key_size,
            map_spec.value_size,
            map_spec.max_entries,
        )
