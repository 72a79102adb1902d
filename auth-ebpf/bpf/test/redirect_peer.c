// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Test fixture, not part of meshauth: a host-side tc program that delivers
 * straight into a pod with bpf_redirect_peer, as eBPF CNIs (Cilium's host
 * routing) do. Packets so delivered skip the host veth's tc hooks and the
 * host's routing; the tests show meshauth's cgroup programs still see them. */

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct redirect_target {
	__u32 ifindex; /* host-side veth of the destination pod */
	__u8 dmac[6];  /* the pod's interface */
	__u8 smac[6];  /* the host-side veth */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* ingress ifindex */
	__type(value, struct redirect_target);
	__uint(max_entries, 16);
} redirect_targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} redirect_count SEC(".maps");

SEC("classifier")
int redirect_peer_prog(struct __sk_buff *skb)
{
	__u32 in = skb->ifindex, zero = 0;
	struct redirect_target *t = bpf_map_lookup_elem(&redirect_targets, &in);
	__u64 *n;

	if (!t)
		return TC_ACT_OK;
	if (bpf_skb_store_bytes(skb, 0, t->dmac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, t->smac, 6, 0) < 0)
		return TC_ACT_SHOT;
	n = bpf_map_lookup_elem(&redirect_count, &zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	return bpf_redirect_peer(t->ifindex, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
