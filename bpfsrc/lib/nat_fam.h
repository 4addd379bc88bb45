/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Reverse NAT of replies, for one address family (lib/fam.h: included by lib/nat.h once per family). */

/*
 * A reply of a translated flow (backend -> client): restore the frontend as its source.
 * from_pod: the reply leaves a local backend. Replies of flows from outside (local backend or DSR)
 * and those whose restored source is this node's address are forwarded by BPF (kp_fib_*): the
 * kernel would drop a local source arriving on a veth as a martian. Hairpin replies go straight
 * back to the pod. A SYN-ACK of a DSR IPIP flow gets its MSS lowered so the client's segments fit
 * the LAN once encapsulated.
 */
static __always_inline int KP_F(kp_revnat)(struct __sk_buff *skb, const KP_PKT *p, int from_pod)
{
	struct kp_config *cfg = kp_config();
	struct bpf_fib_lookup *fib = NULL;
	KP_CT_KEY rk, fk;
	KP_CT_VAL rv, fv;
	KP_CT_VAL *cur;
	__u64 now = bpf_ktime_get_ns();
	int fwd = 0, res = KP_FIB_FAIL;

	KP_F(kp_ct_key_of_pkt)(&rk, p, KP_CT_DIR_REPLY);
	cur = KP_F(kp_ct_lookup)(&rk, now);
	if (!cur)
		return TC_ACT_OK;
	rv = *cur;
	/*
	 * A SYN from the backend side on a closing or closed flow belongs to another connection: the
	 * client re-used the port for a connection straight to the backend, whose SYN we did not see
	 * (kp_ct_direct_syn normally removes the old flow then). Rewriting its SYN-ACK to come from the
	 * frontend would make the client reset it, every retry. Passed as it is; the old flow goes, so
	 * the new connection's later packets find nothing either. A SYN-ACK on an ESTABLISHED flow is
	 * translated as before: the backend retransmits its SYN-ACK when the client's ACK was lost or
	 * dropped (a full accept queue does that), and that is the same connection.
	 */
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & KP_TCP_SYN) && kp_ct_closing(rv.state)) {
		KP_F(kp_ct_forget_reply)(&rk, &rv);
		KP_F(kp_count)(KP_STAT_CT_STALE_REPLY, p->len);
		return TC_ACT_OK;
	}
	KP_F(kp_ct_fwd_of_reply)(&rk, &rv, &fk, &fv);
	KP_F(kp_ct_touch)(&fk, &fv, kp_ct_next_state(fv.state, p->proto, p->tcp_flags, 1),
		    fv.flags | KP_CT_F_SEEN_REPLY, now);
	if (from_pod && !(rv.flags & KP_CT_F_HAIRPIN) &&
	    ((rv.flags & KP_CT_F_EXTERNAL) || KP_F(kp_is_node_addr)(cfg, rv.nat_addr)) && p->ttl > 1) {
		fib = kp_fib_room();
		res = KP_F(kp_fib_lookup)(skb, fib, rv.nat_addr, p->daddr, 0);
		fwd = res == KP_FIB_OK || res == KP_FIB_NEIGH;
	}
	/* whether the backend is a pod or the node's own stack (a hostNetwork endpoint, kp_to_netdev) */
	if ((rv.flags & KP_CT_F_DSR_IPIP) && p->proto == IPPROTO_TCP && (p->tcp_flags & KP_TCP_SYN) &&
	    kp_mss_clamp(skb, p->l4_off, KP_F(kp_l4_csum_off)(p), kp_tunnel_mss(cfg, KP_TUNNEL_HLEN)))
		KP_F(kp_count)(KP_STAT_MSS_CLAMP, p->len);
	if (KP_F(kp_nat)(skb, p, KP_NAT_SRC, rv.nat_addr, rv.nat_port))
		goto fail;
	if (rv.flags & KP_CT_F_HAIRPIN) {
		if (KP_F(kp_nat)(skb, p, KP_NAT_DST, rv.snat_addr, rv.snat_port))
			goto fail;
		KP_F(kp_count)(KP_STAT_REVNAT, p->len);
		KP_F(kp_count)(KP_STAT_HAIRPIN, p->len);
		return from_pod ? kp_bounce(skb) : TC_ACT_OK;
	}
	KP_F(kp_count)(KP_STAT_REVNAT, p->len);
	if (!fwd)
		return TC_ACT_OK;
	if (KP_F(kp_ttl_dec)(skb, p->ttl))
		goto fail;
	return KP_F(kp_fib_redirect)(skb, fib, res);
fail:
	KP_F(kp_count)(KP_DROP_NAT_FAILED, p->len);
	return TC_ACT_SHOT;
}

/*
 * Ingress node, from a netdev: a reply of a SNATed flow (backend -> node:nat_port). Restore
 * client as destination and frontend as source, forward it to the client. Returns -1 if the packet
 * is not such a reply.
 */
static __always_inline int KP_F(kp_snat_revnat)(struct __sk_buff *skb, const KP_PKT *p)
{
	KP_SNAT_KEY sk = {
		.saddr = p->saddr,
		.daddr = p->daddr,
		.sport = p->sport,
		.dport = p->dport,
		.proto = p->proto,
	};
	KP_SNAT_VAL *cur, sv;
	struct bpf_fib_lookup *fib;
	KP_CT_KEY fk;
	KP_CT_VAL *fcur, fv;
	__u64 now = bpf_ktime_get_ns();
	int res;

	cur = bpf_map_lookup_elem(&KP_SNAT_MAP, &sk);
	if (!cur || cur->expires_ns < now)
		return -1;
	sv = *cur;
	fk.saddr = sv.client_addr;
	fk.daddr = sv.front_addr;
	fk.sport = sv.client_port;
	fk.dport = sv.front_port;
	fk.proto = p->proto;
	fk.dir = KP_CT_DIR_FWD;
	fk.pad[0] = 0;
	fk.pad[1] = 0;
	fcur = KP_F(kp_ct_lookup)(&fk, now);
	if (fcur) {
		fv = *fcur;
		KP_F(kp_ct_touch)(&fk, &fv,
			    KP_F(kp_snat_fin_state)(&fv, kp_ct_next_state(fv.state, p->proto, p->tcp_flags, 1),
					      p->tcp_flags, 1, fv.tw_key),
			    fv.flags | KP_CT_F_SEEN_REPLY, now);
	}
	if (p->ttl <= 1)
		return TC_ACT_OK;   /* the kernel answers time exceeded to the backend */
	fib = kp_fib_room();
	res = KP_F(kp_fib_lookup)(skb, fib, sv.front_addr, sv.client_addr, 0);
	if (res != KP_FIB_OK && res != KP_FIB_NEIGH) {
		KP_F(kp_count)(KP_DROP_FIB, p->len);
		return TC_ACT_SHOT;
	}
	if (KP_F(kp_nat)(skb, p, KP_NAT_DST, sv.client_addr, sv.client_port) ||
	    KP_F(kp_nat)(skb, p, KP_NAT_SRC, sv.front_addr, sv.front_port) || KP_F(kp_ttl_dec)(skb, p->ttl)) {
		KP_F(kp_count)(KP_DROP_NAT_FAILED, p->len);
		return TC_ACT_SHOT;
	}
	KP_F(kp_count)(KP_STAT_SNAT_REVNAT, p->len);
	return KP_F(kp_fib_redirect)(skb, fib, res);
}
