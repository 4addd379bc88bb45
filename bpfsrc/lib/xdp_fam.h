/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * kp_xdp's handling of a flow's packets (its first one: kp_xdp_open), for one address family
 * (lib/fam.h: included by lib/xdp.h once per family, after the family's packet primitives kp_xnat4/6,
 * kp_xttl_dec4/6, kp_xfib4/6, kp_xdsr_layout4/6 and accessors kp_xsaddr4/6, kp_xdaddr4/6,
 * kp_xttl4/6, kp_xiplen4/6, kp_xiphlen4/6, kp_xdf4/6 over struct kp_xpkt4/6).
 */

/* The parser's view of a frame kp_xparse took (struct kp_pkt / kp_pkt6 of lib/parse.h), for the code
 * that opens flows. */
static __always_inline void KP_F(kp_xpkt_of)(const struct KP_F(kp_xpkt) *x, KP_PKT *p)
{
	p->len = x->len;
	p->ip_hlen = KP_F(kp_xiphlen)(x);
	p->l4_off = sizeof(struct ethhdr) + p->ip_hlen;
	p->saddr = KP_F(kp_xsaddr)(x);
	p->daddr = KP_F(kp_xdaddr)(x);
	p->sport = x->ports[0];
	p->dport = x->ports[1];
	p->proto = x->proto;
	p->tcp_flags = x->tcp_flags;
	p->icmp_type = 0;
	p->icmp_code = 0;
	p->ttl = KP_F(kp_xttl)(x);
	p->df = KP_F(kp_xdf)(x);
	p->tot_len = KP_F(kp_xiplen)(x);
}

/* Room for a flow's entry being refreshed or opened (kp_scratch's: XDP and TC never run nested on one
 * CPU). */
static __always_inline KP_CT_VAL *KP_F(kp_xscratch)(void)
{
	__u32 zero = 0;
	struct kp_scratch *s = bpf_map_lookup_elem(&kp_scratch, &zero);

	return s ? &s->KP_SCRATCH_CT_VAL : NULL;
}

/* ... and for the key of a flow being opened */
static __always_inline KP_CT_KEY *KP_F(kp_xscratch_key)(void)
{
	__u32 zero = 0;
	struct kp_scratch *s = bpf_map_lookup_elem(&kp_scratch, &zero);

	return s ? &s->KP_SCRATCH_CT_KEY : NULL;
}

/*
 * Make room in front for DSR's bytes (EXTRA: the option, the IPIP header, or both) before anything is
 * rewritten: 1 when the driver has not the headroom (nothing moved: the packet goes to the stack
 * untouched), -1 when the packet is no longer whole, 0 with x pointing at the packet where it lies now,
 * EXTRA bytes in. (A zero UDP checksum, "none", exists in IPv4 only: kp_xdp6 leaves such datagrams to TC.)
 */
static __always_inline int KP_F(kp_xroom)(struct xdp_md *ctx, struct KP_F(kp_xpkt) *x, __u32 extra)
{
	void *data, *end;

	if (bpf_xdp_adjust_head(ctx, -(int)extra))
		return 1;   /* nothing moved: the packet can go to the stack as it came */
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (extra > KP_DSR_EXTRA + KP_TUNNEL_HLEN)
		return -1;
	x->eth = data + extra;
	x->ip = (void *)(x->eth + 1);
	x->ports = (void *)(x->ip + 1);
	if ((void *)(x->ip + 1) + sizeof(struct udphdr) > end)
		return -1;
	if (x->proto == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(x->ip + 1);

		x->l4_csum = uh->check ? (__u16 *)&uh->check : NULL;
	} else {
		struct tcphdr *th = (void *)(x->ip + 1);

		if ((void *)(th + 1) > end)
			return -1;
		x->l4_csum = (__u16 *)&th->check;
	}
	return 0;
}

/* The frontend x is addressed to, if it serves traffic from outside as kp_from_netdev would (it has
 * backends; a ClusterIP only while they are open to the outside), else NULL: the packet is its. */
static __always_inline struct kp_svc4_val *KP_F(kp_xfrontend)(const struct KP_F(kp_xpkt) *x, KP_SVC_KEY *sk)
{
	struct kp_svc4_val *svc;

	KP_F(kp_svc_key_ext)(sk, KP_F(kp_xdaddr)(x), x->ports[1], x->proto);
	svc = bpf_map_lookup_elem(&KP_SVC_MAP, sk);
	if (!svc || !svc->count)
		return NULL;
	if (!(svc->flags & KP_SVC_F_TYPED) && kp_no_external_cluster_ip())
		return NULL;
	return svc;
}

