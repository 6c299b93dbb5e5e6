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
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beekeeper import kube
from beekeeper.devenv import processes
from beekeeper.devenv.controlplane import ControlPlane


def wait_for(check, timeout: float = 60.0, what: str = "condition", interval: float = 0.2):
    """Poll `check()` until it returns something truthy; fail with `what` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


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

    def api(self):
        return kube.api_client(self.kubeconfig)


@dataclass
class Process:
    """A beekeeper component started by the tests (a real process)."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    pid: int | None = None

    def start(self) -> Process:
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

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
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
        self.test_id = uuid.uuid4().hex[:6]
        self.started: list[NodeDaemon] = []

    def __call__(
        self, labels: dict[str, str] | None = None, name: str | None = None, backend: str = "bcc"
    ) -> NodeDaemon:
        """backend "fake" runs the daemon without a kernel (node_daemon.fake_backend)."""
        node = name or f"node-{self.test_id}-{len(self.started)}"
        kube.register_node(self.api, node, {"beekeeper.dev/test": self.test_id, **(labels or {})})
        bpffs_root = Path(f"/sys/fs/bpf/beekeeper-test/{node}")
        state = self.workdir / "nodes" / node
        port = processes.free_port()
        argv = [sys.executable, "-m", "beekeeper.cli", "node-daemon", "--node-name", node]
        argv += ["--bpffs-root", str(bpffs_root), "--state-dir", str(state)]
        argv += ["--metrics-address", "127.0.0.1", "--metrics-port", str(port), "--backend", backend]
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


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sockets_in(netns: str, kinds: list[int]) -> list[socket.socket]:
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
