"""`beekeeper dev up|down|status`: control plane + CRDs + operator + one node daemon.

Everything runs as background processes of this machine; state (pids, logs, kubeconfig)
lives in one directory so any shell can inspect or stop it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import socket
import ssl
import sys
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from beekeeper import kube
from beekeeper.devenv import build, processes
from beekeeper.devenv.certs import Pki, ensure_serving_cert
from beekeeper.devenv.controlplane import ControlPlane
from beekeeper.devenv.host import BPFFS, prepare_host
from beekeeper.devenv.images import Progress
from beekeeper.devenv.paths import state_dir


def bpffs_root(state: Path) -> Path:
    """This environment's bpffs directory: derived from its state directory, so `dev down` of one
    environment never unpins another's programs (bpffs names allow no dots: a hash, not the path)."""
    digest = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:12]
    return BPFFS / "beekeeper-dev" / digest


@dataclass
class Components:
    """Pids of the beekeeper processes `dev up` started."""

    operator_pid: int | None = None
    operator_health_port: int | None = None
    node_daemons: dict[str, int] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)


class DevEnvironment:
    """The developer environment rooted at one state directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir()
        self.control_plane = ControlPlane(self.root)
        self.node_name = socket.gethostname()
        self._file = self.root / "components.json"
        self.pki = Pki(self.root / "pki")
        # Pins live apart from a production daemon's /sys/fs/bpf/beekeeper and from every other
        # dev environment on this machine: the directory is named after this state directory.
        self.bpffs_root = bpffs_root(self.root) / self.node_name

    def _load(self) -> Components:
        if self._file.exists():
            return Components(**json.loads(self._file.read_text()))
        return Components()

    def _save(self, components: Components) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._file.write_text(json.dumps(asdict(components), indent=2))

    def up(self, progress: Progress = print) -> None:
        """Start what is not running yet; safe to run again."""
        from beekeeper.crds.generate import crd_manifests

        prepare_host(progress)
        restarted = self.control_plane.start(progress)
        api = kube.api_client(self.control_plane.kubeconfig)
        names = kube.install_crds(api, crd_manifests())
        progress(f"[crds] installed and established: {', '.join(names)}")
        kube.register_node(api, self.node_name, {"beekeeper.dev/dev-node": "true"})
        progress(f"[node] Node/{self.node_name} registered")

        components = self._load()
        if restarted:  # components still running from before talk to the old apiserver address
            self._stop_components(components, progress)
        env = {"KUBECONFIG": str(self.control_plane.kubeconfig)}
        beekeeper = [sys.executable, "-m", "beekeeper.cli"]
        if not processes.alive(components.operator_pid):
            components.operator_health_port = processes.free_port()  # another environment may run beside
            components.operator_pid = processes.spawn(
                [*beekeeper, "operator", "--health-port", str(components.operator_health_port)],
                self.root / "logs" / "operator.log",
                env,
            )
        daemon_pid = components.node_daemons.get(self.node_name)
        if not processes.alive(daemon_pid):
            port = processes.free_port()
            components.metrics_ports[self.node_name] = port
            # TLS from the environment's CA, and the admin's client certificate is accepted: the
            # kubeconfig's credentials work for /metrics and `beekeeper why-dropped` as they do for kubectl.
            cert, key = ensure_serving_cert(self.pki, f"node-daemon-{self.node_name}", ["127.0.0.1", "localhost"])
            components.node_daemons[self.node_name] = processes.spawn(
                [
                    *beekeeper,
                    "node-daemon",
                    "--node-name",
                    self.node_name,
                    "--metrics-address",
                    "127.0.0.1",
                    "--metrics-port",
                    str(port),
                    "--bpffs-root",
                    str(self.bpffs_root),
                    "--state-dir",
                    str(self.root / "node-state" / self.node_name),
                    "--tls-cert-file",
                    str(cert),
                    "--tls-private-key-file",
                    str(key),
                    "--client-ca-file",
                    str(self.pki.ca_cert),
                ],
                self.root / "logs" / f"node-daemon-{self.node_name}.log",
                env,
            )
        self._save(components)
        progress(self.status())

    def down(self, progress: Progress = print) -> None:
        """Stop every process `up` started; cached binaries and PKI stay for a fast next start."""
        self._stop_components(self._load(), progress)
        pins = bpffs_root(self.root)
        if pins.exists():
            progress(f"[stop] unpinning {pins}: detaches every program this environment's daemon attached")
            shutil.rmtree(pins, ignore_errors=True)
            shutil.rmtree(self.root / "node-state", ignore_errors=True)
            with contextlib.suppress(OSError):  # the shared parent goes with the last environment
                pins.parent.rmdir()
        progress("[stop] control plane")
        self.control_plane.stop()
        self._save(Components())
        progress("[stop] done")

    def metrics(self, pattern: str | None = None, top: int | None = None) -> str:
        """This machine's node daemon /metrics, optionally only matching series, largest first."""
        port = self._load().metrics_ports.get(self.node_name)
        if not port:
            raise RuntimeError("no node daemon is running here: run `beekeeper dev up` first")
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=10, context=context) as resp:
            lines = resp.read().decode().splitlines()
        series = [line for line in lines if not line.startswith("#")]
        if pattern:
            series = [line for line in series if re.search(pattern, line)]
            series.sort(key=lambda line: float(line.rsplit(" ", 1)[-1]), reverse=True)
        return "\n".join(series[:top] if top else series)

    def _stop_components(self, components: Components, progress: Progress) -> None:
        for node, pid in components.node_daemons.items():
            if processes.alive(pid):
                progress(f"[stop] node daemon {node} (pid {pid}); its programs stay attached (pinned)")
                processes.stop(pid)
        if processes.alive(components.operator_pid):
            progress(f"[stop] operator (pid {components.operator_pid})")
            processes.stop(components.operator_pid)
        components.operator_pid = None
        components.node_daemons.clear()

    def status(self) -> str:
        """A human summary of what runs, with pids, ports and log locations."""
        cp = self.control_plane.load_state()
        components = self._load()

        def line(name: str, pid: int | None, detail: str = "") -> str:
            state = "running" if processes.alive(pid) else "stopped"
            return f"  {name:<26} {state:<8} pid={pid or '-':<8} {detail}"

        rows = [
            f"beekeeper dev environment ({self.root})",
            line(f"etcd {build.ETCD_VERSION}", cp.etcd_pid, f"http://127.0.0.1:{cp.etcd_port}" if cp.etcd_port else ""),
            line(
                f"kube-apiserver {build.KUBERNETES_VERSION}",
                cp.apiserver_pid,
                f"https://127.0.0.1:{cp.apiserver_port}" if cp.apiserver_port else "",
            ),
            line("kube-controller-manager", cp.controller_manager_pid),
            line(
                "operator",
                components.operator_pid,
                f"http://127.0.0.1:{components.operator_health_port}/healthz {self.root / 'logs' / 'operator.log'}",
            ),
        ]
        rows += [
            line(
                f"node-daemon {node}",
                pid,
                f"https://127.0.0.1:{components.metrics_ports.get(node)}/metrics "
                f"{self.root / 'logs' / f'node-daemon-{node}.log'}",
            )
            for node, pid in components.node_daemons.items()
        ]
        rows += [
            f"  kubeconfig: {self.control_plane.kubeconfig}",
            f"  pins:       {self.bpffs_root}",
            f"  kubectl:    {build.binaries().kubectl}",
            "  try:        KUBECONFIG=$(beekeeper dev kubeconfig) kubectl get beekeeper",
        ]
        return "\n".join(rows)
