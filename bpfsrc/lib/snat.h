/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Source-port allocation for SNAT of external flows to remote backends (ingress node).
 *
 * Why ports must not be handed round blindly: the backend (which usually closes first) keeps each
 * closed connection's 4-tuple (node:port -> backend) in TIME_WAIT for 60 s. Linux
 * (tcp_timewait_state_process) accepts a SYN on such a tuple as a new connection only if
 *   - both connections use TCP timestamps and the SYN's TSval is above the last one the old
 *     connection sent (PAWS rejects a lower one), or
 *   - otherwise, its sequence number is beyond where the old connection ended.
 * Any other SYN is answered with a bare ACK; the client resets and retries after 1 s. Linux clients
 * draw a random timestamp offset and a random initial sequence number per 4-tuple (measured on
 * 6.18), so a port that carried client A's connection and now carries client B's (or A's from another
 * source port) is rejected half the time. Under load (the lab's NodePort, 2,000-connection bursts
 * within a minute) those retries timed connections out.
 *
 * Hence the rules:
 *  1. Sticky: a client re-opening its own tuple (same client address and port, same frontend and
 *     backend) keeps its port: its timestamps and sequence numbers continue where they were.
 *     kp_snat_alloc() gets the old flow for that. A client coming back after the conntrack entry
 *     expired (fin timeout) is a new flow: its first candidate is its "home" port (kp_snat_home),
 *     the same for the same tuple, and its own tombstone there is taken over at once.
 *  2. Tombstones: a closed flow's entry stays for KP_SNAT_TW_HOLD_NS beyond the flow (kp_snat_of_fwd
 *     writes expires_ns = flow expiry + hold for CLOSING/CLOSED flows; the agent sweeps it then),
 *     with tw_key: what the backend's TIME_WAIT holds against a new SYN there, recorded from the
 *     client's FIN (kp_snat_tw_mark). Another client tuple gets a tombstone's port only once the flow
 *     is over and only with a SYN that TIME_WAIT accepts (kp_snat_tw_accepts): half of the SYNs
 *     with timestamps, whatever the load, and never a PAWS rejection. "Over": closed by both ends
 *     (KP_CT_CLOSED, kp_snat_fin_state: FINs both ways, or a reset), at once, its conntrack entry
 *     taken along (kp_snat_take_closed), as nf_nat evicts a TIME_WAIT conntrack; or its conntrack
 *     entry expired (half-closed flows: the fin timeout). Waiting for the fin timeout in every case
 *     capped a backend at (port range) / (fin timeout), 2,900 new connections/s with the agent's
 *     default range and 10 s, however many ports had no live flow. A flow that ended by a reset
 *     leaves nothing in TIME_WAIT. Tombstones of unknown TIME_WAIT (no key: written by an older
 *     program, or a flow the client never finished; or a SYN without timestamps against a
 *     timestamp key) are taken only when no candidate was better, the one whose flow ended longest
 *     ago (at worst one 1-s retry for that client).
 *  3. Other candidates come from one rotating cursor per loaded object (all CPUs, atomically
 *     advanced), not from random picks: a port comes back only after every other port was tried
 *     once, i.e. the one used longest ago first. At most KP_SNAT_MAX_RETRIES candidates; none
 *     usable: the SYN is dropped and counted (KP_DROP_SNAT_NO_PORT), and its retransmission draws
 *     again.
 *
 * A port is taken by creating its kp_snat4_v1 entry with BPF_NOEXIST (a dead one or a tombstone is
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
#include "lib/tcp.h"

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
 * tw_key: the upper 16 bits of the value a new SYN must exceed (the old connection's last TSval, or
 * the sequence number after its FIN), plus one. A SYN whose value is at or beyond tw_key << 16 is
 * beyond the old value; the price is refusing the SYNs less than 65,536 above it, 1 candidate in
 * 65,536. 0 means "not known", so a key that comes to 0 becomes 1 (still beyond).
 */
static __always_inline __u16 kp_snat_tw_key_of(__u16 value_hi)
{
	__u16 key = value_hi + 1;

	return key ? key : 1;
}

/*
 * Linux takes the SYN as a new connection when its value v is above the old one T by 1 to 2^31
 * ((__s32)(T - v) < 0). With the upper halves only: v >= key << 16 (> T) and v - (key << 16) below
 * 0x7fff << 16, so that v - T stays under 2^31 (T is at most 2^16 below key << 16).
 */
static __always_inline int kp_snat_tw_beyond(__u16 value_hi, __u16 key)
{
	return (__u16)(value_hi - key) < 0x7fff;
}

#undef KP_FAM
#define KP_FAM 4
#include "lib/fam.h"
#include "lib/snat_fam.h"
#undef KP_FAM
#define KP_FAM 6
#include "lib/fam.h"
#include "lib/snat_fam.h"
#undef KP_FAM

#endif /* KPROXY_LIB_SNAT_H */
