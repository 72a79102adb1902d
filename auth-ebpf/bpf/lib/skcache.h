/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-socket verdict cache. Every packet a pod's socket sends or receives
 * goes through the cgroup programs; for an established flow the verdict is
 * the same packet after packet, so it is kept in the socket's local storage:
 * the flow's tuple, the verdict's reason, the generation of the maps it was
 * computed from, and (for authenticated flows) the auth entry's expiry. A
 * packet whose socket holds a matching, current verdict passes without the
 * ipcache, policy, auth and ct lookups. Only passes are cached; expiry is
 * still checked on every forward packet.
 *
 * The cached check reads the coarse monotonic clock (a plain load of the
 * last tick, where CLOCK_BOOTTIME costs a clock read): the slot keeps the
 * entry's deadline translated to that clock, minus CLOCK_COARSE_MARGIN_NS
 * for the coarse clock's lag, so the cached path stops a little early and
 * the exact BOOTTIME check takes over for the last moments. The monotonic
 * clock stands still while the machine is suspended; the agent bumps the
 * generation when it sees BOOTTIME - MONOTONIC move
 * (auth_ebpf::clock::bump_generation_on_resume), so no cached deadline
 * survives a suspend. */
#ifndef __MESHAUTH_SKCACHE_H
#define __MESHAUTH_SKCACHE_H

#include "common.h"
#include "clock.h"

#define SKCACHE_NO_EXPIRY 0xffffffffffffffffULL

struct sk_verdict_slot {
	/* The whole tuple: a raw socket may send any source, and a verdict
	 * (the source check included) holds for the tuple it was made for. */
	union ma_addr local;
	union ma_addr remote;
	__u16 local_port;
	__u16 remote_port;
	__u8 proto;
	__u8 family;
	__u8 reason; /* REASON_PASS_*; 0 = empty */
	__u8 pad;
	__u32 generation;
	__u32 pad2;
	__u64 expiry; /* CLOCK_BOOTTIME ns, or SKCACHE_NO_EXPIRY */
	__u64 deadline_coarse; /* the expiry on the coarse monotonic clock, early */
};

struct sk_verdict {
	struct sk_verdict_slot slot[2]; /* by direction - 1 */
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sk_verdict);
} meshauth_sk_verdict SEC(".maps");

static __always_inline int skcache_slot_matches(const struct sk_verdict_slot *s,
						const struct flow *f, __u32 generation)
{
	return s->reason && s->generation == generation && s->proto == f->proto &&
	       s->family == f->family && s->local_port == f->local_port &&
	       s->remote_port == f->remote_port && s->local.w[0] == f->local.w[0] &&
	       s->local.w[1] == f->local.w[1] && s->local.w[2] == f->local.w[2] &&
	       s->local.w[3] == f->local.w[3] && s->remote.w[0] == f->remote.w[0] &&
	       s->remote.w[1] == f->remote.w[1] && s->remote.w[2] == f->remote.w[2] &&
	       s->remote.w[3] == f->remote.w[3];
}

/* The socket's cached verdict slot for this packet's direction, or NULL. */
static __always_inline struct sk_verdict_slot *skcache_lookup(struct __sk_buff *skb,
							       const struct flow *f,
							       __u32 generation)
{
	struct bpf_sock *sk = skb->sk;
	struct sk_verdict *v;
	struct sk_verdict_slot *s;

	if (!sk)
		return NULL;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return NULL;
	v = bpf_sk_storage_get(&meshauth_sk_verdict, sk, 0, 0);
	if (!v)
		return NULL;
	s = &v->slot[(f->direction - 1) & 1];
	return skcache_slot_matches(s, f, generation) ? s : NULL;
}

/* Remembers a pass for the packet's socket. `now_boot` is BOOTTIME now, or
 * clock_boot_coarse's estimate of it (never ahead of it; the margin covers
 * its lag). */
static __always_inline void skcache_store(struct __sk_buff *skb, const struct flow *f,
					  __u32 generation, __u8 reason, __u64 expiry,
					  __u64 now_boot)
{
	struct bpf_sock *sk = skb->sk;
	struct sk_verdict *v;
	struct sk_verdict_slot *s;

	if (!sk)
		return;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return;
	v = bpf_sk_storage_get(&meshauth_sk_verdict, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!v)
		return;
	s = &v->slot[(f->direction - 1) & 1];
	s->local = f->local;
	s->remote = f->remote;
	s->local_port = f->local_port;
	s->remote_port = f->remote_port;
	s->proto = f->proto;
	s->family = f->family;
	s->generation = generation;
	s->expiry = expiry;
	s->deadline_coarse = 0;
	if (expiry != SKCACHE_NO_EXPIRY && expiry > now_boot + CLOCK_COARSE_MARGIN_NS)
		s->deadline_coarse =
			bpf_ktime_get_coarse_ns() + (expiry - now_boot) - CLOCK_COARSE_MARGIN_NS;
	s->reason = reason;
}

/* 1 when a cached slot's verdict still holds now. */
static __always_inline int skcache_live(const struct sk_verdict_slot *s)
{
	return s->expiry == SKCACHE_NO_EXPIRY || s->deadline_coarse > bpf_ktime_get_coarse_ns();
}

#endif /* __MESHAUTH_SKCACHE_H */
