"""What the policy datapath's maps contain: the desired state, and its byte encoding.

Pure code (no kernel): the operator computes a DatapathState; encode() turns it into the
exact keys and values of bpf/policy.c's maps, so the loader can diff them against the
kernel's and write only the changes. The constants and struct layouts mirror policy.c;
a unit test compares the constants, and the loader compares the sizes with the kernel's
maps when it loads them.

A policy rule becomes LPM-trie entries keyed {local identity, peer identity, direction,
protocol, port}: "any protocol" and "any port" are shorter prefixes, and a port range
is split into the few aligned power-of-two blocks that cover it exactly (port_prefixes),
so one lookup per peer identity answers for every rule and range at once.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

# --- constants of bpf/policy.c ------------------------------------------------------------

DIR_INGRESS = 0
DIR_EGRESS = 1
EP_INGRESS_ENFORCED = 1
EP_EGRESS_ENFORCED = 2

# Identities: 0 = any peer (policy keys only), 1 = host, 2 = world (no ipcache entry);
# the operator gives pods identities from 256 and ipBlock prefixes from 1 << 24.
ID_ANY = 0
ID_WORLD = 2
NO_POLICY = 0xFFFFFFFF

REASON_DENY_RULE = 1
REASON_DEFAULT_DENY = 2
REASON_SPOOFED_SOURCE = 3
REASON_UNSUPPORTED_L3 = 4
REASON_MALFORMED = 5

COUNT_ALLOW = 1
COUNT_DENY = 2
COUNT_DEFAULT_DENY = 3
COUNT_DROP = 4
COUNT_EVENTS_LOST = 5
COUNT_EVENTS_SUPPRESSED = 6

CT_ORIGIN_REVERSED = 1

EVENT_REVOKED = 1

PREFIX_ANY_PROTOCOL = 72
PREFIX_ANY_PORT = 80
PREFIX_FULL = 96

PROTO_ANY = 0
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_SCTP = 132
PORT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP})

MAX_ENDPOINTS = 4096
MAX_IPCACHE = 524288
MAX_CIDR_IDS = 65536
MAX_POLICY = 262144
MAX_CONNTRACK = 131072
MAX_COUNTERS = 16384
MAX_DROP_LIMITS = 16384
EVENTS_BYTES = 256 * 1024
DROP_EVENT_INTERVAL_NS = 1_000_000_000

_U32 = (1 << 32) - 1


# --- map layouts ---------------------------------------------------------------------------

# enum bpf_map_type
MAP_HASH = 1
MAP_ARRAY = 2
MAP_PERCPU_HASH = 5
MAP_LRU_HASH = 9
MAP_LPM_TRIE = 11
MAP_RINGBUF = 27

BPF_F_NO_PREALLOC = 1  # map_flags: required by LPM tries, saves the counters' preallocation


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    """map_flags: part of the layout, a pinned map is reused only with the same."""


LPM_V4_KEY = struct.Struct("<I4s")  # prefixlen, address
IDENTITY_VALUE = struct.Struct("<I")
ENDPOINT_VALUE = struct.Struct("<I4sI")  # identity, ip, flags
POLICY_KEY = struct.Struct("<IIIBB2s")  # prefixlen, local id, peer id, direction, protocol, port (be16)
POLICY_VALUE = struct.Struct("<I")  # policy index
CT_KEY = struct.Struct("<I4s4s2s2sB3x")  # ifindex, saddr, daddr, sport, dport, protocol
CT_VALUE = struct.Struct("<QIIBBB5x")  # expires_ns, epoch, policy index, direction, denied reason, flags
COUNTER_KEY = struct.Struct("<II")  # id, kind
COUNTER_VALUE = struct.Struct("<QQ")  # packets, bytes (one per possible CPU)
DROP_EVENT = struct.Struct("<QI4s4s2s2sIIIIBBBBI")  # ..., suppressed
LIMIT_KEY = struct.Struct("<I4s4s2sBBBB2x")  # ifindex, saddr, daddr, dport, protocol, direction, reason, flags
LIMIT_VALUE = struct.Struct("<QI4x")  # next_ns, suppressed
EPOCH_KEY = struct.Struct("<I")

ENDPOINTS = MapSpec("endpoints", MAP_HASH, 4, ENDPOINT_VALUE.size, MAX_ENDPOINTS)
IPCACHE = MapSpec("ipcache", MAP_LPM_TRIE, LPM_V4_KEY.size, IDENTITY_VALUE.size, MAX_IPCACHE, BPF_F_NO_PREALLOC)
CIDR_IDS = MapSpec("cidr_ids", MAP_LPM_TRIE, LPM_V4_KEY.size, IDENTITY_VALUE.size, MAX_CIDR_IDS, BPF_F_NO_PREALLOC)
POLICY_ALLOW = MapSpec("policy_allow", MAP_LPM_TRIE, POLICY_KEY.size, POLICY_VALUE.size, MAX_POLICY, BPF_F_NO_PREALLOC)
POLICY_DENY = MapSpec("policy_deny", MAP_LPM_TRIE, POLICY_KEY.size, POLICY_VALUE.size, MAX_POLICY, BPF_F_NO_PREALLOC)
CONNTRACK = MapSpec("conntrack", MAP_LRU_HASH, CT_KEY.size, CT_VALUE.size, MAX_CONNTRACK)
POLICY_EPOCH = MapSpec("policy_epoch", MAP_ARRAY, 4, 4, 1)
COUNTERS = MapSpec("counters", MAP_PERCPU_HASH, COUNTER_KEY.size, COUNTER_VALUE.size, MAX_COUNTERS, BPF_F_NO_PREALLOC)
DROP_LIMITS = MapSpec("drop_limits", MAP_LRU_HASH, LIMIT_KEY.size, LIMIT_VALUE.size, MAX_DROP_LIMITS)
DROP_EVENTS = MapSpec("drop_events", MAP_RINGBUF, 0, 0, EVENTS_BYTES)
MAP_SPECS = (
    ENDPOINTS,
    IPCACHE,
    CIDR_IDS,
    POLICY_ALLOW,
    POLICY_DENY,
    CONNTRACK,
    POLICY_EPOCH,
    COUNTERS,
    DROP_LIMITS,
    DROP_EVENTS,
)

SYNCED_MAPS = (IPCACHE, CIDR_IDS, POLICY_DENY, POLICY_ALLOW, ENDPOINTS)
"""The maps sync() owns, in the order upserts are written (deletes go in reverse): a new
endpoint's enforcement is switched on only after its rules and peers are in place, and
switched off before they are removed."""


# --- desired state -------------------------------------------------------------------------


class Direction(StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"

    @property
    def code(self) -> int:
        return DIR_INGRESS if self is Direction.INGRESS else DIR_EGRESS

    @classmethod
    def from_code(cls, code: int) -> Direction:
        return cls.INGRESS if code == DIR_INGRESS else cls.EGRESS


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class DropReason(StrEnum):
    DENY_RULE = "DenyRule"
    DEFAULT_DENY = "DefaultDeny"
    SPOOFED_SOURCE = "SpoofedSource"
    UNSUPPORTED_L3 = "UnsupportedL3"
    MALFORMED = "Malformed"
    UNKNOWN = "Unknown"


_REASONS = {
    REASON_DENY_RULE: DropReason.DENY_RULE,
    REASON_DEFAULT_DENY: DropReason.DEFAULT_DENY,
    REASON_SPOOFED_SOURCE: DropReason.SPOOFED_SOURCE,
    REASON_UNSUPPORTED_L3: DropReason.UNSUPPORTED_L3,
    REASON_MALFORMED: DropReason.MALFORMED,
}


@dataclass(frozen=True)
class Endpoint:
    """A local pod: its host-side veth (name or ifindex), IPv4 address and identity.

    ip None turns off the source address check of packets the pod sends.
    """

    interface: str | int
    ip: str | None
    identity: int
    ingress_enforced: bool = False
    egress_enforced: bool = False


@dataclass(frozen=True)
class PrefixIdentity:
    """cidr -> identity: an ipcache entry (pod or host IP, /32) or a cidr_ids entry (ipBlock)."""

    cidr: str
    identity: int


@dataclass(frozen=True)
class Rule:
    """One allow or deny entry: local identity, direction, peer identity (0 = any),
    protocol (0 = any, then no ports), ports [port_start, port_end] ((0, 0) = any)."""

    local_identity: int
    direction: Direction
    peer_identity: int
    protocol: int
    port_start: int
    port_end: int
    action: Action
    policy_index: int


@dataclass
class DatapathState:
    endpoints: list[Endpoint] = field(default_factory=list)
    ipcache: list[PrefixIdentity] = field(default_factory=list)
    cidr_ids: list[PrefixIdentity] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    policy_names: dict[int, str] = field(default_factory=dict)
    """policy index -> "namespace/name", for counters and drop events."""


# --- encoding --------------------------------------------------------------------------------


def port_prefixes(start: int, end: int) -> list[tuple[int, int]]:
    """The aligned blocks (first port, prefix bits) that cover [start, end] exactly.

    (0, 0) means any port: one block of 0 bits. A range needs at most 30 blocks: one port
    or any port takes 1, 8000-8080 takes 3, 8000-8999 and 1024-65535 take 6.
    """
    if (start, end) == (0, 0):
        return [(0, 0)]
    if not 0 <= start <= end <= 0xFFFF:
        raise ValueError(f"invalid port range {start}-{end}")
    blocks = []
    while start <= end:
        size = start & -start if start else 1 << 16
        while start + size - 1 > end:
            size >>= 1
        blocks.append((start, 17 - size.bit_length()))
        start += size
    return blocks


def _u32(value: int, what: str) -> int:
    if not 0 <= value <= _U32:
        raise ValueError(f"{what} {value} is not a 32-bit unsigned integer")
    return value


def policy_keys(rule: Rule) -> list[bytes]:
    """The LPM-trie keys of one rule (bits past each prefix are zero, as the kernel stores them)."""
    if _u32(rule.local_identity, "local identity") == ID_ANY:
        raise ValueError(f"rule {rule}: the local identity cannot be 0 (any)")
    _u32(rule.peer_identity, "peer identity")
    if not 0 <= rule.protocol <= 255:
        raise ValueError(f"rule {rule}: protocol must be 0 (any) or an IP protocol number")
    direction = Direction(rule.direction).code
    any_port = (rule.port_start, rule.port_end) == (0, 0)
    if rule.protocol == PROTO_ANY:
        if not any_port:
            raise ValueError(f"rule {rule}: ports need a protocol (TCP, UDP or SCTP)")
        return [POLICY_KEY.pack(PREFIX_ANY_PROTOCOL, rule.local_identity, rule.peer_identity, direction, 0, b"\0\0")]
    if not any_port and rule.protocol not in PORT_PROTOCOLS:
        raise ValueError(f"rule {rule}: only TCP, UDP and SCTP have ports")
    return [
        POLICY_KEY.pack(
            PREFIX_ANY_PORT + bits,
            rule.local_identity,
            rule.peer_identity,
            direction,
            rule.protocol,
            port.to_bytes(2, "big"),
        )
        for port, bits in port_prefixes(rule.port_start, rule.port_end)
    ]


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise ValueError(f"invalid CIDR {cidr!r}: {exc}") from None


def lpm_v4_key(net: ipaddress.IPv4Network) -> bytes:
    return LPM_V4_KEY.pack(net.prefixlen, net.network_address.packed)


def endpoint_value(ep: Endpoint) -> bytes:
    flags = (EP_INGRESS_ENFORCED if ep.ingress_enforced else 0) | (EP_EGRESS_ENFORCED if ep.egress_enforced else 0)
    try:
        ip = ipaddress.IPv4Address(ep.ip).packed if ep.ip else b"\0\0\0\0"
    except ValueError:
        raise ValueError(f"endpoint {ep.interface}: {ep.ip!r} is not an IPv4 address (IPv6 is not handled)") from None
    return ENDPOINT_VALUE.pack(_u32(ep.identity, "endpoint identity"), ip, flags)


@dataclass
class EncodedState:
    maps: dict[str, dict[bytes, bytes]]
    """map name -> key -> value, for every map in SYNCED_MAPS."""
    missing_interfaces: list[str | int] = field(default_factory=list)
    """Endpoints left out because their interface does not exist (yet)."""
    ignored_ipv6: int = 0
    """IPv6 prefixes left out: the datapath does not look them up."""


def _prefix_map(entries: Iterable[PrefixIdentity], what: str) -> tuple[dict[bytes, bytes], int]:
    out: dict[bytes, bytes] = {}
    owners: dict[bytes, PrefixIdentity] = {}
    ipv6 = 0
    for entry in entries:
        net = _network(entry.cidr)
        if net.version != 4:
            ipv6 += 1
            continue
        key, value = lpm_v4_key(net), IDENTITY_VALUE.pack(_u32(entry.identity, f"{what} identity"))
        if key in out and out[key] != value:
            raise ValueError(f"{what}: {net} is given two identities ({owners[key].identity} and {entry.identity})")
        out[key], owners[key] = value, entry
    return out, ipv6


def encode(state: DatapathState, ifindex_of: Callable[[str | int], int | None]) -> EncodedState:
    """The full desired content of the synced maps; raises ValueError on invalid input.

    When several rules yield the same key, the lowest policy index is stored (counters
    and drop reasons then name that policy).
    """
    ipcache, ipv6 = _prefix_map(state.ipcache, "ipcache")
    cidr_ids, cidr_ipv6 = _prefix_map(state.cidr_ids, "cidr_ids")
    allow: dict[bytes, int] = {}
    deny: dict[bytes, int] = {}
    for rule in state.rules:
        target = allow if Action(rule.action) is Action.ALLOW else deny
        index = _u32(rule.policy_index, "policy index")
        if index == NO_POLICY:
            raise ValueError(f"rule {rule}: policy index {NO_POLICY:#x} is reserved")
        for key in policy_keys(rule):
            target[key] = min(index, target.get(key, index))
    endpoints: dict[bytes, bytes] = {}
    missing: list[str | int] = []
    for ep in state.endpoints:
        if ep.identity == ID_ANY:
            raise ValueError(f"endpoint {ep.interface}: identity 0 means any and cannot be a pod's")
        value = endpoint_value(ep)
        ifindex = ifindex_of(ep.interface)
        if ifindex is None:
            missing.append(ep.interface)
            continue
        key = struct.pack("<I", ifindex)
        if key in endpoints:
            raise ValueError(f"endpoint {ep.interface}: interface {ifindex} is given twice")
        endpoints[key] = value
    return EncodedState(
        maps={
            IPCACHE.name: ipcache,
            CIDR_IDS.name: cidr_ids,
            POLICY_DENY.name: {k: POLICY_VALUE.pack(v) for k, v in deny.items()},
            POLICY_ALLOW.name: {k: POLICY_VALUE.pack(v) for k, v in allow.items()},
            ENDPOINTS.name: endpoints,
        },
        missing_interfaces=missing,
        ignored_ipv6=ipv6 + cidr_ipv6,
    )


# --- decoding --------------------------------------------------------------------------------


def _ip(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


def _port(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


@dataclass(frozen=True)
class DropEvent:
    """Why one packet was dropped. The tuple, direction and peer identities are those of
    the flow's first packet, which policy judged: for a reply they are reversed."""

    timestamp_ns: int
    """CLOCK_MONOTONIC, like time.monotonic_ns()."""
    ifindex: int
    direction: Direction
    saddr: str
    daddr: str
    sport: int
    dport: int
    protocol: int
    local_identity: int
    peer_identity: int
    peer_cidr_identity: int
    reason: DropReason
    policy_index: int | None
    policy: str | None
    revoked: bool
    """The flow was allowed, until a policy change denied it."""
    suppressed: int = 0
    """Drops of the same flow key (the tuple without the origin's source port) and reason
    that the datapath's per-key event limit left unreported since the previous event."""


