// SPDX-License-Identifier: GPL-2.0
/*
 * beekeeper NetworkIdentityPolicy datapath: two tc programs, loaded once per node and
 * attached (tcx links) to the host-side veth of every local pod.
 *
 *   policy_from_pod  tcx ingress of the veth: packets sent BY the pod  = the pod's egress
 *   policy_to_pod    tcx egress of the veth:  packets sent TO the pod  = the pod's ingress
 *
 * Per packet: find the local endpoint by skb->ifindex; pass if this is the reply or
 * the continuation of a flow conntrack already allowed at this endpoint; otherwise
 * resolve the peer's identities (pod/host/world from ipcache, CIDR from cidr_ids, and
 * the wildcard 0), drop if any deny entry matches, pass if any allow entry matches,
 * else drop (default deny) when the direction is enforced. Every sync of the maps moves
 * policy_epoch; a tracked flow is judged again on its first packet after that, and one
 * the new policy denies is revoked in both directions (its entry stays, marked denied).
 * Headers are read in place (direct packet access); a flow's entry is stored under its
 * canonical orientation, so a packet of either direction finds it with one lookup.
 *
 * Conntrack runs for every endpoint, isolated or not, deliberately: an entry made while
 * a direction is not enforced is what lets the replies of that flow through once a
 * policy isolates the other direction, or the pod, later (a pod's connections do not
 * break when its first policy arrives; those the new policy denies are revoked as at
 * any change). Skipping it for unisolated pods would save ~30% of their BPF time but
 * make a policy's arrival cut the pod's established connections in the reply direction.
 *
 * Fast path between local pods (see forward()): policy_from_pod, once the sender's
 * egress allows a packet the host would route to another local endpoint, judges it by
 * that endpoint's ingress policy on the spot (the same conntrack entries, counters and
 * drop events as policy_to_pod on that veth) and redirects it into the destination's
 * namespace (bpf_redirect_peer), so pod-to-pod traffic on one node skips the host stack:
 * its netfilter hooks (iptables/nft FORWARD, conntrack) and any tc program after this one
 * on the two host-side veths do not see it. Service VIPs, the replies of flows the stack
 * translated, and anything unusual take the stack as before.
 *
 * Drop events are limited per flow key (tuple without the origin's source port, reason,
 * revoked or not) to one per BK_DROP_EVENT_INTERVAL_NS; the drops in between are counted
 * (BK_COUNT_EVENTS_SUPPRESSED) and summed into that key's next event, so a flood cannot
 * fill the ring buffer and hide the events explaining other drops. Every drop is still
 * counted by its reason; events the ring buffer had no room for are counted as lost.
 *
 * Built once, at build time, with `clang -target bpf -O2 -g` (scripts/build_bpf.py) into
 * policy.o, which the package ships and the daemon loads through libbpf: nodes need no
 * kernel headers or compiler. Only UAPI headers are used and no kernel struct is read,
 * so the object has no CO-RE relocations to apply; the programs see only __sk_buff and
 * packet data, whose accesses the verifier rewrites for the running kernel. The fast path
 * needs bpf_fib_lookup and bpf_redirect_peer from tc ingress (Linux 5.10; tcx 6.6).
 *
 * Every map is pinned so that a restarted daemon adopts it; the loader
 * (node_daemon/policy_datapath.py) pins them, and reuses the pins of an earlier build,
 * bcc-built ones included: names, types, flags, key and value layouts must not change
 * (a unit test compares them, and the numbers below, with node_daemon/policy_maps.py).
 *
 * Only IPv4 is evaluated. ARP always passes; any other ethertype (IPv6 included)
 * passes when the direction is not enforced and is dropped when it is.
 * Returns TC_ACT_UNSPEC (tcx "next") to pass, so programs attached after this one
 * still run; TC_ACT_SHOT to drop.
 */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;

char LICENSE[] SEC("license") = "GPL";

/* Directions as the pod sees them (NetworkPolicy policyTypes). */
#define BK_DIR_INGRESS 0
#define BK_DIR_EGRESS 1

/* endpoint.flags */
#define BK_EP_INGRESS_ENFORCED 1
#define BK_EP_EGRESS_ENFORCED 2

/* Reserved identities. */
#define BK_ID_ANY 0
#define BK_ID_WORLD 2

#define BK_NO_POLICY 0xffffffff

/* drop_event.reason, and the id of BK_COUNT_DROP counters */
#define BK_REASON_DENY_RULE 1
#define BK_REASON_DEFAULT_DENY 2
#define BK_REASON_SPOOFED_SOURCE 3
#define BK_REASON_UNSUPPORTED_L3 4
#define BK_REASON_MALFORMED 5