/*
 * What kp_from_netdev checks before it follows a flow's entry, checked alike (else the packet is its):
 * the frontend is still there, has backends and is served from outside, and the flow's backend is still
 * known. A flow whose entry outlives its frontend or backend (deleted, re-balanced) is TC's to handle.
 */
static __always_inline int KP_F(kp_xfollowable)(const struct KP_F(kp_xpkt) *x, const KP_CT_VAL *v)
{
	KP_SVC_KEY sk;
	__u32 id = v->backend_id;

	return KP_F(kp_xfrontend)(x, &sk) && id && bpf_map_lookup_elem(&KP_BE_MAP, &id) != NULL;
}

/* Refresh the flow's entry as kp_from_netdev would (state and flags as they are), when it is due. */
static __always_inline void KP_F(kp_xrefresh)(const KP_CT_KEY *fk, const KP_CT_VAL *v, __u64 now)
{
	KP_CT_VAL *fv;

	if (kp_xfresh(v->state, fk->proto, v->expires_ns, now))
		return;
	fv = KP_F(kp_xscratch)();
	if (!fv)
		return;
	*fv = *v;
	KP_F(kp_ct_touch)(fk, fv, fv->state, fv->flags, now);
}

/* A packet of a tracked flow from outside (fk's FWD entry v): forward it as kp_lb_xlate would. */
static __always_inline int KP_F(kp_xdp_forward)(struct xdp_md *ctx, struct KP_F(kp_xpkt) *x, const KP_CT_KEY *fk,
					       const KP_CT_VAL *v, __u64 now)
{
	__u8 mode = v->flags & (KP_CT_F_SNAT | KP_CT_F_DSR_OPT | KP_CT_F_DSR_IPIP | KP_CT_F_HAIRPIN);
	/* states a packet without SYN, FIN or RST leaves as they are (kp_ct_next_state); a DSR flow stays
	 * SYN_SENT here: its replies bypass this node */
	int state_kept = x->proto == IPPROTO_TCP ? v->state == KP_CT_ESTABLISHED || v->state == KP_CT_SYN_SENT
						 : v->state == KP_CT_UDP;
	struct bpf_fib_lookup *fib;
	struct kp_config *cfg;
	KP_ADDR nat_addr = v->nat_addr, snat_addr = v->snat_addr, front_addr = KP_F(kp_xdaddr)(x), src, dst, node;
	__be16 nat_port = v->nat_port, snat_port = v->snat_port, front_port = x->ports[1];
	__u32 extra = 0, len = x->len;
	int opt = 0, tunnel = 0;

	/* the flows of this node's DSR backends (kp_dsr_rx: LOCAL_BE with a DSR flag) are not forwarded */
	if (!(v->flags & KP_CT_F_EXTERNAL) || (mode & KP_CT_F_HAIRPIN) || !state_kept || KP_F(kp_xttl)(x) <= 1 ||
	    ((v->flags & KP_CT_F_LOCAL_BE) && (mode & (KP_CT_F_DSR_OPT | KP_CT_F_DSR_IPIP))) ||
	    !KP_F(kp_xfollowable)(x, v))
		return XDP_PASS;
	cfg = kp_config();
	fib = kp_fib_room();
	if (!cfg || !fib)
		return XDP_PASS;
	node = KP_F(kp_node_addr)(cfg);
	if (mode) {
		src = KP_F(kp_xsaddr)(x);
		dst = nat_addr;
		if (mode & KP_CT_F_SNAT) {
			src = snat_addr;
		} else {
			/* kp_dsr_wants_opt: every datagram; TCP only its SYN */
			opt = x->proto == IPPROTO_UDP || (x->tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) == KP_TCP_SYN;
			tunnel = !!(mode & KP_CT_F_DSR_IPIP);
			extra = (opt ? KP_DSR_EXTRA : 0) + (tunnel ? KP_TUNNEL_HLEN : 0);
			if (tunnel) {
				src = node;
				dst = snat_addr;
			}
		}
		if (KP_F(kp_xfib)(ctx, fib, &src, &dst, KP_F(kp_xiplen)(x) + extra))
			return XDP_PASS;
	}
	/* due a refresh: written as kp_from_netdev would, so no packet of the flow takes the slower path and
	 * arrives after later ones */
	KP_F(kp_xrefresh)(fk, v, now);
	if (extra) {
		int room = KP_F(kp_xroom)(ctx, x, extra);

		if (room > 0)
			return XDP_PASS;   /* no headroom: the stack's, untouched */
		if (room < 0)
			goto fail;         /* the head moved: the packet cannot go back to the stack as it was */
	}
	KP_F(kp_xnat)(x, 1, nat_addr, nat_port);
	KP_F(kp_count)(KP_STAT_DNAT, len);
	if (!mode) {
		/*
		 * A backend on this node: DNATed, the stack delivers it. kp_from_netdev then finds no frontend
		 * for it (two misses: the frontend and the SNAT lookup). Telling it so through XDP metadata
		 * would save those: this kernel's XDP programs may not call bpf_xdp_adjust_meta (the verifier:
		 * "program of this type cannot use helper").
		 */
		KP_F(kp_count)(KP_STAT_XDP_LOCAL, len);
		return XDP_PASS;
	}
	KP_F(kp_xttl_dec)(x);
	if (mode & KP_CT_F_SNAT) {
		KP_F(kp_xnat)(x, 0, snat_addr, snat_port);
		KP_F(kp_count)(KP_STAT_SNAT, len);
	} else {
		if (extra && KP_F(kp_xdsr_layout)(ctx, extra, opt, tunnel, &node, &snat_addr, &front_addr, front_port))
			goto fail;
		KP_F(kp_count)(tunnel ? KP_STAT_DSR_IPIP_TX : opt ? KP_STAT_DSR_OPT_TX : KP_STAT_DSR_FWD, len);
	}
	KP_F(kp_count)(KP_STAT_XDP_FWD, len);
	return kp_xsend(ctx, fib, KP_FAM, x->len);
fail:
	KP_F(kp_count)(KP_DROP_ENCAP_FAILED, len);
	return XDP_DROP;
}