def decode_drop_event(raw: bytes, policy_names: Mapping[int, str]) -> DropEvent:
    (
        ts,
        ifindex,
        saddr,
        daddr,
        sport,
        dport,
        local_id,
        peer_id,
        cidr_id,
        index,
        proto,
        direction,
        reason,
        flags,
        held,
    ) = DROP_EVENT.unpack_from(raw)
    policy_index = None if index == NO_POLICY else index
    return DropEvent(
        timestamp_ns=ts,
        ifindex=ifindex,
        direction=Direction.from_code(direction),
        saddr=_ip(saddr),
        daddr=_ip(daddr),
        sport=_port(sport),
        dport=_port(dport),
        protocol=proto,
        local_identity=local_id,
        peer_identity=peer_id,
        peer_cidr_identity=cidr_id,
        reason=_REASONS.get(reason, DropReason.UNKNOWN),
        policy_index=policy_index,
        policy=policy_names.get(policy_index) if policy_index is not None else None,
        revoked=bool(flags & EVENT_REVOKED),
        suppressed=held,
    )


@dataclass(frozen=True)
class FlowEntry:
    """A conntrack entry: the tuple of the flow's first packet at one endpoint."""

    ifindex: int
    saddr: str
    daddr: str
    sport: int
    dport: int
    protocol: int
    direction: Direction
    epoch: int
    expires_ns: int
    policy_index: int | None
    """The allow entry that admitted the flow, the deny entry that revoked it, or None."""
    denied: DropReason | None
    """Why a policy change revoked the flow; None while it is allowed."""