/* counter_key.kind */
#define BK_COUNT_ALLOW 1        /* id = policy index of the allow entry */
#define BK_COUNT_DENY 2         /* id = policy index of the deny entry */
#define BK_COUNT_DEFAULT_DENY 3 /* id = identity of the local endpoint */
#define BK_COUNT_DROP 4         /* id = BK_REASON_* other than the two above */
#define BK_COUNT_EVENTS_LOST 5  /* id = 0: drop events the ring buffer had no room for */
#define BK_COUNT_EVENTS_SUPPRESSED 6 /* id = 0: drops not reported by the per-flow event limit */

/* drop_event.flags */
#define BK_EVENT_REVOKED 1 /* the packet belongs to a flow allowed before a policy change */

/* ct_value.flags */
#define BK_CT_ORIGIN_REVERSED 1 /* the key is the reverse of the flow's first packet */

/* Policy keys: local identity (32 bits), peer identity (32), direction (8), protocol (8),
 * port (16). An entry's prefix length says how much of that it matches. */
#define BK_PREFIX_ANY_PROTOCOL 72
#define BK_PREFIX_ANY_PORT 80
#define BK_PREFIX_FULL 96

#define BK_CT_TCP_LIFETIME_NS (6 * 3600ULL * 1000000000ULL)
#define BK_CT_OTHER_LIFETIME_NS (60ULL * 1000000000ULL)
#define BK_CT_REFRESH_NS 1000000000ULL /* write an entry's expiry at most once a second */

#define BK_MAX_ENDPOINTS 4096
#define BK_MAX_IPCACHE 524288
#define BK_MAX_CIDR_IDS 65536
#define BK_MAX_POLICY 262144
#define BK_MAX_CONNTRACK 131072
#define BK_MAX_COUNTERS 16384
#define BK_MAX_DROP_LIMITS 16384
#define BK_EVENTS_BYTES (256 * 1024)
#define BK_DROP_EVENT_INTERVAL_NS 1000000000ULL /* at most one drop event per flow key per second */

#define BK_AF_INET 2
#define BK_IPPROTO_SCTP 132
#define BK_IP_OFFSET_MASK 0x1fff
#define BK_TCP_RST 0x04
#define BK_TCP_SYN 0x02
#define BK_TCP_ACK 0x10
#define BK_ICMP_ECHO_REPLY 0
#define BK_ICMP_DEST_UNREACH 3
#define BK_ICMP_ECHO 8
#define BK_ICMP_TIME_EXCEEDED 11
#define BK_ICMP_PARAMETER_PROB 12

struct lpm_v4_key {
    u32 prefixlen;
    u32 addr; /* network order */
};

struct identity_value {
    u32 identity;
};

struct endpoint {
    u32 identity;
    u32 ip;    /* network order; 0 disables the source address check */
    u32 flags; /* BK_EP_* */
};

struct policy_key {
    u32 prefixlen;
    u32 local_id;
    u32 peer_id;
    u8 direction;
    u8 protocol; /* 0 only in any-protocol entries (prefix 72) */
    u16 port;    /* network order: a prefix of it is a port range */
};

struct policy_value {
    u32 policy_index;
};

struct ct_key {
    u32 ifindex;
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 protocol;
    u8 pad[3];
};

struct ct_value {
    u64 expires_ns;    /* bpf_ktime_get_ns() after which the entry is ignored */
    u32 epoch;         /* policy_epoch the flow was last checked against */
    u32 policy_index;  /* allow entry that admitted it, or BK_NO_POLICY */
    u8 direction;      /* direction of the packet that created it (the flow's origin) */
    u8 denied;         /* 0, or the BK_REASON_* that revoked the flow at a policy change */
    u8 flags;          /* BK_CT_*; 0 in entries of builds that stored the origin as the key */
    u8 pad[5];
};

struct counter_key {
    u32 id;
    u32 kind;
};

struct counter_value {
    u64 packets;
    u64 bytes;
};

struct drop_event {
    u64 timestamp_ns; /* CLOCK_MONOTONIC */
    u32 ifindex;
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u32 local_id;
    u32 peer_id;
    u32 peer_cidr_id;
    u32 policy_index;
    u8 protocol;
    u8 direction;
    u8 reason;
    u8 flags;
    u32 suppressed; /* drops of this flow key not reported since its previous event */
};

/* What the drop event limit counts by: a flow without the origin's source port (a flood
 * that varies it is one key), the reason and whether the flow was revoked. Unparsed drops
 * have no addresses. */
struct limit_key {
    u32 ifindex;
    u32 saddr;
    u32 daddr;
    u16 dport;
    u8 protocol;
    u8 direction;
    u8 reason;
    u8 flags; /* drop_event.flags: a revoked flow's drops are told apart from new flows' */
    u8 pad[2];
};

