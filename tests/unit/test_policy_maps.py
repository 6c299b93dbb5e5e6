"""Encoding of the policy datapath's maps (no kernel)."""

from __future__ import annotations

import ast
import random
import re
import struct
from pathlib import Path

import pytest

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.libbpf import BpfObject
from beekeeper.node_daemon.policy_datapath import FROM_POD, TO_POD, policy_object
from beekeeper.node_daemon.policy_maps import Action, DatapathState, Direction, Endpoint, PrefixIdentity, Rule

POLICY_C = Path(__file__).resolve().parents[2] / "bpf" / "policy.c"


def assert_exact_cover(blocks: list[tuple[int, int]], start: int, end: int) -> None:
    """The blocks are aligned, in order, contiguous, and span exactly [start, end]."""
    expected_first = start
    for first, bits in blocks:
        size = 1 << (16 - bits)
        assert first % size == 0, f"block {first}/{bits} is not aligned"
        assert first == expected_first, f"gap or overlap before {first} in {blocks}"
        expected_first = first + size
    assert expected_first == end + 1, f"{blocks} does not end at {end}"


@pytest.mark.parametrize(
    ("start", "end", "blocks"),
    [
        (0, 0, [(0, 0)]),
        (0, 65535, [(0, 0)]),
        (8080, 8080, [(8080, 16)]),
        (80, 81, [(80, 15)]),
        (8000, 8080, [(8000, 10), (8064, 12), (8080, 16)]),
        (1024, 65535, [(1024, 6), (2048, 5), (4096, 4), (8192, 3), (16384, 2), (32768, 1)]),
    ],
)
def test_port_prefixes_known_ranges(start: int, end: int, blocks: list[tuple[int, int]]) -> None:
    assert pm.port_prefixes(start, end) == blocks


def test_port_prefixes_cover_exactly_and_stay_small() -> None:
    rng = random.Random(7)
    ranges = [(1, 65534), (1, 65535), (0, 1), (65535, 65535)]
    ranges += [tuple(sorted((rng.randrange(65536), rng.randrange(65536)))) for _ in range(2000)]
    for start, end in ranges:
        blocks = pm.port_prefixes(start, end)
        assert_exact_cover(blocks, start, end)
        assert len(blocks) <= 30
    assert len(pm.port_prefixes(1, 65534)) == 30  # the worst case


@pytest.mark.parametrize(("start", "end"), [(5, 4), (-1, 3), (1, 65536)])
def test_port_prefixes_reject_invalid_ranges(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="invalid port range"):
        pm.port_prefixes(start, end)


def rule(proto: int = 6, ports: tuple[int, int] = (0, 0), peer: int = 300, **kw: object) -> Rule:
    fields: dict[str, object] = {
        "local_identity": 256,
        "direction": Direction.INGRESS,
        "peer_identity": peer,
        "protocol": proto,
        "port_start": ports[0],
        "port_end": ports[1],
        "action": Action.ALLOW,
        "policy_index": 1,
    }
    fields.update(kw)
    return Rule(**fields)  # type: ignore[arg-type]


def decode_key(key: bytes) -> tuple[int, int, int, int, int, int]:
    prefixlen, local, peer, direction, proto, port = pm.POLICY_KEY.unpack(key)
    return prefixlen, local, peer, direction, proto, int.from_bytes(port, "big")