def decode_flow(key: bytes, value: bytes) -> FlowEntry:
    ifindex, saddr, daddr, sport, dport, proto = CT_KEY.unpack(key)
    expires, epoch, index, direction, denied, flags = CT_VALUE.unpack(value)
    if flags & CT_ORIGIN_REVERSED:  # stored under its canonical orientation: the first packet was the reverse
        saddr, daddr, sport, dport = daddr, saddr, dport, sport
    return FlowEntry(
        ifindex=ifindex,
        saddr=_ip(saddr),
        daddr=_ip(daddr),
        sport=_port(sport),
        dport=_port(dport),
        protocol=proto,
        direction=Direction.from_code(direction),
        epoch=epoch,
        expires_ns=expires,
        policy_index=None if index == NO_POLICY else index,
        denied=_REASONS.get(denied, DropReason.UNKNOWN) if denied else None,
    )


class CounterKind(StrEnum):
    ALLOW = "allow"
    """Packets passed by an allow entry; id = policy index."""
    DENY = "deny"
    """Packets dropped by a deny entry; id = policy index."""
    DEFAULT_DENY = "default_deny"
    """Packets dropped for want of an allow entry; id = local endpoint identity."""
    DROP = "drop"
    """Other drops; id = reason code (name = DropReason)."""
    EVENTS_LOST = "events_lost"
    """Drop events the ring buffer had no room for."""
    EVENTS_SUPPRESSED = "events_suppressed"
    """Drops the per-flow event limit left unreported (counted, and summed in the flow's next event)."""


