"""Helpers shared by the integration and kernel tests (importable: tests/ is on pythonpath)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, cast

import yaml
from kubernetes import client
from kubernetes.client import ApiClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from beekeeper import kube
from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION
from beekeeper.devenv import build, processes
from beekeeper.devenv.controlplane import ControlPlane
from beekeeper.node_daemon import bpf_syscalls as bpf


def wait_for(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition", interval: float = 0.2) -> Any:
    """Poll `check()` until it returns something truthy; fail with `what` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


_prog_query = ctypes.CDLL("libbpf.so.1", use_errno=True).bpf_prog_query
_prog_query.argtypes = (
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_uint32,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
    ctypes.POINTER(ctypes.c_uint32),
)
_prog_query.restype = ctypes.c_int


BPFFS_TEST_ROOT = Path("/sys/fs/bpf/beekeeper-test")
"""Where kernel tests and simulated nodes pin what they load, each under a directory of its own (the
session fixture in tests/conftest.py removes the root once the run is done)."""


def tcx_chain(ifindex: int, attach_type: int) -> list[int]:
    """Program ids on a tcx hook, in the order they run (BPF_PROG_QUERY; this bpftool predates tcx)."""
    ids, count = (ctypes.c_uint32 * 64)(), ctypes.c_uint32(64)
    if _prog_query(ifindex, attach_type, 0, None, ids, ctypes.byref(count)) != 0:
        raise OSError(ctypes.get_errno(), f"BPF_PROG_QUERY on interface {ifindex}")
    return list(ids[: count.value])


def node_bpfprogram(name: str, node: str, source: str, programs: list[dict[str, Any]]) -> dict[str, Any]:
    """A BpfProgram for one node (selected by its hostname label) with inline source."""
    from beekeeper.crds.names import GROUP, VERSION

    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BpfProgram",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
            "source": {"inline": source},
            "programs": programs,
        },
    }


def running_pod(
    core: Any, namespace: str, name: str, app: str, node: str, ip: str, ports: list[dict[str, Any]] | None = None
) -> None:
    """A Pod object labelled app=`app` on `node` with status Running and `ip`, as a kubelet would report it."""
    container: dict[str, Any] = {"name": "c", "image": "registry.k8s.io/pause:3.9"}
    if ports:
        container["ports"] = ports
    body = {"metadata": {"name": name, "labels": {"app": app}}, "spec": {"nodeName": node, "containers": [container]}}
    core.create_namespaced_pod(namespace, body)
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
    core.patch_namespaced_pod_status(name, namespace, status)


def node_network_policy(custom: Any, node: str) -> dict[str, Any]:
    """The node's spec.networkPolicy with the BpfPolicySlices it lists folded in, as its daemon reads them.

    `endpoints`, `rules` and `ipcache` are the flat union of the inline lists and the listed slices that
    carry the listed contentHash; {} while the node has no state or no policy.
    """
    from kubernetes import client

    from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_POLICY_SLICE_PLURAL, GROUP, VERSION
    from beekeeper.crds.nodestate import NodeNetworkPolicy
    from beekeeper.crds.policyslice import BpfPolicySliceSpec
    from beekeeper.node_daemon.policy_state import flat_rules, node_endpoints, union_prefixes

    try:
        state = custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node)
    except client.ApiException as exc:
        if exc.status != 404:  # not written yet
            raise
        return {}
    raw = (state.get("spec") or {}).get("networkPolicy") or {}
    if not raw:
        return {}
    spec = NodeNetworkPolicy.model_validate(raw)
    items = custom.list_cluster_custom_object(
        GROUP, VERSION, BPF_POLICY_SLICE_PLURAL, field_selector=f"spec.nodeName={node}"
    )["items"]
    found = {i["metadata"]["name"]: BpfPolicySliceSpec.model_validate(i["spec"]) for i in items}
    listed = {
        r.name: found[r.name]
        for r in spec.slices or []
        if r.name in found and found[r.name].content_hash == r.content_hash
    }
    ipcache, _ = union_prefixes(spec.ipcache or [], ((n, p.addresses()) for n, p in listed.items()), "ipcache")
    rules = [
        {
            "localIdentity": r.local_identity,
            "direction": r.direction.value,
            "peerIdentity": r.peer_identity,
            "protocol": r.protocol.value,
            "portStart": r.port_start,
            "portEnd": r.port_end,
            "action": r.action.value,
            "policy": r.policy,
        }
        for r in flat_rules(spec, listed.values())
    ]
    return {
        **raw,
        "endpoints": [e.to_dict() for e in node_endpoints(spec, listed)],
        "ipcache": sorted(({"cidr": e.cidr, "identity": e.identity} for e in ipcache), key=lambda e: e["cidr"]),
        "rules": rules,
    }


