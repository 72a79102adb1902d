/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet and byte counters by (reason, direction): a per-CPU array indexed
 * by reason * 2 + (direction - 1), so counting is an inlined array access. */
#ifndef __MESHAUTH_METRICS_H
#define __MESHAUTH_METRICS_H

#include "common.h"

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

#define METRICS_SLOTS 512 /* 256 reasons x 2 directions */

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, METRICS_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_metrics SEC(".maps");

static __always_inline void metrics_count(__u8 reason, __u8 dir, __u32 len)
{
	__u32 slot = ((__u32)reason << 1) | ((dir - 1) & 1);
	struct metrics_value *v = bpf_map_lookup_elem(&meshauth_metrics, &slot);

	if (v) {
		v->packets += 1;
		v->bytes += len;
	}
}

#endif /* __MESHAUTH_METRICS_H */
