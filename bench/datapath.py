"""New TCP connections through a policy datapath: no policy, iptables chain, nftables set, beekeeper.

    sudo .venv/bin/python bench/datapath.py [--sizes 0,100,1000,10000] [--rounds 10] [--conns 20000]

Topology (the same for every contender): a client and a server network namespace, each
wired to the host by a veth pair with a host route (tests/netpol_rig.PodRig, api None), so
every packet is routed by the host between the two host-side veths. For each size N there
are N peer identities, each one pod with its own /32 on another node, all allowed to the
server on TCP/80, plus one policy allowing the client. The contenders:

- none: nothing but forwarding;
- iptables: a chain jumped to from FORWARD for the server's address, one `-s peer/32 -p tcp
  --dport 80 -j ACCEPT` per peer, the client's rule last, then DROP (`iptables`, whichever
  backend it is);
- nft: one table with a forward-hook chain: `ip saddr . tcp dport @allowed accept`, else drop
  for the server's address; the set holds the N peers and the client;
- beekeeper: the operator's policy compiler over N+2 pods and N/4000 + 1 policies, the node's
  spec and slices given to the daemon's own PolicyAgent, which loads bpf/policy.o and attaches
  its tcx programs to both host-side veths;
- beekeeper-open: the same datapath on both veths, but the only policy selects no local pod,
  so neither pod is isolated (what every pod that no policy selects pays).

Every round runs each contender in turn, the order rotated by one per round; the client runs
--conns connect/close (SO_LINGER 0, so no TIME_WAIT) to the server and reports the rate and
the connect latency. Both ends are bench/conn_loop.c (built with gcc at start), so that the
loop's own cost per connection is a few microseconds and the datapath's share shows. In the
first round each contender is also checked to enforce: a third namespace (an intruder no
policy allows) must fail to connect to the server, except with no policy (and beekeeper-
open), where it must succeed. A contender that cannot load a size is left out of it (n/a).
Ratios are taken within a round, then the median over rounds. Per size it also measures, on
the beekeeper programs (BPF_PROG_TEST_RUN at the server's veth): ns per packet for an
established packet, a new allowed SYN and a denied SYN (and how many of those denied SYNs,
one flow flooding, got a drop event, were suppressed by the per-flow limit, or lost for want
of ring buffer room); the memlock of the loaded maps; the kernel memory each contender's
loaded state takes (Slab + VmallocUsed + Percpu of /proc/meminfo, after minus before
install: approximate on a shared machine, exact enough at large N); and the time to change
one rule among N: `iptables -I`, one nft set element, a raw write of one policy_allow entry,
and the operator's IncrementalCompiler + PolicyAgent.reconcile for a policy that gains one
peer (the whole path minus the API round trips; bench/policy_incremental.py has the
operator's part from scratch vs incremental).

Output: a table on stdout, datapath.csv (and datapath.png if matplotlib is importable) in
--out. Everything it creates (namespaces, links, the iptables chain, the nft table, the bpffs
pins, the temporary state directory) is removed at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import ipaddress
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netpol_rig import PodRig, SimPod
from support import sh
from tc_test_run import ACK, SYN, TC_ACT_UNSPEC, packet, prog_test_run

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon import policy_syscalls as ps
from beekeeper.node_daemon.drops import DropLog
from beekeeper.node_daemon.policy_agent import PolicyAgent
from beekeeper.node_daemon.policy_datapath import TO_POD
from beekeeper.operator.identities import IdentityKey, plan_identities
from beekeeper.operator.pods import PodRecord, pod_records
from beekeeper.operator.policy_compile import CompiledPolicies, compile_policies
from beekeeper.operator.policy_incremental import IncrementalCompiler

NAMESPACE, NODE, ELSEWHERE = "bench", "bench", "elsewhere"
PEERS = ipaddress.IPv4Address("10.64.0.0")  # peer i is PEERS + i + 1 (up to a /10: 4M peers)
GROUP = 4000
"""Peers per policy: below the default expansion budget (8192 entries per policy on a node)."""
PORT = 8080
"""The port of the C server (bench/conn_loop.c); the rig's own Python servers hold 80 and 81."""
CONN_LOOP = Path(__file__).resolve().parent / "conn_loop.c"
CONTENDERS = ("none", "iptables", "nft", "beekeeper", "beekeeper-open")
BPFFS = Path("/sys/fs/bpf/beekeeper-bench")
CHAIN, NFT_TABLE = "BKDPBENCH", "bkdpbench"
_START = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def peer_ip(i: int) -> str:
    return str(PEERS + i + 1)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