/* A backend's reply to a SNATed flow (kp_snat_revnat's job), when its flow is established already. */
static __always_inline int KP_F(kp_xdp_snat_reply)(struct xdp_md *ctx, struct KP_F(kp_xpkt) *x, __u64 now)
{
	KP_SNAT_KEY sk = {
		.saddr = KP_F(kp_xsaddr)(x), .daddr = KP_F(kp_xdaddr)(x), .sport = x->ports[0], .dport = x->ports[1],
		.proto = x->proto,
	};
	__u8 want_state = x->proto == IPPROTO_TCP ? KP_CT_ESTABLISHED : KP_CT_UDP;
	KP_CT_KEY fk = { .proto = x->proto, .dir = KP_CT_DIR_FWD };
	struct bpf_fib_lookup *fib;
	KP_SNAT_VAL *sv;
	KP_CT_VAL *cur;
	KP_ADDR client_addr, front_addr;
	__be16 client_port, front_port;

	sv = bpf_map_lookup_elem(&KP_SNAT_MAP, &sk);
	if (!sv || sv->expires_ns < now)
		return XDP_PASS;
	client_addr = sv->client_addr;
	front_addr = sv->front_addr;
	client_port = sv->client_port;
	front_port = sv->front_port;
	fk.saddr = client_addr;
	fk.daddr = front_addr;
	fk.sport = client_port;
	fk.dport = front_port;
	/* kp_snat_revnat changes the flow's entry with its first reply (SEEN_REPLY, ESTABLISHED): that
	 * packet is its */
	cur = bpf_map_lookup_elem(&KP_CT_MAP, &fk);
	if (!cur || cur->expires_ns < now || !(cur->flags & KP_CT_F_SEEN_REPLY) || cur->state != want_state ||
	    KP_F(kp_xttl)(x) <= 1)
		return XDP_PASS;
	fib = kp_fib_room();
	if (!fib || KP_F(kp_xfib)(ctx, fib, &front_addr, &client_addr, KP_F(kp_xiplen)(x)))
		return XDP_PASS;
	KP_F(kp_xrefresh)(&fk, cur, now);
	KP_F(kp_xnat)(x, 1, client_addr, client_port);
	KP_F(kp_xnat)(x, 0, front_addr, front_port);
	KP_F(kp_xttl_dec)(x);
	KP_F(kp_count)(KP_STAT_SNAT_REVNAT, x->len);
	KP_F(kp_count)(KP_STAT_XDP_FWD, x->len);
	return kp_xsend(ctx, fib, KP_FAM, x->len);
}

/*
 * A flow's first packet from outside to a frontend (kp_xdp_main: a TCP SYN or a UDP datagram, no live
 * entry), in kp_xdp_new(6): its backend picked and its flow tracked as kp_lb_forward does (source
 * ranges, affinity, Maglev, DSR or SNAT, a SNAT port by the same TIME_WAIT rules), then sent as a
 * tracked flow's packet. What kp_from_netdev would answer itself (no backends: a reject; a ClusterIP
 * closed to the outside) is passed to it untouched, as is a packet whose flow another CPU opened
 * meanwhile. A packet XDP cannot send (no neighbour, a device that takes no XDP frames, too big for the
 * route) goes to the stack once its flow is tracked: kp_from_netdev follows the entry, with no second
 * pick. p and sk: room the caller gives (kp_xdp_new6's in kp_scratch6) for the packet's parsed view and
 * its frontend's key.
 */
