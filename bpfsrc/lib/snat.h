/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Source-port allocation for SNAT of external flows to remote backends (ingress node).
 *
 * Why ports must not be handed round quickly: the backend (which usually closes first) keeps each
 * closed connection's 4-tuple (node:port -> backend) in TIME_WAIT for 60 s, and a SYN on such a
 * tuple is accepted only if its TCP timestamp is not lower than the last one seen there (PAWS).
 * Linux clients draw a random timestamp offset per 4-tuple (measured on 6.18: two connections of
 * one client to one address from different ports carry unrelated timestamps), so a port that
 * carried client A's connection and now carries client B's (or A's from another source port) is
 * rejected half the time: the backend answers the SYN with a bare ACK, the client resets and tries
 * again after 1 s. Worse, that reset closed the flow, so the retried SYN was a new flow that got
 * yet another recently used port: connections took 1 + 2 s and timed out, and the lab's NodePort
 * fell from ~4,000 to ~50 connections/s whenever a burst came within a minute of the previous one.
 *
 * Hence three rules:
 *  1. Sticky: a client re-opening its own tuple (same client address and port, same frontend and
 *     backend) keeps its port: its timestamps continue where they were, TIME_WAIT accepts the SYN.
 *     kp_snat_alloc() gets the old flow for that. A client coming back after the conntrack entry
 *     expired (fin timeout) is a new flow: its first candidate is its "home" port (kp_snat_home),
 *     the same for the same tuple, and its own tombstone there is taken over at once.
 *  2. Cooling: a closed flow's entry stays as a tombstone for KP_SNAT_TW_HOLD_NS beyond the flow
 *     (kp_snat_of_fwd writes expires_ns = flow expiry + hold for CLOSING/CLOSED flows; the agent
 *     sweeps it then). A port is handed to another client tuple only once it is free or cold.
 *  3. Other candidates come from one rotating cursor per loaded object (all CPUs, atomically advanced),
 *     not from random picks: a port comes back only after every other port was tried once, i.e.
 *     the one used longest ago first. At most KP_SNAT_MAX_RETRIES candidates; if none was free or
 *     cold, the tombstone among them whose flow ended longest ago is taken over (its SYN may cost
 *     the client one 1-s retry, never more: the retry keeps the port, rule 1). Beyond ~range/60 s
 *     new client tuples per second and backend (28,976 ports: ~480/s) that is unavoidable with one
 *     node address. No free port and no tombstone: the packet is dropped and counted
 *     (KP_DROP_SNAT_NO_PORT).
 *
 * A port is taken by creating its kp_snat4_v1 entry with BPF_NOEXIST (a dead or cold one is
 * deleted first), so two CPUs never hand out the same (backend, node, port) tuple.
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

/* The flow behind an entry is over (a tombstone's expiry includes the TIME_WAIT hold). */
static __always_inline int kp_snat_flow_over(const struct kp_snat4_val *v, __u64 now)
{
	__u64 hold = kp_snat_closing(v->state) ? KP_SNAT_TW_HOLD_NS : 0;

	return v->expires_ns < now + hold;
}

static __always_inline int kp_snat_same_client(const struct kp_snat4_val *v, const struct kp_ct4_key *fk)
{
	return v->client_addr == fk->saddr && v->client_port == fk->sport && v->front_addr == fk->daddr &&
	       v->front_port == fk->dport;
}

/*
 * First candidate for a client tuple: its own port shifted by a per-(client address, frontend)
 * offset. The same tuple always gets the same port (its timestamps continue there, rule 1), and the
 * tuples of one client address never collide with each other (a shift is a bijection), however
 * fast the client re-uses its ports. Tuples of different clients may collide: the cursor then.
 */
static __always_inline __u32 kp_snat_home(const struct kp_ct4_key *fk)
{
	__u32 h = (fk->saddr ^ (fk->daddr * 0x9e3779b1U) ^ ((__u32)fk->dport << 7)) * 0x85ebca6bU;

	return (h ^ (h >> 16)) + bpf_ntohs(fk->sport);
}

/* Replace the entry at sk (seen dead, cold or ours) by sv; fails if another CPU got there first. */
static __always_inline int kp_snat_take(const struct kp_snat4_key *sk, const struct kp_snat4_val *sv)
{
	bpf_map_delete_elem(&kp_snat4_v1, sk);
	return bpf_map_update_elem(&kp_snat4_v1, sk, sv, BPF_NOEXIST);
}

/*
 * Give the new SNATed flow (fk, fv; fv->snat_addr and nat_* set) a port: fills fv->snat_port and
 * writes its kp_snat4_v1 entry. old: the flow this one re-opens on the same FWD tuple, or NULL.
 * Returns 0, or -1 when no port could be had.
 */
static __always_inline int kp_snat_alloc(const struct kp_ct4_key *fk, struct kp_ct4_val *fv,
					 const struct kp_ct4_val *old, const struct kp_config *cfg, __u64 now,
					 __u32 len)
{
	__u32 lo = cfg->snat_port_min ? cfg->snat_port_min : KP_SNAT_PORT_MIN_DEFAULT;
	__u32 hi = cfg->snat_port_max ? cfg->snat_port_max : KP_SNAT_PORT_MAX_DEFAULT;
	struct kp_snat4_key sk;
	struct kp_snat4_val sv;
	__u64 best_exp = ~0ULL;
	__be16 best = 0;
	__u32 span;

	if (hi < lo)
		hi = lo;
	span = hi - lo + 1;

	if (old && (old->flags & KP_CT_F_SNAT)) {
		struct kp_snat4_val *ov;

		if (old->nat_addr == fv->nat_addr && old->nat_port == fv->nat_port &&
		    old->snat_addr == fv->snat_addr) {
			/* Same backend: keep the port. Its entry is this tuple's (or gone): overwrite it. */
			fv->snat_port = old->snat_port;
			kp_snat_of_fwd(fk, fv, &sk, &sv);
			ov = bpf_map_lookup_elem(&kp_snat4_v1, &sk);
			if (!ov || kp_snat_same_client(ov, fk)) {
				if (!bpf_map_update_elem(&kp_snat4_v1, &sk, &sv, BPF_ANY))
					return 0;
			}
		} else if (!kp_snat_closing(old->state)) {
			/* Another backend, the old flow never closed (its backend went away): nothing
			 * to keep in TIME_WAIT there, and its entry would hold the port for hours. */
			struct kp_ct4_key ofk = *fk;

			kp_snat_of_fwd(&ofk, old, &sk, &sv);
			bpf_map_delete_elem(&kp_snat4_v1, &sk);
		}
		/* else: the old port stays as a tombstone toward the old backend. */
	}

	for (int i = 0; i < KP_SNAT_MAX_RETRIES; i++) {
		struct kp_snat4_val *cur;
		__u64 idx = i == 0 ? kp_snat_home(fk) : kp_snat_next();

		fv->snat_port = bpf_htons((__u16)(lo + idx % span));
		kp_snat_of_fwd(fk, fv, &sk, &sv);
		if (!bpf_map_update_elem(&kp_snat4_v1, &sk, &sv, BPF_NOEXIST))
			return 0;
		cur = bpf_map_lookup_elem(&kp_snat4_v1, &sk);
		if (cur) {
			/* Dead (flow timed out, not swept yet) or cold, or our own tombstone. */
			if ((cur->expires_ns < now || (kp_snat_same_client(cur, fk) && kp_snat_flow_over(cur, now))) &&
			    !kp_snat_take(&sk, &sv))
				return 0;
			if (kp_snat_closing(cur->state) && kp_snat_flow_over(cur, now) && cur->expires_ns < best_exp) {
				best_exp = cur->expires_ns;
				best = fv->snat_port;
			}
		}
		kp_count(KP_STAT_SNAT_RETRY, len);
	}
	if (best) {
		/* Every candidate cooling: the one closed longest ago. */
		fv->snat_port = best;
		kp_snat_of_fwd(fk, fv, &sk, &sv);
		if (!kp_snat_take(&sk, &sv))
			return 0;
	}
	return -1;
}

#endif /* KPROXY_LIB_SNAT_H */