struct limit_value {
    u64 next_ns;    /* no event for this key before then */
    u32 suppressed; /* drops since the last event */
    u32 pad;
};

/* BTF-defined maps; bcc-era builds declared the same ones with BPF_TABLE_PINNED. */
#define BK_MAP(_type, _key, _value, _name, _max, _flags) \
    struct {                                             \
        __uint(type, _type);                             \
        __uint(max_entries, _max);                       \
        __uint(map_flags, _flags);                       \
        __type(key, _key);                               \
        __type(value, _value);                           \
    } _name SEC(".maps")

BK_MAP(BPF_MAP_TYPE_HASH, u32, struct endpoint, endpoints, BK_MAX_ENDPOINTS, 0);
BK_MAP(BPF_MAP_TYPE_LPM_TRIE, struct lpm_v4_key, struct identity_value, ipcache, BK_MAX_IPCACHE, BPF_F_NO_PREALLOC);
BK_MAP(BPF_MAP_TYPE_LPM_TRIE, struct lpm_v4_key, struct identity_value, cidr_ids, BK_MAX_CIDR_IDS, BPF_F_NO_PREALLOC);
BK_MAP(BPF_MAP_TYPE_LPM_TRIE, struct policy_key, struct policy_value, policy_allow, BK_MAX_POLICY, BPF_F_NO_PREALLOC);
BK_MAP(BPF_MAP_TYPE_LPM_TRIE, struct policy_key, struct policy_value, policy_deny, BK_MAX_POLICY, BPF_F_NO_PREALLOC);
BK_MAP(BPF_MAP_TYPE_LRU_HASH, struct ct_key, struct ct_value, conntrack, BK_MAX_CONNTRACK, 0);
BK_MAP(BPF_MAP_TYPE_ARRAY, u32, u32, policy_epoch, 1, 0);
BK_MAP(BPF_MAP_TYPE_PERCPU_HASH, struct counter_key, struct counter_value, counters, BK_MAX_COUNTERS, BPF_F_NO_PREALLOC);
BK_MAP(BPF_MAP_TYPE_LRU_HASH, struct limit_key, struct limit_value, drop_limits, BK_MAX_DROP_LIMITS, 0);

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, BK_EVENTS_BYTES);
} drop_events SEC(".maps");

/* A parsed IPv4 packet; ports are 0 for protocols without them. ICMP echo requests
 * carry their id as sport and echo replies as dport, so a reply reverses the request. */
struct flow {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 protocol;
    u8 tcp_flags;
    u8 icmp_error; /* the packet is an ICMP error about another packet */
    u8 ttl;
    u32 l4_offset;
    u16 tot_len;  /* host order */
    u8 options;   /* the IPv4 header has options */
    u8 tos;
};

#define BK_PARSE_OK 0
#define BK_PARSE_FRAGMENT 1 /* not the first fragment: no transport header */
#define BK_PARSE_MALFORMED 2

/* The policy decision for one flow: reason 0 = allowed. */
struct verdict {
    u32 policy_index; /* the allow or deny entry that decided, or BK_NO_POLICY */
    u32 peer_id;      /* the peer's identities, when evaluate() looked them up */
    u32 cidr_id;
    u8 reason;        /* 0, BK_REASON_DENY_RULE or BK_REASON_DEFAULT_DENY */
    u8 peer_known;    /* peer_id and cidr_id are set */
};

static __always_inline void count(u32 kind, u32 id, u32 len)
{
    struct counter_key key = {.id = id, .kind = kind};
    struct counter_value zero = {};
    struct counter_value *value = bpf_map_lookup_elem(&counters, &key);
    if (!value) {
        bpf_map_update_elem(&counters, &key, &zero, BPF_NOEXIST);
        value = bpf_map_lookup_elem(&counters, &key);
    }
    if (value) {
        value->packets++;
        value->bytes += len;
    }
}

/* Pod, host or world identity, and the CIDR identity (0 if none), of a peer address. */
static __always_inline void peer_identities(u32 peer, u32 *peer_id, u32 *cidr_id)
{
    struct lpm_v4_key addr = {.prefixlen = 32, .addr = peer};
    struct identity_value *id = bpf_map_lookup_elem(&ipcache, &addr);
    *peer_id = id ? id->identity : BK_ID_WORLD;
    id = bpf_map_lookup_elem(&cidr_ids, &addr);
    *cidr_id = id ? id->identity : 0;
}

/* Whether this drop gets an event: at most one per flow key (struct limit_key) per
 * BK_DROP_EVENT_INTERVAL_NS, so that one flooding flow cannot fill the ring buffer with
 * events that say the same thing and crowd out those explaining other drops. The next
 * event of a key carries how many of its drops went unreported; the total is counted. */
