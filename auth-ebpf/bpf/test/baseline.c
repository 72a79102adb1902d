// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Benchmark baseline, not part of meshauth: the least a cgroup_skb program
 * that consults a map per packet does — read the source address, one hash
 * lookup, pass. */

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1024);
} baseline_map SEC(".maps");

SEC("cgroup_skb/ingress")
int baseline_ingress(struct __sk_buff *skb)
{
	__u32 saddr = 0;
	__u64 *v;

	if (bpf_skb_load_bytes(skb, 12, &saddr, sizeof(saddr)) < 0)
		return 1;
	v = bpf_map_lookup_elem(&baseline_map, &saddr);
	if (v)
		return 1;
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
