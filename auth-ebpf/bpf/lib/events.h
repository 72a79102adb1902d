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

static __always_inline void event_emit(const struct flow *f, __u32 local_id, __u32 remote_id,
				       __u16 remote_node, __u8 auth_type, __u8 reason,
				       __u8 verdict, __u64 now)
{
	struct flow_event *e = bpf_ringbuf_reserve(&meshauth_events, sizeof(*e), 0);

	if (!e)
		return;
	e->ts = now;
	e->local = f->local;
	e->remote = f->remote;
	e->local_id = local_id;
	e->remote_id = remote_id;
	e->local_port = f->local_port;
	e->remote_port = f->remote_port;
	e->remote_node_id = remote_node;
	e->proto = f->proto;
	e->family = f->family;
	e->direction = f->direction;
	e->reason = reason;
	e->verdict = verdict;
	e->auth_type = auth_type;
	e->len = f->len;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
}

#endif /* __MESHAUTH_EVENTS_H */
