/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking: two LRU entries per translated flow.
 *   FWD   key (client -> frontend, as the client sends it),  val.nat = backend
 *   REPLY key (backend -> client, as the backend sends it),  val.nat = frontend
 * SNATed flows (KP_CT_F_SNAT) keep their reply side in kp_snat4_v1 instead of a REPLY entry: the
 * backend answers node:nat_port, not the client. Hairpin flows (KP_CT_F_HAIRPIN) answer the hairpin
 * address, so their REPLY key carries it and REPLY snat_addr/port hold the client to restore.
 * Each key is derivable from the other entry's key + value, so a hit on either side can rewrite
 * both without a second lookup. Entries are written only on a state change or when their expiry
 * moved by more than KP_CT_REFRESH_NS: no per-packet map writes.
 */
#ifndef KPROXY_LIB_CT_H
#define KPROXY_LIB_CT_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "lib/parse.h"
#include "lib/stats.h"

#define KP_NS_PER_SEC 1000000000ULL

static __always_inline struct kp_config *kp_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&kp_cfg_v1, &zero);
}

/* SCTP's timeouts (nf_conntrack_proto_sctp's): a flow's TCP-like state (kp_sctp_flags) picks one. */
static __always_inline __u32 kp_ct_sctp_timeout(const struct kp_config *cfg, __u8 state)
{
	__u32 secs;

	switch (state) {
	case KP_CT_SYN_SENT:
		secs = cfg ? cfg->ct_sctp_init_timeout : 0;
		return secs ? secs : KP_CT_SCTP_INIT_TIMEOUT_DEFAULT;
	case KP_CT_CLOSING:
	case KP_CT_CLOSED:
		secs = cfg ? cfg->ct_sctp_close_timeout : 0;
		return secs ? secs : KP_CT_SCTP_CLOSE_TIMEOUT_DEFAULT;
	default:
		secs = cfg ? cfg->ct_sctp_timeout : 0;
		return secs ? secs : KP_CT_SCTP_TIMEOUT_DEFAULT;
	}
}

static __always_inline __u64 kp_ct_timeout_ns(__u8 state, __u8 proto)
{
	struct kp_config *cfg = kp_config();
	__u32 secs = 0;

	if (proto == KP_IPPROTO_SCTP)
		return (__u64)kp_ct_sctp_timeout(cfg, state) * KP_NS_PER_SEC;
	switch (state) {
	case KP_CT_SYN_SENT:
		secs = cfg ? cfg->ct_syn_timeout : 0;
		if (!secs)
			secs = KP_CT_SYN_TIMEOUT_DEFAULT;
		break;
	case KP_CT_ESTABLISHED:
		secs = cfg ? cfg->ct_tcp_timeout : 0;
		if (!secs)
			secs = KP_CT_TCP_TIMEOUT_DEFAULT;
		break;
	case KP_CT_CLOSING:
	case KP_CT_CLOSED:
		secs = cfg ? cfg->ct_fin_timeout : 0;
		if (!secs)
			secs = KP_CT_FIN_TIMEOUT_DEFAULT;
		break;
	default:
		secs = cfg ? cfg->ct_udp_timeout : 0;
		if (!secs)
			secs = KP_CT_UDP_TIMEOUT_DEFAULT;
		break;
	}
	return (__u64)secs * KP_NS_PER_SEC;
}

/* How long a closed SNATed flow keeps its port from other clients: the backend's TIME_WAIT (lib/snat.h). */
#define KP_SNAT_TW_HOLD_NS (60 * KP_NS_PER_SEC)

static __always_inline int kp_snat_closing(__u8 state)
{
	return state == KP_CT_CLOSING || state == KP_CT_CLOSED;
}

static __always_inline int kp_ct_closing(__u8 state)
{
	return state == KP_CT_CLOSING || state == KP_CT_CLOSED;
}

/* The state a new flow starts in: TCP and SCTP (whose chunks kp_sctp_flags maps onto TCP flags) wait for
 * a reply in SYN_SENT, UDP has one state. */
static __always_inline __u8 kp_ct_open_state(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == KP_IPPROTO_SCTP ? KP_CT_SYN_SENT : KP_CT_UDP;
}

static __always_inline __u8 kp_ct_next_state(__u8 state, __u8 proto, __u8 tcp_flags, int reply)
{
	if (proto != IPPROTO_TCP && proto != KP_IPPROTO_SCTP)
		return KP_CT_UDP;
	if (tcp_flags & KP_TCP_RST)
		return KP_CT_CLOSED;
	if (tcp_flags & KP_TCP_FIN)
		return state == KP_CT_CLOSED ? KP_CT_CLOSED : KP_CT_CLOSING;
	if (reply && state == KP_CT_SYN_SENT)
		return KP_CT_ESTABLISHED;
	return state;
}

/* A fresh SYN on a closing or closed flow reuses the tuple: it is a new connection. */
static __always_inline int kp_ct_tuple_reused(__u8 state, __u8 tcp_flags)
{
	return (tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) == KP_TCP_SYN &&
	       (state == KP_CT_CLOSING || state == KP_CT_CLOSED);
}


#undef KP_FAM
#define KP_FAM 4
#include "lib/fam.h"
#include "lib/ct_fam.h"
#undef KP_FAM
#define KP_FAM 6
#include "lib/fam.h"
#include "lib/ct_fam.h"
#undef KP_FAM

#endif /* KPROXY_LIB_CT_H */