static __always_inline bool event_due(struct drop_event *ev, u64 now)
{
    struct limit_key key = {
        .ifindex = ev->ifindex,
        .saddr = ev->saddr,
        .daddr = ev->daddr,
        .dport = ev->dport,
        .protocol = ev->protocol,
        .direction = ev->direction,
        .reason = ev->reason,
        .flags = ev->flags,
    };
    struct limit_value *limit = bpf_map_lookup_elem(&drop_limits, &key);
    if (!limit) {
        struct limit_value fresh = {.next_ns = now + BK_DROP_EVENT_INTERVAL_NS};
        bpf_map_update_elem(&drop_limits, &key, &fresh, BPF_ANY);
        return true;
    }
    if (now < limit->next_ns) {
        __sync_fetch_and_add(&limit->suppressed, 1);
        count(BK_COUNT_EVENTS_SUPPRESSED, 0, 0);
        return false;
    }
    limit->next_ns = now + BK_DROP_EVENT_INTERVAL_NS;
    u32 suppressed = limit->suppressed;
    __sync_fetch_and_add(&limit->suppressed, -suppressed);
    ev->suppressed = suppressed;
    return true;
}

/* Count a drop and report it (rate-limited). peer: the remote address whose identities
 * the event names, looked up only when the event is sent and ev does not have them. */
static __always_inline int drop(struct __sk_buff *skb, u32 ifindex, struct drop_event *ev, u32 peer, bool lookup_peer)
{
    if (ev->reason == BK_REASON_DENY_RULE)
        count(BK_COUNT_DENY, ev->policy_index, skb->len);
    else if (ev->reason == BK_REASON_DEFAULT_DENY)
        count(BK_COUNT_DEFAULT_DENY, ev->local_id, skb->len);
    else
        count(BK_COUNT_DROP, ev->reason, skb->len);
    u64 now = bpf_ktime_get_ns();
    ev->ifindex = ifindex;
    if (!event_due(ev, now))
        return TC_ACT_SHOT;
    if (lookup_peer)
        peer_identities(peer, &ev->peer_id, &ev->peer_cidr_id);
    ev->timestamp_ns = now;
    if (bpf_ringbuf_output(&drop_events, ev, sizeof(*ev), 0) != 0)
        count(BK_COUNT_EVENTS_LOST, 0, 0);
    return TC_ACT_SHOT;
}

static __always_inline int drop_unparsed(struct __sk_buff *skb, u32 ifindex, u8 direction, u32 local_id, u8 reason)
{
    struct drop_event ev = {};
    ev.direction = direction;
    ev.local_id = local_id;
    ev.reason = reason;
    ev.policy_index = BK_NO_POLICY;
    return drop(skb, ifindex, &ev, 0, false);
}

/* The outer IPv4 header and the ports (or ICMP echo id) after it, read in place (direct
 * packet access); a header past the linear part of the skb is pulled into it first. */
/* What both parsers take from an IPv4 header ip[0..19]: its length in 32-bit words, 0 if it is none. */
static __always_inline u32 ipv4_header(const u8 *ip, struct flow *f)
{
    u32 ihl = ip[0] & 0x0f;
    if ((ip[0] >> 4) != 4 || ihl < 5)
        return 0;
    __builtin_memcpy(&f->saddr, &ip[12], 4);
    __builtin_memcpy(&f->daddr, &ip[16], 4);
    f->protocol = ip[9];
    return ihl;
}

/* An echo's identifier stands in for the ports; returns the ICMP type (icmp[0..5] readable). */
static __always_inline u8 icmp_echo_id(const u8 *icmp, struct flow *f)
{
    u16 echo_id;
    __builtin_memcpy(&echo_id, &icmp[4], 2);
    if (icmp[0] == BK_ICMP_ECHO)
        f->sport = echo_id;
    else if (icmp[0] == BK_ICMP_ECHO_REPLY)
        f->dport = echo_id;
    return icmp[0];
}

