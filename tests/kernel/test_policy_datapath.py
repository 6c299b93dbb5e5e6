"""The NetworkIdentityPolicy datapath in the running kernel.

Crafted packets go through the real programs with BPF_PROG_TEST_RUN, each test on a
fresh veth (its ifindex is the endpoint key, so conntrack entries of one test
never meet another's); one test sends real TCP between two network namespaces.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import BPFFS_TEST_ROOT, pinned_ids, sockets_in, tcx_chain, wait_for
from tc_test_run import ACK, DROP, ICMP, PASS, RST, SCTP, SYN, TCP, UDP, eth, icmp, ipv4, l4, packet, run_prog

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon.policy_datapath import FROM_POD, TO_POD, PolicyDatapath, PolicyDatapathError, SyncResult
from beekeeper.node_daemon.policy_maps import (
    DROP_EVENT_INTERVAL_NS,
    Action,
    CounterKind,
    DatapathState,
    Direction,
    DropEvent,
    DropReason,
    Endpoint,
    PrefixIdentity,
    Rule,
)

pytestmark = pytest.mark.kernel


POD = "10.231.0.10"
LOCAL = 256
FRONTEND, FRONTEND_IP = 300, "10.231.0.20"
OTHER, OTHER_IP = 301, "10.231.0.30"
WORLD_IP = "198.51.100.7"  # in no ipcache entry

# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datapath() -> Iterator[PolicyDatapath]:
    path = BPFFS_TEST_ROOT / f"policy-{uuid.uuid4().hex[:8]}"
    dp = None
    try:
        dp = PolicyDatapath(path)
        yield dp
    finally:
        if dp is not None:
            dp.remove()
        shutil.rmtree(path, ignore_errors=True)


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=30)


@pytest.fixture
def make_interface() -> Iterator[Callable[[], tuple[str, int]]]:
    """make() -> (name, ifindex) of one end of a new veth pair, deleted after the test."""
    made: list[str] = []
    tag = uuid.uuid4().hex[:6]

    def make() -> tuple[str, int]:
        name = f"bkdp{tag}{len(made)}"
        _ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        made.append(name)
        return name, socket.if_nametoindex(name)

    yield make
    for name in made:
        _ip("link", "del", name, check=False)


@dataclass
class Pod:
    """A local endpoint on a fresh veth, and the packets it sends and receives."""

    dp: PolicyDatapath
    ifname: str
    ifindex: int

    def _run(self, prog: str, pkt: bytes) -> str:
        with bpf.obj_get(str(self.dp.dir / "progs" / self.dp.build_id / prog)) as fd:
            return run_prog(fd.fd, pkt, self.ifindex)

    def receives(self, pkt: bytes) -> str:
        """Verdict of the pod's ingress (tc egress of its veth)."""
        return self._run(TO_POD, pkt)

    def sends(self, pkt: bytes) -> str:
        """Verdict of the pod's egress (tc ingress of its veth)."""
        return self._run(FROM_POD, pkt)

    def endpoint(self, ingress: bool = False, egress: bool = False, ip: str | None = POD) -> Endpoint:
        return Endpoint(self.ifname, ip, LOCAL, ingress_enforced=ingress, egress_enforced=egress)

    def drops(self) -> list[DropEvent]:
        return [e for e in self.dp.drops() if e.ifindex == self.ifindex]


@pytest.fixture
def pod(datapath: PolicyDatapath, make_interface: Callable[[], tuple[str, int]]) -> Pod:
    list(datapath.drops())  # earlier tests' events
    return Pod(datapath, *make_interface())


PEERS = [PrefixIdentity(f"{FRONTEND_IP}/32", FRONTEND), PrefixIdentity(f"{OTHER_IP}/32", OTHER)]


def rule(
    direction: Direction,
    peer: int,
    proto: int = 0,
    ports: tuple[int, int] = (0, 0),
    action: Action = Action.ALLOW,
    index: int = 1,
) -> Rule:
    return Rule(LOCAL, direction, peer, proto, ports[0], ports[1], action, index)


def state(endpoint: Endpoint, *rules: Rule, cidr_ids: tuple[PrefixIdentity, ...] = ()) -> DatapathState:
    names = {r.policy_index: f"ns/policy-{r.policy_index}" for r in rules}
    return DatapathState([endpoint], list(PEERS), list(cidr_ids), list(rules), names)


def counter(dp: PolicyDatapath, kind: CounterKind, ident: int) -> tuple[int, int]:
    found = [(c.packets, c.bytes) for c in dp.counters() if c.kind is kind and c.id == ident]
    return found[0] if found else (0, 0)


# --- verdicts -----------------------------------------------------------------------------------


def test_not_enforced_passes_everything(pod: Pod) -> None:
    pod.dp.sync(state(pod.endpoint()))
    assert pod.receives(packet(WORLD_IP, POD)) == PASS
    assert pod.sends(packet(POD, WORLD_IP, UDP, dport=53)) == PASS
    assert pod.receives(eth(b"\x60" + b"\0" * 39, 0x86DD)) == PASS  # IPv6 is not evaluated
    assert pod.drops() == []