def check_exposition(text: str, openmetrics: bool = False) -> dict[str, dict[tuple[str, tuple], float]]:
    """Parse a /metrics answer as Prometheus would and fail on any family named twice; lint the text format
    with promlint (the checks of `promtool check metrics`, built by the install) and require it clean; with
    promtool itself (once built by `beekeeper dev build-promtool`) also run `promtool check metrics`.

    Returns family -> {(sample name, sorted labels): value}.
    """
    families: dict[str, dict[tuple[str, tuple], float]] = {}
    for family in (parse_openmetrics if openmetrics else parse_text)(text):
        assert family.name not in families, f"family {family.name} appears twice on /metrics:\n{text}"
        families[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    if not openmetrics:
        lint = subprocess.run([str(build.ensure_promlint())], input=text, capture_output=True, text=True, timeout=30)
        assert lint.returncode == 0, f"promlint: {lint.stdout}{lint.stderr}\n{text}"
    if not openmetrics and build.promtool().exists():
        result = subprocess.run(
            [str(build.promtool()), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        # exit 3 is lint advice only (e.g. a counter without _total); 1 is an unparseable exposition
        assert result.returncode in (0, 3), f"promtool check metrics: {result.stderr}\n{text}"
    return families


@dataclass
class Cluster:
    """A running local control plane and the pinned kubectl that talks to it."""

    control_plane: ControlPlane
    kubectl_path: Path

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def api(self) -> ApiClient:
        return kube.api_client(self.kubeconfig)

    @contextmanager
    def temp_namespace(self) -> Iterator[str]:
        """A fresh namespace, deleted (without waiting) afterwards."""
        name = f"t-{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", name)
        yield name
        self.kubectl("delete", "namespace", name, "--wait=false", check=False)


class Api:
    """Thin reads and writes of BpfPrograms and node states for assertions."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.custom = client.CustomObjectsApi(cluster.api())

    def apply(self, manifest: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def program(self, name: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name))

    def status(self, name: str) -> dict[str, Any]:
        return self.program(name).get("status") or {}

    def nodestate(self, node: str) -> dict[str, Any] | None:
        try:
            return cast(
                dict[str, Any], self.custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node)
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def node_reports(self, node: str, program: str) -> list[dict[str, Any]]:
        state = self.nodestate(node) or {}
        return [p for p in (state.get("status") or {}).get("programs") or [] if p["bpfProgram"] == program]

    def delete(self, name: str, wait: bool = True) -> None:
        args = ["delete", "bpfprogram", name, "--ignore-not-found"]
        self.cluster.kubectl(*args, *(["--timeout=90s"] if wait else ["--wait=false"]))

    def ready(self, name: str, expected: str = "1/1", timeout: float = 120) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("ready") == expected and status.get("phase") == "Ready" else None

        return wait_for(check, timeout, f"BpfProgram {name} READY {expected}")

    def failing(self, name: str, reason: str, timeout: float = 90) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            for failure in self.status(name).get("failingNodes") or []:
                if failure["reason"] == reason:
                    return failure
            return None

        return wait_for(check, timeout, f"BpfProgram {name} failing with {reason}")


@contextmanager
def fresh_cluster(prefix: str) -> Iterator[Cluster]:
    """etcd + kube-apiserver + kube-controller-manager in a new temp dir, CRDs installed; torn down after."""
    from beekeeper.crds.generate import crd_manifests

    root = Path(tempfile.mkdtemp(prefix=prefix))
    control_plane = ControlPlane(root)
    try:
        control_plane.start(lambda msg: print(msg, flush=True))
        kube.install_crds(kube.api_client(control_plane.kubeconfig), crd_manifests())
        yield Cluster(control_plane, build.binaries().kubectl)
    finally:
        control_plane.stop()
        if not os.environ.get("BEEKEEPER_KEEP_TEST_STATE"):
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class Process:
    """A beekeeper component started by the tests (a real process)."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    pid: int | None = None

    def start(self) -> Self:
        self.pid = processes.spawn(self.argv, self.log, self.env)
        return self

    def stop(self) -> None:
        processes.stop(self.pid)
        self.pid = None

    def kill(self) -> None:
        """SIGKILL, like a crash or an OOM kill: no cleanup code runs."""
        if self.pid and processes.alive(self.pid):
            os.killpg(self.pid, signal.SIGKILL)
            processes.wait_until(lambda: not processes.alive(self.pid), f"{self.name} killed", 10)
        self.pid = None

    def alive(self) -> bool:
        return processes.alive(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


READER_RULES = [
    {"nonResourceURLs": ["/metrics"], "verbs": ["get"]},
    {"apiGroups": ["beekeeper.dev"], "resources": ["bpfnodestates/drops"], "verbs": ["get"]},
]
"""What a reader of every node daemon's /metrics and /drops is granted."""


def service_account_token(api: Any, name: str, rules: list[dict[str, Any]] | None = None) -> str:
    """A real token (TokenRequest API) of ServiceAccount default/`name`, bound to a ClusterRole with `rules`."""
    from kubernetes import client

    def create(call: Any, *args: Any) -> None:
        try:
            call(*args)
        except client.ApiException as exc:
            if exc.status != 409:
                raise

    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    create(core.create_namespaced_service_account, "default", {"metadata": {"name": name}})
    if rules:
        create(rbac.create_cluster_role, {"metadata": {"name": name}, "rules": rules})
        binding = {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "default"}],
        }
        create(rbac.create_cluster_role_binding, binding)
    body = {"spec": {"expirationSeconds": 3600}}
    request = core.create_namespaced_service_account_token(name, "default", body)  # type: ignore[arg-type]  # sent as is
    assert request.status is not None and request.status.token, "the apiserver issued no token"
    return request.status.token


def token_kubeconfig(admin_kubeconfig: Path, token: str, path: Path) -> Path:
    """A kubeconfig for the same cluster whose user is a bearer token (as a ServiceAccount's would be)."""
    import yaml

    config = yaml.safe_load(admin_kubeconfig.read_text())
    config["users"] = [{"name": config["contexts"][0]["context"]["user"], "user": {"token": token}}]
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@dataclass
class OperatorProcess(Process):
    """The operator, with its probe endpoint on health_port."""

    health_port: int = 0

    @classmethod
    def create(cls, kubeconfig: Path, log: Path, env: dict[str, str] | None = None) -> OperatorProcess:
        port = processes.free_port()
        argv = [sys.executable, "-m", "beekeeper.cli", "operator", "--health-port", str(port)]
        return cls("operator", argv, log, {**component_env(kubeconfig), **(env or {})}, health_port=port)

    def probe(self, path: str) -> tuple[int, dict[str, Any]] | None:
        """(HTTP status, JSON body) of /healthz or /readyz; None while nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=5) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)
        except (urllib.error.URLError, OSError):
            return None

    def metrics(self) -> str:
        """The operator's /metrics (text format)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Until /readyz says the cache is primed and a first pass completed."""
        return wait_for(lambda: (r := self.probe("/readyz")) and r[0] == 200 and r[1], timeout, "operator ready")

    def restart(self, env: dict[str, str] | None = None, kill: bool = False) -> None:
        """Stop (or SIGKILL) and start again, optionally with another environment; waits until ready."""
        self.kill() if kill else self.stop()
        if env is not None:
            self.env = env
        self.start()
        self.wait_ready()


@dataclass
class NodeDaemon(Process):
    """A simulated node: a Node object plus a node daemon process with its own pins and port."""

    node: str = ""
    test_labels: dict[str, str] = field(default_factory=dict)
    """Labels every Node of the same test carries (to select only this test's nodes)."""
    metrics_port: int = 0
    bpffs_root: Path = Path()
    state_dir: Path = Path()
    token: str = ""
    """A token the daemon's /metrics and /drops accept (READER_RULES)."""

    def metrics(self) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.metrics_port}/metrics", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.read().decode()


