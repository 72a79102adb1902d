/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The auth map: authenticated (local, remote, remote node) pairs and their expiry. */
#ifndef __MESHAUTH_AUTH_H
#define __MESHAUTH_AUTH_H

#include "common.h"

struct auth_key {
	__u32 local_id;
	__u32 remote_id;
	__u16 remote_node_id;
	__u8 auth_type;
	__u8 pad;
};

struct auth_value {
	__u64 expiry; /* CLOCK_BOOTTIME ns */
};

#define AUTH_MAX_ENTRIES 131072

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct auth_key);
	__type(value, struct auth_value);
	__uint(max_entries, AUTH_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_auth SEC(".maps");

/* The pair's expiry (CLOCK_BOOTTIME ns), 0 when it has no entry. */
static __always_inline __u64 auth_expiry(const struct auth_key *key)
{
	struct auth_value *v = bpf_map_lookup_elem(&meshauth_auth, key);

	return v ? v->expiry : 0;
}

#endif /* __MESHAUTH_AUTH_H */