def test_default_deny_drops_and_says_why(pod: Pod) -> None:
    pod.dp.sync(state(pod.endpoint(ingress=True)))
    before = counter(pod.dp, CounterKind.DEFAULT_DENY, LOCAL)

    assert pod.receives(packet(FRONTEND_IP, POD, dport=8080)) == DROP
    assert pod.sends(packet(POD, WORLD_IP)) == PASS  # egress is not enforced

    (event,) = pod.drops()
    assert (event.direction, event.saddr, event.daddr, event.sport, event.dport, event.protocol) == (
        Direction.INGRESS,
        FRONTEND_IP,
        POD,
        40000,
        8080,
        TCP,
    )
    assert (event.reason, event.policy_index, event.local_identity, event.peer_identity) == (
        DropReason.DEFAULT_DENY,
        None,
        LOCAL,
        FRONTEND,
    )
    packets, _ = counter(pod.dp, CounterKind.DEFAULT_DENY, LOCAL)
    assert packets == before[0] + 1


def test_allow_by_peer_identity(pod: Pod) -> None:
    pod.dp.sync(state(pod.endpoint(ingress=True), rule(Direction.INGRESS, FRONTEND, TCP, (8080, 8080))))
    assert pod.receives(packet(FRONTEND_IP, POD, dport=8080)) == PASS
    assert pod.receives(packet(FRONTEND_IP, POD, dport=8081)) == DROP
    assert pod.receives(packet(OTHER_IP, POD, dport=8080)) == DROP
    assert pod.receives(packet(WORLD_IP, POD, dport=8080)) == DROP
    assert [(e.saddr, e.peer_identity) for e in pod.drops()] == [
        (FRONTEND_IP, FRONTEND),
        (OTHER_IP, OTHER),
        (WORLD_IP, 2),  # world
    ]


def test_allow_any_peer(pod: Pod) -> None:
    pod.dp.sync(state(pod.endpoint(egress=True), rule(Direction.EGRESS, 0, UDP, (53, 53))))
    assert pod.sends(packet(POD, WORLD_IP, UDP, dport=53)) == PASS
    assert pod.sends(packet(POD, FRONTEND_IP, UDP, dport=53)) == PASS
    assert pod.sends(packet(POD, FRONTEND_IP, UDP, dport=54)) == DROP


def test_deny_beats_allow(pod: Pod) -> None:
    pod.dp.sync(
        state(
            pod.endpoint(ingress=True),
            rule(Direction.INGRESS, 0, TCP, (8080, 8080), index=1),
            rule(Direction.INGRESS, OTHER, 0, action=Action.DENY, index=2),
        )
    )
    assert pod.receives(packet(FRONTEND_IP, POD)) == PASS
    assert pod.receives(packet(WORLD_IP, POD)) == PASS
    assert pod.receives(packet(OTHER_IP, POD)) == DROP
    (event,) = pod.drops()
    assert (event.reason, event.policy_index, event.policy) == (DropReason.DENY_RULE, 2, "ns/policy-2")


def test_port_range(pod: Pod) -> None:
    pod.dp.sync(state(pod.endpoint(ingress=True), rule(Direction.INGRESS, FRONTEND, TCP, (8000, 8080))))
    verdicts = {port: pod.receives(packet(FRONTEND_IP, POD, dport=port)) for port in (7999, 8000, 8042, 8080, 8081)}
    assert verdicts == {7999: DROP, 8000: PASS, 8042: PASS, 8080: PASS, 8081: DROP}


def test_ip_block_with_except(pod: Pod) -> None:
    # ipBlock 10.232.0.0/16 except 10.232.5.0/24: the operator gives each prefix its own
    # CIDR identity and rules only to the one the ipBlock admits.
    block, excluded = 1 << 24, (1 << 24) + 1
    pod.dp.sync(
        state(
            pod.endpoint(egress=True),
            rule(Direction.EGRESS, block, TCP, (443, 443)),
            cidr_ids=(PrefixIdentity("10.232.0.0/16", block), PrefixIdentity("10.232.5.0/24", excluded)),
        )
    )
    assert pod.sends(packet(POD, "10.232.1.1", dport=443)) == PASS
    assert pod.sends(packet(POD, "10.232.5.1", dport=443)) == DROP
    assert pod.sends(packet(POD, "10.233.0.1", dport=443)) == DROP
    events = pod.drops()
    assert [(e.daddr, e.peer_cidr_identity) for e in events] == [("10.232.5.1", excluded), ("10.233.0.1", 0)]