def test_policy_keys_by_shape() -> None:
    assert [decode_key(k) for k in pm.policy_keys(rule(proto=0))] == [(72, 256, 300, pm.DIR_INGRESS, 0, 0)]
    assert [decode_key(k) for k in pm.policy_keys(rule(proto=17))] == [(80, 256, 300, pm.DIR_INGRESS, 17, 0)]
    assert [decode_key(k) for k in pm.policy_keys(rule(ports=(8080, 8080), direction=Direction.EGRESS))] == [
        (96, 256, 300, pm.DIR_EGRESS, 6, 8080)
    ]
    assert [decode_key(k)[0] for k in pm.policy_keys(rule(ports=(8000, 8080)))] == [90, 92, 96]
    assert all(len(k) == pm.POLICY_ALLOW.key_size for k in pm.policy_keys(rule(ports=(1, 65534))))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (rule(proto=0, ports=(80, 80)), "ports need a protocol"),
        (rule(proto=1, ports=(80, 80)), "only TCP, UDP and SCTP have ports"),
        (rule(proto=256), "protocol must be"),
        (rule(local_identity=0), "local identity cannot be 0"),
        (rule(peer=1 << 32), "not a 32-bit unsigned integer"),
        (rule(policy_index=pm.NO_POLICY), "is reserved"),
        (rule(direction="sideways"), "sideways"),
    ],
)
def test_invalid_rules_are_rejected(bad: Rule, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pm.encode(DatapathState(rules=[bad]), lambda _: None)


IFINDEX = {"veth-a": 11, "veth-b": 12}


def test_encode_full_state() -> None:
    state = DatapathState(
        endpoints=[
            Endpoint("veth-a", "10.0.0.5", 256, ingress_enforced=True),
            Endpoint("veth-b", None, 257, egress_enforced=True),
            Endpoint("veth-gone", "10.0.0.7", 258),
        ],
        ipcache=[PrefixIdentity("10.0.0.5/32", 256), PrefixIdentity("10.0.0.9", 300), PrefixIdentity("fd00::1/128", 3)],
        cidr_ids=[PrefixIdentity("10.1.2.3/16", 1 << 24)],
        rules=[rule(ports=(8080, 8080)), rule(action=Action.DENY, peer=0, policy_index=2)],
        policy_names={1: "ns/a", 2: "ns/b"},
    )
    encoded = pm.encode(state, IFINDEX.get)
    assert encoded.missing_interfaces == ["veth-gone"]
    assert encoded.ignored_ipv6 == 1
    maps = encoded.maps
    assert maps["endpoints"] == {
        struct.pack("<I", 11): pm.ENDPOINT_VALUE.pack(256, bytes([10, 0, 0, 5]), pm.EP_INGRESS_ENFORCED),
        struct.pack("<I", 12): pm.ENDPOINT_VALUE.pack(257, b"\0\0\0\0", pm.EP_EGRESS_ENFORCED),
    }
    assert maps["ipcache"] == {
        pm.LPM_V4_KEY.pack(32, bytes([10, 0, 0, 5])): struct.pack("<I", 256),
        pm.LPM_V4_KEY.pack(32, bytes([10, 0, 0, 9])): struct.pack("<I", 300),
    }
    # host bits are cleared: the kernel keeps keys as written, and sync compares bytes
    assert maps["cidr_ids"] == {pm.LPM_V4_KEY.pack(16, bytes([10, 1, 0, 0])): struct.pack("<I", 1 << 24)}
    assert [decode_key(k) for k in maps["policy_allow"]] == [(96, 256, 300, 0, 6, 8080)]
    assert [decode_key(k) for k in maps["policy_deny"]] == [(80, 256, 0, 0, 6, 0)]
    assert list(maps) == [spec.name for spec in pm.SYNCED_MAPS]


def test_overlapping_rules_keep_the_lowest_policy_index() -> None:
    state = DatapathState(rules=[rule(policy_index=9), rule(policy_index=4), rule(policy_index=6)])
    (value,) = pm.encode(state, IFINDEX.get).maps["policy_allow"].values()
    assert pm.POLICY_VALUE.unpack(value) == (4,)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (DatapathState(ipcache=[PrefixIdentity("10.0.0.1/32", 300), PrefixIdentity("10.0.0.1", 301)]), "two"),
        (DatapathState(cidr_ids=[PrefixIdentity("10.0.0.0/33", 1 << 24)]), "invalid CIDR"),
        (DatapathState(endpoints=[Endpoint("veth-a", "10.0.0.5", 0)]), "identity 0"),
        (DatapathState(endpoints=[Endpoint("veth-a", "10.0.0.5", 256), Endpoint(11, None, 257)]), "given twice"),
        (DatapathState(endpoints=[Endpoint("veth-a", "fd00::5", 256)]), "IPv4"),
    ],
)
def test_invalid_state_is_rejected(state: DatapathState, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pm.encode(state, lambda i: IFINDEX.get(i) if isinstance(i, str) else i)


def drop_event(policy_index: int, direction: int, reason: int, flags: int) -> bytes:
    return pm.DROP_EVENT.pack(
        123,
        7,
        bytes([10, 0, 0, 1]),
        bytes([10, 0, 0, 2]),
        (40000).to_bytes(2, "big"),
        (8080).to_bytes(2, "big"),
        256,
        300,
        1 << 24,
        policy_index,
        6,
        direction,
        reason,
        flags,
        5,
    )


def test_drop_event_decoding() -> None:
    raw = drop_event(3, pm.DIR_INGRESS, pm.REASON_DENY_RULE, pm.EVENT_REVOKED)
    assert len(raw) == 48  # sizeof(struct drop_event)
    assert pm.decode_drop_event(raw, {3: "ns/deny-db"}) == pm.DropEvent(
        timestamp_ns=123,
        ifindex=7,
        direction=Direction.INGRESS,
        saddr="10.0.0.1",
        daddr="10.0.0.2",
        sport=40000,
        dport=8080,
        protocol=6,
        local_identity=256,
        peer_identity=300,
        peer_cidr_identity=1 << 24,
        reason=pm.DropReason.DENY_RULE,
        policy_index=3,
        policy="ns/deny-db",
        revoked=True,
        suppressed=5,
    )
    default = pm.decode_drop_event(drop_event(pm.NO_POLICY, pm.DIR_EGRESS, pm.REASON_DEFAULT_DENY, 0), {})
    assert (default.policy_index, default.policy, default.reason, default.direction, default.revoked) == (
        None,
        None,
        pm.DropReason.DEFAULT_DENY,
        Direction.EGRESS,
        False,
    )


def test_counters_are_summed_over_cpus_and_named() -> None:
    key = pm.COUNTER_KEY.pack(3, pm.COUNT_ALLOW)
    value = pm.COUNTER_VALUE.pack(2, 200) + pm.COUNTER_VALUE.pack(5, 500)
    assert pm.decode_counter(key, value, 2, {3: "ns/web"}) == pm.Counter(pm.CounterKind.ALLOW, 3, "ns/web", 7, 700)
    drop = pm.decode_counter(pm.COUNTER_KEY.pack(pm.REASON_SPOOFED_SOURCE, pm.COUNT_DROP), value, 1, {})
    assert drop == pm.Counter(pm.CounterKind.DROP, pm.REASON_SPOOFED_SOURCE, "SpoofedSource", 2, 200)


def test_stale_counters() -> None:
    keys = [
        pm.COUNTER_KEY.pack(1, pm.COUNT_ALLOW),
        pm.COUNTER_KEY.pack(2, pm.COUNT_DENY),
        pm.COUNTER_KEY.pack(256, pm.COUNT_DEFAULT_DENY),
        pm.COUNTER_KEY.pack(257, pm.COUNT_DEFAULT_DENY),
        pm.COUNTER_KEY.pack(pm.REASON_MALFORMED, pm.COUNT_DROP),
        pm.COUNTER_KEY.pack(0, pm.COUNT_EVENTS_LOST),
    ]
    assert pm.stale_counter_keys(keys, {1}, {256}) == [keys[1], keys[3]]


def test_flow_decoding() -> None:
    key = pm.CT_KEY.pack(9, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), b"\x9c\x40", b"\x1f\x90", 6)
    value = pm.CT_VALUE.pack(10**9, 4, pm.NO_POLICY, pm.DIR_EGRESS, pm.REASON_DEFAULT_DENY, 0)
    flow = pm.decode_flow(key, value)
    assert (flow.saddr, flow.sport, flow.dport, flow.direction, flow.policy_index, flow.denied) == (
        "10.0.0.1",
        40000,
        8080,
        Direction.EGRESS,
        None,
        pm.DropReason.DEFAULT_DENY,
    )
    # stored under the canonical orientation: the flow's first packet was the key's reverse
    value = pm.CT_VALUE.pack(10**9, 4, 3, pm.DIR_INGRESS, 0, pm.CT_ORIGIN_REVERSED)
    flow = pm.decode_flow(key, value)
    assert (flow.saddr, flow.daddr, flow.sport, flow.dport, flow.policy_index) == (
        "10.0.0.2",
        "10.0.0.1",
        8080,
        40000,
        3,
    )


