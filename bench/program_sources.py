"""One program three ways: bcc C source vs a CO-RE object from a ConfigMap vs an OCI image.

    sudo .venv/bin/python bench/program_sources.py [--programs 20] [--keep]

The program is the same in all three (openat(2) calls counted per process on the
syscalls:sys_enter_openat tracepoint, a hash map exported as a metric); each copy carries a
revision number (a comment in the source, a `.rodata` constant in the object) so every copy
is distinct bytes: a new bcc build, a new ConfigMap, a new image digest. The same run starts
a real apiserver, the operator, a real OCI registry over TLS (tests/registry_rig.py) and,
per way, a fresh kernel node daemon (its own Node, pins and state directory, so its image
cache starts empty and its peak RSS is its own). Then, per way:

1. **cold**: applies the N copies one after the other, each waited to Ready (apply -> Ready
   per copy); the daemon has never seen these bytes (no object in its image cache);
2. deletes them all and waits until every finalizer let go (programs detached);
3. **cached**: applies the same N copies again: the image cache holds every object, the
   operator's informer every ConfigMap; bcc has no build cache, so it compiles again.

Reported per way: apply -> Ready (median, p90) cold and cached, the daemon's CPU seconds for
each pass (the daemon and its build workers: the workers' CPU is counted through the
daemon's reaped-children times plus the live ones), the daemon's peak RSS (VmHWM) and the
largest worker RSS seen (sampled every 50 ms), with ratios to bcc. Objects are built with
clang against this kernel's BTF and images with buildah, before any timing starts.

Progress goes to stderr. Everything started (processes, registry, buildah storage, pins,
temporary directory) is removed at the end, also after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from core_objects import CORE_HEADERS, compile_core
from kubernetes import client
from kubernetes.client.rest import ApiException
from registry_rig import ImageBuilder, Registry
from support import Cluster, NodeDaemons, OperatorProcess

from beekeeper import kube
from beekeeper.crds.generate import crd_manifests
from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION
from beekeeper.devenv import build
from beekeeper.devenv.controlplane import ControlPlane

WAYS = ("bcc source", "CO-RE ConfigMap", "OCI image")
TRACEPOINT = "syscalls:sys_enter_openat"
BCC_SOURCE = """// revision {revision}
BPF_HASH(opens, u32, u64, 1024);

