/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU packet/byte counters indexed by enum kp_stat. */
#ifndef KPROXY_LIB_STATS_H
#define KPROXY_LIB_STATS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"

/* Per-CPU slot: a TC program is not migrated while it runs, so plain adds are race free. */
static __always_inline void kp_count(__u32 stat, __u32 bytes)
{
	struct kp_counter *c = bpf_map_lookup_elem(&kp_stats_v1, &stat);

	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

#endif /* KPROXY_LIB_STATS_H */
