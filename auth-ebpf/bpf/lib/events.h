/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Flow events for `meshauth observe`. */
#ifndef __MESHAUTH_EVENTS_H
#define __MESHAUTH_EVENTS_H

#include "common.h"
#include "config.h"
#include "drop.h"
#include "metrics.h"

struct flow_event {
	__u64 ts;
	union ma_addr local;
	union ma_addr remote;
	__u32 local_id;
	__u32 remote_id;
	__u16 local_port;
	__u16 remote_port;
	__u16 remote_node_id;
	__u8 proto;
	__u8 family;
	__u8 direction;
	__u8 reason;  /* REASON_* or DROP_* */
	__u8 verdict; /* 1 forwarded, 0 dropped */
	__u8 auth_type;
	__u32 len;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_events SEC(".maps");

/* Rate limiting: a flood at a protected port must not cost the agent one
 * ring-buffer record and one wake-up per packet. The flow key leaves out the
 * remote end's port on ingress (and the local port on egress), so a flood
 * from random source ports is one flow. */
struct event_limit_key {
	union ma_addr local;
	union ma_addr remote;
	__u16 port; /* the policy port: local on ingress, remote on egress */
	__u8 proto;
	__u8 family;
	__u8 direction;
	__u8 reason;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct event_limit_key);
	__type(value, __u64); /* last event time, CLOCK_BOOTTIME ns */
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_event_limit SEC(".maps");

struct event_budget {
	__u64 window_start; /* CLOCK_BOOTTIME ns */
	__u64 count;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct event_budget);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshauth_event_budget SEC(".maps");

#define EVENT_BUDGET_WINDOW_NS 1000000000ULL

/* 1 when an event for this flow and reason may go out now; counts a
 * suppressed one. */
static __always_inline int event_allowed(const struct flow *f, __u8 reason, __u64 now,
					 const struct config_value *cfg)
{
	struct event_limit_key key = {
		.local = f->local,
		.remote = f->remote,
		.port = f->direction == DIR_INGRESS ? f->local_port : f->remote_port,
		.proto = f->proto,
		.family = f->family,
		.direction = f->direction,
		.reason = reason,
	};
	struct event_budget *b;
	__u64 *last = NULL;
	__u32 zero = 0;

	if (cfg->event_interval_ns) {
		last = bpf_map_lookup_elem(&meshauth_event_limit, &key);
		if (last && now - *last < cfg->event_interval_ns)
			goto suppressed;
	}
	if (cfg->event_budget) {
		b = bpf_map_lookup_elem(&meshauth_event_budget, &zero);
		if (b) {
			if (now - b->window_start >= EVENT_BUDGET_WINDOW_NS) {
				b->window_start = now;
				b->count = 0;
			}
			if (b->count >= cfg->event_budget)
				goto suppressed;
			b->count++;
		}
	}
	if (cfg->event_interval_ns) {
		if (last)
			*last = now;
		else
			bpf_map_update_elem(&meshauth_event_limit, &key, &now, BPF_ANY);
	}
	return 1;
suppressed:
	metrics_count(EVENT_FLOW_EVENT_SUPPRESSED, f->direction, 0);
	return 0;
}

/* Off the hot path (drops, audit, opt-in passes), so a real subprogram: its
 * signature also puts struct flow_event into the object's BTF. */
static __noinline int event_submit(const struct flow_event *e)
{
	return bpf_ringbuf_output(&meshauth_events, (void *)e, sizeof(*e), 0);
}

static __always_inline void event_emit(const struct flow *f, __u32 local_id, __u32 remote_id,
				       __u16 remote_node, __u8 auth_type, __u8 reason,
				       __u8 verdict, __u64 now)
{
	struct flow_event e = {
		.ts = now,
		.local = f->local,
		.remote = f->remote,
		.local_id = local_id,
		.remote_id = remote_id,
		.local_port = f->local_port,
		.remote_port = f->remote_port,
		.remote_node_id = remote_node,
		.proto = f->proto,
		.family = f->family,
		.direction = f->direction,
		.reason = reason,
		.verdict = verdict,
		.auth_type = auth_type,
		.len = f->len,
	};

	event_submit(&e);
}

#endif /* __MESHAUTH_EVENTS_H */