def component_env(kubeconfig: Path) -> dict[str, str]:
    """Environment of the beekeeper processes the tests start."""
    return {"KUBECONFIG": str(kubeconfig), "BEEKEEPER_LOG_LEVEL": "debug"}


class NodeDaemons:
    """daemons(labels) -> NodeDaemon: registers a Node and starts its daemon; stop_all() tears them down.

    cluster is conftest's Cluster (api(), kubectl(), kubeconfig).
    """

    def __init__(self, cluster: Any, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.api = cluster.api()
        # A label value that YAML reads as a string whatever the digits: a bare "12e456" is a number to
        # kubectl's YAML (a fresh-clone run failed on one), and PyYAML dumps it unquoted.
        self.test_id = "t" + uuid.uuid4().hex[:5]
        self.started: list[NodeDaemon] = []
        self._token: str | None = None

    @property
    def reader_token(self) -> str:
        """A token that may read every daemon's /metrics and /drops."""
        if self._token is None:
            self._token = service_account_token(self.api, "beekeeper-test-reader", READER_RULES)
        return self._token

    def __call__(
        self,
        labels: dict[str, str] | None = None,
        name: str | None = None,
        backend: str = "bcc",
        args: Sequence[str] = (),
    ) -> NodeDaemon:
        """backend "fake" runs the daemon without a kernel (node_daemon.fake_backend); args are
        more node-daemon flags (e.g. a short --compile-timeout)."""
        node = name or f"node-{self.test_id}-{len(self.started)}"
        kube.register_node(self.api, node, {"beekeeper.dev/test": self.test_id, **(labels or {})})
        bpffs_root = BPFFS_TEST_ROOT / node
        state = self.workdir / "nodes" / node
        port = processes.free_port()
        argv = [sys.executable, "-m", "beekeeper.cli", "node-daemon", "--node-name", node]
        argv += ["--bpffs-root", str(bpffs_root), "--state-dir", str(state)]
        argv += ["--metrics-address", "127.0.0.1", "--metrics-port", str(port), "--backend", backend, *args]
        daemon = NodeDaemon(
            f"node-daemon {node}",
            argv,
            self.workdir / f"node-daemon-{node}.log",
            component_env(self.cluster.kubeconfig),
            node=node,
            test_labels={"beekeeper.dev/test": self.test_id},
            metrics_port=port,
            bpffs_root=bpffs_root,
            state_dir=state,
            token=self.reader_token,
        ).start()
        self.started.append(daemon)
        return daemon

    def stop_all(self, show_logs: bool = False) -> None:
        for daemon in self.started:
            if show_logs:
                print(f"--- {daemon.name} log ---\n{daemon.log_tail()}")
            daemon.stop()
            self.cluster.kubectl("delete", "node", daemon.node, "--wait=false", check=False)
            shutil.rmtree(daemon.bpffs_root, ignore_errors=True)  # unpinning the links detaches them
        self.started.clear()


def sh(*argv: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (optionally inside a network namespace); errors show the command and stderr."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    result = subprocess.run(full, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(full)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@dataclass
class VethNamespace:
    """A network namespace wired to the host by a veth pair, the way a CNI plugin wires a pod.

    Host side `host_if` (no address), namespace side `eth0` with `ip`/24 and a host route to
    `ip` via `host_if`; the host side gets `host_ip` so the namespace can reach the host.
    """

    name: str
    host_if: str
    ip: str
    host_ip: str

    def create(self) -> VethNamespace:
        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_ip}/32", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "link", "set", "lo", "up", netns=self.name)
        sh("ip", "addr", "add", f"{self.ip}/32", "dev", "eth0", netns=self.name)
        sh("ip", "link", "set", "eth0", "up", netns=self.name)
        sh("ip", "route", "add", f"{self.host_ip}/32", "dev", "eth0", netns=self.name)
        sh("ip", "route", "add", "default", "via", self.host_ip, "dev", "eth0", netns=self.name)
        sh("ip", "route", "replace", f"{self.ip}/32", "dev", self.host_if)
        return self

    def delete(self) -> None:
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.name, check=False)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*argv, check=check, netns=self.name)


