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
/* The most IPv6 extension headers walked to find the transport header. The
 * kernel itself walks any number, so a longer chain is dropped
 * (DROP_INVALID_EXTHDR), never judged as if its last header were the
 * transport protocol. Cilium walks 4; 8 leaves room for legitimate chains
 * (hop-by-hop, routing, fragment, destination options, AH) twice over. */
#define IPV6_EXT_MAX 8

#define PARSE_OK 0
#define PARSE_INVALID -1
#define PARSE_UNSUPPORTED -2 /* neither IPv4 nor IPv6: not ours to judge */
#define PARSE_INVALID_EXTHDR -3 /* IPv6 chain too long, or "no next header" */

#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_NONE 59
#define NEXTHDR_DEST 60
#define NEXTHDR_MOBILITY 135
#define NEXTHDR_HIP 139
#define NEXTHDR_SHIM6 140

/* Headers where nearly every packet has them (the IP header at 0, the
 * transport header right after a 20-byte IPv4 or a 40-byte IPv6 header) are
 * read straight from the packet's linear data (cgroup_skb may read
 * skb->data), which costs no helper call; the stack keeps those headers in
 * the linear part. Only constant offsets: adding a variable offset to a
 * packet pointer needs CAP_PERFMON (the verifier's Spectre v1 hardening),
 * which the agent does not hold. Any other offset (IPv4 options, IPv6
 * extension headers) or a header outside the linear data is copied with
 * bpf_skb_load_bytes, so the result is the same either way. */
#define PKT_DIRECT(at)                                                   \
	case at:                                                         \
		if (data + (at) + len <= end) {                          \
			__builtin_memcpy(to, data + (at), len);          \
			return 0;                                        \
		}                                                        \
		break

/* Copies `len` (a constant) bytes at `off` into `to`; < 0 when the packet
 * has fewer. */
static __always_inline int pkt_load(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	__u8 *data = (__u8 *)(long)skb->data;
	__u8 *end = (__u8 *)(long)skb->data_end;

	switch (off) {
	PKT_DIRECT(0);
	PKT_DIRECT(20);
	PKT_DIRECT(40);
	default:
		break;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

static __always_inline int ipv6_is_exthdr(__u8 nexthdr)
{
	switch (nexthdr) {
	case NEXTHDR_HOP:
	case NEXTHDR_ROUTING:
	case NEXTHDR_FRAGMENT:
	case NEXTHDR_AUTH:
	case NEXTHDR_NONE:
	case NEXTHDR_DEST:
	case NEXTHDR_MOBILITY:
	case NEXTHDR_HIP:
	case NEXTHDR_SHIM6:
		return 1;
	default:
		return 0;
	}
}

/* Ports of the L4 header at `off`: TCP/UDP ports, or for ICMP echo the
 * identifier as the requester's port (request: sport = id; reply: dport = id),
 * so a reply's reversed tuple is its request's. Also whether the packet can
 * open a connection, and TCP's flags. */
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, __u8 proto, __u16 *sport,
				    __u16 *dport, struct flow *f)
{
	__u16 ports[2];
	__u8 tcp[14];
	__u8 icmp[6];

	switch (proto) {
	case IPPROTO_TCP_:
		/* Up to the flags byte: a segment without it is malformed. */
		if (pkt_load(skb, off, tcp, sizeof(tcp)) < 0)
			return PARSE_INVALID;
		*sport = ((__u16)tcp[0] << 8) | tcp[1];
		*dport = ((__u16)tcp[2] << 8) | tcp[3];
		f->tcp_flags = tcp[13];
		f->opens = (tcp[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
		return PARSE_OK;
	case IPPROTO_UDP_:
		if (pkt_load(skb, off, ports, sizeof(ports)) < 0)
			return PARSE_INVALID;
		*sport = bpf_ntohs(ports[0]);
		*dport = bpf_ntohs(ports[1]);
		f->opens = 1;
		return PARSE_OK;
	case IPPROTO_ICMP_:
	case IPPROTO_ICMPV6_:
		if (pkt_load(skb, off, icmp, sizeof(icmp)) < 0)
			return PARSE_INVALID;
		/* type 8/128 echo request, 0/129 echo reply */
		if (icmp[0] == 8 || icmp[0] == 128) {
			*sport = ((__u16)icmp[4] << 8) | icmp[5];
			*dport = 0;
			f->opens = 1;
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
				      union ma_addr *src, union ma_addr *dst, struct flow *f)
{
	struct iphdr ip;

	if (pkt_load(skb, 0, &ip, sizeof(ip)) < 0)
		return PARSE_INVALID;
	if (ip.version != 4 || ip.ihl < 5)
		return PARSE_INVALID;
	src->w[0] = ip.saddr;
	dst->w[0] = ip.daddr;
	f->proto = ip.protocol;
	if (bpf_ntohs(ip.frag_off) & IP_OFFSET_MASK) {
		f->fragment = 1;
		*sport = 0;
		*dport = 0;
		return PARSE_OK;
	}
	return parse_l4(skb, ip.ihl * 4, ip.protocol, sport, dport, f);
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, __u16 *sport, __u16 *dport,
				      union ma_addr *src, union ma_addr *dst, struct flow *f)
{
	struct ipv6hdr ip6;
	__u32 off = sizeof(ip6);
	__u8 nexthdr;
	int i;

	if (pkt_load(skb, 0, &ip6, sizeof(ip6)) < 0)
		return PARSE_INVALID;
	if (ip6.version != 6)
		return PARSE_INVALID;
	__builtin_memcpy(src->b, &ip6.saddr, 16);
	__builtin_memcpy(dst->b, &ip6.daddr, 16);
	nexthdr = ip6.nexthdr;

#pragma unroll
	for (i = 0; i < IPV6_EXT_MAX; i++) {
		__u8 ext[2];

		if (!ipv6_is_exthdr(nexthdr))
			break;
		/* Nothing follows: no transport header to judge by. */
		if (nexthdr == NEXTHDR_NONE)
			return PARSE_INVALID_EXTHDR;
		if (pkt_load(skb, off, ext, sizeof(ext)) < 0)
			return PARSE_INVALID;
		if (nexthdr == NEXTHDR_FRAGMENT) {
			__u16 frag;

			if (pkt_load(skb, off + 2, &frag, sizeof(frag)) < 0)
				return PARSE_INVALID;
			nexthdr = ext[0];
			off += 8;
			if (bpf_ntohs(frag) & 0xfff8) {
				f->proto = nexthdr;
				f->fragment = 1;
				*sport = 0;
				*dport = 0;
				return PARSE_OK;
			}
			continue;
		}
		/* AH counts its length in 4-byte units minus 2; the others in
		 * 8-byte units not counting the first 8. */
		if (nexthdr == NEXTHDR_AUTH)
			off += ((__u32)ext[1] + 2) * 4;
		else
			off += ((__u32)ext[1] + 1) * 8;
		nexthdr = ext[0];
	}
	/* The walk ended on an extension header: the chain is longer than we
	 * walk, and whatever we called the transport header would be a guess. */
	if (ipv6_is_exthdr(nexthdr))
		return PARSE_INVALID_EXTHDR;
	f->proto = nexthdr;
	return parse_l4(skb, off, nexthdr, sport, dport, f);
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
		ret = parse_ipv4(skb, &sport, &dport, &src, &dst, f);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		f->family = MA_AF_INET6;
		ret = parse_ipv6(skb, &sport, &dport, &src, &dst, f);
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
