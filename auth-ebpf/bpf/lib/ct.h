/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Connection tracking, just enough to let replies of a tracked flow pass
 * unchecked — and no more than that:
 * - Tracked flows are per endpoint: the key holds the cgroup of the pod's
 *   socket and the direction of the flow's first packet. A reply skips the
 *   auth check only if its flow's first packet was judged by the same pod's
 *   program (same socket cgroup) in the opposite direction, and passed. One
 *   pod cannot make another pod's packets look like replies, and a packet a
 *   pod sends to itself is not a reply of anything it receives.
 * - Only a packet that can open a connection creates an entry: a TCP SYN
 *   without ACK, a UDP datagram, an ICMP/ICMPv6 echo request (flow.opens).
 *   A forged SYN-ACK or ACK creates nothing.
 * - A TCP SYN without ACK is never a reply.
 * - Entries live CT_LIFETIME_TCP_NS (TCP) or CT_LIFETIME_NONTCP_NS after
 *   their last use in the slow path (Cilium's lifetimes): an opening packet,
 *   a reply, or a packet of a flow that needed no authentication. The other
 *   packets of an authenticated flow do not refresh it (endpoint.c). */
#ifndef __MESHAUTH_CT_H
#define __MESHAUTH_CT_H

#include "common.h"

struct ct_key {
	__u64 cgroup; /* cgroup v2 id of the pod's socket */
	union ma_addr saddr;
	union ma_addr daddr;
	__u16 sport; /* host byte order */
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u8 direction; /* of the flow's first packet, seen from the pod */
	__u8 pad;
};

struct ct_value {
	__u64 last_seen; /* last use in the slow path, CLOCK_BOOTTIME ns */
	__u32 flags;
	__u32 pad;
};

#define CT_MAX_ENTRIES 262144
#define CT_LIFETIME_TCP_NS (21600ULL * 1000000000ULL)  /* 6 h */
#define CT_LIFETIME_NONTCP_NS (60ULL * 1000000000ULL) /* 60 s */
/* last_seen is rewritten at most this often, not on every packet. */
#define CT_REFRESH_NS 1000000000ULL

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, CT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_ct SEC(".maps");

static __always_inline __u64 ct_lifetime(__u8 proto)
{
	return proto == IPPROTO_TCP_ ? CT_LIFETIME_TCP_NS : CT_LIFETIME_NONTCP_NS;
}

/* The forward tuple as it travels (egress from the local pod, or ingress
 * into it), for the pod's socket cgroup. */
static __always_inline void ct_forward_key(struct ct_key *key, const struct flow *f, __u64 cgroup)
{
	if (f->direction == DIR_EGRESS) {
		key->saddr = f->local;
		key->daddr = f->remote;
		key->sport = f->local_port;
		key->dport = f->remote_port;
	} else {
		key->saddr = f->remote;
		key->daddr = f->local;
		key->sport = f->remote_port;
		key->dport = f->local_port;
	}
	key->cgroup = cgroup;
	key->proto = f->proto;
	key->family = f->family;
	key->direction = f->direction;
}

/* Keeps an entry alive; 1 if it was still alive. */
static __always_inline int ct_touch(struct ct_value *v, __u8 proto, __u64 now)
{
	if (now - v->last_seen >= ct_lifetime(proto))
		return 0;
	if (now - v->last_seen >= CT_REFRESH_NS)
		v->last_seen = now;
	return 1;
}

/* 1 when this packet is a reply of a live flow that the same pod's socket
 * cgroup opened in the other direction. */
static __always_inline int ct_is_reply(const struct flow *f, __u64 cgroup, __u64 now)
{
	struct ct_key fwd = {}, rev = {};
	struct ct_value *v;

	if (f->proto == IPPROTO_TCP_ && f->opens)
		return 0;
	ct_forward_key(&fwd, f, cgroup);
	rev.cgroup = cgroup;
	rev.saddr = fwd.daddr;
	rev.daddr = fwd.saddr;
	rev.sport = fwd.dport;
	rev.dport = fwd.sport;
	rev.proto = fwd.proto;
	rev.family = fwd.family;
	rev.direction = f->direction == DIR_EGRESS ? DIR_INGRESS : DIR_EGRESS;
	v = bpf_map_lookup_elem(&meshauth_ct, &rev);
	return v && ct_touch(v, f->proto, now);
}

/* Records (or keeps alive) the forward tuple of a flow that was let
 * through. Only a connection-opening packet creates an entry. */
static __always_inline void ct_track(const struct flow *f, __u64 cgroup, __u64 now)
{
	struct ct_key key = {};
	struct ct_value val = {};
	struct ct_value *v;

	ct_forward_key(&key, f, cgroup);
	v = bpf_map_lookup_elem(&meshauth_ct, &key);
	if (v) {
		if (!ct_touch(v, f->proto, now) && f->opens)
			v->last_seen = now; /* a new connection on an old tuple */
		return;
	}
	if (!f->opens)
		return;
	val.last_seen = now;
	bpf_map_update_elem(&meshauth_ct, &key, &val, BPF_NOEXIST);
}

#endif /* __MESHAUTH_CT_H */
