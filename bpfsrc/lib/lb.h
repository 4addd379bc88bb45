/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Service lookup, backend selection (random slot, sessionAffinity) and the forward (DNAT) path. */
#ifndef KPROXY_LIB_LB_H
#define KPROXY_LIB_LB_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "lib/parse.h"
#include "lib/ct.h"
#include "lib/nat.h"
#include "lib/icmp.h"
#include "lib/stats.h"
#include "lib/fib.h"
#include "lib/dsr.h"
#include "lib/snat.h"
#include "lib/srcrange.h"

/* Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds, used when the entry says 0. */
#define KP_AFFINITY_TIMEOUT_DEFAULT 10800

#define KP_SVC_F_TYPED (KP_SVC_F_NODEPORT | KP_SVC_F_LOADBALANCER | KP_SVC_F_EXTERNAL_IP)

enum kp_origin {
	KP_ORIGIN_POD = 0,     /* packet from a local pod: INT scope for TWO_SCOPES services */
	KP_ORIGIN_NETDEV = 1,  /* packet from outside: EXT scope (kp_from_netdev decides about ClusterIPs) */
};

static __always_inline struct kp_ct6_val *kp_scratch_old6(void)
{
	__u32 zero = 0;
	struct kp_scratch *s = bpf_map_lookup_elem(&kp_scratch, &zero);

	return s ? &s->old6 : NULL;
}

#undef KP_FAM
#define KP_FAM 4
#include "lib/fam.h"
#include "lib/lb_fam.h"
#undef KP_FAM
#define KP_FAM 6
#include "lib/fam.h"
#include "lib/lb_fam.h"
#undef KP_FAM

/*
 * A TCP packet (not a SYN) of a pod's flow whose frontend is gone: a Service port deleted while the
 * connection lived. kube-proxy's conntrack keeps translating such a connection until it ends; so does
 * this, from the flow's own entry (its backend address and mode), however the Service changed. -1 if
 * the packet belongs to no tracked flow. A global function (verified once, apart from its caller)
 * whose flow lives in the scratch map: kp_from_pod's frame leaves little stack for a callee.
 */
__attribute__((noinline)) int kp_ct_continue(struct __sk_buff *skb, struct kp_pkt *p)
{
	struct kp_scratch *s;
	struct kp_ct4_val *cur;
	__u32 zero = 0;
	__u64 now;

	if (!skb || !p)
		return -1;
	s = bpf_map_lookup_elem(&kp_scratch, &zero);
	if (!s)
		return -1;
	now = bpf_ktime_get_ns();
	kp_ct_key_of_pkt4(&s->ct_key, p, KP_CT_DIR_FWD);
	cur = kp_ct_lookup4(&s->ct_key, now);
	if (!cur)
		return -1;
	s->ct_val = *cur;
	kp_ct_touch4(&s->ct_key, &s->ct_val, kp_ct_next_state(s->ct_val.state, p->proto, p->tcp_flags, 0),
		    s->ct_val.flags, now);
	kp_count(KP_STAT_CT_ORPHAN, p->len);
	/* A pod's flow is plain DNAT or a hairpin (kp_flow_mode, origin pod), never SNAT or DSR. */
	if (kp_nat4(skb, p, KP_NAT_DST, s->ct_val.nat_addr, s->ct_val.nat_port))
		goto fail;
	if (s->ct_val.flags & KP_CT_F_HAIRPIN) {
		if (kp_nat4(skb, p, KP_NAT_SRC, s->ct_val.snat_addr, s->ct_val.snat_port))
			goto fail;
		return kp_bounce(skb);
	}
	return TC_ACT_OK;
fail:
	kp_count(KP_DROP_NAT_FAILED, p->len);
	return TC_ACT_SHOT;
}

/*
 * Backend node, from a netdev: a packet sent here by an ingress node in DSR mode (already DNATed to
 * a local backend). If it carries the DSR option, strip it and track the flow so the backend's
 * replies leave with the frontend as their source (kp_revnat4 in kp_from_pod); the kernel then
 * delivers it to the backend with the client's address intact. Returns -1 without the option.
 */
static __always_inline int kp_dsr_rx(struct __sk_buff *skb, struct kp_pkt *p, __u8 how)
{
	struct kp_dsr_opt opt;
	struct kp_ct4_key fk;
	struct kp_ct4_val fv = {};
	struct kp_ct4_val *cur;
	__u64 now = bpf_ktime_get_ns();
	__u8 state;

	if (!kp_dsr_opt_read(skb, p, &opt))
		return -1;
	if (kp_dsr_opt_pop(skb, p, &opt)) {
		kp_count(KP_DROP_ENCAP_FAILED, p->len);
		return TC_ACT_SHOT;
	}
	fk.saddr = p->saddr;
	fk.daddr = opt.addr;
	fk.sport = p->sport;
	fk.dport = opt.port;
	fk.proto = p->proto;
	fk.dir = KP_CT_DIR_FWD;
	fk.pad[0] = 0;
	fk.pad[1] = 0;
	/* UDP carries the option on every datagram: a live entry of the same flow is only touched. */
	cur = kp_ct_lookup4(&fk, now);
	if (cur && cur->nat_addr == p->daddr && cur->nat_port == p->dport &&
	    !kp_ct_tuple_reused(cur->state, p->tcp_flags)) {
		fv = *cur;
		kp_ct_touch4(&fk, &fv, kp_ct_next_state(fv.state, p->proto, p->tcp_flags, 0), fv.flags, now);
		kp_count(KP_STAT_DSR_RX, p->len);
		return TC_ACT_OK;
	}
	state = p->proto == IPPROTO_TCP ? KP_CT_SYN_SENT : KP_CT_UDP;
	fv.expires_ns = now + kp_ct_timeout_ns(state);
	fv.nat_addr = p->daddr;
	fv.nat_port = p->dport;
	fv.state = state;
	fv.flags = how | KP_CT_F_EXTERNAL | KP_CT_F_LOCAL_BE;
	if (cur)
		kp_ct_drop_old_reply4(&fk, cur);
	if (kp_ct_claim_reply4(&fk, &fv, now, p->len)) {
		kp_count(KP_DROP_TUPLE_HELD, p->len);   /* the backend serves that 4-tuple already */
		return TC_ACT_SHOT;
	}
	if (kp_ct_write4(&fk, &fv)) {
		kp_count(KP_DROP_CT_FULL, p->len);
		return TC_ACT_SHOT;
	}
	kp_count(KP_STAT_DSR_RX, p->len);
	return TC_ACT_OK;
}

#endif /* KPROXY_LIB_LB_H */
