/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Auth policy: which (local, remote, port, proto, direction) needs authentication. */
#ifndef __MESHAUTH_POLICY_H
#define __MESHAUTH_POLICY_H

#include "common.h"

struct policy_key {
	__u32 local_id;
	__u32 remote_id; /* 0 = any cluster identity */
	__u16 port;      /* host byte order; 0 = any port */
	__u8 proto;      /* 0 = any protocol */
	__u8 direction;  /* DIR_INGRESS / DIR_EGRESS */
};

struct policy_value {
	__u8 auth_type; /* 0 = no authentication required */
	__u8 flags;
	__u16 pad;
};

#define POLICY_MAX_ENTRIES 65536

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, POLICY_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_policy SEC(".maps");

static __always_inline __u8 policy_probe(__u32 local, __u32 remote, __u16 port, __u8 proto,
					 __u8 dir, int *found)
{
	struct policy_key key = {
		.local_id = local,
		.remote_id = remote,
		.port = port,
		.proto = proto,
		.direction = dir,
	};
	struct policy_value *v = bpf_map_lookup_elem(&meshauth_policy, &key);

	if (!v)
		return 0;
	*found = 1;
	return v->auth_type;
}

/* The auth type the policy requires for a flow, most specific first: exact
 * port and protocol, then any port of the protocol, then any port and
 * protocol; each first for the exact remote identity, then for any cluster
 * identity (remote 0, which only matches cluster identities). 0 = none. */
static __always_inline __u8 policy_auth_type(__u32 local, __u32 remote, __u16 port,
					     __u8 proto, __u8 dir)
{
	int found = 0;
	__u8 t;

	t = policy_probe(local, remote, port, proto, dir, &found);
	if (found)
		return t;
	t = policy_probe(local, remote, 0, proto, dir, &found);
	if (found)
		return t;
	t = policy_probe(local, remote, 0, 0, dir, &found);
	if (found)
		return t;
	if (remote < ID_FIRST_CLUSTER)
		return 0;
	t = policy_probe(local, 0, port, proto, dir, &found);
	if (found)
		return t;
	t = policy_probe(local, 0, 0, proto, dir, &found);
	if (found)
		return t;
	return policy_probe(local, 0, 0, 0, dir, &found);
}

#endif /* __MESHAUTH_POLICY_H */
