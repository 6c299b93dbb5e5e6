"""Compiler faults against real node daemon processes, the real apiserver and the kernel.

A program that crashes or hangs the compiler fails alone, with the compiler's words on its
status, while the daemon (same process) keeps reconciling the others. A daemon SIGKILLed in
the middle of a build converges after its restart without leaking kernel objects; a build
that was interrupted twice in a row is quarantined until its spec changes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from support import STACK_HOG, NodeDaemon, nested_macros, node_bpfprogram, wait_for

from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION
from beekeeper.node_daemon.unit_state import safe_name

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

GETPPID = "syscalls:sys_enter_getppid"
COUNTER = """
BPF_ARRAY(calls, u64, 1);
int count_calls(void *ctx) {
    int zero = 0;
    u64 *n = calls.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""


class Programs:
    """Apply BpfPrograms on one node and read their status; deletes them afterwards."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.custom = client.CustomObjectsApi(cluster.api())
        self.names: list[str] = []

    def apply(self, name: str, source: str, function: str, node: str) -> None:
        if name not in self.names:
            self.names.append(name)
        body = node_bpfprogram(name, node, source, [{"name": function, "type": "tracepoint", "tracepoint": GETPPID}])
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(body))

    def status(self, name: str) -> dict[str, Any]:
        return self.custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name).get("status") or {}

    def report(self, node: str, name: str) -> dict[str, Any]:
        state = self.custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node)
        return next((p for p in (state.get("status") or {}).get("programs") or [] if p["bpfProgram"] == name), {})

    def ready(self, name: str, timeout: float = 120) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") == "Ready" and status.get("ready") == "1/1" else None

        return wait_for(check, timeout, f"BpfProgram {name} Ready 1/1")

    def failing(self, name: str, reason: str, timeout: float = 120) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            failing = self.status(name).get("failingNodes") or []
            return failing[0] if failing and failing[0]["reason"] == reason else None

        return wait_for(check, timeout, f"BpfProgram {name} failing with {reason}")

    def delete_all(self) -> None:
        for name in self.names:
            self.cluster.kubectl("delete", "bpfprogram", name, "--ignore-not-found", "--wait=false")


@pytest.fixture
def bpfprograms(cluster, operator_process):
    programs = Programs(cluster)
    yield programs
    programs.delete_all()


def _tag() -> str:
    return uuid.uuid4().hex[:6]


def test_a_crashing_and_a_hanging_compiler_spare_the_daemon_and_other_programs(node_daemons, bpfprograms):
    daemon = node_daemons(args=["--compile-timeout", "4"])
    tag = _tag()
    healthy = f"healthy-{tag}"
    bpfprograms.apply(healthy, COUNTER, "count_calls", daemon.node)
    bpfprograms.ready(healthy)
    pid = daemon.pid

    crash, hang = f"stack-hog-{tag}", f"hang-{tag}"
    bpfprograms.apply(crash, STACK_HOG, "big_stack", daemon.node)
    bpfprograms.apply(hang, nested_macros(30), "slow", daemon.node)

    crashed = bpfprograms.failing(crash, "CompileError")
    assert crashed["node"] == daemon.node
    assert "Looks like the BPF stack limit of 512 bytes is exceeded" in crashed["message"], crashed
    hung = bpfprograms.failing(hang, "CompileTimeout")
    assert "did not finish within 4s" in hung["message"], hung
    assert daemon.alive() and daemon.pid == pid, f"the daemon died:\n{daemon.log_tail()}"

    # The same daemon still reconciles the healthy program: an edit converges.
    before = bpfprograms.report(daemon.node, healthy)
    bpfprograms.apply(healthy, COUNTER + "// edited\n", "count_calls", daemon.node)
    wait_for(
        lambda: (
            (r := bpfprograms.report(daemon.node, healthy)).get("contentHash") != before["contentHash"]
            and r.get("phase") == "Attached"
        ),
        60,
        "the edit of the healthy program attached",
    )
    bpfprograms.ready(healthy)
    assert daemon.alive() and daemon.pid == pid
    assert daemon.log.read_text().count("node daemon started") == 1


def _kill_daemon_only(daemon: NodeDaemon) -> None:
    """SIGKILL the daemon process alone, as the OOM killer would (its workers must follow)."""
    os.kill(daemon.pid, signal.SIGKILL)
    wait_for(lambda: not daemon.alive(), 10, "daemon killed")
    daemon.pid = None


def _marker(daemon: NodeDaemon, name: str) -> dict[str, Any] | None:
    path = daemon.state_dir / "building" / f"{safe_name(name)}.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _kill_mid_build(daemon: NodeDaemon, name: str, interrupted: int) -> None:
    wait_for(
        lambda: (_marker(daemon, name) or {}).get("interrupted") == interrupted,
        120,
        f"{name} being built (after {interrupted} interrupted builds)",
        interval=0.05,
    )
    _kill_daemon_only(daemon)


def _kernel_objects_named(kind: str, name: str) -> int:
    """How many kernel programs or maps carry name (bcc names them after the C identifier)."""
    shown = json.loads(subprocess.run(["bpftool", kind, "show", "-j"], capture_output=True, check=True).stdout)
    return sum(1 for obj in shown if obj.get("name") == name)


def _pins(daemon: NodeDaemon, name: str) -> dict[str, int]:
    unit = Path(daemon.bpffs_root) / "programs" / safe_name(name)
    files = [p for p in unit.rglob("*") if p.is_file()]
    return {kind: sum(1 for p in files if p.parent.name == kind) for kind in ("progs", "maps", "links")}


def _slow_unit(tag: str, depth: int = 19) -> tuple[str, str]:
    """A source taking seconds to build, with a map m<tag> and a function s<tag>."""
    return f"BPF_ARRAY(m{tag}, u64, 1);\n" + nested_macros(depth, f"s{tag}"), f"s{tag}"


def test_sigkill_mid_build_converges_without_leaks_and_quarantines_only_repeated_crashes(node_daemons, bpfprograms):
    daemon = node_daemons(args=["--compile-timeout", "90"])

    # Killed once in the middle of a build: rebuilt after the restart, no quarantine, no leak.
    tag = _tag()
    once, (source, function) = f"killed-once-{tag}", _slow_unit(tag)
    bpfprograms.apply(once, source, function, daemon.node)
    _kill_mid_build(daemon, once, interrupted=0)
    daemon.start()
    bpfprograms.ready(once)
    assert _pins(daemon, once) == {"progs": 1, "maps": 1, "links": 1}
    assert (_kernel_objects_named("prog", function), _kernel_objects_named("map", f"m{tag}")) == (1, 1)
    assert "ended while building unit" in daemon.log.read_text(), "the kill must have hit the build"
    ids = bpfprograms.report(daemon.node, once)["programIds"]

    # Killed in the middle of the same build twice in a row: quarantined, the rest untouched.
    tag2 = _tag()
    twice, (source2, function2) = f"killed-twice-{tag2}", _slow_unit(tag2)
    bpfprograms.apply(twice, source2, function2, daemon.node)
    _kill_mid_build(daemon, twice, interrupted=0)
    daemon.start()
    _kill_mid_build(daemon, twice, interrupted=1)
    daemon.start()
    quarantined = bpfprograms.failing(twice, "Quarantined")
    assert "ended 2 times in a row while building this program" in quarantined["message"], quarantined
    assert bpfprograms.report(daemon.node, once)["programIds"] == ids
    assert _kernel_objects_named("prog", function2) == 0, "an interrupted build leaked its program"

    # A new spec is built again (quicker this time) and converges.
    bpfprograms.apply(twice, source2.replace("F19(0)", "0"), function2, daemon.node)
    bpfprograms.ready(twice)
    assert _pins(daemon, twice) == {"progs": 1, "maps": 1, "links": 1}
    assert (_kernel_objects_named("prog", function2), _kernel_objects_named("map", f"m{tag2}")) == (1, 1)
    assert _marker(daemon, twice) is None


def test_a_daemon_stopped_mid_build_finishes_the_build(node_daemons, bpfprograms):
    """SIGTERM to the daemon's process group (kubectl delete pod, dev down) reaches its compile
    worker too; the update being built must not be recorded as a compiler failure."""
    daemon = node_daemons()
    tag = _tag()
    name, (source, function) = f"stopped-{tag}", _slow_unit(tag)
    bpfprograms.apply(name, source.replace("F19(0)", "0"), function, daemon.node)
    bpfprograms.ready(name)
    quick = bpfprograms.report(daemon.node, name)["contentHash"]
    bpfprograms.apply(name, source, function, daemon.node)
    wait_for(lambda: _marker(daemon, name), 120, f"the update of {name} being built", interval=0.05)
    daemon.stop()
    daemon.start()
    wait_for(
        lambda: (
            (r := bpfprograms.report(daemon.node, name)).get("contentHash") != quick and r.get("phase") == "Attached"
        ),
        60,
        "the update attached after the restart",
    )
    bpfprograms.ready(name)
    assert not bpfprograms.status(name).get("failingNodes")
    assert _kernel_objects_named("prog", function) == 1
