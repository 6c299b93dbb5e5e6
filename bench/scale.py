"""Control plane at scale: one real apiserver and operator, N fake-backend node daemons per size.

    .venv/bin/python bench/scale.py [--nodes 10,100] [--quiet 10]

Every size runs in the same invocation, one after the other on the same control plane, so
the ratios between sizes compare like with like (same machine, same moment). Each size
gets a fresh operator, N Node objects and N node daemon processes (`--backend fake`: the
real daemon without a kernel), and is torn down before the next size starts.

Writes are counted from watch events on BpfNodeStates and BpfPrograms: every write that
changed an object is one event (one new resourceVersion). A change of metadata.generation
is a spec write (the operator's, on BpfNodeStates), a change of status alone is a status
write (the daemon's on BpfNodeStates, the operator's on BpfPrograms). The same events tell
when a rollout is READY N/N, so times and counts describe the same moment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kubernetes import client

from beekeeper import kube
from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import (  # shared with bench/policy_scale.py
    NO_METRICS,
    Harness,
    Usage,
    count,
    format_table,
    interrupt,
    progress,
    ratio,
    usage,
)

SIZE_LABEL = "bench.beekeeper.dev/size"
SOURCE = """// revision {revision}
BPF_HASH(opens, u32, u64, 1024);
int count_openat(void *ctx) {{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    opens.increment(pid);
    return 0;
}}
"""


@dataclass
class Result:
    nodes: int
    seconds: dict[str, float] = field(default_factory=dict)
    writes: dict[str, Counter[str]] = field(default_factory=dict)
    operator_cpu: dict[str, float] = field(default_factory=dict)
    daemon_cpu: dict[str, float] = field(default_factory=dict)
    apiserver_cpu: dict[str, float] = field(default_factory=dict)
    operator: Usage | None = None
    daemons: list[Usage] = field(default_factory=list)


class Bench(Harness):
    """One BpfProgram rolled out, edited and deleted per size."""

    def __init__(self, root: Path, quiet: float, timeout: float, profile: Path | None = None) -> None:
        super().__init__(root, timeout, (BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL))
        self.profile = profile
        self.quiet = quiet

    def run(self, n: int) -> Result:
        result = Result(n)
        custom = client.CustomObjectsApi(self.api)
        core = client.CoreV1Api(self.api)
        nodes = [f"bench-{n}-{i:03d}" for i in range(n)]
        program = f"bench-{n}"
        states = self.recorder.objects[BPF_NODE_STATE_PLURAL]
        programs = self.recorder.objects[BPF_PROGRAM_PLURAL]

        progress(f"N={n}: registering {n} nodes, starting the operator")
        for node in nodes:
            kube.register_node(self.api, node, {SIZE_LABEL: str(n)})
        operator = self.spawn(f"operator-{n}", "operator")
        self.wait(
            "operator creating node states",
            lambda: count(sum(node in states for node in nodes), n, "BpfNodeStates"),
        )

        progress(f"N={n}: starting {n} fake-backend node daemons")
        started = time.monotonic()
        daemons = [
            self.spawn(
                f"node-daemon-{node}",
                *("node-daemon", "--node-name", node, "--backend", "fake", *NO_METRICS),
                *("--state-dir", str(self.root / "nodes" / node)),  # removed with the run, not left in /tmp
            )
            for node in nodes
        ]

        def reporting() -> tuple[bool, str]:
            done = sum(1 for node in nodes if _observed(states.get(node)))
            return count(done, n, "daemons reporting")

        result.seconds["daemons up"] = self.wait("daemons", reporting) - started

        def ready(generation: int) -> Callable[[], tuple[bool, str]]:
            def check() -> tuple[bool, str]:
                status = (programs.get(program) or {}).get("status") or {}
                current = status.get("observedGeneration") == generation
                shown = status.get("ready", "-") if current else f"0/{n}"
                return current and status.get("phase") == "Ready" and status.get("ready") == f"{n}/{n}", shown

            return check

        profiler = self._profile(operator, n)
        progress(f"N={n}: rollout of BpfProgram {program}")
        with self._phase("rollout", result, operator, daemons):
            started = time.monotonic()
            generation = self._write(program, n, revision=1)
            result.seconds["rollout"] = self.wait("READY", ready(generation)) - started
            result.seconds["rollout written"] = self.recorder.last[f"{BPF_NODE_STATE_PLURAL}.spec"] - started

        progress(f"N={n}: source edit")
        with self._phase("edit", result, operator, daemons):
            started = time.monotonic()
            generation = self._write(program, n, revision=2)
            result.seconds["edit"] = self.wait("READY", ready(generation)) - started
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=30)

        progress(f"N={n}: quiet for {self.quiet:.0f}s")
        with self._phase("quiet", result, operator, daemons):
            time.sleep(self.quiet)
        result.operator = usage(operator)
        result.daemons = [usage(pid) for pid in daemons]

        progress(f"N={n}: delete (the finalizer waits for every node to detach)")
        started = time.monotonic()
        custom.delete_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, program)
        result.seconds["delete"] = self.wait("delete", lambda: (program not in programs, "waiting")) - started

        progress(f"N={n}: tearing down")
        self.stop(daemons)
        for node in nodes:
            core.delete_node(node)
        self.wait(
            "node states removed",
            lambda: count(n - sum(node in states for node in nodes), n, "BpfNodeStates gone"),
        )
        self.stop([operator])
        return result

    def _profile(self, pid: int, n: int) -> subprocess.Popen[bytes] | None:
        """py-spy sampling the operator's threads during rollout and edit (collapsed stacks, one file per size)."""
        if self.profile is None:
            return None
        spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        if spy is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        self.profile.mkdir(parents=True, exist_ok=True)
        out = self.profile / f"operator-{n}.txt"
        command = [spy, "record", "--pid", str(pid), "--rate", "250", "--gil", "--format", "raw", "-o", str(out)]
        profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached before the rollout starts
        return profiler

    @contextmanager
    def _phase(self, name: str, result: Result, operator: int, daemons: list[int]) -> Iterator[None]:
        """Writes and CPU time spent between entering and leaving."""
        writes, op_cpu = self.recorder.snapshot(), usage(operator).cpu_seconds
        daemon_cpu = sum(usage(pid).cpu_seconds for pid in daemons)
        apiserver_cpu = self.apiserver_cpu()
        yield
        result.apiserver_cpu[name] = self.apiserver_cpu() - apiserver_cpu
        result.writes[name] = self.recorder.snapshot() - writes
        result.operator_cpu[name] = usage(operator).cpu_seconds - op_cpu
        result.daemon_cpu[name] = sum(usage(pid).cpu_seconds for pid in daemons) - daemon_cpu

    def _write(self, name: str, n: int, revision: int) -> int:
        """Create the group's BpfProgram (revision 1) or edit its source; returns the generation to reach."""
        custom = client.CustomObjectsApi(self.api)
        source = {"inline": SOURCE.format(revision=revision)}
        if revision > 1:
            body = custom.patch_cluster_custom_object(
                GROUP, VERSION, BPF_PROGRAM_PLURAL, name, {"spec": {"source": source}}
            )
        else:
            manifest = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "BpfProgram",
                "metadata": {"name": name},
                "spec": {
                    "nodeSelector": {"matchLabels": {SIZE_LABEL: str(n)}},
                    "source": source,
                    "programs": [
                        {"name": "count_openat", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_openat"}
                    ],
                },
            }
            body = custom.create_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, manifest)
        return int(cast(dict[str, Any], body)["metadata"]["generation"])


