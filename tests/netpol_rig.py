"""A rig of simulated pods for NetworkIdentityPolicy tests: real API objects, real packets.

A simulated pod is what a kubelet and a CNI plugin would leave behind, minus the
container: a Pod object (labels, spec.nodeName, named container ports, status.podIP and
phase set through the status subresource) and a network namespace wired to the host by
a veth pair with the pod IP inside and a host route to it. A small server in each pod
answers on TCP and UDP ports 80 and 81 with the pod's name; the prober opens real
connections from inside the source pod's namespace, all in parallel with one deadline,
so a whole 9x9x4 truth table takes about one timeout.

Pods on different simulated nodes share this machine's kernel: the host forwards between
their veths (ip_forward=1 for the rig's lifetime), and each node daemon attaches the
policy programs only to its own pods' veths, as on real nodes. Addresses come from
10.240.0.0/16, inside namespaces the rig creates. close() removes everything it made.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import random
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from support import VethNamespace, sh, sockets_in, tcx_chain, wait_for

SUBNET = ipaddress.IPv4Network("10.240.0.0/16")
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")
NAMED_PORTS = {f"serve-{port}-{proto.lower()}": (port, proto) for port in PORTS for proto in PROTOCOLS}
"""Container port names of every simulated pod, as in the upstream NetworkPolicy e2e tests."""

_blocks = iter(random.Random().sample(range(SUBNET.num_addresses // 4), SUBNET.num_addresses // 4))
"""Each pod takes a /30 block (host side .1, pod .2); random order keeps clear of leftovers."""

SERVER = r"""
import selectors, socket, sys
name = sys.argv[1].encode()
sel = selectors.DefaultSelector()
for port in (80, 81):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(512)
    tcp.setblocking(False)
    sel.register(tcp, selectors.EVENT_READ, "tcp")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    udp.setblocking(False)
    sel.register(udp, selectors.EVENT_READ, "udp")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        try:
            if key.data == "tcp":
                conn, _ = key.fileobj.accept()
                conn.settimeout(1)
                conn.sendall(name)
                conn.close()
            else:
                _, peer = key.fileobj.recvfrom(2048)
                key.fileobj.sendto(name, peer)
        except OSError:
            pass
