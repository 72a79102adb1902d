/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet and byte counters by (reason, direction). */
#ifndef __MESHAUTH_METRICS_H
#define __MESHAUTH_METRICS_H

#include "common.h"

struct metrics_key {
	__u8 reason;
	__u8 direction;
	__u16 pad;
};

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct metrics_key);
	__type(value, struct metrics_value);
	__uint(max_entries, 256);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_metrics SEC(".maps");

static __always_inline void metrics_count(__u8 reason, __u8 dir, __u32 len)
{
	struct metrics_key key = { .reason = reason, .direction = dir };
	struct metrics_value *v = bpf_map_lookup_elem(&meshauth_metrics, &key);

	if (v) {
		v->packets += 1;
		v->bytes += len;
	} else {
		struct metrics_value init = { .packets = 1, .bytes = len };

		bpf_map_update_elem(&meshauth_metrics, &key, &init, BPF_NOEXIST);
	}
}

#endif /* __MESHAUTH_METRICS_H */
