/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Agent-set configuration: enforce/audit, signal interval, event mask. */
#ifndef __MESHAUTH_CONFIG_H
#define __MESHAUTH_CONFIG_H

#include "common.h"

#define MODE_ENFORCE 0
#define MODE_AUDIT 1

/* Event mask bits: which verdicts produce flow events. */
#define EVENT_DROPS (1 << 0)
#define EVENT_PASSES (1 << 1)
#define EVENT_AUDIT (1 << 2)

struct config_value {
	__u32 mode;
	__u32 event_mask;
	__u64 signal_interval_ns;
	/* Bumped by the agent whenever a change could turn a pass into a drop
	 * (policy or ipcache changed, an auth entry removed): verdicts cached
	 * per socket under an older generation are not used. */
	__u32 generation;
	__u32 flags; /* CONFIG_F_* */
	/* Flow events: at most one per flow (local, remote, the policy port,
	 * protocol, direction, reason) per interval; 0 = every packet. */
	__u64 event_interval_ns;
	/* Flow events: at most this many per CPU per second; 0 = no limit.
	 * Counters stay exact; suppressed events are counted. */
	__u32 event_budget;
	__u32 pad;
	/* CLOCK_BOOTTIME - CLOCK_MONOTONIC when the agent wrote this: how long
	 * the machine had been suspended (clock.h). CONFIG_SUSPENDED_UNKNOWN
	 * until the agent writes it. */
	__u64 suspended_ns;
};

#define CONFIG_SUSPENDED_UNKNOWN 0xffffffffffffffffULL

/* Do not use or fill the per-socket verdict cache (debugging, benchmarks). */
#define CONFIG_F_NO_SKCACHE (1 << 0)
/* Strict: a pod address the ipcache does not know yet (a pod the agent has
 * not learned of) is dropped (133) instead of passed unenforced. The agent
 * puts node addresses in the ipcache as host / remote-node, so a miss on the
 * local end means a pod, not a hostNetwork workload. */
#define CONFIG_F_DROP_UNKNOWN_LOCAL (1 << 1)
/* Check on egress that the source address belongs to the sending pod
 * (source.h); a mismatch is dropped with DROP_INVALID_SOURCE_IP. */
#define CONFIG_F_CHECK_SOURCE (1 << 2)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct config_value);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_config SEC(".maps");

/* --- layout: the layout version of the pinned maps -------------------------
 * Its own layout never changes: the loader reads it before anything else to
 * decide whether pinned maps can be reused, must be migrated, or recreated. */
struct layout_value {
	__u32 version;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct layout_value);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_layout SEC(".maps");

#define SIGNAL_INTERVAL_DEFAULT_NS 1000000000ULL
#define EVENT_INTERVAL_DEFAULT_NS 1000000000ULL
#define EVENT_BUDGET_DEFAULT 1000

/* The agent's configuration, or the defaults in `def` while the agent has
 * not written it (an array slot always exists; all zero means unwritten).
 * A pointer into the map: no copy per packet. */
static __always_inline const struct config_value *config_get(struct config_value *def)
{
	__u32 zero = 0;
	struct config_value *c = bpf_map_lookup_elem(&meshauth_config, &zero);

	if (c && c->signal_interval_ns != 0)
		return c;
	def->mode = MODE_ENFORCE;
	def->event_mask = EVENT_DROPS | EVENT_AUDIT;
	def->signal_interval_ns = SIGNAL_INTERVAL_DEFAULT_NS;
	def->generation = 0;
	def->flags = 0;
	def->event_interval_ns = EVENT_INTERVAL_DEFAULT_NS;
	def->event_budget = EVENT_BUDGET_DEFAULT;
	def->pad = 0;
	def->suspended_ns = CONFIG_SUSPENDED_UNKNOWN;
	return def;
}

#endif /* __MESHAUTH_CONFIG_H */