# Counts UDP packets to the compile-time PORT: shared by the kernel tests of XDP.
XDP_COUNT_UDP = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

BPF_ARRAY(packets, u64, 1);

int count_udp(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_UDP)
        return XDP_PASS;
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end || udp->dest != bpf_htons(PORT))
        return XDP_PASS;
    int zero = 0;
    u64 *count = packets.lookup(&zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    return XDP_PASS;
}
"""


# Compiler faults: LLVM exit()s on a function needing more than 512 bytes of stack.
STACK_HOG = r"""
int big_stack(void *ctx) {
    char buf[1024];
    bpf_get_current_comm(buf, sizeof(buf));
    return buf[5];
}
"""


def nested_macros(depth: int, function: str = "slow") -> str:
    """A source whose preprocessing doubles in time (and memory) with each level of depth."""
    lines = ["#define F0(x) x"]
    lines += [f"#define F{i}(x) F{i - 1}(F{i - 1}(x))" for i in range(1, depth + 1)]
    lines.append(f"int {function}(void *ctx) {{ return F{depth}(0); }}")
    return "\n".join(lines) + "\n"


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sockets_in(netns: str, kinds: Sequence[int]) -> list[socket.socket]:
    """Sockets created inside netns: setns() in a short-lived thread moves only that thread,
    and a socket stays in the namespace it was created in."""
    made: list[list[socket.socket] | BaseException] = []

    def create() -> None:
        try:
            with open(f"/run/netns/{netns}") as ns:
                if _libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            made.append([socket.socket(socket.AF_INET, kind) for kind in kinds])
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def pinned_ids(directory: Path, info: Callable[[int], Any]) -> dict[str, int]:
    """Pin name -> kernel id of every object pinned in a bpffs directory (info: bpf.map_info, bpf.link_info)."""
    ids = {}
    for pin in sorted(directory.iterdir()):
        with bpf.obj_get(str(pin)) as fd:
            ids[pin.name] = info(fd.fd).id
    return ids
