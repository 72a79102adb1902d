/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Source validation on egress: the remote end's identity comes from a
 * packet's source address, so a pod must not send with another pod's.
 * Not every CNI filters spoofed sources, and a pod with CAP_NET_RAW can
 * write any source, so the datapath checks it itself.
 *
 * meshauth_endpoints holds, for every local pod the agent knows, the cgroup
 * v2 id of the pod's cgroup (kubelet's pod<uid> cgroup, parent of its
 * containers' cgroups) with each of the pod's addresses, plus one entry with
 * family 0 that marks the cgroup as a known pod. On egress the programs walk
 * the sending socket's cgroup ancestors from the top:
 * - a known pod's cgroup that owns the source address: fine;
 * - a known pod's cgroup that does not: DROP_INVALID_SOURCE_IP;
 * - no known pod among the ancestors (a pod the agent has not learned of,
 *   a hostNetwork pod): it may not use a cluster pod's address (identity
 *   >= 256) as its source.
 * Addresses that cannot leave the pod's link (loopback, link-local,
 * unspecified) carry no identity and are not checked. */
#ifndef __MESHAUTH_SOURCE_H
#define __MESHAUTH_SOURCE_H

#include "common.h"

struct endpoint_key {
	__u64 cgroup;
	__u8 family; /* MA_AF_INET, MA_AF_INET6, or 0: "this cgroup is a pod" */
	__u8 pad[7];
	union ma_addr addr; /* zero for the family-0 marker */
};

struct endpoint_value {
	__u32 identity;
	__u32 flags;
};

#define ENDPOINTS_MAX_ENTRIES 16384
/* Cgroup levels walked below the root: kubelet's pod cgroups sit at level
 * 2-4 (kubepods[.slice]/<qos>/pod<uid>), containers one below. */
#define ENDPOINT_CGROUP_LEVELS 8

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_value);
	__uint(max_entries, ENDPOINTS_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_endpoints SEC(".maps");

/* Loopback, link-local or unspecified: never routed off the pod's link. */
static __always_inline int addr_is_link_scope(const union ma_addr *a, __u8 family)
{
	if (family == MA_AF_INET) {
		__u8 b0 = a->b[0], b1 = a->b[1];

		return b0 == 127 || (b0 == 169 && b1 == 254) || a->w[0] == 0;
	}
	/* ::1, ::, fe80::/10 */
	if (a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 &&
	    (a->w[3] == 0 || a->w[3] == bpf_htonl(1)))
		return 1;
	return a->b[0] == 0xfe && (a->b[1] & 0xc0) == 0x80;
}

/* 1 when the egress packet's source address may be sent by its socket's
 * cgroup; `local_identity` is the ipcache's identity of that address. */
static __always_inline int source_ok(struct __sk_buff *skb, const struct flow *f,
				     __u32 local_identity)
{
	struct endpoint_key owned = {}, marker = {};
	int level;

	if (addr_is_link_scope(&f->local, f->family))
		return 1;
	owned.family = f->family;
	owned.addr = f->local;
#pragma unroll
	for (level = 1; level <= ENDPOINT_CGROUP_LEVELS; level++) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);

		if (!id)
			break;
		owned.cgroup = id;
		if (bpf_map_lookup_elem(&meshauth_endpoints, &owned))
			return 1;
		marker.cgroup = id;
		if (bpf_map_lookup_elem(&meshauth_endpoints, &marker))
			return 0;
	}
	return local_identity < ID_FIRST_CLUSTER;
}

#endif /* __MESHAUTH_SOURCE_H */
