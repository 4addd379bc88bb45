/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU packet/byte counters indexed by enum kp_stat. */
#ifndef KPROXY_LIB_STATS_H
#define KPROXY_LIB_STATS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"

/*
 * Per-CPU slot: a TC program is not migrated nor preempted while it runs, so plain adds are race free
 * (KP_COUNT_ATOMIC, defined before this header, makes them atomic for programs that may be). IPv4 packets
 * (and what is of no family) count in kp_stats_v1, IPv6 packets in kp_stats6_v1: kp_count4 / kp_count6 (no
 * default: every count names its family),
 * KP_F(kp_count) in the family-generic headers, kp_count_fam(fam, ...) where the family is a parameter.
 */
static __always_inline void kp_count_in(void *map, __u32 stat, __u32 bytes)
{
	struct kp_counter *c = bpf_map_lookup_elem(map, &stat);

	if (!c)
		return;
#ifdef KP_COUNT_ATOMIC
	/* an object whose programs may be preempted on their CPU (socket hooks, process context) */
	__sync_fetch_and_add(&c->packets, 1);
	if (bytes)
		__sync_fetch_and_add(&c->bytes, bytes);
#else
	c->packets += 1;
	c->bytes += bytes;
#endif
}

static __always_inline void kp_count4(__u32 stat, __u32 bytes)
{
	kp_count_in(&kp_stats_v1, stat, bytes);
}

static __always_inline void kp_count6(__u32 stat, __u32 bytes)
{
	kp_count_in(&kp_stats6_v1, stat, bytes);
}

/* fam: 4 or 6, a constant where this is inlined */
static __always_inline void kp_count_fam(int fam, __u32 stat, __u32 bytes)
{
	if (fam == 6)
		kp_count6(stat, bytes);
	else
		kp_count4(stat, bytes);
}

#endif /* KPROXY_LIB_STATS_H */