static __always_inline int parse_outer(struct __sk_buff *skb, struct flow *f)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (data + ETH_HLEN + 20 > end) {
        if (bpf_skb_pull_data(skb, ETH_HLEN + 20) < 0)
            return BK_PARSE_MALFORMED;
        data = (void *)(long)skb->data;
        end = (void *)(long)skb->data_end;
        if (data + ETH_HLEN + 20 > end)
            return BK_PARSE_MALFORMED;
    }
    u8 *ip = data + ETH_HLEN;
    u32 ihl = ipv4_header(ip, f);
    if (!ihl)
        return BK_PARSE_MALFORMED;
    f->ttl = ip[8];
    f->tos = ip[1];
    f->tot_len = (ip[2] << 8) | ip[3];
    f->options = ihl > 5;
    if (((ip[6] << 8) | ip[7]) & BK_IP_OFFSET_MASK)
        return BK_PARSE_FRAGMENT;
    u32 l4 = ETH_HLEN + ihl * 4;
    f->l4_offset = l4;
    u32 need = 0; /* bytes of the transport header read below */
    if (f->protocol == IPPROTO_TCP)
        need = 14;
    else if (f->protocol == IPPROTO_UDP || f->protocol == BK_IPPROTO_SCTP)
        need = 4;
    else if (f->protocol == IPPROTO_ICMP)
        need = 6;
    if (!need)
        return BK_PARSE_OK;
    if (data + l4 + need > end) {
        if (bpf_skb_pull_data(skb, l4 + need) < 0)
            return BK_PARSE_MALFORMED;
        data = (void *)(long)skb->data;
        end = (void *)(long)skb->data_end;
    }
    u8 *th = data + l4;
    if (f->protocol == IPPROTO_ICMP) {
        if ((void *)(th + 6) > end)
            return BK_PARSE_MALFORMED;
        u8 type = icmp_echo_id(th, f);
        if (type == BK_ICMP_DEST_UNREACH || type == BK_ICMP_TIME_EXCEEDED || type == BK_ICMP_PARAMETER_PROB)
            f->icmp_error = 1;
        return BK_PARSE_OK;
    }
    if ((void *)(th + 4) > end)
        return BK_PARSE_MALFORMED;
    __builtin_memcpy(&f->sport, &th[0], 2);
    __builtin_memcpy(&f->dport, &th[2], 2);
    if (f->protocol == IPPROTO_TCP) {
        if ((void *)(th + 14) > end)
            return BK_PARSE_MALFORMED;
        f->tcp_flags = th[13];
    }
    return BK_PARSE_OK;
}

/* The IPv4 header quoted in an ICMP error, at off (rare: read with bpf_skb_load_bytes). */
static __always_inline int parse_inner(struct __sk_buff *skb, u32 off, struct flow *f)
{
    u8 ip[20];
    if (bpf_skb_load_bytes(skb, off, ip, sizeof(ip)) < 0)
        return BK_PARSE_MALFORMED;
    u32 ihl = ipv4_header(ip, f);
    if (!ihl)
        return BK_PARSE_MALFORMED;
    if (((ip[6] << 8) | ip[7]) & BK_IP_OFFSET_MASK)
        return BK_PARSE_FRAGMENT;
    off += ihl * 4;
    if (f->protocol == IPPROTO_TCP || f->protocol == IPPROTO_UDP || f->protocol == BK_IPPROTO_SCTP) {
        u16 ports[2];
        if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
            return BK_PARSE_MALFORMED;
        f->sport = ports[0];
        f->dport = ports[1];
    } else if (f->protocol == IPPROTO_ICMP) {
        u8 icmp[6];
        if (bpf_skb_load_bytes(skb, off, icmp, sizeof(icmp)) < 0)
            return BK_PARSE_MALFORMED;
        icmp_echo_id(icmp, f);
    }
    return BK_PARSE_OK;
}

static __always_inline void ct_key_of(struct ct_key *key, u32 ifindex, struct flow *f, bool reversed)
{
    key->ifindex = ifindex;
    key->protocol = f->protocol;
    key->saddr = reversed ? f->daddr : f->saddr;
    key->daddr = reversed ? f->saddr : f->daddr;
    key->sport = reversed ? f->dport : f->sport;
    key->dport = reversed ? f->sport : f->dport;
}

static __always_inline void ct_reverse(struct ct_key *out, struct ct_key *in)
{
    *out = *in;
    out->saddr = in->daddr;
    out->daddr = in->saddr;
    out->sport = in->dport;
    out->dport = in->sport;
}

/* Entries are stored under the flow's canonical orientation (lower address, then port,
 * first), so that a packet of either direction finds its flow with one lookup. */
static __always_inline bool reversed_is_canonical(struct flow *f)
{
    u32 s = bpf_ntohl(f->saddr), d = bpf_ntohl(f->daddr);
    return s > d || (s == d && f->sport > f->dport);
}

static __always_inline struct ct_value *ct_live(struct ct_key *key, u64 now)
{
    struct ct_value *ct = bpf_map_lookup_elem(&conntrack, key);
    if (ct && ct->expires_ns < now)
        return 0;
    return ct;
}

/* The live entry of the flow packet f belongs to at ifindex, the key it is stored under
 * in stored, and the tuple of the flow's first packet in origin. The canonical key first;
 * then the other orientation, where builds before canonical keys stored flows whose first
 * packet was not canonical. */
