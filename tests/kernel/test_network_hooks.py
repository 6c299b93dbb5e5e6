"""XDP and tc programs on a real veth pair, moved by real packets."""

from __future__ import annotations

import secrets
import socket
import subprocess

import pytest
from support import XDP_COUNT_UDP

from beekeeper.node_daemon.backend import AttachSpec, Field, Layout, Phase, ProgramUnit, Reason

pytestmark = pytest.mark.kernel


TC_DROP_TCP_PORT = r"""
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>

struct flow {
    u32 saddr;
    u16 dport;
};
BPF_PERCPU_HASH(drops, struct flow, u64, 64);

int drop_port(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_UNSPEC;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP)
        return TC_ACT_UNSPEC;
    struct tcphdr *tcp = (void *)(ip + 1);
    if ((void *)(tcp + 1) > end || tcp->dest != bpf_htons(PORT))
        return TC_ACT_UNSPEC;
    struct flow key = {.saddr = ip->saddr, .dport = tcp->dest};
    u64 zero = 0;
    u64 *count = drops.lookup_or_try_init(&key, &zero);
    if (count)
        *count += 1;
    return TC_ACT_SHOT;
}
"""

TC_ORDER = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

BPF_ARRAY(first, u32, 1);

/* Only the test's probe claims: a stray packet on the fresh veth (IPv6 neighbour discovery)
   may cross the first program before the second is attached. */
static __always_inline int claim(struct __sk_buff *skb, u32 me) {
    u8 proto = 0;
    u16 dport = 0;
    if (skb->protocol != bpf_htons(ETH_P_IP)
        || bpf_skb_load_bytes(skb, ETH_HLEN + 9, &proto, 1) < 0 || proto != IPPROTO_UDP
        || bpf_skb_load_bytes(skb, ETH_HLEN + 20 + 2, &dport, 2) < 0 || dport != bpf_htons(40001))
        return TC_ACT_UNSPEC;
    int zero = 0;
    u32 *who = first.lookup(&zero);
    if (who && *who == 0)
        *who = me;
    return TC_ACT_UNSPEC;
}
int runs_late(struct __sk_buff *skb) { return claim(skb, 1); }
int runs_early(struct __sk_buff *skb) { return claim(skb, 2); }
"""


def packets(backend, key: str) -> int:
    (entry,) = backend.read_map(key, "packets")
    return entry.values[0]


def test_xdp_counts_packets_in_generic_and_native_mode(backend, veth):
    port = 40000
    pattern = veth.host_if[:-2] + "*"

    def unit(mode: str) -> ProgramUnit:
        return ProgramUnit(
            "xdp-counter",
            XDP_COUNT_UDP,
            cflags=[f"-DPORT={port}"],
            programs=[
                AttachSpec("count_udp", "xdp", interface_pattern=pattern, xdp_mode=mode),
                AttachSpec("count_udp", "xdp", interface_pattern="bk-no-such-*", xdp_mode=mode),
            ],
        )

    on_pattern, no_match = backend.apply(unit("generic"))
    assert on_pattern.phase == Phase.ATTACHED, on_pattern
    assert on_pattern.attach_points == (f"xdp/generic:{veth.host_if}",)
    assert (no_match.phase, no_match.reason) == (Phase.LOADED, Reason.NO_MATCHING_INTERFACES)
    assert packets(backend, "xdp-counter") == 0

    veth.send_udp(port, 50)
    veth.send_udp(port + 1, 10)  # another port: not counted
    assert packets(backend, "xdp-counter") == 50

    native, _ = backend.apply(unit("native"))
    assert native.phase == Phase.ATTACHED, native
    assert native.attach_points == (f"xdp/native:{veth.host_if}",)
    assert native.program_ids == on_pattern.program_ids, "a mode change must not reload the program"
    veth.send_udp(port, 30)
    assert packets(backend, "xdp-counter") == 80


def test_tc_ingress_drops_a_tcp_port_until_removed(backend, veth):
    server = socket.socket()
    server.bind((veth.host_ip, 0))
    server.listen(16)
    port = server.getsockname()[1]

    def connects() -> bool:
        with veth.socket(socket.SOCK_STREAM) as client:
            client.settimeout(0.5)
            try:
                client.connect((veth.host_ip, port))
            except OSError:
                return False
            return True

    with server:
        assert connects(), "baseline: the port must be reachable before the program"
        unit = ProgramUnit(
            "tc-drop",
            TC_DROP_TCP_PORT,
            cflags=[f"-DPORT={port}"],
            programs=[AttachSpec("drop_port", "tc", interfaces=[veth.host_if], direction="ingress")],
        )
        (report,) = backend.apply(unit)
        assert report.phase == Phase.ATTACHED, report
        assert report.attach_points == (f"tcx/ingress:{veth.host_if}",)

        assert not connects()
        layout = Layout("struct", [Field("saddr", "ipv4"), Field("dport", "be16")])
        (entry,) = backend.read_map("tc-drop", "drops", layout)
        assert entry.key == {"saddr": veth.ns_ip, "dport": port}
        assert entry.values[0] >= 1  # SYN and its retransmits, summed over CPUs

        backend.remove("tc-drop")
        assert connects()


def test_tc_priority_orders_programs_on_one_hook(backend, veth):
    unit = ProgramUnit(
        "tc-order",
        TC_ORDER,
        programs=[
            AttachSpec("runs_late", "tc", interfaces=[veth.host_if], priority=20),
            AttachSpec("runs_early", "tc", interfaces=[veth.host_if], priority=10),
        ],
    )
    assert [r.phase for r in backend.apply(unit)] == [Phase.ATTACHED, Phase.ATTACHED]
    veth.send_udp(40001, 1)
    (entry,) = backend.read_map("tc-order", "first")
    assert entry.values == (2,), "the lower priority number must run first, whatever the attach order"


def test_xdp_native_mode_on_a_driver_without_it_keeps_the_generic_attachment(backend, cleanup):
    ifb = f"bkd{secrets.token_hex(3)}"  # an ifb device: its driver has no native XDP
    subprocess.run(["ip", "link", "add", ifb, "type", "ifb"], check=True)
    cleanup.append(lambda: subprocess.run(["ip", "link", "del", ifb], check=False))

    def unit(mode: str) -> ProgramUnit:
        spec = AttachSpec("count_udp", "xdp", interfaces=[ifb], xdp_mode=mode)
        return ProgramUnit("xdp-no-native", XDP_COUNT_UDP, cflags=["-DPORT=1"], programs=[spec])

    (generic,) = backend.apply(unit("generic"))
    assert generic.phase == Phase.ATTACHED, generic
    (native,) = backend.apply(unit("native"))
    assert (native.phase, native.reason) == (Phase.FAILED, Reason.ATTACH_FAILED)
    assert "no native XDP; use xdp mode generic" in native.message
    assert native.attach_points == (f"xdp/generic:{ifb}",), "the generic attachment must be restored"