def _c_defines() -> dict[str, str]:
    return dict(re.findall(r"^#define (BK_\w+) (.+?)(?:\s*/\*.*)?$", POLICY_C.read_text(), re.M))


def _c_int(expr: str) -> int:
    """Value of a C integer constant expression made of literals, * and <<."""

    def value(node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return value(node.left) * value(node.right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.LShift):
            return value(node.left) << value(node.right)
        raise ValueError(f"unsupported C expression {expr!r}")

    return value(ast.parse(expr.replace("ULL", ""), mode="eval").body)


def test_constants_match_policy_c() -> None:
    """policy_maps mirrors policy.c's numbers; both must change together."""
    c = _c_defines()
    mirrored = {
        "BK_DIR_INGRESS": pm.DIR_INGRESS,
        "BK_DIR_EGRESS": pm.DIR_EGRESS,
        "BK_EP_INGRESS_ENFORCED": pm.EP_INGRESS_ENFORCED,
        "BK_EP_EGRESS_ENFORCED": pm.EP_EGRESS_ENFORCED,
        "BK_ID_ANY": pm.ID_ANY,
        "BK_ID_WORLD": pm.ID_WORLD,
        "BK_NO_POLICY": pm.NO_POLICY,
        "BK_REASON_DENY_RULE": pm.REASON_DENY_RULE,
        "BK_REASON_DEFAULT_DENY": pm.REASON_DEFAULT_DENY,
        "BK_REASON_SPOOFED_SOURCE": pm.REASON_SPOOFED_SOURCE,
        "BK_REASON_UNSUPPORTED_L3": pm.REASON_UNSUPPORTED_L3,
        "BK_REASON_MALFORMED": pm.REASON_MALFORMED,
        "BK_COUNT_ALLOW": pm.COUNT_ALLOW,
        "BK_COUNT_DENY": pm.COUNT_DENY,
        "BK_COUNT_DEFAULT_DENY": pm.COUNT_DEFAULT_DENY,
        "BK_COUNT_DROP": pm.COUNT_DROP,
        "BK_COUNT_EVENTS_LOST": pm.COUNT_EVENTS_LOST,
        "BK_COUNT_EVENTS_SUPPRESSED": pm.COUNT_EVENTS_SUPPRESSED,
        "BK_CT_ORIGIN_REVERSED": pm.CT_ORIGIN_REVERSED,
        "BK_MAX_DROP_LIMITS": pm.MAX_DROP_LIMITS,
        "BK_DROP_EVENT_INTERVAL_NS": pm.DROP_EVENT_INTERVAL_NS,
        "BK_EVENT_REVOKED": pm.EVENT_REVOKED,
        "BK_PREFIX_ANY_PROTOCOL": pm.PREFIX_ANY_PROTOCOL,
        "BK_PREFIX_ANY_PORT": pm.PREFIX_ANY_PORT,
        "BK_PREFIX_FULL": pm.PREFIX_FULL,
        "BK_MAX_ENDPOINTS": pm.MAX_ENDPOINTS,
        "BK_MAX_IPCACHE": pm.MAX_IPCACHE,
        "BK_MAX_CIDR_IDS": pm.MAX_CIDR_IDS,
        "BK_MAX_POLICY": pm.MAX_POLICY,
        "BK_MAX_CONNTRACK": pm.MAX_CONNTRACK,
        "BK_MAX_COUNTERS": pm.MAX_COUNTERS,
        "BK_EVENTS_BYTES": pm.EVENTS_BYTES,
    }
    assert {name: _c_int(c[name]) for name in mirrored} == mirrored


def test_map_specs_match_policy_c_declarations() -> None:
    declared = re.findall(
        r"^BK_MAP\(BPF_MAP_TYPE_(\w+), [^,]+, [^,]+, (\w+), (\w+), (\w+)\);", POLICY_C.read_text(), re.M
    )
    c = _c_defines()
    types = {"HASH": pm.MAP_HASH, "LPM_TRIE": pm.MAP_LPM_TRIE, "LRU_HASH": pm.MAP_LRU_HASH, "ARRAY": pm.MAP_ARRAY}
    types["PERCPU_HASH"] = pm.MAP_PERCPU_HASH
    flags = {"0": 0, "BPF_F_NO_PREALLOC": pm.BPF_F_NO_PREALLOC}
    specs = {s.name: (s.type, s.max_entries, s.flags) for s in pm.MAP_SPECS if s.type != pm.MAP_RINGBUF}
    assert {name: (types[kind], _c_int(c.get(size, size)), flags[flag]) for kind, name, size, flag in declared} == specs


def test_compiled_object_has_the_mirrored_map_layouts() -> None:
    """policy.o, as libbpf reads it (BTF sizes of every key and value), has exactly the maps of MAP_SPECS:
    a pinned map of an earlier build, bcc-built ones included, is reused only when these agree."""
    with BpfObject.open(policy_object(), name="policy") as obj:
        maps = {m.name: (m.type, m.key_size, m.value_size, m.max_entries) for m in obj.maps()}
        programs = {p.name: p.type for p in obj.programs()}
    assert maps == {s.name: (s.type, s.key_size, s.value_size, s.max_entries) for s in pm.MAP_SPECS}
    assert programs == {FROM_POD: bpf.PROG_TYPE_SCHED_CLS, TO_POD: bpf.PROG_TYPE_SCHED_CLS}