static __always_inline struct ct_value *ct_find(u32 ifindex, struct flow *f, u64 now, struct ct_key *origin,
                                                struct ct_key *stored)
{
    bool reversed = reversed_is_canonical(f);
    ct_key_of(stored, ifindex, f, reversed);
    struct ct_value *ct = ct_live(stored, now);
    if (ct) {
        if (ct->flags & BK_CT_ORIGIN_REVERSED)
            ct_reverse(origin, stored);
        else
            *origin = *stored;
        return ct;
    }
    ct_key_of(stored, ifindex, f, !reversed);
    *origin = *stored;
    return ct_live(stored, now);
}

static __always_inline bool enforced_in(struct endpoint *ep, u8 direction)
{
    return ep->flags & (direction == BK_DIR_INGRESS ? BK_EP_INGRESS_ENFORCED : BK_EP_EGRESS_ENFORCED);
}

/* The remote end of a flow whose first packet had tuple origin. */
static __always_inline u32 peer_of(struct ct_key *origin, u8 direction)
{
    return direction == BK_DIR_EGRESS ? origin->daddr : origin->saddr;
}

static __always_inline bool deny_hit(struct policy_key *key, u32 peer_id, struct verdict *v)
{
    key->peer_id = peer_id;
    struct policy_value *pv = bpf_map_lookup_elem(&policy_deny, key);
    if (!pv)
        return false;
    v->reason = BK_REASON_DENY_RULE;
    v->policy_index = pv->policy_index;
    return true;
}

static __always_inline bool allow_hit(struct policy_key *key, u32 peer_id, struct verdict *v)
{
    key->peer_id = peer_id;
    struct policy_value *pv = bpf_map_lookup_elem(&policy_allow, key);
    if (!pv)
        return false;
    v->policy_index = pv->policy_index;
    return true;
}

/* Policy for the flow whose first packet had tuple origin, in direction, judged on the
 * destination port of that packet. Deny entries win over allow entries; each map is
 * asked for the peer's pod/host/world identity, its CIDR identity and "any". */
static __always_inline void evaluate(struct endpoint *ep, u8 direction, struct ct_key *origin, struct verdict *v)
{
    v->policy_index = BK_NO_POLICY;
    v->reason = 0;
    v->peer_known = 0;
    v->peer_id = 0;
    v->cidr_id = 0;
    if (!enforced_in(ep, direction))
        return;
    u32 peer_id, cidr_id;
    peer_identities(peer_of(origin, direction), &peer_id, &cidr_id);
    v->peer_id = peer_id;
    v->cidr_id = cidr_id;
    v->peer_known = 1;
    struct policy_key key = {
        .prefixlen = BK_PREFIX_FULL,
        .local_id = ep->identity,
        .direction = direction,
        .protocol = origin->protocol,
        .port = origin->dport,
    };
    if (deny_hit(&key, peer_id, v) || (cidr_id && deny_hit(&key, cidr_id, v)) || deny_hit(&key, BK_ID_ANY, v))
        return;
    if (allow_hit(&key, peer_id, v) || (cidr_id && allow_hit(&key, cidr_id, v)) || allow_hit(&key, BK_ID_ANY, v))
        return;
    v->reason = BK_REASON_DEFAULT_DENY;
}

/* Drop a packet of the flow origin at ifindex, reporting the flow as policy judged it. */
static __always_inline int drop_flow(struct __sk_buff *skb, u32 ifindex, struct endpoint *ep, u8 direction,
                                     struct ct_key *origin, struct verdict *v, u8 flags)
{
    struct drop_event ev = {};
    ev.saddr = origin->saddr;
    ev.daddr = origin->daddr;
    ev.sport = origin->sport;
    ev.dport = origin->dport;
    ev.protocol = origin->protocol;
    ev.direction = direction;
    ev.local_id = ep->identity;
    ev.peer_id = v->peer_id;
    ev.peer_cidr_id = v->cidr_id;
    ev.policy_index = v->policy_index;
    ev.reason = v->reason;
    ev.flags = flags;
    return drop(skb, ifindex, &ev, peer_of(origin, direction), !v->peer_known);
}

static __always_inline int pass(struct __sk_buff *skb, u32 policy_index)
{
    if (policy_index != BK_NO_POLICY)
        count(BK_COUNT_ALLOW, policy_index, skb->len);
    return TC_ACT_UNSPEC;
}

#define BK_TAKE_STACK 0x7fff /* judge(): the fast path leaves this packet to the stack */
#define BK_JUDGE 0x7ffe      /* screen(): the packet is for judge() */

/* The verdict on an IPv4 packet f at the endpoint ep of veth ifindex, in direction.
 * *opened: the packet opened a flow here. tracked_only: return BK_TAKE_STACK, judging
 * nothing, unless the packet belongs to a flow tracked here. */
