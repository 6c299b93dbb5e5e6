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
 *
 * Built once, at build time, with `clang -target bpf -O2 -g` (scripts/build_bpf.py) into
 * policy.o, which the package ships and the daemon loads through libbpf: nodes need no
 * kernel headers or compiler. Only UAPI headers are used and no kernel struct is read,
 * so the object has no CO-RE relocations to apply; the programs see only __sk_buff,
 * whose accesses the verifier rewrites for the running kernel.
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

/* drop_event.flags */
#define BK_EVENT_REVOKED 1 /* the packet belongs to a flow allowed before a policy change */

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
#define BK_EVENTS_BYTES (256 * 1024)

#define BK_IPPROTO_SCTP 132
#define BK_IP_OFFSET_MASK 0x1fff
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
    u8 pad[6];
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
    u8 pad;
    u32 l4_offset;
};

#define BK_PARSE_OK 0
#define BK_PARSE_FRAGMENT 1 /* not the first fragment: no transport header */
#define BK_PARSE_MALFORMED 2

/* The policy decision for one flow: reason 0 = allowed. */
struct verdict {
    u32 policy_index; /* the allow or deny entry that decided, or BK_NO_POLICY */
    u8 reason;        /* 0, BK_REASON_DENY_RULE or BK_REASON_DEFAULT_DENY */
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

static __always_inline int drop(struct __sk_buff *skb, struct drop_event *ev)
{
    if (ev->reason == BK_REASON_DENY_RULE)
        count(BK_COUNT_DENY, ev->policy_index, skb->len);
    else if (ev->reason == BK_REASON_DEFAULT_DENY)
        count(BK_COUNT_DEFAULT_DENY, ev->local_id, skb->len);
    else
        count(BK_COUNT_DROP, ev->reason, skb->len);
    ev->timestamp_ns = bpf_ktime_get_ns();
    ev->ifindex = skb->ifindex;
    if (bpf_ringbuf_output(&drop_events, ev, sizeof(*ev), 0) != 0)
        count(BK_COUNT_EVENTS_LOST, 0, 0);
    return TC_ACT_SHOT;
}

static __always_inline int drop_unparsed(struct __sk_buff *skb, u8 direction, u32 local_id, u8 reason)
{
    struct drop_event ev = {};
    ev.direction = direction;
    ev.local_id = local_id;
    ev.reason = reason;
    ev.policy_index = BK_NO_POLICY;
    return drop(skb, &ev);
}

/* Source and destination ports (or ICMP echo id) of the transport header at off. */
static __always_inline int parse_ports(struct __sk_buff *skb, u32 off, struct flow *f)
{
    if (f->protocol == IPPROTO_TCP || f->protocol == IPPROTO_UDP || f->protocol == BK_IPPROTO_SCTP) {
        u16 ports[2];
        if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
            return BK_PARSE_MALFORMED;
        f->sport = ports[0];
        f->dport = ports[1];
    } else if (f->protocol == IPPROTO_ICMP) {
        struct {
            u8 type;
            u8 code;
            u16 checksum;
            u16 echo_id;
        } icmp;
        if (bpf_skb_load_bytes(skb, off, &icmp, sizeof(icmp)) < 0)
            return BK_PARSE_MALFORMED;
        if (icmp.type == BK_ICMP_ECHO)
            f->sport = icmp.echo_id;
        else if (icmp.type == BK_ICMP_ECHO_REPLY)
            f->dport = icmp.echo_id;
        else if (icmp.type == BK_ICMP_DEST_UNREACH || icmp.type == BK_ICMP_TIME_EXCEEDED ||
                 icmp.type == BK_ICMP_PARAMETER_PROB)
            f->icmp_error = 1;
    }
    return BK_PARSE_OK;
}

/* The IPv4 header at off: addresses, protocol, then the ports. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, u32 off, struct flow *f, bool outer)
{
    u8 ip[20];
    if (bpf_skb_load_bytes(skb, off, ip, sizeof(ip)) < 0)
        return BK_PARSE_MALFORMED;
    u32 ihl = ip[0] & 0x0f;
    if ((ip[0] >> 4) != 4 || ihl < 5)
        return BK_PARSE_MALFORMED;
    __builtin_memcpy(&f->saddr, &ip[12], 4);
    __builtin_memcpy(&f->daddr, &ip[16], 4);
    f->protocol = ip[9];
    if (((ip[6] << 8) | ip[7]) & BK_IP_OFFSET_MASK)
        return BK_PARSE_FRAGMENT;
    f->l4_offset = off + ihl * 4;
    int ret = parse_ports(skb, f->l4_offset, f);
    if (ret == BK_PARSE_OK && outer && f->protocol == IPPROTO_TCP) {
        if (bpf_skb_load_bytes(skb, f->l4_offset + 13, &f->tcp_flags, 1) < 0)
            return BK_PARSE_MALFORMED;
    }
    return ret;
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

static __always_inline struct ct_value *ct_live(struct ct_key *key, u64 now)
{
    struct ct_value *ct = bpf_map_lookup_elem(&conntrack, key);
    if (ct && ct->expires_ns < now)
        return 0;
    return ct;
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

/* Pod, host or world identity, and the CIDR identity (0 if none), of a peer address. */
static __always_inline void peer_identities(u32 peer, u32 *peer_id, u32 *cidr_id)
{
    struct lpm_v4_key addr = {.prefixlen = 32, .addr = peer};
    struct identity_value *id = bpf_map_lookup_elem(&ipcache, &addr);
    *peer_id = id ? id->identity : BK_ID_WORLD;
    id = bpf_map_lookup_elem(&cidr_ids, &addr);
    *cidr_id = id ? id->identity : 0;
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
    if (!enforced_in(ep, direction))
        return;
    u32 peer_id, cidr_id;
    peer_identities(peer_of(origin, direction), &peer_id, &cidr_id);
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

/* Drop a packet of the flow origin, reporting the flow as policy judged it. */
static __always_inline int drop_flow(struct __sk_buff *skb, struct endpoint *ep, u8 direction, struct ct_key *origin,
                                     struct verdict *v, u8 flags)
{
    struct drop_event ev = {};
    ev.saddr = origin->saddr;
    ev.daddr = origin->daddr;
    ev.sport = origin->sport;
    ev.dport = origin->dport;
    ev.protocol = origin->protocol;
    ev.direction = direction;
    ev.local_id = ep->identity;
    peer_identities(peer_of(origin, direction), &ev.peer_id, &ev.peer_cidr_id);
    ev.policy_index = v->policy_index;
    ev.reason = v->reason;
    ev.flags = flags;
    return drop(skb, &ev);
}

static __always_inline int pass(struct __sk_buff *skb, u32 policy_index)
{
    if (policy_index != BK_NO_POLICY)
        count(BK_COUNT_ALLOW, policy_index, skb->len);
    return TC_ACT_UNSPEC;
}

static __always_inline int handle(struct __sk_buff *skb, u8 direction)
{
    u32 ifindex = skb->ifindex;
    struct endpoint *ep = bpf_map_lookup_elem(&endpoints, &ifindex);
    if (!ep)
        return TC_ACT_UNSPEC; /* not a local endpoint (yet, or any more) */
    bool enforced = enforced_in(ep, direction);

    if (skb->protocol == bpf_htons(ETH_P_ARP))
        return TC_ACT_UNSPEC;
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return enforced ? drop_unparsed(skb, direction, ep->identity, BK_REASON_UNSUPPORTED_L3) : TC_ACT_UNSPEC;

    struct flow f = {};
    int parsed = parse_ipv4(skb, ETH_HLEN, &f, true);
    if (parsed == BK_PARSE_MALFORMED)
        return enforced ? drop_unparsed(skb, direction, ep->identity, BK_REASON_MALFORMED) : TC_ACT_UNSPEC;
    if (direction == BK_DIR_EGRESS && ep->ip && f.saddr != ep->ip)
        return drop_unparsed(skb, direction, ep->identity, BK_REASON_SPOOFED_SOURCE);
    if (parsed == BK_PARSE_FRAGMENT)
        return TC_ACT_UNSPEC; /* the first fragment, which has the ports, was checked */

    u64 now = bpf_ktime_get_ns();
    struct ct_key fwd = {}, rev = {};
    ct_key_of(&fwd, ifindex, &f, false);
    ct_key_of(&rev, ifindex, &f, true);
    struct verdict v;

    if (f.icmp_error) {
        /* Best effort: an error about a packet of a tracked, allowed flow (either
         * orientation) belongs to it; other errors are judged as plain ICMP. */
        struct flow inner = {};
        if (parse_ipv4(skb, f.l4_offset + 8, &inner, false) == BK_PARSE_OK) {
            struct ct_key related = {};
            ct_key_of(&related, ifindex, &inner, false);
            struct ct_value *ct = ct_live(&related, now);
            if (!ct) {
                ct_key_of(&related, ifindex, &inner, true);
                ct = ct_live(&related, now);
            }
            if (ct && !ct->denied)
                return pass(skb, ct->policy_index);
        }
        evaluate(ep, direction, &fwd, &v);
        return v.reason ? drop_flow(skb, ep, direction, &fwd, &v, 0) : pass(skb, v.policy_index);
    }

    u32 zero = 0;
    u32 *epoch_ptr = bpf_map_lookup_elem(&policy_epoch, &zero);
    u32 epoch = epoch_ptr ? *epoch_ptr : 0;
    u64 lifetime = f.protocol == IPPROTO_TCP ? BK_CT_TCP_LIFETIME_NS : BK_CT_OTHER_LIFETIME_NS;
    /* A pure SYN opens a new connection even if its tuple is known (port reuse). */
    bool syn = f.protocol == IPPROTO_TCP && (f.tcp_flags & (BK_TCP_SYN | BK_TCP_ACK)) == BK_TCP_SYN;

    struct ct_key *origin = &fwd;
    struct ct_value *ct = 0;
    if (!syn) {
        ct = ct_live(&fwd, now);
        if (!ct) {
            ct = ct_live(&rev, now);
            origin = &rev;
        }
    }
    if (ct) {
        if (ct->epoch != epoch) {
            /* Policy changed since this flow was judged: judge it again. A revoked flow
             * keeps its entry, marked denied, so that neither end can open it again
             * with a packet that would otherwise look like a new flow or a reply. */
            evaluate(ep, ct->direction, origin, &v);
            ct->epoch = epoch;
            ct->policy_index = v.policy_index;
            ct->denied = v.reason;
        }
        if (ct->expires_ns < now + lifetime - BK_CT_REFRESH_NS)
            ct->expires_ns = now + lifetime;
        if (ct->denied) {
            v.policy_index = ct->policy_index;
            v.reason = ct->denied;
            return drop_flow(skb, ep, ct->direction, origin, &v, BK_EVENT_REVOKED);
        }
        return pass(skb, ct->policy_index);
    }

    evaluate(ep, direction, &fwd, &v);
    if (v.reason)
        return drop_flow(skb, ep, direction, &fwd, &v, 0);
    struct ct_value entry = {
        .expires_ns = now + lifetime,
        .epoch = epoch,
        .policy_index = v.policy_index,
        .direction = direction,
    };
    bpf_map_update_elem(&conntrack, &fwd, &entry, BPF_ANY);
    return pass(skb, v.policy_index);
}

SEC("tc")
int policy_from_pod(struct __sk_buff *skb)
{
    return handle(skb, BK_DIR_EGRESS);
}

SEC("tc")
int policy_to_pod(struct __sk_buff *skb)
{
    return handle(skb, BK_DIR_INGRESS);
}