def test_udp_and_sctp(pod: Pod) -> None:
    pod.dp.sync(
        state(
            pod.endpoint(ingress=True),
            rule(Direction.INGRESS, FRONTEND, UDP, (5000, 5001)),
            rule(Direction.INGRESS, FRONTEND, SCTP, (3868, 3868)),
        )
    )
    assert pod.receives(packet(FRONTEND_IP, POD, UDP, dport=5001)) == PASS
    assert pod.receives(packet(FRONTEND_IP, POD, UDP, dport=5002)) == DROP
    assert pod.receives(packet(FRONTEND_IP, POD, SCTP, dport=3868)) == PASS
    assert pod.receives(packet(FRONTEND_IP, POD, SCTP, dport=5001)) == DROP
    assert pod.receives(packet(FRONTEND_IP, POD, TCP, dport=3868)) == DROP


def test_protocol_only_rule(pod: Pod) -> None:
    pod.dp.sync(state(pod.endpoint(ingress=True), rule(Direction.INGRESS, FRONTEND, TCP)))
    assert pod.receives(packet(FRONTEND_IP, POD, TCP, dport=1)) == PASS
    assert pod.receives(packet(FRONTEND_IP, POD, TCP, dport=65535)) == PASS
    assert pod.receives(packet(FRONTEND_IP, POD, UDP, dport=1)) == DROP


def test_reply_of_allowed_connection_passes(pod: Pod) -> None:
    pod.dp.sync(state(pod.endpoint(ingress=True, egress=True), rule(Direction.EGRESS, FRONTEND, TCP, (5432, 5432))))
    assert pod.sends(packet(POD, FRONTEND_IP, sport=41000, dport=5432, flags=SYN)) == PASS
    assert pod.receives(packet(FRONTEND_IP, POD, sport=5432, dport=41000, flags=SYN | ACK)) == PASS
    assert pod.sends(packet(POD, FRONTEND_IP, sport=41000, dport=5432, flags=ACK)) == PASS
    # The same peer opening a connection to the pod is a new flow, and ingress allows nothing.
    assert pod.receives(packet(FRONTEND_IP, POD, sport=5432, dport=41001, flags=SYN)) == DROP
    # A pure SYN reusing the reply's tuple is a new connection too, not a reply.
    assert pod.receives(packet(FRONTEND_IP, POD, sport=5432, dport=41000, flags=SYN)) == DROP
    (flow,) = [f for f in pod.dp.flows() if f.ifindex == pod.ifindex]
    assert (flow.saddr, flow.daddr, flow.dport, flow.direction) == (POD, FRONTEND_IP, 5432, Direction.EGRESS)


def test_either_direction_finds_the_flow_and_a_reset_ends_it(pod: Pod) -> None:
    """A flow whose first packet is not in canonical order (the higher address first) is found
    by both directions and reported as its first packet was; a reset removes it."""
    pod.dp.sync(state(pod.endpoint(ingress=True, egress=True), rule(Direction.INGRESS, FRONTEND, TCP, (8080, 8080))))
    assert pod.receives(packet(FRONTEND_IP, POD, sport=42000, dport=8080, flags=SYN)) == PASS
    assert (
        pod.sends(packet(POD, FRONTEND_IP, sport=8080, dport=42000, flags=SYN | ACK)) == PASS
    )  # egress allows nothing
    assert pod.receives(packet(FRONTEND_IP, POD, sport=42000, dport=8080, flags=ACK)) == PASS
    (flow,) = [f for f in pod.dp.flows() if f.ifindex == pod.ifindex]
    assert (flow.saddr, flow.daddr, flow.sport, flow.dport, flow.direction) == (
        FRONTEND_IP,
        POD,
        42000,
        8080,
        Direction.INGRESS,
    )
    assert pod.sends(packet(POD, FRONTEND_IP, sport=8080, dport=42000, flags=RST | ACK)) == PASS
    assert [f for f in pod.dp.flows() if f.ifindex == pod.ifindex] == []
    assert pod.sends(packet(POD, FRONTEND_IP, sport=8080, dport=42000, flags=ACK)) == DROP  # no reply any more


