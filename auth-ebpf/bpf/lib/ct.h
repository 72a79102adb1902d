/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Connection tracking, just enough to let replies of a tracked flow pass unchecked. */
#ifndef __MESHAUTH_CT_H
#define __MESHAUTH_CT_H

#include "common.h"

struct ct_key {
	union ma_addr saddr;
	union ma_addr daddr;
	__u16 sport; /* host byte order */
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

struct ct_value {
	__u64 last_seen; /* when the flow was first let through, CLOCK_BOOTTIME ns */
	__u32 flags;
	__u32 pad;
};

#define CT_MAX_ENTRIES 262144

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, CT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_ct SEC(".maps");

static __always_inline void ct_forward_key(struct ct_key *key, const struct flow *f)
{
	/* The forward tuple as it travels: egress from the local pod, or ingress
	 * into it. */
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
	key->proto = f->proto;
	key->family = f->family;
}

/* 1 when this packet is a reply of a flow tracked in the other direction. */
static __always_inline int ct_is_reply(const struct flow *f)
{
	struct ct_key fwd = {}, rev = {};

	ct_forward_key(&fwd, f);
	rev.saddr = fwd.daddr;
	rev.daddr = fwd.saddr;
	rev.sport = fwd.dport;
	rev.dport = fwd.sport;
	rev.proto = fwd.proto;
	rev.family = fwd.family;
	return bpf_map_lookup_elem(&meshauth_ct, &rev) != NULL;
}

/* Records the forward tuple of a flow that was let through, once: the LRU
 * keeps entries that replies keep looking up, and drops idle ones. */
static __always_inline void ct_track(const struct flow *f)
{
	struct ct_key key = {};
	struct ct_value val = {};

	ct_forward_key(&key, f);
	if (bpf_map_lookup_elem(&meshauth_ct, &key))
		return;
	val.last_seen = bpf_ktime_get_boot_ns();
	bpf_map_update_elem(&meshauth_ct, &key, &val, BPF_NOEXIST);
}

#endif /* __MESHAUTH_CT_H */
