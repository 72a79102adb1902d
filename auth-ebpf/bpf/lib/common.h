/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Common types and constants of the meshauth datapath. Every struct here is
 * mirrored by a #[repr(C)] type in auth-ebpf/src/types.rs; a test compares the
 * two through the object's BTF. */
#ifndef __MESHAUTH_COMMON_H
#define __MESHAUTH_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Bumped whenever a map's key or value layout changes. The loader compares it
 * with the version recorded beside the pinned maps and migrates or recreates. */
#define MESHAUTH_LAYOUT_VERSION 2

/* cgroup_skb verdicts. */
#define CGROUP_PASS 1
#define CGROUP_DROP 0

/* Address families as stored in map keys (values of AF_INET / AF_INET6). */
#define MA_AF_INET 2
#define MA_AF_INET6 10

/* Policy direction, seen from the pod whose cgroup the program runs for. */
#define DIR_INGRESS 1
#define DIR_EGRESS 2

/* Reserved identities (Cilium's numbering). */
#define ID_UNKNOWN 0
#define ID_HOST 1
#define ID_WORLD 2
#define ID_FIRST_CLUSTER 256

#define IPPROTO_ICMP_ 1
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IPPROTO_ICMPV6_ 58

/* An address of either family; IPv4 uses the first four bytes. */
union ma_addr {
	__u8 b[16];
	__u32 w[4];
};

/* The parsed forward view of one packet, from the local pod's side. */
struct flow {
	union ma_addr local;
	union ma_addr remote;
	__u16 local_port;  /* host byte order */
	__u16 remote_port; /* host byte order */
	__u8 proto;
	__u8 family;
	__u8 direction;
	__u8 fragment; /* 1 for a non-first fragment: no L4 header */
	__u32 len;
	__u8 tcp_flags; /* TCP only: the flags byte (FIN 0x01, SYN 0x02, ACK 0x10) */
	/* 1 when the packet can open a connection: a TCP SYN without ACK, a UDP
	 * datagram, an ICMP/ICMPv6 echo request. Only these create tracked flows. */
	__u8 opens;
	__u16 pad;
};

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

#endif /* __MESHAUTH_COMMON_H */