static __always_inline int judge(struct __sk_buff *skb, u32 ifindex, struct endpoint *ep, u8 direction, struct flow *f,
                                 u64 now, bool *opened, bool tracked_only)
{
    struct verdict v = {};
    struct ct_key origin = {};

    if (f->icmp_error) {
        if (tracked_only)
            return BK_TAKE_STACK;
        /* Best effort: an error about a packet of a tracked, allowed flow (either
         * orientation) belongs to it; other errors are judged as plain ICMP. */
        struct flow inner = {};
        if (parse_inner(skb, f->l4_offset + 8, &inner) == BK_PARSE_OK) {
            struct ct_key stored = {};
            struct ct_value *ct = ct_find(ifindex, &inner, now, &origin, &stored);
            if (ct && !ct->denied)
                return pass(skb, ct->policy_index);
        }
        ct_key_of(&origin, ifindex, f, false);
        evaluate(ep, direction, &origin, &v);
        return v.reason ? drop_flow(skb, ifindex, ep, direction, &origin, &v, 0) : pass(skb, v.policy_index);
    }

    u32 zero = 0;
    u32 *epoch_ptr = bpf_map_lookup_elem(&policy_epoch, &zero);
    u32 epoch = epoch_ptr ? *epoch_ptr : 0;
    u64 lifetime = f->protocol == IPPROTO_TCP ? BK_CT_TCP_LIFETIME_NS : BK_CT_OTHER_LIFETIME_NS;
    /* A pure SYN opens a new connection even if its tuple is known (port reuse). */
    bool syn = f->protocol == IPPROTO_TCP && (f->tcp_flags & (BK_TCP_SYN | BK_TCP_ACK)) == BK_TCP_SYN;

    struct ct_value *ct = 0;
    struct ct_key stored = {};
    if (!syn)
        ct = ct_find(ifindex, f, now, &origin, &stored);
    if (ct) {
        if (ct->epoch != epoch) {
            /* Policy changed since this flow was judged: judge it again. A revoked flow
             * keeps its entry, marked denied, so that neither end can open it again
             * with a packet that would otherwise look like a new flow or a reply. */
            evaluate(ep, ct->direction, &origin, &v);
            ct->epoch = epoch;
            ct->policy_index = v.policy_index;
            ct->denied = v.reason;
        }
        if (ct->expires_ns < now + lifetime - BK_CT_REFRESH_NS)
            ct->expires_ns = now + lifetime;
        if (ct->denied) {
            v.policy_index = ct->policy_index;
            v.reason = ct->denied;
            v.peer_known = 0;
            v.peer_id = 0;
            v.cidr_id = 0;
            return drop_flow(skb, ifindex, ep, ct->direction, &origin, &v, BK_EVENT_REVOKED);
        }
        u32 policy_index = ct->policy_index;
        /* A reset ends the connection: its entry goes (a revoked one stays, above), so
         * that closed connections do not crowd the LRU map until their lifetime ends. */
        if (f->tcp_flags & BK_TCP_RST && f->protocol == IPPROTO_TCP)
            bpf_map_delete_elem(&conntrack, &stored);
        return pass(skb, policy_index);
    }
    if (tracked_only)
        return BK_TAKE_STACK;

    *opened = true;
    ct_key_of(&origin, ifindex, f, false);
    evaluate(ep, direction, &origin, &v);
    if (v.reason)
        return drop_flow(skb, ifindex, ep, direction, &origin, &v, 0);
    bool reversed = reversed_is_canonical(f);
    struct ct_key key = {};
    ct_key_of(&key, ifindex, f, reversed);
    struct ct_value entry = {
        .expires_ns = now + lifetime,
        .epoch = epoch,
        .policy_index = v.policy_index,
        .direction = direction,
        .flags = reversed ? BK_CT_ORIGIN_REVERSED : 0,
    };
    bpf_map_update_elem(&conntrack, &key, &entry, BPF_ANY);
    return pass(skb, v.policy_index);
}

/* The checks before policy: ARP passes, other non-IPv4 and malformed packets are dropped
 * where the direction is enforced, a pod's packets must carry its address, and later
 * fragments pass (the first, which has the ports, was judged). Returns BK_JUDGE to go
 * on to judge(), or the verdict. */
static __always_inline int screen(struct __sk_buff *skb, u32 ifindex, struct endpoint *ep, u8 direction,
                                  struct flow *f)
{
    bool enforced = enforced_in(ep, direction);
    if (skb->protocol == bpf_htons(ETH_P_ARP))
        return TC_ACT_UNSPEC;
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return enforced ? drop_unparsed(skb, ifindex, direction, ep->identity, BK_REASON_UNSUPPORTED_L3)
                        : TC_ACT_UNSPEC;
    int parsed = parse_outer(skb, f);
    if (parsed == BK_PARSE_MALFORMED)
        return enforced ? drop_unparsed(skb, ifindex, direction, ep->identity, BK_REASON_MALFORMED) : TC_ACT_UNSPEC;
    if (direction == BK_DIR_EGRESS && ep->ip && f->saddr != ep->ip)
        return drop_unparsed(skb, ifindex, direction, ep->identity, BK_REASON_SPOOFED_SOURCE);
    if (parsed == BK_PARSE_FRAGMENT)
        return TC_ACT_UNSPEC;
    return BK_JUDGE;
}