_KINDS = {
    COUNT_ALLOW: CounterKind.ALLOW,
    COUNT_DENY: CounterKind.DENY,
    COUNT_DEFAULT_DENY: CounterKind.DEFAULT_DENY,
    COUNT_DROP: CounterKind.DROP,
    COUNT_EVENTS_LOST: CounterKind.EVENTS_LOST,
    COUNT_EVENTS_SUPPRESSED: CounterKind.EVENTS_SUPPRESSED,
}


@dataclass(frozen=True)
class Counter:
    kind: CounterKind
    id: int
    name: str | None
    """Policy name (allow, deny) or drop reason (drop)."""
    packets: int
    bytes: int


def decode_counter(key: bytes, value: bytes, cpus: int, policy_names: Mapping[int, str]) -> Counter | None:
    """One counters entry summed over CPUs (value holds one 8-byte aligned slot per CPU)."""
    ident, code = COUNTER_KEY.unpack(key)
    kind = _KINDS.get(code)
    if kind is None:
        return None
    packets = byte_count = 0
    for cpu in range(cpus):
        p, b = COUNTER_VALUE.unpack_from(value, cpu * COUNTER_VALUE.size)
        packets += p
        byte_count += b
    if kind in (CounterKind.ALLOW, CounterKind.DENY):
        name = policy_names.get(ident)
    elif kind is CounterKind.DROP:
        name = _REASONS.get(ident, DropReason.UNKNOWN).value
    else:
        name = None
    return Counter(kind, ident, name, packets, byte_count)


def stale_counter_keys(keys: Iterable[bytes], policy_indexes: set[int], local_identities: set[int]) -> list[bytes]:
    """Counter keys of policies and endpoint identities that no longer exist."""
    stale = []
    for key in keys:
        ident, code = COUNTER_KEY.unpack(key)
        if (code in (COUNT_ALLOW, COUNT_DENY) and ident not in policy_indexes) or (
            code == COUNT_DEFAULT_DENY and ident not in local_identities
        ):
            stale.append(key)
    return stale
