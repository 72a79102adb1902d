/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Time on the authenticated path without reading the clock source.
 *
 * Auth entries expire on CLOCK_BOOTTIME (bpf_ktime_get_boot_ns), which reads
 * the clock source on every call: on a virtual machine that was the largest
 * single cost of an authenticated packet's full path (about 35 ns of it).
 * The coarse monotonic clock (bpf_ktime_get_coarse_ns) is a load of the last
 * tick. BOOTTIME is MONOTONIC plus the time the machine has been suspended,
 * which the agent writes into the config (config_value.suspended_ns) at
 * start and again within a second of a resume, when it also bumps the
 * generation (auth_ebpf::clock::bump_generation_on_resume).
 *
 * So coarse + suspended_ns is BOOTTIME at most one tick ago, and an entry
 * whose expiry lies more than CLOCK_COARSE_MARGIN_NS (20 ms, above a tick at
 * HZ >= 100) beyond it is certainly live. Closer to its expiry, or while the
 * agent has not written the suspended time, BOOTTIME itself decides, so an
 * entry never passes a packet after its expiry. The exception is the one
 * the socket cache has always had (skcache.h): from a resume until the agent
 * writes the new suspended time (at most about a second), the estimate lags
 * by the time asleep. */
#ifndef __MESHAUTH_CLOCK_H
#define __MESHAUTH_CLOCK_H

#include "common.h"
#include "config.h"

#define CLOCK_COARSE_MARGIN_NS 20000000ULL /* 20 ms: above one tick at HZ >= 100 */

/* BOOTTIME estimated from the coarse clock: never ahead of it, behind it by
 * at most one tick (while no suspend went unnoticed); 0 when the agent has
 * not written the suspended time. */
static __always_inline __u64 clock_boot_coarse(const struct config_value *cfg)
{
	if (cfg->suspended_ns == CONFIG_SUSPENDED_UNKNOWN)
		return 0;
	return bpf_ktime_get_coarse_ns() + cfg->suspended_ns;
}

/* 1 when `deadline` (BOOTTIME ns) is certainly still ahead at `coarse_boot`
 * (from clock_boot_coarse; 0 proves nothing). */
static __always_inline int clock_certainly_before(__u64 deadline, __u64 coarse_boot)
{
	return coarse_boot && deadline > coarse_boot + CLOCK_COARSE_MARGIN_NS;
}

#endif /* __MESHAUTH_CLOCK_H */