def test_policy_change_is_a_map_update_and_revokes_established_flows(pod: Pod) -> None:
    allowed = state(pod.endpoint(ingress=True), rule(Direction.INGRESS, FRONTEND, TCP, (8080, 8080), index=5))
    pod.dp.sync(allowed)
    progs, epoch = pod.dp.prog_ids, pod.dp.epoch
    request = packet(FRONTEND_IP, POD, flags=ACK)
    response = packet(POD, FRONTEND_IP, sport=8080, dport=40000, flags=ACK)
    assert pod.receives(packet(FRONTEND_IP, POD, flags=SYN)) == PASS
    assert pod.receives(request) == PASS
    assert pod.sends(response) == PASS

    revoked = pod.dp.sync(state(pod.endpoint(ingress=True)))
    assert (revoked.updates, revoked.deletes, revoked.epoch) == (0, 1, epoch + 1)
    suppressed = counter(pod.dp, CounterKind.EVENTS_SUPPRESSED, 0)[0]
    assert pod.receives(request) == DROP  # established, judged again
    # Egress is not enforced, yet the pod's side of the revoked flow cannot reopen it.
    assert pod.sends(response) == DROP
    events = pod.drops()
    assert {(e.reason, e.revoked, e.direction, e.saddr, e.dport) for e in events} == {
        (DropReason.DEFAULT_DENY, True, Direction.INGRESS, FRONTEND_IP, 8080)
    }
    assert len(events) == 1  # the same flow's second drop within the event interval: counted, not reported
    assert counter(pod.dp, CounterKind.EVENTS_SUPPRESSED, 0)[0] == suppressed + 1
    assert pod.receives(packet(FRONTEND_IP, POD, sport=40001, flags=SYN)) == DROP  # new ones too

    again = pod.dp.sync(allowed)
    assert (again.updates, again.deletes) == (1, 0)
    assert pod.sends(response) == PASS  # the revoked flow is allowed again
    assert pod.receives(request) == PASS
    assert pod.receives(packet(FRONTEND_IP, POD, sport=40001, flags=SYN)) == PASS
    assert pod.dp.prog_ids == progs


def test_sync_writes_only_changes_and_validates_first(pod: Pod) -> None:
    desired = state(pod.endpoint(ingress=True), rule(Direction.INGRESS, FRONTEND, TCP, (8000, 8999)))
    first = pod.dp.sync(desired)
    assert first.updates >= 6  # the range alone is 6 prefixes
    epoch = pod.dp.epoch
    assert pod.dp.sync(desired) == SyncResult(0, 0, epoch)

    bad = state(pod.endpoint(ingress=True), rule(Direction.INGRESS, FRONTEND, 0, (80, 80)))
    with pytest.raises(ValueError, match="ports need a protocol"):
        pod.dp.sync(bad)
    assert pod.dp.sync(desired).updates == 0  # nothing was written

    missing = pod.dp.sync(DatapathState([Endpoint("bkdp-nonexistent", POD, LOCAL)]))
    assert missing.missing_interfaces == ["bkdp-nonexistent"]


def test_counters_move(pod: Pod) -> None:
    pod.dp.sync(
        state(
            pod.endpoint(ingress=True),
            rule(Direction.INGRESS, FRONTEND, TCP, (8080, 8080), index=11),
            rule(Direction.INGRESS, OTHER, TCP, action=Action.DENY, index=12),
        )
    )
    allow_before = counter(pod.dp, CounterKind.ALLOW, 11)
    deny_before = counter(pod.dp, CounterKind.DENY, 12)
    syn = packet(FRONTEND_IP, POD, sport=40100)
    assert pod.receives(syn) == PASS
    assert pod.receives(packet(FRONTEND_IP, POD, sport=40100, flags=ACK)) == PASS  # via conntrack
    assert pod.receives(packet(OTHER_IP, POD)) == DROP
    allow = counter(pod.dp, CounterKind.ALLOW, 11)
    assert allow[0] - allow_before[0] == 2
    assert allow[1] - allow_before[1] == 2 * len(syn)
    assert counter(pod.dp, CounterKind.DENY, 12)[0] - deny_before[0] == 1
    names = {c.id: c.name for c in pod.dp.counters() if c.kind is CounterKind.ALLOW}
    assert names[11] == "ns/policy-11"


def test_drop_events_are_limited_per_flow_so_a_flood_hides_no_other_drop(pod: Pod) -> None:
    """A flood of one flow (source ports varied) gets one event per interval, the rest counted
    and summed into the flow's next event; a drop of another flow still has its event."""
    pod.dp.sync(state(pod.endpoint(ingress=True)))
    suppressed = counter(pod.dp, CounterKind.EVENTS_SUPPRESSED, 0)[0]
    lost = counter(pod.dp, CounterKind.EVENTS_LOST, 0)[0]
    for sport in range(30000, 32000):
        assert pod.receives(packet(WORLD_IP, POD, sport=sport, dport=22, flags=SYN)) == DROP
    assert pod.receives(packet(FRONTEND_IP, POD, dport=8080, flags=SYN)) == DROP
    events = pod.drops()
    assert [(e.saddr, e.dport, e.suppressed) for e in events] == [(WORLD_IP, 22, 0), (FRONTEND_IP, 8080, 0)]
    assert counter(pod.dp, CounterKind.EVENTS_SUPPRESSED, 0)[0] == suppressed + 1999
    assert counter(pod.dp, CounterKind.EVENTS_LOST, 0)[0] == lost
    assert counter(pod.dp, CounterKind.DEFAULT_DENY, LOCAL)[0] >= 2001  # every drop is counted
    time.sleep(DROP_EVENT_INTERVAL_NS / 1e9 + 0.1)
    assert pod.receives(packet(WORLD_IP, POD, sport=40000, dport=22, flags=SYN)) == DROP
    (event,) = pod.drops()
    assert (event.saddr, event.dport, event.suppressed) == (WORLD_IP, 22, 1999)


