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

/* Dropped: the packet could not be parsed (truncated headers). */
#define DROP_INVALID 134
/* Dropped: "Authentication required" (Hubble's code). */
#define DROP_AUTH_REQUIRED 189

#endif /* __MESHAUTH_DROP_H */