static __always_inline int KP_F(kp_xdp_open)(struct xdp_md *ctx, struct KP_F(kp_xpkt) *x, KP_PKT *p,
					    KP_SVC_KEY *sk)
{
	struct kp_config *cfg = kp_config();
	struct kp_svc4_val *svc;
	/* the flow's key and entry in kp_scratch: kp_xdp_new6's stack has no room for them beside SNAT's */
	KP_CT_KEY *fk = KP_F(kp_xscratch_key)();
	KP_CT_VAL *fv = KP_F(kp_xscratch)();
	__u64 now = bpf_ktime_get_ns();
	__u32 drop;
	int mode;

	/* a SYN alone opens a TCP flow (kp_xdp_main sends nothing else here; checked again, as the program
	 * is reachable by itself through kp_xnew_v1) */
	if (x->proto == IPPROTO_TCP &&
	    (x->tcp_flags & (KP_TCP_SYN | KP_TCP_ACK | KP_TCP_FIN | KP_TCP_RST)) != KP_TCP_SYN)
		return XDP_PASS;
	svc = KP_F(kp_xfrontend)(x, sk);
	if (!svc || !fv || !fk)
		return XDP_PASS;
	__builtin_memset(fv, 0, sizeof(*fv));
	KP_F(kp_xpkt_of)(x, p);
	kp_frag_set(KP_FRAG_NONE);   /* kp_flow_mode asks: the scratch map holds TC's last packet's answer */
	KP_F(kp_ct_key_of_pkt)(fk, p, KP_CT_DIR_FWD);
	if (KP_F(kp_ct_lookup)(fk, now))
		return XDP_PASS;
	if (KP_F(kp_src_range_drop)(svc, p))
		return XDP_DROP;
	mode = KP_F(kp_lb_pick)(p, sk, svc, fk, fv, cfg, KP_ORIGIN_NETDEV, now);
	if (mode < 0) {
		drop = -mode;
		goto drop;
	}
	if ((mode & KP_CT_F_SNAT) && cfg &&
	    KP_F(kp_lb_snat)(fk, fv, NULL, p->proto == IPPROTO_TCP ? kp_xtcp_mark(ctx, p) : 0, cfg, now, p->len)) {
		drop = KP_DROP_SNAT_NO_PORT;
		goto drop;
	}
	drop = KP_F(kp_lb_commit)(fk, fv, now, p->len);
	if (drop)
		goto drop;
	KP_F(kp_count)(KP_STAT_CT_NEW, p->len);
	KP_F(kp_count)(KP_STAT_XDP_NEW, p->len);
	return KP_F(kp_xdp_forward)(ctx, x, fk, fv, now);
drop:
	KP_F(kp_count)(drop, p->len);
	return XDP_DROP;
}

/*
 * A TCP or UDP frame kp_xparse took. FIN, RST, a SYN-ACK change a flow's state: kp_from_netdev's. A
 * tracked flow's packet is forwarded (a SYN again: kp_from_netdev's, it retransmits or reopens); a
 * flow's first packet to a frontend is KP_XDP_NEW's; anything else may be a SNATed flow's reply.
 */
static __always_inline int KP_F(kp_xdp_main)(struct xdp_md *ctx, struct KP_F(kp_xpkt) *x)
{
	KP_CT_KEY fk = {
		.saddr = KP_F(kp_xsaddr)(x), .daddr = KP_F(kp_xdaddr)(x), .sport = x->ports[0],
		.dport = x->ports[1], .proto = x->proto, .dir = KP_CT_DIR_FWD,
	};
	int syn = x->tcp_flags & KP_TCP_SYN;
	KP_SVC_KEY sk;
	KP_CT_VAL *v;
	__u64 now;

	if (x->tcp_flags & (KP_TCP_FIN | KP_TCP_RST) || (syn && (x->tcp_flags & KP_TCP_ACK)))
		return XDP_PASS;
	now = bpf_ktime_get_ns();
	v = bpf_map_lookup_elem(&KP_CT_MAP, &fk);
	if (v && v->expires_ns >= now)
		return syn ? XDP_PASS : KP_F(kp_xdp_forward)(ctx, x, &fk, v, now);
	if ((syn || x->proto == IPPROTO_UDP) && KP_F(kp_xfrontend)(x, &sk))
		return KP_XDP_NEW;
	if (syn)
		return XDP_PASS;
	return KP_F(kp_xdp_snat_reply)(ctx, x, now);
}
