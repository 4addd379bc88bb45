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

/* Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds, used when the entry says 0. */
#define KP_AFFINITY_TIMEOUT_DEFAULT 10800

#define KP_SVC_F_TYPED (KP_SVC_F_NODEPORT | KP_SVC_F_LOADBALANCER | KP_SVC_F_EXTERNAL_IP)

enum kp_origin {
	KP_ORIGIN_POD = 0,     /* packet from a local pod: INT scope for TWO_SCOPES services */
	KP_ORIGIN_NETDEV = 1,  /* packet from outside: EXT scope, typed frontends only */
};

/* Slot 0 of the frontend the packet is addressed to, or NULL. *key is left at that slot-0 key. */
static __always_inline struct kp_svc4_val *kp_svc_lookup(const struct kp_pkt *p, int origin,
							 struct kp_svc4_key *key)
{
	struct kp_svc4_val *svc, *svc_int;

	key->addr = p->daddr;
	key->port = p->dport;
	key->slot = 0;
	key->proto = p->proto;
	key->scope = KP_SCOPE_EXT;
	key->pad[0] = 0;
	key->pad[1] = 0;
	svc = bpf_map_lookup_elem(&kp_svc4_v1, key);
	if (!svc)
		return NULL;
	if (origin == KP_ORIGIN_NETDEV)
		return (svc->flags & KP_SVC_F_TYPED) ? svc : NULL;
	if (svc->flags & KP_SVC_F_TWO_SCOPES) {
		key->scope = KP_SCOPE_INT;
		svc_int = bpf_map_lookup_elem(&kp_svc4_v1, key);
		if (svc_int)
			return svc_int;
		/* The agent writes INT before flagging EXT; a missing INT entry is a transient state. */
		key->scope = KP_SCOPE_EXT;
	}
	return svc;
}

/* Pick a backend for a new flow: the affinity entry if valid, else a uniformly random slot. */
static __always_inline int kp_lb_select(const struct kp_svc4_key *svc_key, const struct kp_svc4_val *svc,
					const struct kp_pkt *p, __u64 now, __u32 *backend_id,
					struct kp_be4_val *be)
{
	struct kp_aff4_key ak = { .client_addr = p->saddr, .svc_id = svc->svc_id };
	struct kp_svc4_key slot_key = *svc_key;
	struct kp_svc4_val *slot;
	struct kp_be4_val *b;
	int affinity = svc->flags & KP_SVC_F_AFFINITY;

	if (affinity) {
		struct kp_aff4_val *av = bpf_map_lookup_elem(&kp_aff4_v1, &ak);
		__u64 timeout = svc->affinity_timeout ? svc->affinity_timeout : KP_AFFINITY_TIMEOUT_DEFAULT;

		if (av && now - av->last_used_ns < timeout * KP_NS_PER_SEC) {
			__u32 id = av->backend_id;

			b = bpf_map_lookup_elem(&kp_be4_v1, &id);
			if (b && !(b->flags & KP_BE_F_TERMINATING)) {
				*backend_id = id;
				*be = *b;
				kp_count(KP_STAT_AFFINITY_HIT, p->len);
				goto remember;
			}
		}
	}

	slot_key.slot = 1 + bpf_get_prandom_u32() % svc->count;
	slot = bpf_map_lookup_elem(&kp_svc4_v1, &slot_key);
	if (!slot)
		return -1;
	*backend_id = slot->backend_id;
	b = bpf_map_lookup_elem(&kp_be4_v1, backend_id);
	if (!b)
		return -1;
	*be = *b;
remember:
	if (affinity) {
		/* Once per new connection, never per packet. */
		struct kp_aff4_val nv = { .last_used_ns = now, .backend_id = *backend_id };

		bpf_map_update_elem(&kp_aff4_v1, &ak, &nv, BPF_ANY);
	}
	return 0;
}

/*
 * A packet to a service frontend: follow its flow's backend, or pick one and track the flow,
 * then DNAT. No backend at all: ICMP port unreachable, or a drop when the agent asked for one.
 */
static __always_inline int kp_lb4_forward(struct __sk_buff *skb, const struct kp_pkt *p,
					  const struct kp_svc4_key *svc_key, const struct kp_svc4_val *svc,
					  __u8 ct_flags)
{
	struct kp_ct4_key fk;
	struct kp_ct4_val fv = {};
	struct kp_ct4_val *cur;
	struct kp_be4_val be;
	__u32 backend_id;
	__u32 new_stat = KP_STAT_CT_NEW;
	__u64 now = bpf_ktime_get_ns();
	__u8 state;

	if (svc->count == 0) {
		if (svc->flags & KP_SVC_F_NO_LOCAL_DROP) {
			kp_count(KP_DROP_NO_LOCAL_BACKEND, p->len);
			return TC_ACT_SHOT;
		}
		return kp_icmp_reject(skb, p);
	}

	kp_ct_key_of_pkt(&fk, p, KP_CT_DIR_FWD);
	cur = kp_ct_lookup(&fk, now);
	if (cur) {
		fv = *cur;
		if (!kp_ct_tuple_reused(fv.state, p->tcp_flags) &&
		    bpf_map_lookup_elem(&kp_be4_v1, &fv.backend_id)) {
			kp_ct_touch(&fk, &fv, kp_ct_next_state(fv.state, p->proto, p->tcp_flags, 0), fv.flags,
				    now);
			goto dnat;
		}
		new_stat = KP_STAT_CT_REOPEN;
	}

	if (kp_lb_select(svc_key, svc, p, now, &backend_id, &be)) {
		kp_count(KP_DROP_BACKEND_MISSING, p->len);
		return TC_ACT_SHOT;
	}
	state = p->proto == IPPROTO_TCP ? KP_CT_SYN_SENT : KP_CT_UDP;
	fv.expires_ns = now + kp_ct_timeout_ns(state);
	fv.backend_id = backend_id;
	fv.svc_id = svc->svc_id;
	fv.nat_addr = be.addr;
	fv.nat_port = be.port;
	fv.state = state;
	fv.flags = ct_flags | ((be.flags & KP_BE_F_LOCAL) ? KP_CT_F_LOCAL_BE : 0);
	if (kp_ct_write(&fk, &fv)) {
		kp_count(KP_DROP_CT_FULL, p->len);
		return TC_ACT_SHOT;
	}
	kp_count(new_stat, p->len);
dnat:
	if (kp_nat4(skb, p, KP_NAT_DST, fv.nat_addr, fv.nat_port)) {
		kp_count(KP_DROP_NAT_FAILED, p->len);
		return TC_ACT_SHOT;
	}
	kp_count(KP_STAT_DNAT, p->len);
	return TC_ACT_OK;
}

#endif /* KPROXY_LIB_LB_H */
