// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* meshauth's entry programs: cgroup_skb ingress and egress on the cgroup v2
 * that holds all pods. They see every packet delivered to or sent by a pod's
 * sockets, after whatever the CNI did, so enforcement does not depend on tc
 * hooks on host veths.
 *
 * Fragments: cgroup_skb ingress runs at socket delivery, after the stack
 * reassembled the datagram, and egress runs before the stack fragments it, so
 * these programs see whole datagrams. A non-first fragment that reaches them
 * anyway (no L4 header) is judged by the port-less (any-port) rules only. */

#include "lib/common.h"
#include "lib/drop.h"
#include "lib/config.h"
#include "lib/parse.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/auth.h"
#include "lib/ct.h"
#include "lib/source.h"
#include "lib/signal.h"
#include "lib/events.h"
#include "lib/metrics.h"
#include "lib/skcache.h"
#include "lib/clock.h"

/* Counts the packet, reports it if the event mask asks, returns the verdict.
 * `now` may be 0 when the path did not need the time. */
static __always_inline int verdict(const struct flow *f, const struct config_value *cfg,
				   __u32 local_id, __u32 remote_id, __u16 remote_node,
				   __u8 auth_type, __u8 reason, __u64 now)
{
	int pass = reason < 128;
	__u32 bit = pass ? (reason == REASON_PASS_AUDIT ? EVENT_AUDIT : EVENT_PASSES)
			 : EVENT_DROPS;

	metrics_count(reason, f->direction, f->len);
	if (cfg->event_mask & bit) {
		if (!now)
			now = bpf_ktime_get_boot_ns();
		if (event_allowed(f, reason, now, cfg))
			event_emit(f, local_id, remote_id, remote_node, auth_type, reason, pass,
				   now);
	}
	return pass ? CGROUP_PASS : CGROUP_DROP;
}

