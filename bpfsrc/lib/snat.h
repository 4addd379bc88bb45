/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Source-port allocation for SNAT of external flows to remote backends (ingress node).
 * A port is taken by creating its kp_snat4_v1 entry with BPF_NOEXIST, so two CPUs can never hand
 * out the same (backend, node, port) tuple. Candidates come from one rotating cursor per loaded
 * object (all CPUs, atomically advanced), not from random picks: a port comes back only after every
 * other port of the range was handed out or found taken once, i.e. the port whose previous
 * connection ended longest ago is tried first. The backend keeps a closed connection's 4-tuple in
 * TIME_WAIT for 60 s; a random pick lands on a recently used port often (with half the range used in
 * the last minute, every other pick) and its SYN then depends on the backend accepting a SYN into
 * TIME_WAIT. The cursor starts at a random place so a restarted agent does not begin where the
 * previous one began. At most KP_SNAT_MAX_RETRIES candidates, then the packet is dropped and counted
 * (KP_DROP_SNAT_NO_PORT). Entries live as long as their flow's conntrack entry: kp_ct_touch()
 * refreshes both, and a dead entry's port is taken over here.
 */
#ifndef KPROXY_LIB_SNAT_H
#define KPROXY_LIB_SNAT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"
#include "lib/ct.h"
#include "lib/stats.h"

#define KP_SNAT_MAX_RETRIES 32

/* Next SNAT port candidate (index into the range, modulo its size); 0 = not seeded yet. 64 bits:
 * the BPF target of the build (no -mcpu=v3) has 64-bit atomics only. */
static __u64 kp_snat_cursor;

static __always_inline __u64 kp_snat_next(void)
{
	if (!kp_snat_cursor)
		__sync_val_compare_and_swap(&kp_snat_cursor, 0, (__u64)bpf_get_prandom_u32() | 1);
	return __sync_fetch_and_add(&kp_snat_cursor, 1);
}

/*
 * Give the new SNATed flow (fk, fv; fv->snat_addr set) a port: fills fv->snat_port and writes its
 * kp_snat4_v1 entry. Returns 0, or -1 when every candidate was taken.
 */
static __always_inline int kp_snat_alloc(const struct kp_ct4_key *fk, struct kp_ct4_val *fv,
					 const struct kp_config *cfg, __u64 now, __u32 len)
{
	__u32 lo = cfg->snat_port_min ? cfg->snat_port_min : KP_SNAT_PORT_MIN_DEFAULT;
	__u32 hi = cfg->snat_port_max ? cfg->snat_port_max : KP_SNAT_PORT_MAX_DEFAULT;
	struct kp_snat4_key sk;
	struct kp_snat4_val sv;
	__u32 span;

	if (hi < lo)
		hi = lo;
	span = hi - lo + 1;
	for (int i = 0; i < KP_SNAT_MAX_RETRIES; i++) {
		struct kp_snat4_val *old;

		fv->snat_port = bpf_htons((__u16)(lo + kp_snat_next() % span));
		kp_snat_of_fwd(fk, fv, &sk, &sv);
		if (!bpf_map_update_elem(&kp_snat4_v1, &sk, &sv, BPF_NOEXIST))
			return 0;
		/* Taken. A dead entry (its flow timed out, the agent has not swept it yet) is freed and
		 * claimed again with NOEXIST, so a racing CPU still cannot get the same port. */
		old = bpf_map_lookup_elem(&kp_snat4_v1, &sk);
		if (old && old->expires_ns < now) {
			bpf_map_delete_elem(&kp_snat4_v1, &sk);
			if (!bpf_map_update_elem(&kp_snat4_v1, &sk, &sv, BPF_NOEXIST))
				return 0;
		}
		kp_count(KP_STAT_SNAT_RETRY, len);
	}
	return -1;
}

#endif /* KPROXY_LIB_SNAT_H */