# --- the world: pods and policies as the operator sees them ---------------------------------------


def pod_body(name: str, node: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {"nodeName": node},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def policy_body(name: str, peers: dict[str, str], ports: list[int]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NAMESPACE, "generation": 1},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": peers}}], "ports": [{"protocol": "TCP", "port": p}]}
                for p in ports
            ],
        },
    }


@dataclass
class World:
    """N peer pods elsewhere, the rig's client and server here, and the policies allowing them."""

    size: int
    client: SimPod
    server: SimPod
    pods: list[dict[str, Any]] = field(default_factory=list)
    records: list[PodRecord] = field(default_factory=list)
    identities: dict[IdentityKey, int] = field(default_factory=dict)
    compiler: IncrementalCompiler = field(default_factory=IncrementalCompiler)

    def __post_init__(self) -> None:
        self.pods = [pod_body(p.name, NODE, p.ip, p.labels) for p in (self.client, self.server)]
        self.pods += [
            pod_body(f"peer-{i}", ELSEWHERE, peer_ip(i), {"peer": str(i), "group": str(i // GROUP)})
            for i in range(self.size)
        ]
        self.records = pod_records(self.pods, {NAMESPACE: {"kubernetes.io/metadata.name": NAMESPACE}})
        self.identities = plan_identities({r.key for r in self.records}, {}, {}, 0.0, 60.0).assigned

    def policies(self, extra_peer: bool = False) -> list[dict[str, Any]]:
        """One policy per GROUP peers on TCP/80, one for the client; extra_peer: the client's also lets peer 0
        (when there is one) in on TCP/81, one more rule."""
        bodies = [policy_body(f"peers-{g}", {"group": str(g)}, [PORT]) for g in range((self.size + GROUP - 1) // GROUP)]
        client = policy_body("client", {"app": "client"}, [PORT])
        if extra_peer and self.size:
            client["spec"]["ingress"].append(
                {"from": [{"podSelector": {"matchLabels": {"peer": "0"}}}], "ports": [{"protocol": "TCP", "port": 81}]}
            )
        return [*bodies, client]

    def compile(self, extra_peer: bool = False, isolating: bool = True) -> CompiledPolicies:
        """Through the operator's IncrementalCompiler, as its reconcile passes do (the first call
        from scratch). isolating False: one policy that selects no pod here (the datapath runs,
        nothing is isolated), compiled from scratch."""
        nodes: dict[str, list[str]] = {NODE: [], ELSEWHERE: []}
        if isolating:
            return self.compiler.compile(self.policies(extra_peer), self.records, self.identities, nodes)
        nobody = policy_body("nobody", {"app": "nobody"}, [PORT])
        nobody["spec"]["podSelector"] = {"matchLabels": {"app": "nobody"}}
        return compile_policies([nobody], self.records, self.identities, nodes)

    def identity(self, name: str) -> int:
        record = next(r for r in self.records if r.name == name)
        return self.identities[record.key]


# --- contenders -----------------------------------------------------------------------------------


class Contender:
    name = "none"
    enforces = False
    """Whether the intruder must be refused."""

    def __init__(self, world: World) -> None:
        self.world = world

    def install(self) -> None:
        """Enforce the world's policy (nothing for no policy)."""

    def uninstall(self) -> None:
        """Remove what install() made; safe to call when nothing is installed."""

    def change_one(self) -> float | None:
        """Seconds to add one rule among N while installed (None: not applicable)."""
        return None


class Iptables(Contender):
    name = "iptables"
    enforces = True

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self._had_filter = sh("nft", "list", "table", "ip", "filter", check=False).returncode == 0
        self.load_seconds = 0.0

    def _jump(self, op: str) -> list[str]:
        return ["iptables", op, "FORWARD", "-d", f"{self.world.server.ip}/32", "-j", CHAIN]

    def install(self) -> None:
        lines = ["*filter", f":{CHAIN} - [0:0]"]
        lines += [f"-A {CHAIN} -s {peer_ip(i)}/32 -p tcp --dport {PORT} -j ACCEPT" for i in range(self.world.size)]
        lines += [f"-A {CHAIN} -s {self.world.client.ip}/32 -p tcp --dport {PORT} -j ACCEPT", f"-A {CHAIN} -j DROP"]
        lines += [f"-I FORWARD 1 -d {self.world.server.ip}/32 -j {CHAIN}", "COMMIT", ""]
        rules = "\n".join(lines)
        started = time.perf_counter()
        subprocess.run(["iptables-restore", "--noflush"], input=rules, text=True, check=True, capture_output=True)
        self.load_seconds = time.perf_counter() - started

    def uninstall(self) -> None:
        while sh(*self._jump("-D"), check=False).returncode == 0:
            pass
        sh("iptables", "-F", CHAIN, check=False)
        sh("iptables", "-X", CHAIN, check=False)
        if not self._had_filter:
            sh("nft", "delete", "table", "ip", "filter", check=False)

    def change_one(self) -> float:
        rule = [CHAIN, "1", "-s", "10.63.255.254/32", "-p", "tcp", "--dport", str(PORT), "-j", "ACCEPT"]
        seconds = timed(lambda: sh("iptables", "-I", *rule))
        sh("iptables", "-D", CHAIN, "1")
        return seconds


class Nft(Contender):
    name = "nft"
    enforces = True

    def install(self) -> None:
        elements = [f"{peer_ip(i)} . {PORT}" for i in range(self.world.size)] + [f"{self.world.client.ip} . {PORT}"]
        server = self.world.server.ip
        ruleset = (
            f"table ip {NFT_TABLE} {{\n"
            f"  set allowed {{ type ipv4_addr . inet_service; elements = {{ {', '.join(elements)} }} }}\n"
            f"  chain forward {{ type filter hook forward priority -5; policy accept;\n"
            f"    ip daddr {server} ip saddr . tcp dport @allowed accept\n"
            f"    ip daddr {server} drop\n  }}\n}}\n"
        )
        subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True, capture_output=True)

    def uninstall(self) -> None:
        sh("nft", "delete", "table", "ip", NFT_TABLE, check=False)

    def change_one(self) -> float:
        element = ["ip", NFT_TABLE, "allowed", f"{{ 10.63.255.254 . {PORT} }}"]
        seconds = timed(lambda: sh("nft", "add", "element", *element))
        sh("nft", "delete", "element", *element)
        return seconds


class Beekeeper(Contender):
    """The operator's compiled spec for this node, converged by the daemon's PolicyAgent."""

    name = "beekeeper"
    enforces = True

    def __init__(self, world: World, state_dir: Path, isolating: bool = True) -> None:
        super().__init__(world)
        if not isolating:
            self.name, self.enforces = "beekeeper-open", False
        self.bpffs = BPFFS / f"dp-{uuid.uuid4().hex[:8]}"
        (state_dir / self.name).mkdir(exist_ok=True)
        self.agent = PolicyAgent(NODE, self.bpffs, state_dir / self.name, DropLog())
        started = time.perf_counter()
        self.compiled = world.compile(isolating=isolating)
        self.compile_seconds = time.perf_counter() - started
        self.flood: dict[str, int] = {}
        """Drop events of the denied packets' BPF_PROG_TEST_RUN (one flow, `repeat` times): sent, suppressed, lost."""
        self._generation = 0

    def _reconcile(self, compiled: CompiledPolicies) -> dict[str, Any] | None:
        self._generation += 1
        slices = {name: {"spec": spec} for name, spec in (compiled.slices.get(NODE) or {}).items()}
        status = self.agent.reconcile(compiled.nodes[NODE], self._generation, None, slices)
        problem = (status or {}).get("problem") or (status or {}).get("message")
        if status is None or problem:
            raise SystemExit(f"beekeeper did not sync: {status}")
        return status

    def install(self) -> None:
        status = self._reconcile(self.compiled)
        if (status or {}).get("attached") != 2:
            raise SystemExit(f"beekeeper attached to {(status or {}).get('attached')} interfaces, not 2: {status}")

    def uninstall(self) -> None:
        self.agent.remove()

    def close(self) -> None:
        self.agent.remove()
        self.agent.close()
        shutil.rmtree(self.bpffs, ignore_errors=True)

    def change_one(self) -> float | None:
        """The operator's (incremental) recompile plus the daemon's reconcile for one more rule, then back."""
        if not self.enforces:
            return None
        seconds = timed(lambda: self._reconcile(self.world.compile(extra_peer=True)))
        self._reconcile(self.world.compile())
        return seconds

    def map_write(self, writes: int = 200) -> float:
        """Median seconds of one raw policy_allow update (the two map writes a sync ends in, one of them)."""
        key = pm.POLICY_KEY.pack(
            pm.PREFIX_FULL,
            self.world.identity("server"),
            self.world.identity("client"),
            pm.Direction.INGRESS.code,
            pm.PROTO_TCP,
            (81).to_bytes(2, "big"),
        )
        samples = []
        with bpf.obj_get(str(self.bpffs / "maps" / pm.POLICY_ALLOW.name)) as fd:
            for _ in range(writes):
                samples.append(timed(lambda: ps.map_update(fd.fd, key, pm.POLICY_VALUE.pack(0))))
            ps.map_delete(fd.fd, key)
        return statistics.median(samples)

    def memlock_bytes(self) -> int:
        total = 0
        for pin in (self.bpffs / "maps").iterdir():
            with bpf.obj_get(str(pin)) as fd:
                for line in Path(f"/proc/self/fdinfo/{fd.fd}").read_text().splitlines():
                    if line.startswith("memlock:"):
                        total += int(line.split()[1])
        return total

    def ns_per_packet(self, repeat: int = 20000) -> dict[str, float]:
        """BPF_PROG_TEST_RUN of the to-pod program at the server's veth, average ns per run of `repeat`."""
        prog = next((self.bpffs / "progs").iterdir()) / TO_POD
        client, server = self.world.client.ip, self.world.server.ip
        ifindex = int(Path(f"/sys/class/net/{self.world.server.host_if}/ifindex").read_text())
        denied_from = peer_ip(0) if self.world.size else "198.51.100.7"  # a known peer on a port it is not let in
        packets = {
            "new allowed": (packet(client, server, sport=41000, dport=PORT, flags=SYN), True),
            "established": (packet(client, server, sport=41000, dport=PORT, flags=ACK), True),
            "denied": (packet(denied_from, server, dport=81, flags=SYN), False),
        }
        result = {}
        with bpf.obj_get(str(prog)) as fd:
            for kind, (data, passes) in packets.items():  # the SYN first: it opens the established flow
                before = self.event_counts()
                verdict, ns = prog_test_run(fd.fd, data, ifindex, repeat)
                if (verdict == TC_ACT_UNSPEC) != passes:
                    raise SystemExit(f"{kind} packet: verdict {verdict:#x}, expected {'pass' if passes else 'drop'}")
                result[kind] = ns
        lost, suppressed = (b - a for a, b in zip(before, self.event_counts(), strict=True))
        self.flood = {"lost": lost, "suppressed": suppressed, "sent": repeat - lost - suppressed}
        return result

    def event_counts(self) -> tuple[int, int]:
        """Drop events lost (ring buffer full) and suppressed (per-flow limit) so far."""
        seen = self.agent.observe()
        counters = seen.counters if seen else []
        return (
            sum(c.packets for c in counters if c.kind is pm.CounterKind.EVENTS_LOST),
            sum(c.packets for c in counters if c.kind is pm.CounterKind.EVENTS_SUPPRESSED),
        )


# --- measuring ------------------------------------------------------------------------------------

PROBE = r"""
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except OSError:
    print("refused")
"""


def intruder_connects(world: World, intruder: SimPod, timeout: float = 0.5) -> bool:
    """Whether a pod that no policy allows can open a connection to the server."""
    done = sh(sys.executable, "-c", PROBE, world.server.ip, str(PORT), str(timeout), netns=intruder.netns)
    return done.stdout.strip() == "connected"


def kernel_memory_kib() -> int:
    """Slab + VmallocUsed + Percpu: where iptables rules, nft set elements and BPF maps live."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[name].split()[0]) for name in ("Slab", "VmallocUsed", "Percpu"))


def build_conn_loop(state_dir: Path) -> Path:
    binary = state_dir / "conn_loop"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(CONN_LOOP)], check=True, capture_output=True)
    return binary


def start_server(binary: Path, server: SimPod) -> subprocess.Popen[str]:
    """The C accept/close loop in the server's namespace, on PORT."""
    argv = ["ip", "netns", "exec", server.netns, str(binary), "serve", str(PORT)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise SystemExit(f"the C server did not start in {server.netns}")
    return process


def connect_loop(world: World, binary: Path, conns: int) -> dict[str, float]:
    """conns connect/close from the client to the server, timed by the built bench/conn_loop.c."""
    argv = [str(binary), "connect", world.server.ip, str(PORT), str(conns)]
    done = sh(*argv, netns=world.client.netns)
    result = json.loads(done.stdout)
    if result["failed"]:
        raise SystemExit(f"{result['failed']} of {conns} connections failed: {result}")
    return result


def measure_size(rig: PodRig, size: int, rounds: int, conns: int, state_dir: Path) -> dict[str, Any]:
    world = World(size, rig.pods["b/client"], rig.pods["b/server"])
    progress(f"N={size}: compiling {len(world.policies())} policies over {len(world.records)} pods")
    bee = Beekeeper(world, state_dir)
    bee_open = Beekeeper(world, state_dir, isolating=False)
    contenders: list[Contender] = [Contender(world), Iptables(world), Nft(world), bee, bee_open]
    runs: dict[str, list[dict[str, float]]] = {c.name: [] for c in contenders}
    extra: dict[str, Any] = {"compile s": bee.compile_seconds}
    unloadable: set[str] = set()
    try:
        for r in range(rounds):
            order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for contender in (c for c in order if c.name not in unloadable):
                if r == 0:
                    time.sleep(1)  # the kernel frees the previous contender's maps and rules with a delay
                memory_before = kernel_memory_kib()
                try:
                    contender.install()
                except (subprocess.CalledProcessError, OSError) as exc:
                    progress(f"N={size}: {contender.name} cannot load it ({exc}): left out")
                    unloadable.add(contender.name)
                    contender.uninstall()
                    continue
                try:
                    if r == 0:
                        extra[f"{contender.name} kernel memory, KiB"] = kernel_memory_kib() - memory_before
                        if intruder_connects(world, rig.pods["b/intruder"]) == contender.enforces:
                            raise SystemExit(
                                f"N={size}: {contender.name} {'let' if contender.enforces else 'kept'} the intruder "
                                f"{'in' if contender.enforces else 'out'}"
                            )
                    runs[contender.name].append(connect_loop(world, state_dir / "conn_loop", conns))
                    if r == 0:
                        change = contender.change_one()
                        if change is not None:
                            extra[f"{contender.name} change one rule, ms"] = change * 1e3
                        if contender is bee:
                            extra["beekeeper raw map write, us"] = bee.map_write() * 1e6
                            extra["beekeeper memlock, KiB"] = bee.memlock_bytes() / 1024
                            extra["ns/packet"] = bee.ns_per_packet()
                            for outcome, events in bee.flood.items():
                                extra[f"denied flood: events {outcome}"] = events
                        if isinstance(contender, Iptables):
                            extra["iptables-restore s"] = contender.load_seconds
                finally:
                    contender.uninstall()
            shown = "  ".join(f"{c.name} {runs[c.name][-1]['rate']:.0f}/s" for c in contenders if runs[c.name])
            progress(f"N={size} round {r + 1}/{rounds}: {shown}")
    finally:
        for contender in contenders:
            contender.uninstall()
        bee.close()
        bee_open.close()
    return {"runs": runs, **extra}


def summarize(size: int, measured: dict[str, Any]) -> dict[str, Any]:
    runs = measured["runs"]
    rates = {name: [r["rate"] for r in rs] for name, rs in runs.items()}
    row: dict[str, Any] = {"N": size}
    for name in CONTENDERS:
        values = rates[name]
        row[f"{name} conn/s min"] = min(values) if values else None
        row[f"{name} conn/s median"] = statistics.median(values) if values else None
        row[f"{name} conn/s max"] = max(values) if values else None
        row[f"{name} p50 us"] = statistics.median(r["p50"] for r in runs[name]) if values else None
        row[f"{name} p99 us"] = statistics.median(r["p99"] for r in runs[name]) if values else None

    def ratio(name: str, base: str) -> float | None:
        if not rates[name] or len(rates[name]) != len(rates[base]):
            return None  # left out, or loaded only in some rounds
        return statistics.median(a / b for a, b in zip(rates[name], rates[base], strict=True))

    for name in CONTENDERS[1:]:
        row[f"{name}/none"] = ratio(name, "none")
    for peer in ("iptables", "nft"):
        row[f"beekeeper/{peer}"] = ratio("beekeeper", peer)
    for kind, ns in measured["ns/packet"].items():
        row[f"BPF ns/packet {kind}"] = ns
    for key, value in measured.items():
        if key not in ("runs", "ns/packet"):
            row[key] = value
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    metrics = [k for k in rows[0] if k != "N"]
    width = max(len(m) for m in metrics)
    sizes = "  ".join(f"{'N=' + str(row['N']):>9}" for row in rows)
    print(f"{'metric':<{width}}  {sizes}")
    for metric in metrics:
        cells = []
        for row in rows:
            value = row.get(metric)
            if value is None:
                cells.append(f"{'n/a':>9}")
            else:
                cells.append(f"{value:>9.2f}" if isinstance(value, float) and abs(value) < 100 else f"{value:>9.0f}")
        print(f"{metric:<{width}}  " + "  ".join(cells))


def write_outputs(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "datapath.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:  # optional, not a dependency of the project: loaded by name, typed Any either way
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        print(f"wrote {out / 'datapath.csv'} (no matplotlib here: no plot)", file=sys.stderr)
        return
    figure, (axis, ratios) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in CONTENDERS:
        shown = [row for row in rows if row[f"{name} conn/s median"] is not None]
        axis.errorbar(
            [max(row["N"], 1) for row in shown],
            [row[f"{name} conn/s median"] for row in shown],
            yerr=[
                [row[f"{name} conn/s median"] - row[f"{name} conn/s min"] for row in shown],
                [row[f"{name} conn/s max"] - row[f"{name} conn/s median"] for row in shown],
            ],
            marker="o",
            capsize=3,
            label=name,
        )
    for name in CONTENDERS[1:]:
        shown = [row for row in rows if row[f"{name}/none"] is not None]
        ratios.plot([max(row["N"], 1) for row in shown], [row[f"{name}/none"] for row in shown], marker="o", label=name)
    ratios.axhline(1.0, color="grey", linewidth=0.8)
    for chart in (axis, ratios):
        chart.set_xscale("log")
        chart.set_xlabel("peer identities N (N=0 drawn at 1)")
        chart.legend()
    axis.set_ylabel("new TCP connections/s (median, min-max)")
    ratios.set_ylabel("conn/s relative to no policy (median of per-round ratios)")
    figure.tight_layout()
    figure.savefig(out / "datapath.png", dpi=120)
    print(f"wrote {out / 'datapath.csv'} and {out / 'datapath.png'}", file=sys.stderr)


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,100,1000,10000", help="comma-separated peer counts (100000 works)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--conns", type=int, default=20000, help="connect/close per contender per round")
    parser.add_argument("--out", type=Path, default=Path("."), help="where datapath.csv (and .png) go")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    state_dir = Path(tempfile.mkdtemp(prefix="beekeeper-bench-datapath-"))
    rows = []
    rig = None
    server = None
    try:
        binary = build_conn_loop(state_dir)
        rig = PodRig(None)
        rig.add("b/client", NAMESPACE, "client", NODE, {"app": "client"})
        rig.add("b/server", NAMESPACE, "server", NODE, {"app": "server"})
        rig.add("b/intruder", NAMESPACE, "intruder", NODE, {"app": "intruder"})  # no pod record: no policy allows it
        rig.wait_servers()
        server = start_server(binary, rig.pods["b/server"])
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(summarize(size, measure_size(rig, size, args.rounds, args.conns, state_dir)))
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        if rig is not None:
            rig.close()
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(BPFFS, ignore_errors=True)
    print(f"\n{args.rounds} rounds x {args.conns} connect/close per contender, order rotated per round")
    print_table(rows)
    write_outputs(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
