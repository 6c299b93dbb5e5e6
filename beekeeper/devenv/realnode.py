"""A real one-node Kubernetes cluster on this machine: control plane, containerd, kubelet, kube-proxy.

What a cluster runs, with nothing pulled and nothing left behind on a shared machine:
- the control plane listens on HOST_IP, on a veth the rig creates; pods reach it directly
  and through the `kubernetes` Service (kube-proxy, nftables mode);
- containerd, the kubelet and kube-proxy live in a private mount namespace and a network
  namespace of their own (the node's "host network"): overlay and tmpfs mounts, pod veths,
  nft tables and sysctls such as ip_forward stay inside them and vanish with them;
- the kubelet's machine-wide sysctls (vm.overcommit_memory, kernel.panic*) are answered by
  files bind-mounted over /proc/sys inside that mount namespace, so it changes nothing;
- pods' cgroups live under one cgroup root per hierarchy, removed at teardown;
- images are OCI archives imported with `ctr images import` (no registry).
One rig per machine at a time (fixed addresses): a lock held by the namespace holder says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from beekeeper.devenv import build, processes, testimages
from beekeeper.devenv.certs import Pki, ensure_client_cert
from beekeeper.devenv.controlplane import SERVICE_CIDR, ControlPlane, ControlPlaneOptions
from beekeeper.devenv.host import prepare_host
from beekeeper.devenv.images import Progress

HOST_IP = "10.243.0.1"
APISERVER_PORT = 6443  # HOST_IP is the rig's alone (one rig per machine), so a fixed port is free
NODE_IP = "10.243.0.2"
POD_CIDR = "10.244.0.0/24"
HOST_LINK = "bkrig-host"
NODE_LINK = "bkrig-node"
NODE_NAME = "beekeeper-node"
CGROUP_ROOT = "beekeeper-realnode"
CGROUPS = Path("/sys/fs/cgroup")
LOCK = Path("/run/beekeeper-realnode.lock")
BPFFS_ROOT = Path("/sys/fs/bpf/beekeeper")
"""Where the chart's node daemon pins (nodeDaemon.bpffsRoot + /beekeeper; the mount point
must be bpffs itself, a container cannot mount onto a new directory in sysfs). Nothing else on
these machines uses the production path; down() unpins what is left."""

# What the kubelet insists on setting machine-wide (kubelet's setupKernelTunables); inside
# the rig's mount namespace these paths are files of the rig, so the host keeps its values.
_KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
# Host paths containerd, CNI and the kubelet hard-code (the kubelet's device-plugin socket
# dir, for one); a tmpfs over each, private to the rig.
_PRIVATE_DIRS = tuple(
    Path(p) for p in ("/run/netns", "/run/containerd", "/var/lib/cni", "/var/log/containers", "/var/lib/kubelet")
)
_CAP_SYS_RESOURCE = 24


@dataclass
class RigState:
    """What runs and what was created, persisted so `dev cluster down` works from any shell."""

    lock_pid: int | None = None
    holder_pid: int | None = None
    containerd_pid: int | None = None
    kubelet_pid: int | None = None
    kube_proxy_pid: int | None = None
    created_dirs: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class RealNode:
    """The rig rooted at one state directory; `up` is idempotent, `down` removes everything."""

    def __init__(self, root: Path, node_name: str = NODE_NAME) -> None:
        self.dir = root
        self.node_name = node_name
        self.control_plane = ControlPlane(
            root / "control-plane", ControlPlaneOptions(address=HOST_IP, hosts_pods=True, port=APISERVER_PORT)
        )
        self.logs = root / "logs"
        self._state_file = root / "realnode.json"
        self.containerd_socket = root / "containerd" / "containerd.sock"

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def load_state(self) -> RigState:
        if self._state_file.exists():
            return RigState(**json.loads(self._state_file.read_text()))
        return RigState()

    def _save(self, state: RigState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._state_file.write_text(json.dumps(asdict(state), indent=2))

    def running(self) -> bool:
        state = self.load_state()
        pids = (state.holder_pid, state.containerd_pid, state.kubelet_pid, state.kube_proxy_pid)
        return all(processes.alive(pid) for pid in pids) and self.control_plane.running()

    # --- up -----------------------------------------------------------------------------------

    def up(self, progress: Progress = print, lock_wait: float = 0) -> RigState:
        """Bring the whole node up (building what is missing) and wait until it is Ready."""
        if self.running():
            progress(f"[realnode] already running; kubeconfig {self.kubeconfig}")
            return self.load_state()
        self.down(progress)
        started = time.monotonic()
        build.ensure_built(progress)
        node_bins = build.ensure_node_built(progress)
        archives = testimages.ensure_archives(progress)
        prepare_host(progress)
        state = RigState()
        state.timings["builds_s"] = round(time.monotonic() - started, 2)
        try:
            self._start_namespaces(state, lock_wait, progress)
            self._wire_network(state)
            self._save(state)
            t = time.monotonic()
            self.control_plane.start(progress)
            state.timings["control_plane_s"] = round(time.monotonic() - t, 2)
            self._make_cgroups()
            t = time.monotonic()
            self._start_containerd(state)
            for archive in archives:
                self.import_images(archive)
            state.timings["containerd_and_images_s"] = round(time.monotonic() - t, 2)
            t = time.monotonic()
            self._start_kubelet(state, node_bins.kubelet)
            self._start_kube_proxy(state, node_bins.kube_proxy)
            self._save(state)
            processes.wait_until(
                self.node_ready, f"Node {self.node_name} Ready", 120, state.kubelet_pid, self.logs / "kubelet.log"
            )
            state.timings["node_ready_s"] = round(time.monotonic() - t, 2)
            state.timings["rig_start_s"] = round(time.monotonic() - started, 2)
        except BaseException:
            self._save(state)
            self.down(progress)
            raise
        self._save(state)
        progress(
            f"[realnode] Node {self.node_name} Ready in {state.timings['node_ready_s']}s; kubeconfig {self.kubeconfig}"
        )
        return state

    def _start_namespaces(self, state: RigState, lock_wait: float, progress: Progress) -> None:
        """A process holding the rig's mount + network namespaces and the machine-wide rig lock."""
        for path in _PRIVATE_DIRS:
            if not path.exists():
                path.mkdir(parents=True)
                state.created_dirs.append(str(path))
        sysctls = self.dir / "sysctl"
        sysctls.mkdir(parents=True, exist_ok=True)
        script = ["set -e", "mount --make-rshared /"]
        script += [f"mount -t tmpfs -o mode=755 beekeeper-rig {path}" for path in _PRIVATE_DIRS]
        for name, value in _KUBELET_SYSCTLS.items():
            fake = sysctls / name.replace("/", ".")
            fake.write_text(value + "\n")
            script.append(f"mount --bind {fake} /proc/sys/{name}")
        script += ["ip link set lo up", f"echo $$ > {self.dir / 'holder.pid'}", "exec sleep infinity"]
        pid_file, locked = self.dir / "holder.pid", self.dir / "locked"
        pid_file.unlink(missing_ok=True)
        locked.unlink(missing_ok=True)
        # The lock has a keeper of its own, stopped last by down(): a rig waiting for this
        # machine starts only once everything of this one is gone.
        state.lock_pid = processes.spawn(
            [
                "flock",
                "--wait" if lock_wait else "--nonblock",
                *([str(lock_wait)] if lock_wait else []),
                str(LOCK),
                "sh",
                "-c",
                f"echo locked > {locked}; exec sleep infinity",
            ],
            self.logs / "lock.log",
        )
        self._save(state)

        def lock_taken() -> bool:
            if not processes.alive(state.lock_pid):
                raise RuntimeError(
                    "another real-node rig holds this machine (only one can run: fixed addresses); "
                    f"see `beekeeper dev cluster status` or {self.logs / 'lock.log'}"
                )
            return locked.exists()

        processes.wait_until(lock_taken, "the real-node rig lock", lock_wait + 30)
        holder = processes.spawn(
            ["unshare", "--mount", "--net", "--propagation", "slave", "--", "sh", "-c", "\n".join(script)],
            self.logs / "holder.log",
        )

        def ready() -> bool:
            return pid_file.exists() and pid_file.read_text().strip() != ""

        processes.wait_until(ready, "rig namespaces", 30, holder, self.logs / "holder.log")
        state.holder_pid = int(pid_file.read_text())
        self._save(state)
        progress(f"[realnode] namespaces held by pid {state.holder_pid}")

    def _wire_network(self, state: RigState) -> None:
        """veth host<->node: the apiserver on HOST_IP, the node on NODE_IP, pods routed via the node."""
        pid = str(state.holder_pid)
        _run("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", NODE_LINK, "netns", pid)
        _run("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_LINK)
        _run("ip", "link", "set", HOST_LINK, "up")
        self.node_exec("ip", "addr", "add", f"{NODE_IP}/30", "dev", NODE_LINK)
        self.node_exec("ip", "link", "set", NODE_LINK, "up")
        # ip_forward is per network namespace: this is the node's, not the machine's.
        self.node_exec("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # Host-network clients (the node daemon) need a route before kube-proxy's DNAT applies.
        self.node_exec("ip", "route", "add", SERVICE_CIDR, "via", HOST_IP, "dev", NODE_LINK)
        _run("ip", "route", "add", POD_CIDR, "via", NODE_IP, "dev", HOST_LINK)

    def node_exec(self, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in the node's mount and network namespaces (as its host network sees it)."""
        pid = self.load_state().holder_pid
        if not processes.alive(pid):
            raise RuntimeError("the real-node rig is not running")
        return _run("nsenter", "-t", str(pid), "-m", "-n", "--", *argv, check=check, input=input)

    def _make_cgroups(self) -> None:
        for hierarchy in _hierarchies():
            path = hierarchy / CGROUP_ROOT
            path.mkdir(exist_ok=True)
            if (hierarchy / "cpuset.cpus").exists():  # v1 cpuset: a child starts with no CPUs
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (path / name).write_text((hierarchy / name).read_text())

    def _start_containerd(self, state: RigState) -> None:
        base = self.dir / "containerd"
        for sub in ("root", "state", "opt", "runc"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        cni = self.dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-beekeeper-rig.conflist").write_text(json.dumps(_cni_config(cni / "ipam"), indent=2))
        (base / "config.toml").write_text(_containerd_config(base, cni / "net.d", _missing_cap(_CAP_SYS_RESOURCE)))
        log = self.logs / "containerd.log"
        state.containerd_pid = self._spawn_in_node(["containerd", "--config", str(base / "config.toml")], log)
        self._save(state)
        processes.wait_until(
            lambda: self.ctr("version", check=False).returncode == 0, "containerd", 30, state.containerd_pid, log
        )

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The rig's containerd through its own socket, in the namespace Kubernetes uses."""
        return _run("ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", *args, check=check)

    def import_images(self, archive: Path) -> None:
        """Make an OCI/docker archive's images available to pods (imagePullPolicy Never or IfNotPresent)."""
        self.ctr("images", "import", "--no-unpack=false", str(archive))

    def _spawn_in_node(self, argv: list[str], log: Path) -> int:
        holder = str(self.load_state().holder_pid)
        return processes.spawn(["nsenter", "-t", holder, "-m", "-n", "--", *argv], log)

    def _start_kubelet(self, state: RigState, kubelet: Path) -> None:
        pki = Pki(self.control_plane.dir / "pki")
        cert, key = ensure_client_cert(pki, "kubelet", f"system:node:{self.node_name}", ["system:nodes"])
        kubeconfig = self._client_kubeconfig("kubelet", cert, key)
        root = self.dir / "kubelet"
        root.mkdir(exist_ok=True)
        config = root.with_suffix(".yaml")
        config.write_text(yaml.safe_dump(_kubelet_config(pki, self.containerd_socket, root)))
        state.kubelet_pid = self._spawn_in_node(
            [
                str(kubelet),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={root}",
                f"--cert-dir={root / 'pki'}",
                f"--node-ip={NODE_IP}",
                f"--hostname-override={self.node_name}",
                "--v=1",
            ],
            self.logs / "kubelet.log",
        )

    def _start_kube_proxy(self, state: RigState, kube_proxy: Path) -> None:
        pki = Pki(self.control_plane.dir / "pki")
        cert, key = ensure_client_cert(pki, "kube-proxy", "system:kube-proxy")
        config = self.dir / "kube-proxy.yaml"
        config.write_text(
            yaml.safe_dump(_kube_proxy_config(self._client_kubeconfig("kube-proxy", cert, key), self.node_name))
        )
        state.kube_proxy_pid = self._spawn_in_node(
            [str(kube_proxy), f"--config={config}", "--v=1"], self.logs / "kube-proxy.log"
        )

    def _client_kubeconfig(self, name: str, cert: Path, key: Path) -> Path:
        admin = yaml.safe_load(self.kubeconfig.read_text())
        admin["users"][0]["user"] = {"client-certificate": str(cert), "client-key": str(key)}
        path = self.dir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump(admin))
        path.chmod(0o600)
        return path

    def node_ready(self) -> bool:
        result = subprocess.run(
            [
                str(build.binaries().kubectl),
                f"--kubeconfig={self.kubeconfig}",
                "get",
                "node",
                self.node_name,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            ],
            capture_output=True,
            text=True,
        )
        return result.stdout.strip() == "True"

    # --- down ---------------------------------------------------------------------------------

    def down(self, progress: Progress = print) -> None:
        """Stop everything and remove what `up` made: processes, namespaces, links, cgroups, dirs."""
        state = self.load_state()
        if any((state.lock_pid, state.holder_pid, state.created_dirs)):
            progress("[realnode] stopping the node")
        for pid in (state.kubelet_pid, state.kube_proxy_pid):
            processes.stop(pid, timeout=3)  # the node goes away whole: no graceful pod shutdown
        self._kill_pods()
        holder_mnt = _ns_id(state.holder_pid, "mnt")
        processes.stop(state.containerd_pid)
        if holder_mnt:  # containerd shims detach from containerd; they share its mount namespace
            for pid in _pids_in_namespace("mnt", holder_mnt):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if processes.alive(state.holder_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.holder_pid, signal.SIGKILL)
        processes.wait_until(lambda: not processes.alive(state.holder_pid), "rig namespaces released", 15)
        subprocess.run(["ip", "link", "del", HOST_LINK], capture_output=True)  # gone with the netns, normally
        self._remove_cgroups()
        shutil.rmtree(BPFFS_ROOT, ignore_errors=True)  # unpinning detaches what a daemon left attached
        for path in reversed(state.created_dirs):
            with contextlib.suppress(FileNotFoundError, OSError):
                Path(path).rmdir()
        self.control_plane.stop()
        # The node is gone, so is its cluster: the next `up` starts from an empty etcd, not
        # with pods whose containers died with the node.
        for child in self.dir.iterdir() if self.dir.exists() else []:
            if child.name != "logs" and child != self._state_file:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        if self._state_file.exists():
            self._save(RigState(timings=state.timings))
        processes.stop(state.lock_pid)  # last: the next rig may start now

    def _kill_pods(self) -> None:
        """SIGKILL every process in the rig's pod cgroups until they are empty (containers)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids: set[int] = set()
            for hierarchy in _hierarchies():
                for cgroup in _subtree(hierarchy / CGROUP_ROOT):
                    with contextlib.suppress(OSError):
                        pids.update(int(p) for p in (cgroup / "cgroup.procs").read_text().split())
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        raise RuntimeError(f"processes in the rig's pod cgroups survive SIGKILL: {sorted(pids)}")

    def _remove_cgroups(self) -> None:
        for hierarchy in _hierarchies():
            root = hierarchy / CGROUP_ROOT
            if not root.is_dir():
                continue
            for path in reversed(_subtree(root)):  # children before parents
                with contextlib.suppress(FileNotFoundError):
                    path.rmdir()

    def leftovers(self) -> list[str]:
        """Everything of a rig still on this machine; empty after a clean `down`."""
        found = []
        mounts = Path("/proc/self/mountinfo").read_text()
        for marker in (str(self.dir), "beekeeper-rig"):
            found += [f"mount: {line}" for line in mounts.splitlines() if marker in line]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        found += [f"link: {line.split(':')[1].strip()}" for line in links.splitlines() if "bkrig" in line]
        routes = subprocess.run(["ip", "route", "show", POD_CIDR], capture_output=True, text=True).stdout.strip()
        found += [f"route: {routes}"] if routes else []
        found += [f"cgroup: {h / CGROUP_ROOT}" for h in _hierarchies() if (h / CGROUP_ROOT).exists()]
        found += [f"pin: {p}" for p in (BPFFS_ROOT.rglob("*") if BPFFS_ROOT.exists() else []) if not p.is_dir()]
        found += [f"dir: {path}" for path in self.load_state().created_dirs if Path(path).exists()]
        mine = _ancestors(os.getpid())
        for pid in _all_pids():
            if pid in mine:
                continue
            with contextlib.suppress(OSError):
                cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if str(self.dir) in cmdline or "containerd-shim" in cmdline:
                    found.append(f"process {pid}: {cmdline[:200]}")
        return found

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of the node's own processes, for the record."""
        state = self.load_state()
        found = {}
        for name, pid in (("containerd", state.containerd_pid), ("kubelet", state.kubelet_pid)):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        found[name] = round(int(line.split()[1]) / 1024, 1)
        return found

    def status(self) -> str:
        state = self.load_state()

        def line(name: str, pid: int | None) -> str:
            return f"  {name:<16} {'running' if processes.alive(pid) else 'stopped':<8} pid={pid or '-'}"

        rows = [
            f"beekeeper real-node cluster ({self.dir})",
            line("namespaces", state.holder_pid),
            line("containerd", state.containerd_pid),
            line("kubelet", state.kubelet_pid),
            line("kube-proxy", state.kube_proxy_pid),
            f"  node {self.node_name} Ready: {self.node_ready() if self.control_plane.running() else False}",
            f"  apiserver https://{HOST_IP}, node {NODE_IP}, pods {POD_CIDR}",
            f"  kubeconfig: {self.kubeconfig}",
            f"  logs:       {self.logs}",
            f"  timings:    {state.timings}",
            f"  rss MB:     {self.rss_mb()}",
        ]
        return "\n".join(rows)


# --- configuration ------------------------------------------------------------------------------


def _cni_config(ipam_dir: Path) -> dict:
    """ptp: one routed veth per pod and a /32 host route, which the node daemon's lookup expects."""
    return {
        "cniVersion": "0.4.0",
        "name": "beekeeper-rig",
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": False,
                "mtu": 1500,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }


def _containerd_config(base: Path, cni_conf: Path, restrict_oom: bool) -> str:
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    return f"""\
version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{base / "containerd.sock"}"

[ttrpc]
  address = "{base / "containerd.sock.ttrpc"}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"

{cri}
  sandbox_image = "{testimages.PAUSE_IMAGE}"
  # Without CAP_SYS_RESOURCE runc cannot lower oom_score_adj below its own; ask for no less.
  restrict_oom_score_adj = {str(restrict_oom).lower()}
  stream_server_address = "127.0.0.1"
  enable_cdi = false

{cri[:-1]}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

{cri[:-1]}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

{cri[:-1]}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{base / "runc"}"

{cri[:-1]}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{cni_conf}"
  max_conf_num = 1
"""


def _kubelet_config(pki: Pki, socket: Path, root: Path) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "failCgroupV1": False,
        "containerRuntimeEndpoint": f"unix://{socket}",
        "address": NODE_IP,
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki.ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "podLogsDir": str(root / "pod-logs"),
        # The rig's images are imported, not pulled: never garbage-collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # A shared machine's disk and memory are not this node's to defend: no evictions.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "failSwapOn": False,
        # No machine-wide iptables chains; no hairpin sysctls on veths the rig does not own.
        "makeIPTablesUtilChains": False,
        "hairpinMode": "none",
        "protectKernelDefaults": False,
        "serializeImagePulls": False,
        "resolvConf": "/etc/resolv.conf",
        "nodeStatusUpdateFrequency": "2s",
        "syncFrequency": "5s",
    }


def _kube_proxy_config(kubeconfig: Path, node_name: str) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node_name,
        "clusterCIDR": POD_CIDR,
        "metricsBindAddress": "127.0.0.1:10249",
        "healthzBindAddress": "127.0.0.1:10256",
        # 0 = leave the (partly machine-wide) conntrack sysctls alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


# --- helpers ------------------------------------------------------------------------------------


def _run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=120)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _missing_cap(cap: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return not int(line.split()[1], 16) & (1 << cap)
    return True


def _hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, named ones, the unified one)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2") and fields[4].startswith(str(CGROUPS)):
            found.append(Path(fields[4]))
    return found


def _subtree(root: Path) -> list[Path]:
    """A cgroup and its descendants, parents first; cgroups vanishing meanwhile are skipped."""
    return [Path(top) for top, _, _ in os.walk(root)]


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ancestors(pid: int) -> set[int]:
    """pid and its parents: the commands that run the rig mention its directory too."""
    found = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        with contextlib.suppress(OSError):
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            continue
        break
    return found


def _ns_id(pid: int | None, kind: str) -> str | None:
    if not processes.alive(pid):
        return None
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _pids_in_namespace(kind: str, ns: str) -> list[int]:
    found = []
    for pid in _all_pids():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/{kind}") == ns:
                found.append(pid)
    return found