int count_opens(void *ctx)
{{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 zero = 0, *count = opens.lookup_or_try_init(&tgid, &zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}}
"""
CORE_SOURCE = (
    CORE_HEADERS
    + """
const volatile __u32 revision = REVISION; /* distinct bytes per copy, as the bcc comment */

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u32);
    __type(value, __u64);
} opens SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_openat")
int count_opens(void *ctx)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    __u64 one = 1, *count = bpf_map_lookup_elem(&opens, &tgid);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        bpf_map_update_elem(&opens, &tgid, &one, BPF_NOEXIST);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
"""
)
PROGRAMS = [{"name": "count_opens", "type": "tracepoint", "tracepoint": TRACEPOINT}]
METRICS = [{"map": "opens", "name": "bench_opens_total", "type": "counter", "key": {"kind": "int", "label": "tgid"}}]
CONFIGMAP_NAMESPACE = "default"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_SECONDS = 0.05
_START = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- the daemon's process tree ----------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def tree_cpu_seconds(pid: int) -> float:
    """CPU of pid and its reaped children, plus every live descendant (and what it reaped)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        with suppress(OSError, IndexError):
            stat = _stat(current)
            total += sum(int(stat[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
            pending += _children(current)
    return total / CLOCK_TICKS


class RssSampler:
    """Samples the daemon's descendants' VmHWM every 50 ms (a worker lives for one build)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.worker_peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            pending = _children(self.pid)
            while pending:
                current = pending.pop()
                with suppress(OSError):
                    self.worker_peak_kib = max(self.worker_peak_kib, _kib(current, "VmHWM"))
                    pending += _children(current)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# --- one way ----------------------------------------------------------------------------------


@dataclass
class Pass:
    latencies: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0


@dataclass
class WayResult:
    way: str
    cold: Pass = field(default_factory=Pass)
    cached: Pass = field(default_factory=Pass)
    daemon_peak_mib: float = 0.0
    worker_peak_mib: float = 0.0
    delete_seconds: float = 0.0


class Bench:
    """Owns what it starts (control plane, registry, buildah, operator, daemons) so cleanup() stops it all."""

    def __init__(self, root: Path, copies: int, timeout: float) -> None:
        self.root = root
        self.copies = copies
        self.timeout = timeout
        self.control_plane = ControlPlane(root / "control-plane")
        self.registry = Registry(root / "registry")
        self.builder = ImageBuilder(root / "buildah", self.registry)
        self.operator: OperatorProcess | None = None
        self.daemons: NodeDaemons | None = None

    def start(self) -> None:
        progress("starting the control plane and the registry")
        self.control_plane.start(progress)
        self.registry.start()
        self.api = kube.api_client(self.control_plane.kubeconfig)
        kube.install_crds(self.api, crd_manifests())
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        env = {"BEEKEEPER_REGISTRY_CA_FILE": str(self.registry.ca), "BEEKEEPER_LOG_LEVEL": "info"}
        logs = self.root / "logs"
        logs.mkdir()
        self.operator = OperatorProcess.create(self.control_plane.kubeconfig, logs / "operator.log", env).start()
        self.operator.wait_ready()
        self.daemons = NodeDaemons(Cluster(self.control_plane, build.binaries().kubectl), logs)

    def cleanup(self) -> None:
        """Stop everything; a second Ctrl-C or SIGTERM must not leave half of it running."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        with suppress(Exception):
            self._delete_all(wait=False)
        if self.daemons is not None:
            self.daemons.stop_all()
        if self.operator is not None:
            self.operator.stop()
        self.registry.stop()
        self.builder.close()
        self.control_plane.stop()

    # -- code for each way -----------------------------------------------------------------

    def prepare(self) -> dict[str, list[dict[str, Any]]]:
        """The bytecode sections of the N copies for each way; objects and images are built here."""
        objects = self.root / "objects"
        objects.mkdir()
        codes: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
        for n in range(self.copies):
            progress(f"building copy {n + 1}/{self.copies}: clang, ConfigMap, buildah image")
            obj = objects / f"opens{n}.o"
            obj.write_bytes(compile_core(CORE_SOURCE.replace("REVISION", str(n + 1)), f"opens{n}"))
            name = f"bench-opens-{n}"
            data = {"opens.o": base64.b64encode(obj.read_bytes()).decode()}
            configmap = {"metadata": {"name": name}, "binaryData": data}
            self.core.create_namespaced_config_map(CONFIGMAP_NAMESPACE, configmap)  # type: ignore[arg-type]  # sent as is
            repo = f"bench/opens{n}"
            digest = self.builder.build_and_push(repo, "v1", obj, {"count_opens": "tracepoint"}, {"opens": "hash"})
            codes["bcc source"].append({"source": {"inline": BCC_SOURCE.format(revision=n + 1)}})
            codes["CO-RE ConfigMap"].append(
                {"bytecode": {"configMapRef": {"namespace": CONFIGMAP_NAMESPACE, "name": name, "key": "opens.o"}}}
            )
            codes["OCI image"].append({"bytecode": {"image": f"{self.registry.address}/{repo}@{digest}"}})
        return codes

    # -- BpfPrograms -----------------------------------------------------------------------

    def _status(self, name: str) -> dict[str, Any]:
        body = cast(dict[str, Any], self.custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name))
        return body.get("status") or {}

    def _names(self) -> list[str]:
        items = cast(dict[str, Any], self.custom.list_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL))[
            "items"
        ]
        return [item["metadata"]["name"] for item in items]

    def _poll(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout
        while not check():
            for proc in (self.operator, *(self.daemons.started if self.daemons else [])):
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"{proc.name} exited; last lines of its log:\n{proc.log_tail(20)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not after {self.timeout:.0f}s")
            time.sleep(0.02)

    def apply_ready(self, name: str, node: str, code: dict[str, Any]) -> float:
        """Create one BpfProgram for node and wait until it is Ready there; returns the seconds."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BpfProgram",
            "metadata": {"name": name},
            "spec": {
                "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
                **code,
                "programs": PROGRAMS,
                "metrics": METRICS,
            },
        }
        started = time.monotonic()
        created = cast(
            dict[str, Any], self.custom.create_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, body)
        )
        generation = created["metadata"]["generation"]

        def ready() -> bool:
            status = self._status(name)
            if status.get("phase") == "Failed" or status.get("failingNodes"):
                raise RuntimeError(f"{name} failed: {status}")
            return (
                status.get("observedGeneration") == generation
                and status.get("phase") == "Ready"
                and status.get("ready") == "1/1"
            )

        self._poll(f"{name} Ready", ready)
        return time.monotonic() - started

    def _delete_all(self, wait: bool = True) -> None:
        for name in self._names():
            with suppress(ApiException):
                self.custom.delete_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name)
        if wait:
            self._poll("every BpfProgram deleted", lambda: not self._names())

    # -- one way ---------------------------------------------------------------------------

    def run_way(self, way: str, codes: list[dict[str, Any]]) -> WayResult:
        assert self.daemons is not None
        result = WayResult(way)
        slug = way.split()[0].lower().replace("-", "")
        daemon = self.daemons(name=f"bench-{slug}", args=["--registry-ca-file", str(self.registry.ca)])
        self._poll(f"{daemon.name} reporting", lambda: _daemon_observed(self.custom, daemon.node))
        assert daemon.pid is not None
        sampler = RssSampler(daemon.pid)
        try:
            for label, measured in (("cold", result.cold), ("cached", result.cached)):
                cpu = tree_cpu_seconds(daemon.pid)
                for n, code in enumerate(codes):
                    seconds = self.apply_ready(f"bench-{slug}-{n}", daemon.node, code)
                    measured.latencies.append(seconds)
                    progress(f"{way}, {label}: copy {n + 1}/{len(codes)} Ready in {seconds:.2f}s")
                measured.cpu_seconds = tree_cpu_seconds(daemon.pid) - cpu
                started = time.monotonic()
                self._delete_all()
                if label == "cold":
                    result.delete_seconds = time.monotonic() - started
                progress(f"{way}, {label}: daemon CPU {measured.cpu_seconds:.2f}s; all deleted")
            result.daemon_peak_mib = _kib(daemon.pid, "VmHWM") / 1024
        finally:
            sampler.close()
        result.worker_peak_mib = sampler.worker_peak_kib / 1024
        self.daemons.stop_all()
        return result


def _daemon_observed(custom: client.CustomObjectsApi, node: str) -> bool:
    with suppress(ApiException):
        state = cast(dict[str, Any], custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node))
        return (state.get("status") or {}).get("observedGeneration") == state["metadata"].get("generation")
    return False


# --- report -----------------------------------------------------------------------------------


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def report(results: list[WayResult], copies: int, seconds: float) -> None:
    base = results[0]
    rows: list[tuple[str, Callable[[WayResult], float], str]] = [
        ("apply->Ready cold, median s", lambda r: statistics.median(r.cold.latencies), "{:.2f}"),
        ("apply->Ready cold, p90 s", lambda r: _p90(r.cold.latencies), "{:.2f}"),
        ("apply->Ready cached, median s", lambda r: statistics.median(r.cached.latencies), "{:.2f}"),
        ("apply->Ready cached, p90 s", lambda r: _p90(r.cached.latencies), "{:.2f}"),
        (f"daemon CPU, {copies} cold, s", lambda r: r.cold.cpu_seconds, "{:.2f}"),
        (f"daemon CPU, {copies} cached, s", lambda r: r.cached.cpu_seconds, "{:.2f}"),
        ("daemon CPU per program (cold), ms", lambda r: 1000 * r.cold.cpu_seconds / copies, "{:.0f}"),
        ("daemon peak RSS (VmHWM), MiB", lambda r: r.daemon_peak_mib, "{:.0f}"),
        ("build worker peak RSS, MiB", lambda r: r.worker_peak_mib, "{:.0f}"),
        (f"delete {copies} until detached, s", lambda r: r.delete_seconds, "{:.2f}"),
    ]
    widths = [36, *(max(16, len(r.way) + 2) for r in results)]
    print(f"\n{copies} programs each way, one after the other, on one node daemon per way ({seconds:.0f} s in all)")
    print("metric".ljust(widths[0]) + "".join(r.way.rjust(w) for r, w in zip(results, widths[1:], strict=True)))
    for label, value, fmt in rows:
        cells = []
        for r, w in zip(results, widths[1:], strict=True):
            text = fmt.format(value(r))
            if r is not base and value(base) > 0:
                text += f" ({value(r) / value(base):.2f}x)"
            cells.append(text.rjust(w))
        print(label.ljust(widths[0]) + "".join(cells))
    print("(ratios are to bcc source; bcc has no build cache, so its cached pass compiles again)")


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so the finally blocks run."""

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=20, help="copies of the program per way")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one step may take")
    parser.add_argument("--keep", action="store_true", help="keep the logs (path printed at the end)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("loads programs into the kernel: run as root")
    root = Path(tempfile.mkdtemp(prefix="beekeeper-bench-sources-"))
    bench = Bench(root, args.programs, args.timeout)
    started = time.monotonic()
    try:
        with _interruptible():
            bench.start()
            codes = bench.prepare()
            results = []
            for way in WAYS:
                progress(f"{way}: a fresh node daemon, {args.programs} programs cold, then cached")
                results.append(bench.run_way(way, codes[way]))
        report(results, args.programs, time.monotonic() - started)
    except KeyboardInterrupt:
        progress("interrupted: cleaning up")
    finally:
        bench.cleanup()
        if args.keep:
            print(f"logs kept in {root / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
