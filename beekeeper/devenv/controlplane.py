"""A real local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager.

envtest-style by default: no kubelet, no scheduler; everything listens on 127.0.0.1 on
random free ports, with TLS, client-certificate authentication and RBAC authorization. Used
by `beekeeper dev up` and by the test suite (each with its own state directory).
With `ControlPlaneOptions(hosts_pods=True)` it is a control plane a real kubelet can join
(the real-node rig): reachable on an address pods route to, the Node authorizer, the
ServiceAccount admission, a scheduler and the controllers that pods and workloads need.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from beekeeper.devenv import build, processes
from beekeeper.devenv.certs import Pki, ensure_pki
from beekeeper.devenv.images import Progress

log = logging.getLogger(__name__)

SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"

# What a cluster that runs pods needs beyond namespaces and garbage collection: service
# account tokens and the kube-root-ca.crt ConfigMap (projected token volumes), workloads
# (Deployment, DaemonSet, Job for Helm hooks), EndpointSlices for kube-proxy, and the node
# lifecycle controller, which lifts the not-ready taint a kubelet registers its node with.
_POD_CONTROLLERS = (
    "node-lifecycle-controller",
    "serviceaccount-token-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "deployment-controller",
    "replicaset-controller",
    "daemonset-controller",
    "job-controller",
    "ttl-after-finished-controller",
    "endpointslice-controller",
    "endpoints-controller",
    "pod-garbage-collector-controller",
)


@dataclass(frozen=True)
class ControlPlaneOptions:
    """How this control plane differs from the kubelet-less default."""

    address: str = "127.0.0.1"
    """Where the apiserver listens and what it advertises as the `kubernetes` endpoint."""
    hosts_pods: bool = False
    """Run what real kubelets and pods need: see the module docstring."""
    port: int | None = None
    """The apiserver's port; None picks a free one. The `kubernetes` Service's endpoints and
    kubeconfigs handed to nodes keep pointing at one port across restarts only if it is fixed."""


@dataclass
class ControlPlaneState:
    """What is running, persisted so `dev status`/`dev down` work from another shell."""

    etcd_pid: int | None = None
    etcd_port: int | None = None
    etcd_peer_port: int | None = None
    apiserver_pid: int | None = None
    apiserver_port: int | None = None
    controller_manager_pid: int | None = None
    scheduler_pid: int | None = None


class ControlPlane:
    """Owns one control plane's state directory and processes."""

    def __init__(self, state_dir: Path, options: ControlPlaneOptions | None = None) -> None:
        self.dir = state_dir
        self.options = options or ControlPlaneOptions()
        self.logs = state_dir / "logs"
        self.kubeconfig = state_dir / "kubeconfig"
        self._state_file = state_dir / "controlplane.json"

    def load_state(self) -> ControlPlaneState:
        if self._state_file.exists():
            return ControlPlaneState(**json.loads(self._state_file.read_text()))
        return ControlPlaneState()

    def _save(self, state: ControlPlaneState) -> None:
        self._state_file.write_text(json.dumps(asdict(state), indent=2))

    def running(self) -> bool:
        state = self.load_state()
        return processes.alive(state.apiserver_pid) and processes.alive(state.etcd_pid) and self._ready(state)

    def start(self, progress: Progress = print) -> bool:
        """Start whatever is not running; idempotent. True when the apiserver was (re)started."""
        if self.running():
            progress(f"[control-plane] already running, kubeconfig {self.kubeconfig}")
            self._ensure_controller_manager(self.load_state())
            self._ensure_scheduler(self.load_state())
            return False
        self.stop()
        bins = build.ensure_built(progress)
        self.dir.mkdir(parents=True, exist_ok=True)
        server_ips = [self.options.address, KUBERNETES_SERVICE_IP] if self.options.hosts_pods else []
        ensure_pki(self.dir / "pki", [ip for ip in server_ips if ip != "127.0.0.1"])
        state = ControlPlaneState()

        state.etcd_port, state.etcd_peer_port = processes.free_port(), processes.free_port()
        etcd_url = f"http://127.0.0.1:{state.etcd_port}"
        peer_url = f"http://127.0.0.1:{state.etcd_peer_port}"
        etcd_log = self.logs / "etcd.log"
        state.etcd_pid = processes.spawn(
            [
                str(bins.etcd),
                "--name=beekeeper-dev",
                f"--data-dir={self.dir / 'etcd-data'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=beekeeper-dev={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            etcd_log,
        )
        self._save(state)
        progress(f"[control-plane] etcd {build.ETCD_VERSION} pid {state.etcd_pid} on {etcd_url}")
        processes.wait_until(lambda: _http_ok(f"{etcd_url}/health"), "etcd", 60, state.etcd_pid, etcd_log)

        state.apiserver_port = self.options.port or processes.free_port()
        self._start_apiserver(state, progress)
        self._ensure_controller_manager(state)
        self._ensure_scheduler(state)
        progress(f"[control-plane] ready; kubeconfig {self.kubeconfig}")
        return True

    def _start_apiserver(self, state: ControlPlaneState, progress: Progress = print) -> None:
        """Start kube-apiserver on state.apiserver_port over this plane's etcd and wait until it is ready."""
        bins = build.binaries()
        pki = Pki(self.dir / "pki")
        api_log = self.logs / "kube-apiserver.log"
        state.apiserver_pid = processes.spawn(
            [
                str(bins.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{state.etcd_port}",
                f"--bind-address={self.options.address}",
                f"--advertise-address={self.options.address}",
                f"--secure-port={state.apiserver_port}",
                f"--cert-dir={self.dir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                *self._pod_hosting_flags(pki),
                "--v=1",
            ],
            api_log,
        )
        self._save(state)
        progress(
            f"[control-plane] kube-apiserver {build.KUBERNETES_VERSION} pid {state.apiserver_pid} "
            f"on https://{self.options.address}:{state.apiserver_port}"
        )
        assert state.apiserver_port is not None  # chosen by start() before the first apiserver
        self._write_kubeconfig(pki, state.apiserver_port)
        processes.wait_until(lambda: self._ready(state), "kube-apiserver", 120, state.apiserver_pid, api_log)

    def kill_apiserver(self) -> None:
        """SIGKILL only kube-apiserver, like a crash: etcd and its data stay (fault tests)."""
        state = self.load_state()
        if processes.alive(state.apiserver_pid):
            os.killpg(state.apiserver_pid, signal.SIGKILL)
            processes.wait_until(lambda: not processes.alive(state.apiserver_pid), "kube-apiserver killed", 10)

    def restart_apiserver(self, progress: Progress = print) -> None:
        """Start kube-apiserver again on the same port and etcd, after kill_apiserver()."""
        state = self.load_state()
        if processes.alive(state.apiserver_pid):
            raise RuntimeError(f"kube-apiserver pid {state.apiserver_pid} still runs")
        for attempt in range(30):
            try:
                self._start_apiserver(state, progress)
                return
            except RuntimeError as exc:
                # The port is free for binding only once no socket holds it: another process's
                # connection may briefly have it as its ephemeral source port.
                if "address already in use" not in str(exc) or attempt == 29:
                    raise
                time.sleep(1)

    def _ensure_controller_manager(self, state: ControlPlaneState) -> None:
        if processes.alive(state.controller_manager_pid):
            return
        bins = build.binaries()
        pki = Pki(self.dir / "pki")
        state.controller_manager_pid = processes.spawn(
            [
                str(bins.kube_controller_manager),
                f"--kubeconfig={self.kubeconfig}",
                "--controllers=" + ",".join(self._controllers()),
                "--leader-elect=false",
                "--secure-port=0",  # no metrics/health endpoint needed; nothing else to expose
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_cert}",
                "--v=1",
            ],
            self.logs / "kube-controller-manager.log",
        )
        self._save(state)

    def _pod_hosting_flags(self, pki: Pki) -> list[str]:
        if not self.options.hosts_pods:
            # No kubelet or SA-token controller here: pods are API objects only.
            return ["--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount"]
        return [
            # Kubelets authenticate as system:node:NAME and may touch only their own node's objects.
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            # kubectl logs/exec go through the kubelet, which trusts our CA.
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
            "--kubelet-preferred-address-types=InternalIP",
            "--endpoint-reconciler-type=lease",
        ]

    def _controllers(self) -> list[str]:
        controllers = ["namespace-controller", "garbage-collector-controller"]
        return controllers + list(_POD_CONTROLLERS) if self.options.hosts_pods else controllers

    def _ensure_scheduler(self, state: ControlPlaneState) -> None:
        if not self.options.hosts_pods or processes.alive(state.scheduler_pid):
            return
        state.scheduler_pid = processes.spawn(
            [
                str(build.ensure_node_built().kube_scheduler),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--v=1",
            ],
            self.logs / "kube-scheduler.log",
        )
        self._save(state)

    def stop(self) -> None:
        """Stop every process of this control plane (data stays for a fast restart)."""
        state = self.load_state()
        for pid in (state.scheduler_pid, state.controller_manager_pid, state.apiserver_pid, state.etcd_pid):
            processes.stop(pid)
        if self._state_file.exists():
            self._save(ControlPlaneState())

    def _ready(self, state: ControlPlaneState) -> bool:
        if not state.apiserver_port:
            return False
        pki = Pki(self.dir / "pki")
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        return _http_ok(f"https://{self.options.address}:{state.apiserver_port}/readyz", ctx)

    def _write_kubeconfig(self, pki: Pki, port: int) -> None:
        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "beekeeper-dev",
                    "cluster": {
                        "server": f"https://{self.options.address}:{port}",
                        "certificate-authority-data": b64(pki.ca_cert),
                    },
                }
            ],
            "users": [
                {
                    "name": "beekeeper-admin",
                    "user": {"client-certificate-data": b64(pki.admin_cert), "client-key-data": b64(pki.admin_key)},
                }
            ],
            "contexts": [{"name": "beekeeper-dev", "context": {"cluster": "beekeeper-dev", "user": "beekeeper-admin"}}],
            "current-context": "beekeeper-dev",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False