def _observed(state: dict[str, Any] | None) -> bool:
    """The node's daemon has reported on the state's current spec."""
    if state is None:
        return False
    return (state.get("status") or {}).get("observedGeneration") == state["metadata"].get("generation")


# --- report ---------------------------------------------------------------------------------


NODESTATE, PROGRAM = BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL
OPERATOR_WRITES = tuple(
    f"{plural}.{change}"
    for plural, changes in ((NODESTATE, ("create", "spec", "meta", "delete")), (PROGRAM, ("status", "meta")))
    for change in changes
)
"""What only the operator writes (BpfProgram creates and spec edits are the user's)."""


def _writes(phases: tuple[str, ...], kinds: tuple[str, ...], per_node: bool = False) -> Callable[[Result], float]:
    def value(r: Result) -> float:
        total = sum(r.writes[p][k] for p in phases for k in kinds)
        return total / r.nodes if per_node else total

    return value


def _cpu_per_write(r: Result) -> float:
    """The operator's CPU over rollout and edit (passes, cache, every write) per node state it wrote."""
    written = _writes(("rollout", "edit"), OPERATOR_WRITES[:4])(r)
    return 1000 * (r.operator_cpu["rollout"] + r.operator_cpu["edit"]) / written if written else 0.0


def table(results: list[Result], quiet: float) -> str:
    """Rows of metrics, a column per size and the ratio of every size to the first."""
    busy = ("rollout", "edit")
    q = f"quiet {quiet:.0f}s"
    rows: list[tuple[str, Callable[[Result], float], str]] = [
        ("daemons up (start to first status), s", lambda r: r.seconds["daemons up"], "{:.1f}"),
        ("rollout: create to READY N/N, s", lambda r: r.seconds["rollout"], "{:.2f}"),
        ("rollout: create to last node state written, s", lambda r: r.seconds["rollout written"], "{:.2f}"),
        ("source edit to READY N/N, s", lambda r: r.seconds["edit"], "{:.2f}"),
        ("delete until the finalizer let go, s", lambda r: r.seconds["delete"], "{:.2f}"),
        ("operator BpfNodeState writes/node, rollout", _writes(("rollout",), OPERATOR_WRITES[:4], True), "{:.2f}"),
        ("operator BpfNodeState writes/node, edit", _writes(("edit",), OPERATOR_WRITES[:4], True), "{:.2f}"),
        ("operator BpfProgram writes (status, kopf meta), rollout+edit", _writes(busy, OPERATOR_WRITES[4:]), "{:.0f}"),
        ("daemon status writes/node, rollout+edit", _writes(busy, (f"{NODESTATE}.status",), True), "{:.2f}"),
        (f"{q}: operator writes", _writes(("quiet",), OPERATOR_WRITES), "{:.0f}"),
        (f"{q}: daemon status writes/node", _writes(("quiet",), (f"{NODESTATE}.status",), True), "{:.2f}"),
        ("operator CPU, rollout+edit, s", lambda r: r.operator_cpu["rollout"] + r.operator_cpu["edit"], "{:.2f}"),
        ("operator CPU per BpfNodeState write, ms", _cpu_per_write, "{:.2f}"),
        (f"operator CPU, {q}, s", lambda r: r.operator_cpu["quiet"], "{:.2f}"),
        ("operator RSS (peak), MiB", lambda r: r.operator.peak_rss_mib if r.operator else 0.0, "{:.0f}"),
        ("daemon CPU/node, rollout+edit, ms", lambda r: 1000 * sum(r.daemon_cpu[p] for p in busy) / r.nodes, "{:.0f}"),
        ("kube-apiserver + etcd CPU, rollout+edit, s", lambda r: sum(r.apiserver_cpu[p] for p in busy), "{:.2f}"),
        (f"daemon CPU/node, {q}, ms", lambda r: 1000 * r.daemon_cpu["quiet"] / r.nodes, "{:.0f}"),
        ("daemon RSS (median), MiB", lambda r: statistics.median(u.rss_mib for u in r.daemons), "{:.1f}"),
        ("daemons PSS (sum), MiB", lambda r: sum(u.pss_mib for u in r.daemons), "{:.0f}"),
    ]
    first = results[0]
    header = ["metric", *(f"N={r.nodes}" for r in results), *(f"{r.nodes}/{first.nodes}" for r in results[1:])]
    lines = [["nodes", *(str(r.nodes) for r in results), *(ratio(r.nodes, first.nodes) for r in results[1:])]]
    for label, value, fmt in rows:
        values = [value(r) for r in results]
        lines.append([label, *(fmt.format(v) for v in values), *(ratio(v, values[0]) for v in values[1:])])
    return format_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nodes", default="10,100", help="comma-separated sizes, measured in this order (default 10,100)"
    )
    parser.add_argument("--quiet", type=float, default=10.0, help="seconds of the quiet period (default 10)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds any one wait may take (default 600)")
    parser.add_argument("--keep", action="store_true", help="keep the state directory (logs) for inspection")
    parser.add_argument("--profile", type=Path, help="write py-spy collapsed stacks of the operator here, per size")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.nodes.split(",")]

    signal.signal(signal.SIGTERM, interrupt)
    root = Path(tempfile.mkdtemp(prefix="beekeeper-bench-"))
    bench = Bench(root, args.quiet, args.timeout, args.profile)
    results = bench.run_sizes(sizes, lambda n, _: bench.run(n), args.keep)
    if results is None:
        return 130
    print(table(results, args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
