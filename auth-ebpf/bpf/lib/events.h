/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Flow events for `meshauth observe`. */
#ifndef __MESHAUTH_EVENTS_H
#define __MESHAUTH_EVENTS_H

#include "common.h"

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