def test_non_ipv4_traffic(pod: Pod) -> None:
    pod.dp.sync(state(pod.endpoint(ingress=True, egress=True)))
    arp = eth(b"\0\x01\x08\0\x06\x04\0\x01" + b"\0" * 20, 0x0806)
    ipv6 = eth(b"\x60" + b"\0" * 39, 0x86DD)
    assert pod.receives(arp) == PASS
    assert pod.sends(arp) == PASS
    assert pod.receives(ipv6) == DROP
    assert [e.reason for e in pod.drops()] == [DropReason.UNSUPPORTED_L3]


def test_spoofed_source_is_dropped_even_without_policy(pod: Pod) -> None:
    pod.dp.sync(state(pod.endpoint()))
    assert pod.sends(packet(FRONTEND_IP, OTHER_IP)) == DROP
    assert [e.reason for e in pod.drops()] == [DropReason.SPOOFED_SOURCE]
    pod.dp.sync(state(pod.endpoint(ip=None)))  # a pod that routes for others
    assert pod.sends(packet(FRONTEND_IP, OTHER_IP)) == PASS


def test_icmp_echo_and_errors(pod: Pod) -> None:
    pod.dp.sync(
        state(
            pod.endpoint(ingress=True, egress=True),
            rule(Direction.EGRESS, 0, ICMP),
            rule(Direction.EGRESS, 0, UDP, (9999, 9999)),
        )
    )
    assert pod.sends(icmp(POD, WORLD_IP, 8, echo_id=77)) == PASS
    assert pod.receives(icmp(WORLD_IP, POD, 0, echo_id=77)) == PASS  # the echo reply
    assert pod.receives(icmp(WORLD_IP, POD, 0, echo_id=78)) == DROP
    # Port unreachable about a datagram the pod sent: related to a tracked flow.
    sent = ipv4(POD, WORLD_IP, UDP, l4(UDP, 45000, 9999, 0))
    assert pod.sends(eth(sent)) == PASS
    assert pod.receives(icmp(WORLD_IP, POD, 3, inner=sent[:28])) == PASS
    unrelated = ipv4(POD, WORLD_IP, UDP, l4(UDP, 45001, 9999, 0))
    assert pod.receives(icmp(WORLD_IP, POD, 3, inner=unrelated[:28])) == DROP


def test_non_first_fragment_passes(pod: Pod) -> None:
    pod.dp.sync(state(pod.endpoint(ingress=True)))
    assert pod.receives(eth(ipv4(FRONTEND_IP, POD, UDP, b"x" * 16, frag_offset=1480))) == PASS
    assert pod.receives(eth(ipv4(FRONTEND_IP, POD, UDP, l4(UDP, 1, 2, 0)))) == DROP


# --- lifecycle ----------------------------------------------------------------------------------

_ATTACH_AND_EXIT = """
import json, sys
from pathlib import Path
from beekeeper.node_daemon.policy_datapath import PolicyDatapath
dp = PolicyDatapath(Path(sys.argv[1]))
a = dp.attach(sys.argv[2])
print(json.dumps({"links": a.link_ids, "progs": a.prog_ids}))
"""