/* The fast path between local pods, after the sender's egress verdict: when the host
 * would route the packet to another local endpoint's veth (bpf_fib_lookup, with the
 * neighbour resolved), judge it by that endpoint's ingress policy here, exactly as
 * policy_to_pod would on that veth (its conntrack entries, counters and drop events),
 * then forward it as the host would (MACs from the FIB, TTL decremented) straight into
 * the destination pod's namespace with bpf_redirect_peer, skipping the host stack and
 * the veth's egress hook. Anything else takes the stack: a service VIP (kube-proxy's DNAT
 * must see it; it is no endpoint's address), another node, the host, an unresolved
 * neighbour, an MTU problem, TTL 1, IP options, ICMP errors, fragments; and a packet of
 * a flow the sender had already opened that the destination does not track under the
 * same tuple: the reply of a connection the stack translated (a service VIP's DNAT, a
 * hostPort) must go back through the stack to be translated back. */
static __always_inline int forward(struct __sk_buff *skb, struct flow *f, u64 now, bool opened)
{
    if (f->icmp_error || f->options || f->ttl <= 1)
        return TC_ACT_UNSPEC;
    struct bpf_fib_lookup fib = {};
    fib.family = BK_AF_INET;
    fib.tos = f->tos;
    fib.l4_protocol = f->protocol;
    if (f->protocol == IPPROTO_TCP || f->protocol == IPPROTO_UDP || f->protocol == BK_IPPROTO_SCTP) {
        fib.sport = f->sport;
        fib.dport = f->dport;
    }
    fib.tot_len = f->tot_len;
    fib.ipv4_src = f->saddr;
    fib.ipv4_dst = f->daddr;
    fib.ifindex = skb->ifindex;
    if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
        return TC_ACT_UNSPEC;
    u32 out = fib.ifindex;
    struct endpoint *dst = bpf_map_lookup_elem(&endpoints, &out);
    if (!dst || !dst->ip || dst->ip != f->daddr || out == skb->ifindex)
        return TC_ACT_UNSPEC;
    bool dst_opened = false;
    int verdict = judge(skb, out, dst, BK_DIR_INGRESS, f, now, &dst_opened, !opened);
    if (verdict == BK_TAKE_STACK)
        return TC_ACT_UNSPEC;
    if (verdict != TC_ACT_UNSPEC)
        return verdict;
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (data + ETH_HLEN + 20 > end)
        return TC_ACT_UNSPEC; /* cannot happen: parse_outer made the headers linear */
    struct ethhdr *eth = data;
    __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
    struct iphdr *ip = data + ETH_HLEN;
    /* ip_decrease_ttl(): the TTL is the high byte of its 16-bit word */
    u32 check = ip->check;
    check += bpf_htons(0x0100);
    ip->check = (u16)(check + (check >= 0xffff));
    ip->ttl--;
    return bpf_redirect_peer(out, 0);
}

SEC("tc")
int policy_from_pod(struct __sk_buff *skb)
{
    u32 ifindex = skb->ifindex;
    struct endpoint *ep = bpf_map_lookup_elem(&endpoints, &ifindex);
    if (!ep)
        return TC_ACT_UNSPEC; /* not a local endpoint (yet, or any more) */
    struct flow f = {};
    int verdict = screen(skb, ifindex, ep, BK_DIR_EGRESS, &f);
    if (verdict != BK_JUDGE)
        return verdict;
    u64 now = bpf_ktime_get_ns();
    bool opened = false;
    verdict = judge(skb, ifindex, ep, BK_DIR_EGRESS, &f, now, &opened, false);
    if (verdict != TC_ACT_UNSPEC)
        return verdict;
    return forward(skb, &f, now, opened);
}

SEC("tc")
int policy_to_pod(struct __sk_buff *skb)
{
    u32 ifindex = skb->ifindex;
    struct endpoint *ep = bpf_map_lookup_elem(&endpoints, &ifindex);
    if (!ep)
        return TC_ACT_UNSPEC;
    struct flow f = {};
    int verdict = screen(skb, ifindex, ep, BK_DIR_INGRESS, &f);
    if (verdict != BK_JUDGE)
        return verdict;
    bool opened = false;
    return judge(skb, ifindex, ep, BK_DIR_INGRESS, &f, bpf_ktime_get_ns(), &opened, false);
}