/* A pass that the socket can remember. */
static __always_inline int pass_and_cache(struct __sk_buff *skb, const struct flow *f,
					  const struct config_value *cfg, __u32 local_id,
					  __u32 remote_id, __u16 remote_node, __u8 auth_type,
					  __u8 reason, __u64 expiry, __u64 now)
{
	if (!(cfg->flags & CONFIG_F_NO_SKCACHE))
		skcache_store(skb, f, cfg->generation, reason, expiry, now);
	return verdict(f, cfg, local_id, remote_id, remote_node, auth_type, reason, now);
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct config_value cfg_default;
	const struct config_value *cfg = config_get(&cfg_default);
	struct ipcache_value local, remote;
	struct sk_verdict_slot *cached;
	struct auth_key key = {};
	struct flow f = {};
	__u64 now = 0, coarse, expiry, cgroup;
	__u16 port;
	__u8 auth_type;
	int ret;

	ret = parse_flow(skb, dir, &f);
	if (ret == PARSE_UNSUPPORTED)
		return CGROUP_PASS;
	if (ret == PARSE_INVALID_EXTHDR)
		return verdict(&f, cfg, 0, 0, 0, 0, DROP_INVALID_EXTHDR, 0);
	if (ret < 0)
		return verdict(&f, cfg, 0, 0, 0, 0, DROP_INVALID, 0);

	/* Fast path: the socket's cached verdict for this flow, if still current. */
	cached = cfg->flags & CONFIG_F_NO_SKCACHE ? NULL : skcache_lookup(skb, &f, cfg->generation);
	if (cached && skcache_live(cached))
		return verdict(&f, cfg, 0, 0, 0, 0, cached->reason, 0);

	local = ipcache_lookup(&f.local, f.family);
	/* The source first: everything below trusts the addresses. */
	if (dir == DIR_EGRESS && (cfg->flags & CONFIG_F_CHECK_SOURCE) &&
	    !source_ok(skb, &f, local.identity))
		return verdict(&f, cfg, local.identity, 0, 0, 0, DROP_INVALID_SOURCE_IP, 0);
	if (local.identity == ID_WORLD && (cfg->flags & CONFIG_F_DROP_UNKNOWN_LOCAL) &&
	    cfg->mode != MODE_AUDIT)
		return verdict(&f, cfg, local.identity, 0, 0, 0, DROP_POLICY_DENIED, 0);
	if (local.identity < ID_FIRST_CLUSTER)
		return pass_and_cache(skb, &f, cfg, local.identity, 0, 0, 0,
				      REASON_PASS_NOT_ENFORCED, SKCACHE_NO_EXPIRY, now);

	remote = ipcache_lookup(&f.remote, f.family);

	port = dir == DIR_INGRESS ? f.local_port : f.remote_port;
	if (f.fragment)
		port = 0;
	auth_type = policy_auth_type(local.identity, remote.identity, port, f.proto, dir);
	if (!auth_type) {
		cgroup = bpf_skb_cgroup_id(skb);
		now = bpf_ktime_get_boot_ns();
		if (ct_is_reply(&f, cgroup, now))
			return pass_and_cache(skb, &f, cfg, local.identity, remote.identity,
					      remote.node_id, 0, REASON_PASS_REPLY,
					      SKCACHE_NO_EXPIRY, now);
		ct_track(&f, cgroup, now);
		return pass_and_cache(skb, &f, cfg, local.identity, remote.identity,
				      remote.node_id, 0, REASON_PASS_NO_POLICY,
				      SKCACHE_NO_EXPIRY, now);
	}

	/* Authenticated before the reply check: a live entry passes the packet
	 * whether or not it answers a tracked flow, so the hit path skips the
	 * tracked-flow lookup; only a packet the policy would drop is checked
	 * as a reply. An entry far from its expiry is proven live by the coarse
	 * clock (clock.h); BOOTTIME is read only near the expiry, or for a
	 * packet that opens a flow. */
	key.local_id = local.identity;
	key.remote_id = remote.identity;
	key.remote_node_id = remote.node_id;
	key.auth_type = auth_type;
	expiry = auth_expiry(&key);
	coarse = expiry ? clock_boot_coarse(cfg) : 0;
	if (!clock_certainly_before(expiry, coarse)) {
		now = bpf_ktime_get_boot_ns();
		coarse = 0;
	}
	if (coarse || expiry > now) {
		/* Only a packet that opens a flow is tracked here; the rest of an
		 * authenticated flow does not refresh its entry (the socket cache
		 * never did), which saves a lookup per packet. A TCP flow tracked
		 * this way lives CT_LIFETIME_TCP_NS from its SYN; its replies need
		 * the entry only once its pair's authentication has lapsed. */
		if (f.opens) {
			if (!now)
				now = bpf_ktime_get_boot_ns();
			ct_track(&f, bpf_skb_cgroup_id(skb), now);
		}
		if (!(cfg->flags & CONFIG_F_NO_SKCACHE))
			skcache_store(skb, &f, cfg->generation, REASON_PASS_AUTHENTICATED, expiry,
				      now ? now : coarse);
		return verdict(&f, cfg, local.identity, remote.identity, remote.node_id,
			       auth_type, REASON_PASS_AUTHENTICATED, now);
	}
	cgroup = bpf_skb_cgroup_id(skb);
	if (ct_is_reply(&f, cgroup, now))
		return pass_and_cache(skb, &f, cfg, local.identity, remote.identity,
				      remote.node_id, 0, REASON_PASS_REPLY, SKCACHE_NO_EXPIRY,
				      now);

	signal_auth_required(&key, now, cfg, dir);
	if (cfg->mode == MODE_AUDIT) {
		ct_track(&f, cgroup, now);
		return verdict(&f, cfg, local.identity, remote.identity, remote.node_id,
			       auth_type, REASON_PASS_AUDIT, now);
	}
	return verdict(&f, cfg, local.identity, remote.identity, remote.node_id, auth_type,
		       DROP_AUTH_REQUIRED, now);
}

SEC("cgroup_skb/ingress")
int meshauth_ingress(struct __sk_buff *skb)
{
	return handle(skb, DIR_INGRESS);
}

SEC("cgroup_skb/egress")
int meshauth_egress(struct __sk_buff *skb)
{
	return handle(skb, DIR_EGRESS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