"""


# --- host networking -------------------------------------------------------------------------


class HostForwarding:
    """ip_forward=1 and nothing in FORWARD that drops the rig's traffic, for as long as it is open.

    Any forward-hook nftables base chain (iptables-nft's FORWARD is one) and a non-empty or
    non-ACCEPT iptables-legacy FORWARD get an accept rule for the rig's subnet at their top;
    close() removes those rules. ip_forward is machine-wide, so rigs of concurrent test runs
    register in a shared file: the first saves the original value, the last one restores it.
    """

    SYSCTL = Path("/proc/sys/net/ipv4/ip_forward")
    HOLDERS = Path("/run/beekeeper-netpol-rig.json")
    COMMENT = "beekeeper-netpol-rig"

    def __init__(self) -> None:
        self._undo: list[list[str]] = []
        with self._holders() as state:
            state.setdefault("saved", self.SYSCTL.read_text().strip())
            state["holders"].append(os.getpid())
            self.SYSCTL.write_text("1")
        try:
            self._open_nftables()
            self._open_iptables_legacy()
        except BaseException:
            self.close()
            raise

    def _open_nftables(self) -> None:
        listing = subprocess.run(["nft", "-j", "list", "chains"], capture_output=True, text=True)
        if listing.returncode != 0:
            return  # no nftables here
        for item in json.loads(listing.stdout).get("nftables", []):
            chain = item.get("chain")
            if not chain or chain.get("hook") != "forward" or chain.get("family") not in ("ip", "inet"):
                continue
            where = [chain["family"], chain["table"], chain["name"]]
            match = ["ip", "saddr", str(SUBNET), "ip", "daddr", str(SUBNET)]
            added = sh("nft", "-e", "-a", "insert", "rule", *where, *match, "accept", "comment", f'"{self.COMMENT}"')
            handle = added.stdout.rsplit("# handle", 1)[1].split()[0]
            self._undo.append(["nft", "delete", "rule", *where, "handle", handle])

    def _open_iptables_legacy(self) -> None:
        try:
            rules = subprocess.run(["iptables-legacy", "-S", "FORWARD"], capture_output=True, text=True)
        except FileNotFoundError:
            return
        if rules.returncode != 0 or rules.stdout.strip() == "-P FORWARD ACCEPT":
            return
        rule = ["FORWARD", "-s", str(SUBNET), "-d", str(SUBNET), "-m", "comment", "--comment", self.COMMENT]
        sh("iptables-legacy", "-I", *rule, "-j", "ACCEPT")
        self._undo.append(["iptables-legacy", "-D", *rule, "-j", "ACCEPT"])

    def close(self) -> None:
        for argv in reversed(self._undo):
            sh(*argv, check=False)
        self._undo.clear()
        with self._holders() as state:
            state["holders"].remove(os.getpid())
            if not state["holders"]:
                self.SYSCTL.write_text(state.pop("saved"))

    @classmethod
    @contextlib.contextmanager
    def _holders(cls) -> Iterator[dict[str, Any]]:
        """The shared record {"saved": original ip_forward, "holders": [pids]}, locked and written back.

        Holders that died without closing are dropped; the value they saved survives them.
        """
        with open(cls.HOLDERS.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(cls.HOLDERS.read_text())
            except (FileNotFoundError, ValueError):
                state = {}
            state["holders"] = [pid for pid in state.get("holders", []) if _alive(pid)]
            yield state
            if state["holders"]:
                cls.HOLDERS.write_text(json.dumps(state))
            else:
                cls.HOLDERS.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- simulated pods --------------------------------------------------------------------------


@dataclass
class SimPod:
    """One simulated pod. key is its name in truth tables: logical namespace / pod, e.g. x/a."""

    key: str
    namespace: str
    name: str
    node: str
    labels: dict[str, str]
    wiring: VethNamespace
    server: subprocess.Popen | None = None

    @property
    def ip(self) -> str:
        return self.wiring.ip

    @property
    def host_if(self) -> str:
        return self.wiring.host_if

    @property
    def netns(self) -> str:
        return self.wiring.name


def pod_manifest(pod: SimPod) -> dict:
    ports = [
        {"name": name, "containerPort": port, "protocol": proto} for name, (port, proto) in sorted(NAMED_PORTS.items())
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
        "spec": {
            "nodeName": pod.node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "server", "image": "registry.invalid/beekeeper/netpol-server:1", "ports": ports}],
        },
    }


class PodRig:
    """Creates simulated pods and removes them all on close(); api None: no Pod objects."""

    def __init__(self, api: client.ApiClient | None) -> None:
        self.core = client.CoreV1Api(api) if api is not None else None
        self.tag = uuid.uuid4().hex[:4]
        self.pods: dict[str, SimPod] = {}
        self._wired: list[VethNamespace] = []
        self._serving: set[str] = set()
        self._forwarding = HostForwarding()
        self._seq = 0

    def add(
        self, key: str, namespace: str, name: str, node: str, labels: Mapping[str, str], wired: bool = True
    ) -> SimPod:
        """A pod: wired, serving and (with an API) a Running Pod object with its IP.

        wired False only reserves its names and IP (a pod whose CNI ADD has not happened
        yet); complete(key) does the rest.
        """
        block = SUBNET.network_address + 4 * next(_blocks)
        self._seq += 1
        netns, host_if = f"bk-{self.tag}-{key.replace('/', '-')}", f"bk{self.tag}{self._seq}"
        pod = SimPod(
            key, namespace, name, node, dict(labels), VethNamespace(netns, host_if, str(block + 2), str(block + 1))
        )
        self.pods[key] = pod
        if wired:
            self.complete(key)
        return pod

    def complete(self, key: str) -> SimPod:
        """Wire a reserved pod like a CNI ADD (veth pair, pod IP, host route), start its server, publish it."""
        pod = self.pods[key]
        self._wired.append(pod.wiring.create())
        pod.server = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, sys.executable, "-c", SERVER, key],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        if self.core is not None:
            self.core.create_namespaced_pod(pod.namespace, pod_manifest(pod))  # type: ignore[arg-type]  # sent as is
            status = {
                "phase": "Running",
                "podIP": pod.ip,
                "podIPs": [{"ip": pod.ip}],
                "hostIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
            }
            self.core.patch_namespaced_pod_status(pod.name, pod.namespace, {"status": status})
        return pod

    def wait_servers(self, timeout: float = 30.0) -> None:
        """Until every started server listens (each says so once on stdout)."""
        deadline = time.monotonic() + timeout
        for pod in self.pods.values():
            if pod.server is None or pod.key in self._serving:
                continue
            assert pod.server.stdout is not None
            ready = _readline(pod.server.stdout, deadline - time.monotonic())
            assert ready == "ready\n", f"server of {pod.key} did not start ({ready!r}, exit {pod.server.poll()})"
            self._serving.add(pod.key)

    def set_labels(self, key: str, labels: Mapping[str, str | None]) -> None:
        """Merge labels into a pod (None removes one), in the API and in the rig's record."""
        pod = self.pods[key]
        for k, v in labels.items():
            if v is None:
                pod.labels.pop(k, None)
            else:
                pod.labels[k] = v
        if self.core is not None:
            self.core.patch_namespaced_pod(pod.name, pod.namespace, {"metadata": {"labels": dict(labels)}})

    def close(self) -> None:
        for pod in self.pods.values():
            if pod.server is None:
                continue  # never completed
            if pod.server.poll() is None:
                pod.server.kill()
                pod.server.wait(timeout=10)
            if self.core is not None:
                try:  # no kubelet finishes a graceful deletion here
                    self.core.delete_namespaced_pod(pod.name, pod.namespace, grace_period_seconds=0)
                except ApiException as exc:
                    if exc.status != 404:
                        raise
        for wiring in self._wired:
            wiring.delete()
        self.pods.clear()
        self._forwarding.close()

    def __enter__(self) -> PodRig:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _readline(stream: IO[str], timeout: float) -> str:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(max(timeout, 0.1))
    return line[0] if line else ""


# --- probing ---------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Probe:
    src: str
    dst: str
    port: int
    protocol: str


def all_probes(keys: Iterable[str]) -> list[Probe]:
    keys = list(keys)
    return [Probe(s, d, port, proto) for s in keys for d in keys for port in PORTS for proto in PROTOCOLS]


@dataclass
class _Attempt:
    probe: Probe
    sock: socket.socket
    expect: bytes
    connected: bool = False


def probe(pods: Mapping[str, SimPod], probes: Iterable[Probe], timeout: float = 1.0) -> dict[Probe, bool]:
    """Run every probe at once; a probe passes when the destination's server answers with its name.

    TCP: connect, then read the name. UDP: send a datagram, read the name back. Whatever
    has not answered when the timeout ends failed (a dropped SYN or datagram just waits).
    """
    probes = list(probes)
    results = {p: False for p in probes}
    by_source: dict[str, list[Probe]] = {}
    for p in probes:
        by_source.setdefault(p.src, []).append(p)
    sel = selectors.DefaultSelector()
    attempts: list[_Attempt] = []
    try:
        for src, group in by_source.items():
            kinds = [socket.SOCK_STREAM if p.protocol == "TCP" else socket.SOCK_DGRAM for p in group]
            for p, sock in zip(group, sockets_in(pods[src].netns, kinds), strict=True):
                attempt = _Attempt(p, sock, p.dst.encode())
                attempts.append(attempt)
                sock.setblocking(False)
                target = (pods[p.dst].ip, p.port)
                if p.protocol == "TCP":
                    code = sock.connect_ex(target)
                    if code not in (0, errno.EINPROGRESS):
                        continue
                    sel.register(sock, selectors.EVENT_WRITE, attempt)
                else:
                    sock.connect(target)
                    sock.send(b"probe")
                    attempt.connected = True
                    sel.register(sock, selectors.EVENT_READ, attempt)
        deadline = time.monotonic() + timeout
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                attempt = key.data
                if not attempt.connected:
                    if attempt.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        sel.unregister(attempt.sock)
                    else:
                        attempt.connected = True
                        sel.modify(attempt.sock, selectors.EVENT_READ, attempt)
                    continue
                with contextlib.suppress(OSError):  # refused, reset
                    results[attempt.probe] = attempt.sock.recv(256) == attempt.expect
                sel.unregister(attempt.sock)
    finally:
        sel.close()
        for attempt in attempts:
            attempt.sock.close()
    return results


@dataclass
class Prober:
    """Probes a fixed set of flows in rounds on a thread, counting verdicts that differ from the expected."""

    pods: Mapping[str, SimPod]
    expected: dict[Probe, bool]
    rounds: int = 0
    connections: int = 0
    wrong: list[tuple[float, Probe, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            observed = probe(self.pods, self.expected, 1.0)
            self.rounds += 1
            self.connections += len(observed)
            self.wrong += [(time.monotonic(), p, v) for p, v in observed.items() if v != self.expected[p]]

    def rounds_after(self, count: int) -> None:
        """Wait until count more full rounds ran."""
        target = self.rounds + count
        wait_for(lambda: self.rounds >= target, 60, f"{count} probe rounds", interval=0.05)


# --- truth tables ----------------------------------------------------------------------------


def _matches(pattern: str, key: str) -> bool:
    if pattern == "*":
        return True
    ns, _, name = pattern.partition("/")
    key_ns, _, key_name = key.partition("/")
    return ns in ("*", key_ns) and name in ("*", key_name)


@dataclass
class TruthTable:
    """Allowed or not for every (source pod, destination pod, port, protocol)."""

    keys: list[str]
    cells: dict[Probe, bool] = field(default_factory=dict)

    @classmethod
    def full(cls, keys: Iterable[str], allowed: bool = True) -> TruthTable:
        keys = list(keys)
        return cls(keys, {p: allowed for p in all_probes(keys)})

    def set(
        self, allowed: bool, frm: str = "*", to: str = "*", port: int | None = None, protocol: str | None = None
    ) -> TruthTable:
        """Set every cell matching the patterns ("x/a", "x/*", "*/a", "*")."""
        for p in self.cells:
            if (
                _matches(frm, p.src)
                and _matches(to, p.dst)
                and port in (None, p.port)
                and protocol in (None, p.protocol)
            ):
                self.cells[p] = allowed
        return self

    def mismatches(self, observed: Mapping[Probe, bool]) -> list[Probe]:
        return sorted(p for p, allowed in self.cells.items() if observed.get(p) != allowed)

    def render(self, observed: Mapping[Probe, bool]) -> str:
        """The observed table against this one: a grid per port and protocol, rows from, columns to.

        '.' allowed, 'X' blocked; '!' marks a cell that differs from this table
        (X! = blocked but expected allowed, .! = allowed but expected blocked).
        """
        width = max(len(k) for k in self.keys) + 1
        out = []
        for port in PORTS:
            for proto in PROTOCOLS:
                out.append(f"{proto}/{port} observed (X! blocked, expected allowed; .! allowed, expected blocked)")
                out.append(" " * width + "".join(f"{k:>{width}}" for k in self.keys))
                for src in self.keys:
                    row = []
                    for dst in self.keys:
                        p = Probe(src, dst, port, proto)
                        mark = ("." if observed.get(p) else "X") + ("!" if observed.get(p) != self.cells.get(p) else "")
                        row.append(f"{mark:>{width}}")
                    out.append(f"{src:<{width}}" + "".join(row))
        return "\n".join(out)


def wait_for_table(
    pods: Mapping[str, SimPod], expected: TruthTable, timeout: float = 30.0, probe_timeout: float = 1.0
) -> tuple[dict[Probe, bool], int]:
    """Probe until the observed table equals expected (policy changes take a moment to land).

    Returns the last observation and the number of full rounds; on timeout, the caller
    compares and prints the last observation.
    """
    deadline = time.monotonic() + timeout
    rounds = 0
    while True:
        rounds += 1
        observed = probe(pods, expected.cells, probe_timeout)
        if not expected.mismatches(observed) or time.monotonic() > deadline:
            return observed, rounds


def assert_table(pods: Mapping[str, SimPod], expected: TruthTable, what: str, timeout: float = 30.0) -> int:
    """wait_for_table, failing with both tables printed; returns the rounds it took."""
    observed, rounds = wait_for_table(pods, expected, timeout)
    wrong = expected.mismatches(observed)
    if wrong:
        raise AssertionError(
            f"{what}: {len(wrong)} of {len(expected.cells)} probes differ after {rounds} rounds, e.g. "
            f"{', '.join(f'{p.src}->{p.dst} {p.protocol}/{p.port}' for p in wrong[:6])}\n"
            f"{expected.render(observed)}"
        )
    return rounds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


_TCX_HOOKS = {"ingress": 46, "egress": 47}  # BPF_TCX_INGRESS / BPF_TCX_EGRESS


def tcx_program_ids(ifname: str) -> dict[str, list[int]]:
    """{"ingress": [...], "egress": [...]}: the programs on an interface's tcx hooks, asked of the kernel
    (BPF_PROG_QUERY; this bpftool predates tcx)."""
    ifindex = socket.if_nametoindex(ifname)
    return {hook: tcx_chain(ifindex, attach_type) for hook, attach_type in _TCX_HOOKS.items()}
