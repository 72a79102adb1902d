/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Auth-required signals to the agent, rate-limited per auth key. */
#ifndef __MESHAUTH_SIGNAL_H
#define __MESHAUTH_SIGNAL_H

#include "common.h"
#include "auth.h"
#include "config.h"
#include "drop.h"
#include "metrics.h"

struct signal_msg {
	struct auth_key key;
	__u64 ts; /* CLOCK_BOOTTIME ns */
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_signals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct auth_key);
	__type(value, __u64); /* last signal time, CLOCK_BOOTTIME ns */
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_signal_limit SEC(".maps");

/* Rate-limited, so off the hot path: a real subprogram, whose signature also
 * puts struct signal_msg into the object's BTF. */
static __noinline int signal_submit(const struct signal_msg *m)
{
	return bpf_ringbuf_output(&meshauth_signals, (void *)m, sizeof(*m), 0);
}

/* Sends a signal for `key` unless one was sent less than the configured
 * interval ago; counts the outcome (sent, rate-limited, lost) for `dir`.
 * Returns 1 when a signal was queued. */
static __always_inline int signal_auth_required(const struct auth_key *key, __u64 now,
						const struct config_value *cfg, __u8 dir)
{
	__u64 *last = bpf_map_lookup_elem(&meshauth_signal_limit, key);
	struct signal_msg msg = { .key = *key, .ts = now };

	if (last && now - *last < cfg->signal_interval_ns) {
		metrics_count(EVENT_SIGNAL_RATE_LIMITED, dir, 0);
		return 0;
	}
	if (signal_submit(&msg) != 0) {
		/* Not remembered as sent: the next packet tries again. */
		metrics_count(EVENT_SIGNAL_LOST, dir, 0);
		return 0;
	}
	bpf_map_update_elem(&meshauth_signal_limit, key, &now, BPF_ANY);
	metrics_count(EVENT_SIGNAL_SENT, dir, 0);
	return 1;
}

#endif /* __MESHAUTH_SIGNAL_H */
