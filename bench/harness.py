"""What the control-plane benchmarks share: a real control plane, spawned components, watch-counted writes.

bench/scale.py (BpfProgram rollouts) and bench/policy_scale.py (NetworkIdentityPolicies)
both start one ControlPlane, spawn the operator and fake-backend node daemons as
processes, count writes from watch events (every write that changed an object is one
event, one new resourceVersion), read CPU and memory from /proc, and stop everything
they started at the end, also after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from beekeeper import kube
from beekeeper.crds.generate import crd_manifests
from beekeeper.crds.names import GROUP, VERSION
from beekeeper.devenv import processes
from beekeeper.devenv.controlplane import ControlPlane

NO_METRICS = ("--metrics-port", "0")
PROGRESS_SECONDS = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_START = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- observing the API ----------------------------------------------------------------------


class Recorder:
    """Watches cluster-scoped custom resources (plurals): keeps the newest objects and counts writes by kind."""

    def __init__(self, plurals: tuple[str, ...]) -> None:
        self.objects: dict[str, dict[str, dict[str, Any]]] = {plural: {} for plural in plurals}
        self.writes: Counter[str] = Counter()
        self.last: dict[str, float] = {}
        """"<plural>.<change>" -> time.monotonic() of its latest event (where a rollout's time goes)."""
        """"<plural>.<create|spec|status|meta|delete>" -> count."""
        self.listeners: list[Callable[[str, str, dict[str, Any], float], None]] = []
        """Called under the lock with (plural, change, object, time.monotonic()) for every event."""
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
            now = time.monotonic()
            self.writes[f"{plural}.{change}"] += 1
            self.last[f"{plural}.{change}"] = now
            for listener in self.listeners:
                listener(plural, change, obj, now)
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


S = TypeVar("S")
R = TypeVar("R")


class Harness:
    """Owns everything started (control plane, operator, daemons) so cleanup() can stop it all."""

    def __init__(self, root: Path, timeout: float, plurals: tuple[str, ...]) -> None:
        self.root = root
        self.timeout = timeout
        self.control_plane = ControlPlane(root / "control-plane")
        self.pids: list[int] = []
        self.logs: dict[int, Path] = {}
        self.recorder = Recorder(plurals)
        self.api: client.ApiClient

    def start(self) -> None:
        self.control_plane.start(progress)
        self.api = kube.api_client(self.control_plane.kubeconfig)
        kube.install_crds(self.api, crd_manifests())
        self.recorder.start(self.api)

    def run_sizes(self, sizes: Sequence[S], run: Callable[[S, int], R], keep: bool) -> list[R] | None:
        """start(), run(size, index) for every size, then cleanup() whatever happened, removing
        the state directory unless keep. None when interrupted (Ctrl-C, or SIGTERM via interrupt)."""
        try:
            self.start()
            results = [run(size, index) for index, size in enumerate(sizes)]
        except KeyboardInterrupt:
            progress("interrupted; cleaning up")
            return None
        finally:
            self.cleanup()
            if keep:
                progress(f"state and logs kept in {self.root}")
            else:
                shutil.rmtree(self.root, ignore_errors=True)
        if self.recorder.relists:
            progress(f"warning: {self.recorder.relists} watch restart(s): write counts may miss some writes")
        return results

    def cleanup(self) -> None:
        """Stop everything; a second Ctrl-C or SIGTERM must not leave half of it running."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        self.recorder.close()
        self.stop(self.pids)
        self.control_plane.stop()

    def stop(self, pids: list[int]) -> None:
        stop_all(pids)
        gone = set(pids)
        self.pids = [pid for pid in self.pids if pid not in gone]

    def spawn(self, name: str, *args: str) -> int:
        """`beekeeper <args>` as a process of its own, logging to logs/<name>.log."""
        level = os.environ.get("BEEKEEPER_LOG_LEVEL", "info")  # debug: the operator logs every pass and its time
        env = {"KUBECONFIG": str(self.control_plane.kubeconfig), "BEEKEEPER_LOG_LEVEL": level}
        log = self.root / "logs" / f"{name}.log"
        pid = processes.spawn([sys.executable, "-m", "beekeeper.cli", *args], log, env)
        self.pids.append(pid)
        self.logs[pid] = log
        return pid

    def wait(self, what: str, check: Callable[[], tuple[bool, str]], timeout: float | None = None) -> float:
        return self.recorder.wait(what, check, self.timeout if timeout is None else timeout, self.all_alive)

    def all_alive(self) -> None:
        for pid in self.pids:
            if not processes.alive(pid):
                tail = "\n".join(self.logs[pid].read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"{self.logs[pid].stem} (pid {pid}) exited; last lines of its log:\n{tail}")

    def apiserver_cpu(self) -> float:
        """kube-apiserver and etcd: on these 2 cores they compete with the operator and daemons."""
        state = self.control_plane.load_state()
        return sum(usage(pid).cpu_seconds for pid in (state.apiserver_pid, state.etcd_pid) if pid)


def count(done: int, total: int, what: str) -> tuple[bool, str]:
    return done >= total, f"{done}/{total} {what}"


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile by the nearest-rank method (with 20 values, p99 is the largest); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def interrupt(*_: object) -> None:
    """SIGTERM cleans up like Ctrl-C."""
    raise KeyboardInterrupt


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns: the first left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    out = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
