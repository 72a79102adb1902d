/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The ipcache: which identity and node an address belongs to. */
#ifndef __MESHAUTH_IPCACHE_H
#define __MESHAUTH_IPCACHE_H

#include "common.h"

struct ipcache_key {
	__u32 prefixlen; /* 32 (family + pad) + address prefix length */
	__u8 family;
	__u8 pad[3];
	union ma_addr addr;
};

struct ipcache_value {
	__u32 identity;
	__u16 node_id; /* 0 = the local node */
	__u16 flags;
};

#define IPCACHE_MAX_ENTRIES 65536

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, IPCACHE_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_ipcache SEC(".maps");

/* Looks up the identity of an address. No entry means the world. */
static __always_inline struct ipcache_value ipcache_lookup(const union ma_addr *addr,
							   __u8 family)
{
	struct ipcache_key key = {};
	struct ipcache_value world = { .identity = ID_WORLD };
	struct ipcache_value *v;

	key.family = family;
	key.addr = *addr;
	key.prefixlen = 32 + (family == MA_AF_INET ? 32 : 128);
	v = bpf_map_lookup_elem(&meshauth_ipcache, &key);
	return v ? *v : world;
}

#endif /* __MESHAUTH_IPCACHE_H */