def test_attachments_survive_the_process_and_are_adopted(
    datapath: PolicyDatapath, make_interface: Callable[[], tuple[str, int]]
) -> None:
    ifname, ifindex = make_interface()
    with (
        bpf.load_trivial_prog(bpf.PROG_TYPE_SCHED_CLS) as other,
        bpf.tcx_link_create(other.fd, ifindex, bpf.ATTACH_TCX_INGRESS),
    ):
        done = subprocess.run(
            [sys.executable, "-c", _ATTACH_AND_EXIT, str(datapath.dir), ifname],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        created = json.loads(done.stdout)
        assert created["progs"] == datapath.prog_ids  # adopted, not reloaded
        # The policy runs first, before what was attached earlier.
        assert tcx_chain(ifindex, bpf.ATTACH_TCX_INGRESS) == [created["progs"][FROM_POD], bpf.prog_info(other.fd).id]

        adopted = PolicyDatapath(datapath.dir)
        try:
            assert adopted.prog_ids == datapath.prog_ids
            attachment = adopted.attached()[ifname]
            assert (attachment.ifindex, attachment.link_ids) == (ifindex, created["links"])
            assert adopted.attach(ifname).link_ids == created["links"]  # idempotent
            assert adopted.detach(ifname)
            assert ifname not in adopted.attached()
            # Unpinning drops the last reference; the kernel frees the link (and detaches
            # it from the hook) in a workqueue, so the ids go away shortly after.
            wait_for(
                lambda: not set(created["links"].values()) & set(bpf.object_ids("link")),
                timeout=10,
                what="the unpinned links to be freed",
            )
            assert tcx_chain(ifindex, bpf.ATTACH_TCX_INGRESS) == [bpf.prog_info(other.fd).id]
        finally:
            adopted.close()


_LOAD_WITHOUT_KERNEL_HEADERS = """
import json, os, sys
from pathlib import Path
from beekeeper.node_daemon.policy_datapath import PolicyDatapath
from beekeeper.node_daemon.policy_maps import DatapathState, Endpoint
dp = PolicyDatapath(Path(sys.argv[1]))
dp.sync(DatapathState([Endpoint(sys.argv[2], sys.argv[3], int(sys.argv[4]), ingress_enforced=True)]))
dp.attach(sys.argv[2])
headers = os.listdir("/lib/modules") + os.listdir("/usr/src")
print(json.dumps({"headers": headers, "bcc": "bcc" in sys.modules, "progs": dp.prog_ids}))
"""
_HIDDEN_KERNEL_HEADERS = (
    *("unshare", "--mount", "--propagation", "private", "sh", "-c"),
    'mount -t tmpfs none /lib/modules && mount -t tmpfs none /usr/src && exec "$@"',
    "sh",
)
"""A command prefix: run the rest in a mount namespace where /lib/modules and /usr/src are empty."""


def test_a_node_without_kernel_headers_loads_and_enforces(make_interface: Callable[[], tuple[str, int]]) -> None:
    """The datapath is loaded, synced and attached by a process that sees no kernel headers
    (/lib/modules and /usr/src are empty in its mount namespace) and never imports bcc."""
    ifname, ifindex = make_interface()
    path = BPFFS_TEST_ROOT / f"policy-noheaders-{uuid.uuid4().hex[:8]}"
    dp = None
    try:
        args = [str(path), ifname, POD, str(LOCAL)]
        done = subprocess.run(
            [*_HIDDEN_KERNEL_HEADERS, sys.executable, "-c", _LOAD_WITHOUT_KERNEL_HEADERS, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        loaded = json.loads(done.stdout)
        assert (loaded["headers"], loaded["bcc"]) == ([], False)
        dp = PolicyDatapath(path)
        assert dp.prog_ids == loaded["progs"]  # adopted: the programs that process loaded
        pod = Pod(dp, ifname, ifindex)
        assert pod.receives(packet(FRONTEND_IP, POD)) == DROP
        assert pod.sends(packet(POD, FRONTEND_IP)) == PASS
        assert tcx_chain(ifindex, bpf.ATTACH_TCX_EGRESS) == [loaded["progs"][TO_POD]]
    finally:
        if dp is None:
            dp = PolicyDatapath(path)
        dp.remove()


def test_new_build_replaces_programs_on_links_and_remove_leaves_nothing(
    make_interface: Callable[[], tuple[str, int]],
) -> None:
    path = BPFFS_TEST_ROOT / f"policy-life-{uuid.uuid4().hex[:8]}"
    (gone_ifname, _), (ifname, _) = make_interface(), make_interface()
    dp = PolicyDatapath(path)
    desired = DatapathState([Endpoint(ifname, POD, LOCAL, ingress_enforced=True)], list(PEERS))
    try:
        assert dp.sync(desired).updates == 3
        old_progs = dp.prog_ids
        links = dp.attach(ifname).link_ids
        dp.attach(gone_ifname)
        maps = pinned_ids(path / "maps", bpf.map_info)
        dp.close()

        _ip("link", "del", gone_ifname)  # a pod goes away while no daemon runs
        # Another build of the source (a daemon upgrade): pinned apart from the current one.
        (path / "progs" / dp.build_id).rename(path / "progs" / "previous")
        dp = PolicyDatapath(path)
        new_progs = dp.prog_ids
        assert set(new_progs.values()).isdisjoint(old_progs.values())
        attachment = dp.attached()[ifname]
        assert (attachment.link_ids, attachment.prog_ids) == (links, new_progs)  # swapped in place
        assert not (path / "progs" / "previous").exists()
        assert pinned_ids(path / "maps", bpf.map_info) == maps  # reused, with their content
        assert (dp.sync(desired).updates, dp.sync(desired).deletes) == (0, 0)

        assert dp.prune() == 2  # the links of the veth deleted meanwhile
        dp.remove()
        dp = None
        assert not path.exists()
        leftovers = lambda: (  # noqa: E731
            set(bpf.object_ids("prog")) & {*old_progs.values(), *new_progs.values()},
            set(bpf.object_ids("map")) & set(maps.values()),
            set(bpf.object_ids("link")) & set(links.values()),
        )
        deadline = time.monotonic() + 10
        while any(leftovers()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the kernel frees maps from a workqueue
        assert leftovers() == (set(), set(), set())
    finally:
        if dp is not None:
            dp.remove()
        shutil.rmtree(path, ignore_errors=True)


def test_incompatible_pinned_map_is_refused() -> None:
    path = BPFFS_TEST_ROOT / f"policy-bad-{uuid.uuid4().hex[:8]}"
    (path / "maps").mkdir(parents=True)
    try:
        layout = ["type", "hash", "key", "4", "value", "8", "entries", "16", "name", "endpoints"]
        subprocess.run(["bpftool", "map", "create", str(path / "maps" / "endpoints"), *layout], check=True)
        with pytest.raises(PolicyDatapathError, match="endpoints has"):
            PolicyDatapath(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- real traffic -------------------------------------------------------------------------------


def socket_in(netns: str) -> socket.socket:
    """A TCP socket created in netns."""
    return sockets_in(netns, [socket.SOCK_STREAM])[0]


@dataclass
class NetnsPod:
    netns: str
    host_veth: str
    ip: str


@pytest.fixture
def two_pods() -> Iterator[tuple[NetnsPod, NetnsPod]]:
    """Two namespaces, each behind a veth routed by the host (10.231.{1,2}.0/24)."""
    tag = uuid.uuid4().hex[:6]
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    saved = forward.read_text()
    pods: list[NetnsPod] = []
    try:
        forward.write_text("1")
        for i, side in enumerate("ab", start=1):
            pod = NetnsPod(f"bk-dp-{tag}-{side}", f"bkdp{tag}{side}", f"10.231.{i}.2")
            pods.append(pod)
            _ip("netns", "add", pod.netns)
            _ip("link", "add", pod.host_veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
            _ip("addr", "add", f"10.231.{i}.1/24", "dev", pod.host_veth)
            _ip("link", "set", pod.host_veth, "up")
            _ip("-n", pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
            _ip("-n", pod.netns, "link", "set", "eth0", "up")
            _ip("-n", pod.netns, "route", "add", "default", "via", f"10.231.{i}.1")
        yield pods[0], pods[1]
    finally:
        for pod in pods:
            _ip("netns", "del", pod.netns, check=False)  # takes the veth pair with it
            _ip("link", "del", pod.host_veth, check=False)
        forward.write_text(saved)


def _connect(client_ns: str, server: tuple[str, int], timeout: float) -> socket.socket | None:
    client = socket_in(client_ns)
    client.settimeout(timeout)
    try:
        client.connect(server)
    except (TimeoutError, OSError):
        client.close()
        return None
    return client


def test_real_tcp_connection_follows_policy_changes(
    datapath: PolicyDatapath, two_pods: tuple[NetnsPod, NetnsPod]
) -> None:
    server_pod, client_pod = two_pods
    server_id, client_id = 1000, 1001
    allow = Rule(server_id, Direction.INGRESS, client_id, TCP, 8080, 8080, Action.ALLOW, 7)

    def desired(*rules: Rule) -> DatapathState:
        return DatapathState(
            endpoints=[
                Endpoint(server_pod.host_veth, server_pod.ip, server_id, ingress_enforced=True),
                Endpoint(client_pod.host_veth, client_pod.ip, client_id),
            ],
            ipcache=[
                PrefixIdentity(f"{server_pod.ip}/32", server_id),
                PrefixIdentity(f"{client_pod.ip}/32", client_id),
            ],
            rules=list(rules),
            policy_names={7: "ns/allow-client"},
        )

    datapath.sync(desired(allow))
    for pod in two_pods:
        datapath.attach(pod.host_veth)
    listener = socket_in(server_pod.netns)
    listener.bind((server_pod.ip, 8080))
    listener.listen()
    listener.settimeout(2)
    list(datapath.drops())
    try:
        client = _connect(client_pod.netns, (server_pod.ip, 8080), timeout=2)
        assert client is not None, "the allowed connection failed"
        conn, _ = listener.accept()
        conn.settimeout(0.5)
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.sendall(b"pong")
        assert client.recv(4) == b"pong"

        datapath.sync(desired())  # the allow entry goes away
        client.sendall(b"more")
        with pytest.raises(TimeoutError):
            conn.recv(4)  # the established connection is revoked too
        assert _connect(client_pod.netns, (server_pod.ip, 8080), timeout=0.5) is None
        reasons = {
            (e.saddr, e.dport, e.reason, e.revoked)
            for e in datapath.drops()
            if e.protocol == TCP and e.ifindex == socket.if_nametoindex(server_pod.host_veth)
        }
        assert (client_pod.ip, 8080, DropReason.DEFAULT_DENY, True) in reasons  # revoked
        assert (client_pod.ip, 8080, DropReason.DEFAULT_DENY, False) in reasons

        datapath.sync(desired(allow))
        again = _connect(client_pod.netns, (server_pod.ip, 8080), timeout=2)
        assert again is not None, "the connection was not allowed again"
        again.close()
        client.close()
        conn.close()
    finally:
        listener.close()
        for pod in two_pods:
            datapath.detach(pod.host_veth)


def _tx_packets(ifname: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/tx_packets").read_text())


@pytest.fixture
def fast_path_pods(
    datapath: PolicyDatapath, two_pods: tuple[NetnsPod, NetnsPod]
) -> Iterator[tuple[NetnsPod, NetnsPod, Callable[..., SyncResult]]]:
    """The server (identity 1000, ingress isolated) and client (1001) of two_pods, attached; sync(*rules)."""
    server_pod, client_pod = two_pods

    def sync(*rules: Rule) -> SyncResult:
        return datapath.sync(
            DatapathState(
                endpoints=[
                    Endpoint(server_pod.host_veth, server_pod.ip, 1000, ingress_enforced=True),
                    Endpoint(client_pod.host_veth, client_pod.ip, 1001),
                ],
                ipcache=[PrefixIdentity(f"{server_pod.ip}/32", 1000), PrefixIdentity(f"{client_pod.ip}/32", 1001)],
                rules=list(rules),
                policy_names={7: "ns/allow-client"},
            )
        )

    sync(Rule(1000, Direction.INGRESS, 1001, TCP, 8080, 8080, Action.ALLOW, 7))
    for pod in two_pods:
        datapath.attach(pod.host_veth)
    try:
        yield server_pod, client_pod, sync
    finally:
        for pod in two_pods:
            datapath.detach(pod.host_veth)


def _listen(netns: str, ip: str, port: int) -> socket.socket:
    listener = socket_in(netns)
    listener.bind((ip, port))
    listener.listen()
    listener.settimeout(2)
    return listener


def test_pod_to_pod_traffic_skips_the_host_and_still_meets_the_destination_ingress_policy(
    datapath: PolicyDatapath, fast_path_pods: tuple[NetnsPod, NetnsPod, Callable[..., SyncResult]]
) -> None:
    """Between local endpoints the sender's program judges the destination's ingress and
    redirects into its namespace: the server's host veth transmits nothing, yet a port its
    policy does not allow is dropped there, with the event and counters of that veth."""
    server_pod, client_pod, _ = fast_path_pods
    server_if = socket.if_nametoindex(server_pod.host_veth)
    allowed, denied = _listen(server_pod.netns, server_pod.ip, 8080), _listen(server_pod.netns, server_pod.ip, 8081)
    try:
        warm = _connect(client_pod.netns, (server_pod.ip, 8080), timeout=2)  # resolves the neighbours
        assert warm is not None
        warm.close()
        allowed.accept()[0].close()
        list(datapath.drops())
        before_tx = _tx_packets(server_pod.host_veth)
        before_allow = counter(datapath, CounterKind.ALLOW, 7)[0]

        client = _connect(client_pod.netns, (server_pod.ip, 8080), timeout=2)
        assert client is not None, "the allowed connection failed"
        conn, _ = allowed.accept()
        conn.settimeout(1)
        for _ in range(20):
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
        assert _connect(client_pod.netns, (server_pod.ip, 8081), timeout=0.5) is None
        sent = _tx_packets(server_pod.host_veth) - before_tx
        assert sent <= 2, f"{sent} packets went through the host to the server: no fast path"  # an ARP at most
        assert counter(datapath, CounterKind.ALLOW, 7)[0] - before_allow >= 20  # the server's ingress judged them
        events = [e for e in datapath.drops() if e.ifindex == server_if and e.dport == 8081]
        assert events and {(e.direction, e.reason, e.saddr) for e in events} == {
            (Direction.INGRESS, DropReason.DEFAULT_DENY, client_pod.ip)
        }
        client.close()
        conn.close()
    finally:
        allowed.close()
        denied.close()


def test_service_vip_traffic_and_its_replies_take_the_host_stack(
    datapath: PolicyDatapath, fast_path_pods: tuple[NetnsPod, NetnsPod, Callable[..., SyncResult]]
) -> None:
    """A connection to a VIP that the host DNATs to a local pod works both ways, though the
    VIP is routed at that pod's veth: the fast path leaves the VIP (no endpoint's address)
    to the stack, and the server's replies too (the client tracks the VIP's tuple, not the
    server's), so the stack translates them back."""
    server_pod, client_pod, _ = fast_path_pods
    vip, table = "10.231.99.1", f"bkdp{uuid.uuid4().hex[:6]}"
    listener = _listen(server_pod.netns, server_pod.ip, 8080)
    ruleset = (
        f"table ip {table} {{\n  chain pre {{\n    type nat hook prerouting priority -100;\n"
        f"    ip daddr {vip} tcp dport 80 dnat to {server_pod.ip}:8080\n  }}\n}}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True, capture_output=True)
    _ip("route", "add", f"{vip}/32", "via", server_pod.ip, "dev", server_pod.host_veth)
    try:
        for _ in range(3):  # the first resolves the neighbours; the later ones could take the fast path
            client = _connect(client_pod.netns, (vip, 80), timeout=2)
            assert client is not None, "the connection to the VIP failed"
            conn, _ = listener.accept()
            conn.sendall(b"pong")
            client.settimeout(1)
            assert client.recv(4) == b"pong"
            conn.close()
            client.close()
    finally:
        _ip("route", "del", f"{vip}/32", check=False)
        subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True)
        listener.close()
