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
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from beekeeper import kube
from beekeeper.crds.generate import crd_manifests
from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION
from beekeeper.devenv import processes
from beekeeper.devenv.controlplane import ControlPlane

SIZE_LABEL = "bench.beekeeper.dev/size"
NO_METRICS = ("--metrics-port", "0")
PROGRESS_SECONDS = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SOURCE = """// revision {revision}
BPF_HASH(opens, u32, u64, 1024);
int count_openat(void *ctx) {{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    opens.increment(pid);
    return 0;
}}
"""
_START = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- observing the API ----------------------------------------------------------------------


class Recorder:
    """Watches BpfNodeStates and BpfPrograms: keeps the newest objects and counts writes by kind."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, dict[str, Any]]] = {BPF_NODE_STATE_PLURAL: {}, BPF_PROGRAM_PLURAL: {}}
        self.writes: Counter[str] = Counter()
        self.last: dict[str, float] = {}
        """"<plural>.<change>" -> time.monotonic() of its latest event (where a rollout's time goes)."""
        """"<plural>.<create|spec|status|meta|delete>" -> count."""
        self.relists = 0
        """Watches restarted from a fresh list: writes in between may be missing from the counts."""
        self._cond = threading.Condition()
        self._stop = threading.Event()

    def start(self, api: client.ApiClient) -> None:
        custom = client.CustomObjectsApi(api)
        for plural in self.objects:
            threading.Thread(target=self._watch, args=(custom, plural), name=f"watch-{plural}", daemon=True).start()

    def close(self) -> None:
        """Stop counting (the watch threads end with their next event or error)."""
        self._stop.set()

    def snapshot(self) -> Counter[str]:
        with self._cond:
            return Counter(self.writes)

    def wait(
        self, what: str, check: Callable[[], tuple[bool, str]], timeout: float, guard: Callable[[], None]
    ) -> float:
        """Until check() (run under the lock after every event) says done; returns time.monotonic() then.

        guard() runs about once a second and raises when waiting is pointless (a process died).
        """
        start = shown = guarded = time.monotonic()
        with self._cond:
            while True:
                done, detail = check()
                now = time.monotonic()
                if done:
                    return now
                if now - start > timeout:
                    raise TimeoutError(f"{what}: not done after {timeout:.0f}s ({detail})")
                if now - guarded >= 1.0:
                    guard()
                    guarded = now
                if now - shown >= PROGRESS_SECONDS:
                    progress(f"  {what}: {detail}")
                    shown = now
                self._cond.wait(timeout=1.0)

    def _watch(self, custom: client.CustomObjectsApi, plural: str) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listing = cast(dict[str, Any], custom.list_cluster_custom_object(GROUP, VERSION, plural))
                    with self._cond:  # in place: callers hold on to these dicts
                        self.objects[plural].clear()
                        self.objects[plural].update({o["metadata"]["name"]: o for o in listing["items"]})
                        self._cond.notify_all()
                    version = listing["metadata"]["resourceVersion"]
                for event in watch.Watch().stream(
                    custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    plural,
                    resource_version=version,
                    timeout_seconds=120,
                    allow_watch_bookmarks=True,
                ):
                    if event["type"] == "ERROR":
                        raise ApiException(status=event["object"].get("code"), reason="watch error")
                    if self._stop.is_set():
                        return
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._record(plural, event["type"], event["object"])
            except Exception:
                if self._stop.is_set():
                    return
                self.relists += 1
                version = None
                time.sleep(0.5)

    def _record(self, plural: str, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        with self._cond:
            old = self.objects[plural].get(name)
            if kind == "DELETED":
                self.objects[plural].pop(name, None)
                change = "delete"
            else:
                self.objects[plural][name] = obj
                if old is None:
                    change = "create"
                elif old["metadata"].get("generation") != obj["metadata"].get("generation"):
                    change = "spec"
                elif old.get("status") != obj.get("status"):
                    change = "status"
                else:
                    change = "meta"
            self.writes[f"{plural}.{change}"] += 1
            self.last[f"{plural}.{change}"] = time.monotonic()
            self._cond.notify_all()


# --- processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float
    rss_mib: float
    peak_rss_mib: float
    pss_mib: float


def usage(pid: int) -> Usage:
    """CPU time and memory of one process, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    rollup = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])

    def mib(text: str) -> float:
        return int(text.split()[0]) / 1024  # "1234 kB"

    return Usage(
        (int(stat[11]) + int(stat[12])) / CLOCK_TICKS, mib(status["VmRSS"]), mib(status["VmHWM"]), mib(rollup["Pss"])
    )


def stop_all(pids: list[int], timeout: float = 15.0) -> None:
    """SIGTERM every process group at once, SIGKILL what is left after timeout."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        alive = [pid for pid in pids if processes.alive(pid)]
        for pid in alive:
            with suppress(ProcessLookupError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            for pid in alive:
                with suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            alive = [pid for pid in alive if processes.alive(pid)]
            time.sleep(0.1)
        if not alive:
            return


# --- one size -------------------------------------------------------------------------------


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


class Bench:
    """Owns everything started (control plane, operator, daemons) so cleanup() can stop it all."""

    def __init__(self, root: Path, quiet: float, timeout: float, profile: Path | None = None) -> None:
        self.root = root
        self.profile = profile
        self.quiet = quiet
        self.timeout = timeout
        self.control_plane = ControlPlane(root / "control-plane")
        self.pids: list[int] = []
        self.logs: dict[int, Path] = {}
        self.recorder = Recorder()
        self.api: client.ApiClient

    def start(self) -> None:
        self.control_plane.start(progress)
        self.api = kube.api_client(self.control_plane.kubeconfig)
        kube.install_crds(self.api, crd_manifests())
        self.recorder.start(self.api)

    def cleanup(self) -> None:
        """Stop everything; a second Ctrl-C or SIGTERM must not leave half of it running."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        self.recorder.close()
        self._stop(self.pids)
        self.control_plane.stop()

    def _stop(self, pids: list[int]) -> None:
        stop_all(pids)
        gone = set(pids)
        self.pids = [pid for pid in self.pids if pid not in gone]

    def _spawn(self, name: str, *args: str) -> int:
        env = {"KUBECONFIG": str(self.control_plane.kubeconfig), "BEEKEEPER_LOG_LEVEL": "info"}
        log = self.root / "logs" / f"{name}.log"
        pid = processes.spawn([sys.executable, "-m", "beekeeper.cli", *args], log, env)
        self.pids.append(pid)
        self.logs[pid] = log
        return pid

    def _wait(self, what: str, check: Callable[[], tuple[bool, str]]) -> float:
        return self.recorder.wait(what, check, self.timeout, self._all_alive)

    def _all_alive(self) -> None:
        for pid in self.pids:
            if not processes.alive(pid):
                tail = "\n".join(self.logs[pid].read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"{self.logs[pid].stem} (pid {pid}) exited; last lines of its log:\n{tail}")

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
        operator = self._spawn(f"operator-{n}", "operator")
        self._wait(
            "operator creating node states",
            lambda: _count(sum(node in states for node in nodes), n, "BpfNodeStates"),
        )

        progress(f"N={n}: starting {n} fake-backend node daemons")
        started = time.monotonic()
        daemons = [
            self._spawn(f"node-daemon-{node}", "node-daemon", "--node-name", node, "--backend", "fake", *NO_METRICS)
            for node in nodes
        ]

        def reporting() -> tuple[bool, str]:
            done = sum(1 for node in nodes if _observed(states.get(node)))
            return _count(done, n, "daemons reporting")

        result.seconds["daemons up"] = self._wait("daemons", reporting) - started

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
            result.seconds["rollout"] = self._wait("READY", ready(generation)) - started
            result.seconds["rollout written"] = self.recorder.last[f"{BPF_NODE_STATE_PLURAL}.spec"] - started

        progress(f"N={n}: source edit")
        with self._phase("edit", result, operator, daemons):
            started = time.monotonic()
            generation = self._write(program, n, revision=2)
            result.seconds["edit"] = self._wait("READY", ready(generation)) - started
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
        result.seconds["delete"] = self._wait("delete", lambda: (program not in programs, "waiting")) - started

        progress(f"N={n}: tearing down")
        self._stop(daemons)
        for node in nodes:
            core.delete_node(node)
        self._wait(
            "node states removed",
            lambda: _count(n - sum(node in states for node in nodes), n, "BpfNodeStates gone"),
        )
        self._stop([operator])
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
        apiserver_cpu = self._apiserver_cpu()
        yield
        result.apiserver_cpu[name] = self._apiserver_cpu() - apiserver_cpu
        result.writes[name] = self.recorder.snapshot() - writes
        result.operator_cpu[name] = usage(operator).cpu_seconds - op_cpu
        result.daemon_cpu[name] = sum(usage(pid).cpu_seconds for pid in daemons) - daemon_cpu

    def _apiserver_cpu(self) -> float:
        """kube-apiserver and etcd: on these 2 cores they compete with the operator and daemons."""
        state = self.control_plane.load_state()
        return sum(usage(pid).cpu_seconds for pid in (state.apiserver_pid, state.etcd_pid) if pid)

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


def _count(done: int, total: int, what: str) -> tuple[bool, str]:
    return done >= total, f"{done}/{total} {what}"


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
    lines = [["nodes", *(str(r.nodes) for r in results), *(_ratio(r.nodes, first.nodes) for r in results[1:])]]
    for label, value, fmt in rows:
        values = [value(r) for r in results]
        lines.append([label, *(fmt.format(v) for v in values), *(_ratio(v, values[0]) for v in values[1:])])
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *lines]
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def _interrupt(*_: object) -> None:
    """SIGTERM cleans up like Ctrl-C."""
    raise KeyboardInterrupt


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

    signal.signal(signal.SIGTERM, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="beekeeper-bench-"))
    bench = Bench(root, args.quiet, args.timeout, args.profile)
    try:
        bench.start()
        results = [bench.run(n) for n in sizes]
    except KeyboardInterrupt:
        progress("interrupted; cleaning up")
        return 130
    finally:
        bench.cleanup()
        if args.keep:
            progress(f"state and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if bench.recorder.relists:
        progress(f"warning: {bench.recorder.relists} watch restart(s): write counts may miss some writes")
    print(table(results, args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
