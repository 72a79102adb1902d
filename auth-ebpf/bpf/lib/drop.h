/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Verdict reasons. Drop codes are Hubble's; the pass reasons are meshauth's own
 * and sit below 128 so they never collide with a drop code. The one table that
 * maps code -> text lives in auth-ebpf/src/reason.rs and is checked against
 * these values by a test. */
#ifndef __MESHAUTH_DROP_H
#define __MESHAUTH_DROP_H

/* Passed: no auth-required policy between the two identities. */
#define REASON_PASS_NO_POLICY 1
/* Passed: auth required and a live auth entry exists. */
#define REASON_PASS_AUTHENTICATED 2
/* Passed: a reply of a tracked flow; not re-checked. */
#define REASON_PASS_REPLY 3
/* Passed in audit mode although the flow would have been dropped for 189. */
#define REASON_PASS_AUDIT 4
/* Passed: the local end is a reserved identity (host, hostNetwork pod, world),
 * which meshauth does not enforce. */
#define REASON_PASS_NOT_ENFORCED 5

/* Events counted in the metrics map beside the verdicts (64..127: neither a
 * pass nor a drop): what became of an auth-required signal. */
/* A signal was queued for the agent. */
#define EVENT_SIGNAL_SENT 64
/* No signal: one for the same pair went out less than the interval ago. */
#define EVENT_SIGNAL_RATE_LIMITED 65
/* No signal: the ring buffer was full (the agent is behind). */
#define EVENT_SIGNAL_LOST 66
/* No flow event: one for the same flow went out less than the interval ago,
 * or this CPU's events-per-second budget is spent (a flood). */
#define EVENT_FLOW_EVENT_SUPPRESSED 67

/* Dropped: the packet could not be parsed (truncated headers). */
#define DROP_INVALID 134
/* Dropped: "Invalid source ip" (Hubble's code): on egress, the packet's source
 * address is not one of the sending pod's own addresses (a spoofed source). */
#define DROP_INVALID_SOURCE_IP 132
/* Dropped: "Invalid IPv6 extension header" (Hubble's code): the chain of
 * extension headers is longer than the datapath walks, so the transport header
 * cannot be found. */
#define DROP_INVALID_EXTHDR 156
/* Dropped: "Policy denied" (Hubble's code): in strict mode, the pod's own
 * address is not known to meshauth yet, so its policy cannot be applied. */
#define DROP_POLICY_DENIED 133
/* Dropped: "Authentication required" (Hubble's code). */
#define DROP_AUTH_REQUIRED 189

#endif /* __MESHAUTH_DROP_H */
