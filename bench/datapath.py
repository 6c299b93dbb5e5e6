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
- beekeeper: the operator's compile_policies over N+2 pods and N/4000 + 1 policies, the node's
  spec and slices given to the daemon's own PolicyAgent, which loads bpf/policy.o and attaches
  its tcx programs to both host-side veths.

Every round runs each contender in turn, the order rotated by one per round; the client runs
--conns connect/close (SO_LINGER 0, so no TIME_WAIT) to the server and reports the rate and
the connect latency. Ratios are taken within a round, then the median over rounds. Per
size it also measures, on the beekeeper programs (BPF_PROG_TEST_RUN at the server's
veth): ns per packet for an established packet, a new allowed SYN and a denied SYN; the
memlock of the loaded maps; and the time to change one rule among N: `iptables -I`, one nft
set element, a raw write of one policy_allow entry, and the operator's IncrementalCompiler +
PolicyAgent.reconcile for a policy that gains one peer (the whole path minus the API round trips;
bench/policy_incremental.py has the operator's part from scratch vs incremental).

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
from beekeeper.operator.policy_compile import CompiledPolicies
from beekeeper.operator.policy_incremental import IncrementalCompiler

NAMESPACE, NODE, ELSEWHERE = "bench", "bench", "elsewhere"
PEERS = ipaddress.IPv4Address("10.64.0.0")  # peer i is PEERS + i + 1 (up to a /10: 4M peers)
GROUP = 4000
"""Peers per policy: below the default expansion budget (8192 entries per policy on a node)."""
PORT = 80
CONTENDERS = ("none", "iptables", "nft", "beekeeper")
BPFFS = Path("/sys/fs/bpf/beekeeper-bench")
CHAIN, NFT_TABLE = "BKDPBENCH", "bkdpbench"
_START = time.monotonic()

CLIENT = r"""
import json, socket, struct, sys, time
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
linger = struct.pack("ii", 1, 0)
latencies, failed = [], 0
started = time.perf_counter()
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.settimeout(2)
    t = time.perf_counter()
    try:
        s.connect((dst, port))
        latencies.append(time.perf_counter() - t)
    except OSError:
        failed += 1
    s.close()
elapsed = time.perf_counter() - started
latencies.sort() or latencies.append(0.0)
print(json.dumps({"rate": (n - failed) / elapsed, "p50": latencies[len(latencies) // 2] * 1e6,
                  "p99": latencies[int(len(latencies) * 0.99)] * 1e6, "failed": failed}))
"""


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

    def compile(self, extra_peer: bool = False) -> CompiledPolicies:
        """Through the operator's IncrementalCompiler, as its reconcile passes do (the first call from scratch)."""
        return self.compiler.compile(
            self.policies(extra_peer), self.records, self.identities, {NODE: [], ELSEWHERE: []}
        )

    def identity(self, name: str) -> int:
        record = next(r for r in self.records if r.name == name)
        return self.identities[record.key]


# --- contenders -----------------------------------------------------------------------------------


class Contender:
    name = "none"

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

    def __init__(self, world: World, state_dir: Path) -> None:
        super().__init__(world)
        self.bpffs = BPFFS / f"dp-{uuid.uuid4().hex[:8]}"
        self.agent = PolicyAgent(NODE, self.bpffs, state_dir, DropLog())
        started = time.perf_counter()
        self.compiled = world.compile()
        self.compile_seconds = time.perf_counter() - started
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

    def change_one(self) -> float:
        """The operator's (incremental) recompile plus the daemon's reconcile for one more rule, then back."""
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
                verdict, ns = prog_test_run(fd.fd, data, ifindex, repeat)
                if (verdict == TC_ACT_UNSPEC) != passes:
                    raise SystemExit(f"{kind} packet: verdict {verdict:#x}, expected {'pass' if passes else 'drop'}")
                result[kind] = ns
        return result


# --- measuring ------------------------------------------------------------------------------------


def connect_loop(world: World, conns: int) -> dict[str, float]:
    argv = [sys.executable, "-c", CLIENT, world.server.ip, str(PORT), str(conns)]
    done = sh(*argv, netns=world.client.netns)
    result = json.loads(done.stdout)
    if result["failed"]:
        raise SystemExit(f"{result['failed']} of {conns} connections failed: {result}")
    return result


def measure_size(rig: PodRig, size: int, rounds: int, conns: int, state_dir: Path) -> dict[str, Any]:
    world = World(size, rig.pods["b/client"], rig.pods["b/server"])
    progress(f"N={size}: compiling {len(world.policies())} policies over {len(world.records)} pods")
    bee = Beekeeper(world, state_dir)
    contenders: list[Contender] = [Contender(world), Iptables(world), Nft(world), bee]
    runs: dict[str, list[dict[str, float]]] = {c.name: [] for c in contenders}
    extra: dict[str, Any] = {"compile s": bee.compile_seconds}
    try:
        for r in range(rounds):
            order = contenders[r % 4 :] + contenders[: r % 4]
            for contender in order:
                contender.install()
                try:
                    runs[contender.name].append(connect_loop(world, conns))
                    if r == 0:
                        change = contender.change_one()
                        if change is not None:
                            extra[f"{contender.name} change one rule, ms"] = change * 1e3
                        if contender is bee:
                            extra["beekeeper raw map write, us"] = bee.map_write() * 1e6
                            extra["beekeeper memlock, KiB"] = bee.memlock_bytes() / 1024
                            extra["ns/packet"] = bee.ns_per_packet()
                        if isinstance(contender, Iptables):
                            extra["iptables-restore s"] = contender.load_seconds
                finally:
                    contender.uninstall()
            shown = "  ".join(f"{c.name} {runs[c.name][-1]['rate']:.0f}/s" for c in contenders)
            progress(f"N={size} round {r + 1}/{rounds}: {shown}")
    finally:
        for contender in contenders:
            contender.uninstall()
        bee.close()
    return {"runs": runs, **extra}


def summarize(size: int, measured: dict[str, Any]) -> dict[str, Any]:
    runs = measured["runs"]
    rates = {name: [r["rate"] for r in rs] for name, rs in runs.items()}
    row: dict[str, Any] = {"N": size}
    for name, values in rates.items():
        row[f"{name} conn/s min"] = min(values)
        row[f"{name} conn/s median"] = statistics.median(values)
        row[f"{name} conn/s max"] = max(values)
        row[f"{name} p50 us"] = statistics.median(r["p50"] for r in runs[name])
        row[f"{name} p99 us"] = statistics.median(r["p99"] for r in runs[name])
    for name in CONTENDERS[1:]:
        row[f"{name}/none"] = statistics.median(a / b for a, b in zip(rates[name], rates["none"], strict=True))
    for peer in ("iptables", "nft"):
        row[f"beekeeper/{peer}"] = statistics.median(
            a / b for a, b in zip(rates["beekeeper"], rates[peer], strict=True)
        )
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
    figure, axis = plt.subplots(figsize=(7, 4))
    sizes = [max(row["N"], 1) for row in rows]
    for name in CONTENDERS:
        axis.errorbar(
            sizes,
            [row[f"{name} conn/s median"] for row in rows],
            yerr=[
                [row[f"{name} conn/s median"] - row[f"{name} conn/s min"] for row in rows],
                [row[f"{name} conn/s max"] - row[f"{name} conn/s median"] for row in rows],
            ],
            marker="o",
            capsize=3,
            label=name,
        )
    axis.set_xscale("log")
    axis.set_xlabel("peer identities N (N=0 drawn at 1)")
    axis.set_ylabel("new TCP connections/s (median, min-max)")
    axis.legend()
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
    try:
        rig = PodRig(None)
        rig.add("b/client", NAMESPACE, "client", NODE, {"app": "client"})
        rig.add("b/server", NAMESPACE, "server", NODE, {"app": "server"})
        rig.wait_servers()
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(summarize(size, measure_size(rig, size, args.rounds, args.conns, state_dir)))
    finally:
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
