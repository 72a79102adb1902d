/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Parsing a packet as cgroup_skb programs see it: from the IP header on, no
 * Ethernet header. */
#ifndef __MESHAUTH_PARSE_H
#define __MESHAUTH_PARSE_H

#include "common.h"

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#define IP_OFFSET_MASK 0x1fff
#define IPV6_EXT_MAX 4

#define PARSE_OK 0
#define PARSE_INVALID -1
#define PARSE_UNSUPPORTED -2 /* neither IPv4 nor IPv6: not ours to judge */

/* Ports of the L4 header at `off`: TCP/UDP ports, or for ICMP echo the
 * identifier as the requester's port (request: sport = id; reply: dport = id),
 * so a reply's reversed tuple is its request's. */
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, __u8 proto,
				    __u16 *sport, __u16 *dport)
{
	__u16 ports[2];
	__u8 icmp[6];

	switch (proto) {
	case IPPROTO_TCP_:
	case IPPROTO_UDP_:
		if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
			return PARSE_INVALID;
		*sport = bpf_ntohs(ports[0]);
		*dport = bpf_ntohs(ports[1]);
		return PARSE_OK;
	case IPPROTO_ICMP_:
	case IPPROTO_ICMPV6_:
		if (bpf_skb_load_bytes(skb, off, icmp, sizeof(icmp)) < 0)
			return PARSE_INVALID;
		/* type 8/128 echo request, 0/129 echo reply */
		if (icmp[0] == 8 || icmp[0] == 128) {
			*sport = ((__u16)icmp[4] << 8) | icmp[5];
			*dport = 0;
		} else if (icmp[0] == 0 || icmp[0] == 129) {
			*sport = 0;
			*dport = ((__u16)icmp[4] << 8) | icmp[5];
		} else {
			*sport = 0;
			*dport = 0;
		}
		return PARSE_OK;
	default:
		*sport = 0;
		*dport = 0;
		return PARSE_OK;
	}
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, __u16 *sport, __u16 *dport,
				      union ma_addr *src, union ma_addr *dst, __u8 *proto,
				      __u8 *fragment)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
		return PARSE_INVALID;
	if (ip.version != 4 || ip.ihl < 5)
		return PARSE_INVALID;
	src->w[0] = ip.saddr;
	dst->w[0] = ip.daddr;
	*proto = ip.protocol;
	if (bpf_ntohs(ip.frag_off) & IP_OFFSET_MASK) {
		*fragment = 1;
		*sport = 0;
		*dport = 0;
		return PARSE_OK;
	}
	return parse_l4(skb, ip.ihl * 4, ip.protocol, sport, dport);
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, __u16 *sport, __u16 *dport,
				      union ma_addr *src, union ma_addr *dst, __u8 *proto,
				      __u8 *fragment)
{
	struct ipv6hdr ip6;
	__u32 off = sizeof(ip6);
	__u8 nexthdr;
	int i;

	if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
		return PARSE_INVALID;
	if (ip6.version != 6)
		return PARSE_INVALID;
	__builtin_memcpy(src->b, &ip6.saddr, 16);
	__builtin_memcpy(dst->b, &ip6.daddr, 16);
	nexthdr = ip6.nexthdr;

#pragma unroll
	for (i = 0; i < IPV6_EXT_MAX; i++) {
		__u8 ext[2];

		if (nexthdr != 0 && nexthdr != 43 && nexthdr != 44 && nexthdr != 60)
			break;
		if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
			return PARSE_INVALID;
		if (nexthdr == 44) {
			__u16 frag;

			if (bpf_skb_load_bytes(skb, off + 2, &frag, sizeof(frag)) < 0)
				return PARSE_INVALID;
			nexthdr = ext[0];
			off += 8;
			if (bpf_ntohs(frag) & 0xfff8) {
				*proto = nexthdr;
				*fragment = 1;
				*sport = 0;
				*dport = 0;
				return PARSE_OK;
			}
			continue;
		}
		nexthdr = ext[0];
		off += ((__u32)ext[1] + 1) * 8;
	}
	*proto = nexthdr;
	return parse_l4(skb, off, nexthdr, sport, dport);
}

/* Fills the forward view of the packet, seen from the local pod. */
static __always_inline int parse_flow(struct __sk_buff *skb, __u8 dir, struct flow *f)
{
	union ma_addr src = {}, dst = {};
	__u16 sport = 0, dport = 0;
	int ret;

	f->direction = dir;
	f->len = skb->len;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		f->family = MA_AF_INET;
		ret = parse_ipv4(skb, &sport, &dport, &src, &dst, &f->proto, &f->fragment);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		f->family = MA_AF_INET6;
		ret = parse_ipv6(skb, &sport, &dport, &src, &dst, &f->proto, &f->fragment);
	} else {
		return PARSE_UNSUPPORTED;
	}
	if (ret < 0)
		return ret;
	if (dir == DIR_EGRESS) {
		f->local = src;
		f->remote = dst;
		f->local_port = sport;
		f->remote_port = dport;
	} else {
		f->local = dst;
		f->remote = src;
		f->local_port = dport;
		f->remote_port = sport;
	}
	return PARSE_OK;
}

#endif /* __MESHAUTH_PARSE_H */
