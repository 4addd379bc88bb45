/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service lookup, backend selection and the forward (DNAT) path of one address family (lib/fam.h:
 * included by lib/lb.h once per family).
 */

/* Slot 0 of the frontend the packet is addressed to, or NULL. *key is left at that slot-0 key. */
/* The slot-0 EXT key of the frontend addr:port/proto (kp_svc_lookup; kp_xdp's kp_xfrontend). */
static __always_inline void KP_F(kp_svc_key_ext)(KP_SVC_KEY *key, KP_ADDR addr, __be16 port, __u8 proto)
{
	key->addr = addr;
	key->port = port;
	key->slot = 0;
	key->proto = proto;
	key->scope = KP_SCOPE_EXT;
	key->pad[0] = 0;
	key->pad[1] = 0;
}

static __always_inline struct kp_svc4_val *KP_F(kp_svc_lookup)(const KP_PKT *p, int origin,
							 KP_SVC_KEY *key)
{
	struct kp_svc4_val *svc, *svc_int;

	KP_F(kp_svc_key_ext)(key, p->daddr, p->dport, p->proto);
	svc = bpf_map_lookup_elem(&KP_SVC_MAP, key);
	if (!svc)
		return NULL;
	if (origin == KP_ORIGIN_NETDEV)
		return svc;
	if (svc->flags & KP_SVC_F_TWO_SCOPES) {
		key->scope = KP_SCOPE_INT;
		svc_int = bpf_map_lookup_elem(&KP_SVC_MAP, key);
		if (svc_int)
			return svc_int;
		/* The agent writes INT before flagging EXT; a missing INT entry is a transient state. */
		key->scope = KP_SCOPE_EXT;
	}
	return svc;
}

/*
 * Pick a backend for a new flow: the affinity entry if valid, else, for a KP_SVC_F_MAGLEV frontend and
 * MAGLEV == KP_LB_MAGLEV (a packet's first draw), the Maglev table's, else a uniformly random slot.
 * KP_LB_REDRAW: a second draw (the first backend's reply tuple was held) wants another backend;
 * KP_LB_NO_MAGLEV: the socket hooks, whose connect() has no source port to hash yet.
 */
static __always_inline int KP_F(kp_lb_select)(const KP_SVC_KEY *svc_key, const struct kp_svc4_val *svc,
					const KP_PKT *p, __u64 now, __u32 *backend_id,
					KP_BE_VAL *be, int maglev)
{
	KP_AFF_KEY ak = { .client_addr = p->saddr, .svc_id = svc->svc_id };
	KP_SVC_KEY slot_key = *svc_key;
	struct kp_svc4_val *slot;
	KP_BE_VAL *b;
	int affinity = svc->flags & KP_SVC_F_AFFINITY;

	if (affinity) {
		struct kp_aff4_val *av = bpf_map_lookup_elem(&KP_AFF_MAP, &ak);
		__u64 timeout = svc->affinity_timeout ? svc->affinity_timeout : KP_AFFINITY_TIMEOUT_DEFAULT;

		if (av && now - av->last_used_ns < timeout * KP_NS_PER_SEC) {
			__u32 id = av->backend_id;

			b = bpf_map_lookup_elem(&KP_BE_MAP, &id);
			if (b && !(b->flags & KP_BE_F_TERMINATING)) {
				*backend_id = id;
				*be = *b;
				KP_F(kp_count)(KP_STAT_AFFINITY_HIT, p->len);
				goto remember;
			}
		}
	}

	if (maglev == KP_LB_MAGLEV && (svc->flags & KP_SVC_F_MAGLEV)) {
		__u32 id = kp_maglev_backend(svc->svc_id, kp_maglev_hash(KP_ADDR_FOLD(p->saddr), p->sport,
									  p->dport, p->proto));

		b = id ? bpf_map_lookup_elem(&KP_BE_MAP, &id) : NULL;
		if (b && !(b->flags & KP_BE_F_TERMINATING)) {
			*backend_id = id;
			*be = *b;
			KP_F(kp_count)(KP_STAT_MAGLEV, p->len);
			goto remember;
		}
		KP_F(kp_count)(KP_STAT_MAGLEV_FALLBACK, p->len);
	}
	slot_key.slot = 1 + bpf_get_prandom_u32() % svc->count;
	slot = bpf_map_lookup_elem(&KP_SVC_MAP, &slot_key);
	if (!slot)
		return -1;
	*backend_id = slot->backend_id;
	b = bpf_map_lookup_elem(&KP_BE_MAP, backend_id);
	if (!b)
		return -1;
	*be = *b;
remember:
	if (affinity) {
		/* Once per new connection, never per packet. */
		struct kp_aff4_val nv = { .last_used_ns = now, .backend_id = *backend_id };

		bpf_map_update_elem(&KP_AFF_MAP, &ak, &nv, BPF_ANY);
	}
	return 0;
}

/*
 * How a new flow leaves this node, decided once at flow creation and kept in the CT FWD flags, so
 * a DSR toggle (kp_config dsr_mode) applies to new flows only:
 *   pod balanced to itself          HAIRPIN: source -> hairpin address, bounced back to the pod
 *   from outside to a remote backend (externalTrafficPolicy Cluster, node address configured):
 *                                   DSR_OPT or DSR_IPIP (both need the backend's node address), else SNAT
 *   anything else                   plain DNAT, the kernel routes it
 */
static __always_inline __u8 KP_F(kp_flow_mode)(const KP_PKT *p, const struct kp_svc4_val *svc,
						 const KP_BE_VAL *be, const struct kp_config *cfg, int origin)
{
	if (origin == KP_ORIGIN_POD)
		return KP_ADDR_EQ(be->addr, p->saddr) ? KP_CT_F_HAIRPIN : 0;
	if ((be->flags & KP_BE_F_LOCAL) || (svc->flags & KP_SVC_F_ETP_LOCAL) || !cfg ||
	    KP_ADDR_IS_ZERO(KP_F(kp_node_addr)(cfg)))
		return 0;
	/* DSR only to a backend whose node is known (its EndpointSlice names a node in the node table, with
	 * an address of the flow's family): that node's kproxy must take the flow. Any other backend is
	 * SNATed, which works wherever it runs, this node included (kp_from_pod translates the replies). */
	/* SCTP: DSR's backend side (kp_dsr_rx, the IPIP tunnel's reply path) knows TCP and UDP only */
	if (KP_ADDR_IS_ZERO(be->node_addr) || kp_frag_get() || p->proto == KP_IPPROTO_SCTP)
		return KP_CT_F_SNAT;   /* a flow that starts fragmented: no room for DSR's bytes either */
#if KP_FAM == 6
	/* the option header goes right after the fixed one: a flow opened with extension headers (a
	 * hop-by-hop header must stay first) is SNATed; so are all when the LAN cannot carry a 1280-byte
	 * packet (IPv6's minimum MTU, below which no client lowers its path MTU) with DSR's bytes */
	if (p->ip_hlen != KP_IP6_HLEN ||
	    kp_lan_mtu(cfg) < KP_IP6_MIN_MTU + KP_DSR_EXTRA + (cfg->dsr_mode == KP_DSR_IPIP ? KP_TUNNEL_HLEN : 0))
		return KP_CT_F_SNAT;
#endif
	if (cfg->dsr_mode == KP_DSR_OPT)
		return KP_CT_F_DSR_OPT;
	if (cfg->dsr_mode == KP_DSR_IPIP)
		return KP_CT_F_DSR_IPIP;
	return KP_CT_F_SNAT;
}

/* New flows draw again at most this many times when the drawn backend's REPLY tuple is held. */
#define KP_HELD_TRIES 4

/* Whether a new flow fk to `be` in `mode` would take the REPLY tuple of a live connection (lib/ct.h). */
static __always_inline int KP_F(kp_lb_reply_held)(const KP_CT_KEY *fk, const KP_BE_VAL *be, __u8 mode,
						   const struct kp_config *cfg, __u64 now)
{
	if (mode & KP_CT_F_SNAT)
		return 0;   /* its reply side is a kp_snat4_v1 entry of its own port */
	return KP_F(kp_ct_reply_held)(fk, be->addr, be->port,
				      (mode & KP_CT_F_HAIRPIN) ? KP_F(kp_hairpin_addr)(cfg) : KP_ADDR_NONE, now);
}

/*
 * A new flow fk from p to the frontend svc: its backend picked (KP_HELD_TRIES draws at most, see below)
 * and its entry fv filled, all but a SNAT flow's port (kp_lb_snat). Returns the flow's mode (its
 * KP_CT_F_SNAT, DSR or HAIRPIN flag, or 0: returned, not read back from fv, so that the verifier knows
 * it on each path and walks SNAT's code only where it runs), or minus the drop counter saying why the
 * packet cannot open a flow. kp_lb_forward and kp_xdp's first packets (lib/xdp_fam.h) open flows
 * alike through it, kp_lb_snat and kp_lb_commit.
 */
static __always_inline int KP_F(kp_lb_pick)(const KP_PKT *p, const KP_SVC_KEY *svc_key,
					     const struct kp_svc4_val *svc, const KP_CT_KEY *fk, KP_CT_VAL *fv,
					     const struct kp_config *cfg, int origin, __u64 now)
{
	KP_BE_VAL be;
	__u32 backend_id;
	__u8 state, mode;
	int tries;

	/* A backend whose REPLY tuple for this client port a live connection holds (kp_ct_reply_held)
	 * cannot take the flow: another draw, at most KP_HELD_TRIES, then a drop (the client's SYN is
	 * retransmitted and drawn again). */
	for (tries = 0;; tries++) {
		if (KP_F(kp_lb_select)(svc_key, svc, p, now, &backend_id, &be,
					 tries ? KP_LB_REDRAW : KP_LB_MAGLEV))
			return -KP_DROP_BACKEND_MISSING;
		mode = KP_F(kp_flow_mode)(p, svc, &be, cfg, origin);
		if (!KP_F(kp_lb_reply_held)(fk, &be, mode, cfg, now))
			break;
		if (tries >= KP_HELD_TRIES - 1)
			return -KP_DROP_TUPLE_HELD;
	}
	state = kp_ct_open_state(p->proto);
	fv->expires_ns = now + kp_ct_timeout_ns(state, p->proto);
	fv->backend_id = backend_id;
	fv->svc_id = svc->svc_id;
	fv->nat_addr = be.addr;
	fv->nat_port = be.port;
	fv->state = state;
	fv->flags = mode | (origin == KP_ORIGIN_NETDEV ? KP_CT_F_EXTERNAL : 0) |
		    ((be.flags & KP_BE_F_LOCAL) ? KP_CT_F_LOCAL_BE : 0);
	fv->snat_addr = KP_ADDR_NONE;
	fv->snat_port = 0;
	fv->tw_key = 0;
	if (mode & KP_CT_F_HAIRPIN) {
		fv->snat_addr = KP_F(kp_hairpin_addr)(cfg);
		fv->snat_port = p->sport;
	}
	else if (mode & KP_CT_F_DSR_IPIP) {
		fv->snat_addr = be.node_addr;   /* outer destination of the flow's packets */
	}
	return mode;
}

/* A SNAT flow's source: this node's address and a port (kp_snat_alloc; syn: the mark of the TCP SYN
 * that opens it, lib/tcp.h). 0, or -1: no port free (counted by the caller as KP_DROP_SNAT_NO_PORT). */
static __always_inline int KP_F(kp_lb_snat)(const KP_CT_KEY *fk, KP_CT_VAL *fv, const KP_CT_VAL *old,
					     __u64 syn, const struct kp_config *cfg, __u64 now, __u32 len)
{
	fv->snat_addr = KP_F(kp_node_addr)(cfg);
	if (KP_F(kp_snat_alloc)(fk, fv, old, syn, cfg, now, len))
		return -1;
	KP_F(kp_count)(KP_STAT_SNAT_NEW, len);
	return 0;
}

/* Write a new flow's entries (FWD, and REPLY unless SNATed); 0, or the drop counter. */
static __always_inline __u32 KP_F(kp_lb_commit)(const KP_CT_KEY *fk, const KP_CT_VAL *fv, __u64 now, __u32 len)
{
	if (KP_F(kp_ct_claim_reply)(fk, fv, now, len))
		return KP_DROP_TUPLE_HELD;   /* held since the draw of kp_lb_pick */
	if (KP_F(kp_ct_write)(fk, fv))
		return KP_DROP_CT_FULL;
	return 0;
}

/*
 * Translate a packet of a tracked flow (fk, fv) as its mode says. Flows BPF forwards itself (SNAT,
 * DSR) are routed first, before anything is rewritten, so a packet too big for the route once the
 * DSR option or IPIP header is added can still be answered with "fragmentation needed" about the
 * packet the client sent. A too-big packet without DF is dropped (counted): its fragments could
 * not carry the flow to the backend node's conntrack.
 */
static __always_inline int KP_F(kp_lb_xlate)(struct __sk_buff *skb, const KP_PKT *p,
					const KP_CT_KEY *fk, const KP_CT_VAL *fv,
					const struct kp_config *cfg)
{
	__u8 mode = fv->flags & (KP_CT_F_SNAT | KP_CT_F_DSR_OPT | KP_CT_F_DSR_IPIP | KP_CT_F_HAIRPIN);
	struct bpf_fib_lookup *fib;
	__u32 extra = 0, tot_len;
	KP_ADDR fib_src, fib_dst, node_addr;
	int res, opt = 0;

	if (!mode || ((mode & KP_CT_F_HAIRPIN) == 0 && !cfg)) {
		if (KP_F(kp_nat)(skb, p, KP_NAT_DST, fv->nat_addr, fv->nat_port))
			goto fail;
		KP_F(kp_count)(KP_STAT_DNAT, p->len);
		return TC_ACT_OK;
	}
	if (mode & KP_CT_F_HAIRPIN) {
		if (KP_F(kp_nat)(skb, p, KP_NAT_DST, fv->nat_addr, fv->nat_port) ||
		    KP_F(kp_nat)(skb, p, KP_NAT_SRC, fv->snat_addr, fv->snat_port))
			goto fail;
		KP_F(kp_count)(KP_STAT_DNAT, p->len);
		KP_F(kp_count)(KP_STAT_HAIRPIN, p->len);
		return kp_bounce(skb);
	}
	if (p->ttl <= 1)
		return TC_ACT_OK;   /* the kernel answers time exceeded */
	fib_src = p->saddr;
	fib_dst = fv->nat_addr;
	if (mode & KP_CT_F_SNAT)
		fib_src = fv->snat_addr;
	node_addr = KP_F(kp_node_addr)(cfg);
	if (!(mode & KP_CT_F_SNAT)) {
		opt = KP_F(kp_dsr_wants_opt)(p);
		extra = opt ? KP_DSR_EXTRA : 0;
		if (mode & KP_CT_F_DSR_IPIP) {
			extra += KP_TUNNEL_HLEN;
			fib_src = node_addr;
			fib_dst = fv->snat_addr;
		}
	}
	tot_len = p->tot_len ? p->tot_len + extra : 0;
	fib = kp_fib_room();
	res = KP_F(kp_fib_lookup)(skb, fib, fib_src, fib_dst, tot_len);
	if (res == KP_FIB_FRAG_NEEDED) {
		if (!p->df) {
			KP_F(kp_count)(KP_DROP_DSR_TOO_BIG, p->len);
			return TC_ACT_SHOT;
		}
		return KP_F(kp_icmp_frag_needed)(skb, p, fib->mtu_result - extra);
	}
	if (res == KP_FIB_FAIL) {
		KP_F(kp_count)(KP_DROP_FIB, p->len);
		return TC_ACT_SHOT;
	}

	if (KP_F(kp_nat)(skb, p, KP_NAT_DST, fv->nat_addr, fv->nat_port) || KP_F(kp_ttl_dec)(skb, p->ttl))
		goto fail;
	KP_F(kp_count)(KP_STAT_DNAT, p->len);
	if (mode & KP_CT_F_SNAT) {
		if (KP_F(kp_nat)(skb, p, KP_NAT_SRC, fv->snat_addr, fv->snat_port))
			goto fail;
		KP_F(kp_count)(KP_STAT_SNAT, p->len);
		return KP_F(kp_fib_redirect)(skb, fib, res);
	}
	if (opt && KP_F(kp_dsr_opt_push)(skb, fk->daddr, fk->dport))
		goto fail_encap;
	if (mode & KP_CT_F_DSR_IPIP) {
		if (KP_F(kp_tunnel_push)(skb, node_addr, fv->snat_addr))
			goto fail_encap;
		KP_F(kp_count)(KP_STAT_DSR_IPIP_TX, p->len);
	} else {
		KP_F(kp_count)(opt ? KP_STAT_DSR_OPT_TX : KP_STAT_DSR_FWD, p->len);
	}
	return KP_F(kp_fib_redirect)(skb, fib, res);
fail_encap:
	KP_F(kp_count)(KP_DROP_ENCAP_FAILED, p->len);
	return TC_ACT_SHOT;
fail:
	KP_F(kp_count)(KP_DROP_NAT_FAILED, p->len);
	return TC_ACT_SHOT;
}

/*
 * A packet to a service frontend: follow its flow's backend, or pick one and track the flow,
 * then translate. No backend at all: ICMP port unreachable, or a drop when the agent asked for one.
 * svc NULL: the frontend is gone (a Service port deleted while its connection lived); a packet of a
 * tracked flow that does not reopen it is translated as the flow's entry says (its backend address,
 * SNAT or DSR), as kube-proxy's conntrack keeps doing; anything else returns -1. kp_from_netdev calls
 * it once for both (this body is the heaviest the verifier walks there); a pod's flows are plain DNAT
 * or hairpin and continue through the lighter kp_ct_continue.
 */
static __always_inline int KP_F(kp_lb_forward)(struct __sk_buff *skb, const KP_PKT *p,
					  const KP_SVC_KEY *svc_key, const struct kp_svc4_val *svc,
					  int origin)
{
	struct kp_config *cfg = kp_config();
	KP_CT_KEY fk;
#if KP_FAM == 4
	KP_CT_VAL fv = {}, old_val = {};
	KP_CT_VAL *old = &old_val;
#else
	/* the deepest path of kp_from_netdev6 (a new SNATed flow) has no stack to spare for it */
	KP_CT_VAL fv = {};
	KP_CT_VAL *old = kp_scratch_old6();
#endif
	KP_CT_VAL *cur;
	KP_BE_VAL *cur_be;
	__u32 new_stat = KP_STAT_CT_NEW, drop;
	__u64 now = bpf_ktime_get_ns();
	int reopened = 0, mode;

	if (svc && svc->count == 0) {
		if (svc->flags & KP_SVC_F_NO_LOCAL_DROP) {
			KP_F(kp_count)(KP_DROP_NO_LOCAL_BACKEND, p->len);
			return TC_ACT_SHOT;
		}
		return KP_F(kp_icmp_reject)(skb, p);
	}

	KP_F(kp_ct_key_of_pkt)(&fk, p, KP_CT_DIR_FWD);
	cur = KP_F(kp_ct_lookup)(&fk, now);
	if (cur) {
		fv = *cur;
		/* a flow outliving its frontend follows its entry, whether or not its backend is known */
		cur_be = svc ? bpf_map_lookup_elem(&KP_BE_MAP, &fv.backend_id) : (void *)cur;
		if (!kp_ct_tuple_reused(fv.state, p->tcp_flags) && cur_be) {
			__u8 flags = fv.flags;
			__u16 tw_key = KP_F(kp_snat_tw_mark)(skb, p, &fv, &flags);

			KP_F(kp_ct_touch_tw)(&fk, &fv,
				       KP_F(kp_snat_fin_state)(&fv, kp_ct_next_state(fv.state, p->proto, p->tcp_flags, 0),
							 p->tcp_flags, 0, tw_key),
				       flags, tw_key, now);
			if (!svc)
				KP_F(kp_count)(KP_STAT_CT_ORPHAN, p->len);
			goto xlate;
		}
		if (!svc)
			return -1;
		new_stat = KP_STAT_CT_REOPEN;
		KP_F(kp_ct_drop_old_reply)(&fk, &fv);
		/* The old flow is over: kp_snat_alloc() gives its SNAT port to the new one when the
		 * backend is the same (lib/snat.h: the backend's TIME_WAIT accepts the SYN then). */
		if (old)
			*old = fv;
		reopened = 1;
	}

	if (!svc)
		return -1;
	/* New flows only: established ones passed the check when they started. */
	if (KP_F(kp_src_range_drop)(svc, p))
		return TC_ACT_SHOT;
	mode = KP_F(kp_lb_pick)(p, svc_key, svc, &fk, &fv, cfg, origin, now);
	if (mode < 0) {
		KP_F(kp_count)(-mode, p->len);
		return TC_ACT_SHOT;
	}
	if ((mode & KP_CT_F_SNAT) && cfg) {
		__u64 syn = p->proto == IPPROTO_TCP && (p->tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) == KP_TCP_SYN ?
				    kp_tcp_mark(skb, p) : 0;

		if (KP_F(kp_lb_snat)(&fk, &fv, reopened ? old : NULL, syn, cfg, now, p->len)) {
			KP_F(kp_count)(KP_DROP_SNAT_NO_PORT, p->len);
			return TC_ACT_SHOT;
		}
	}
	drop = KP_F(kp_lb_commit)(&fk, &fv, now, p->len);
	if (drop) {
		KP_F(kp_count)(drop, p->len);
		return TC_ACT_SHOT;
	}
	KP_F(kp_count)(new_stat, p->len);
xlate:
	return KP_F(kp_lb_xlate)(skb, p, &fk, &fv, cfg);
}

/*
 * Backend node, from a netdev: a packet sent here by an ingress node in DSR mode (already DNATed to
 * a local backend). If it carries the DSR option, strip it and track the flow so the backend's
 * replies leave with the frontend as their source (kp_revnat in kp_from_pod); the kernel then
 * delivers it to the backend with the client's address intact. Returns -1 without the option.
 */
static __always_inline int KP_F(kp_dsr_rx)(struct __sk_buff *skb, KP_PKT *p, __u8 how)
{
	KP_DSR_OPT_T opt;
	KP_CT_KEY fk;
	KP_CT_VAL fv = {};
	KP_CT_VAL *cur;
	__u64 now = bpf_ktime_get_ns();
	__u8 state;

#if KP_FAM == 6
	/* an ingress node never puts the option on a fragment (kp_dsr_wants_opt), and no router on the way
	 * fragments IPv6: not DSR's (an IPv4 router copies DSR's option into every fragment it makes) */
	if (kp_frag_get())
		return -1;
#endif
	if (!KP_F(kp_dsr_opt_read)(skb, p, &opt))
		return -1;
	if (KP_F(kp_dsr_opt_pop)(skb, p, &opt)) {
		KP_F(kp_count)(KP_DROP_ENCAP_FAILED, p->len);
		return TC_ACT_SHOT;
	}
	fk.saddr = p->saddr;
	fk.daddr = opt.addr;
	fk.sport = p->sport;
	fk.dport = opt.port;
	fk.proto = p->proto;
	fk.dir = KP_CT_DIR_FWD;
	__builtin_memset(fk.pad, 0, sizeof(fk.pad));
	/* UDP carries the option on every datagram: a live entry of the same flow is only touched. */
	cur = KP_F(kp_ct_lookup)(&fk, now);
	if (cur && KP_ADDR_EQ(cur->nat_addr, p->daddr) && cur->nat_port == p->dport &&
	    !kp_ct_tuple_reused(cur->state, p->tcp_flags)) {
		fv = *cur;
		KP_F(kp_ct_touch)(&fk, &fv, kp_ct_next_state(fv.state, p->proto, p->tcp_flags, 0), fv.flags, now);
		KP_F(kp_count)(KP_STAT_DSR_RX, p->len);
		return TC_ACT_OK;
	}
	state = kp_ct_open_state(p->proto);
	fv.expires_ns = now + kp_ct_timeout_ns(state, p->proto);
	fv.nat_addr = p->daddr;
	fv.nat_port = p->dport;
	fv.state = state;
	fv.flags = how | KP_CT_F_EXTERNAL | KP_CT_F_LOCAL_BE;
	if (cur)
		KP_F(kp_ct_drop_old_reply)(&fk, cur);
	if (KP_F(kp_ct_claim_reply)(&fk, &fv, now, p->len)) {
		KP_F(kp_count)(KP_DROP_TUPLE_HELD, p->len);   /* the backend serves that 4-tuple already */
		return TC_ACT_SHOT;
	}
	if (KP_F(kp_ct_write)(&fk, &fv)) {
		KP_F(kp_count)(KP_DROP_CT_FULL, p->len);
		return TC_ACT_SHOT;
	}
	KP_F(kp_count)(KP_STAT_DSR_RX, p->len);
	return TC_ACT_OK;
}

/*
 * A TCP packet (not a SYN) of a pod's flow whose frontend is gone: a Service port deleted while the
 * connection lived. kube-proxy's conntrack keeps translating such a connection until it ends; so does
 * this, from the flow's own entry (its backend address and mode), however the Service changed. -1 if
 * the packet belongs to no tracked flow. A global function (verified once, apart from its caller)
 * whose flow lives in the scratch map: kp_from_pod's frame leaves little stack for a callee.
 */
#if KP_FAM == 4
__attribute__((noinline)) int
#else
/* inline in kp_from_pod6: its frame and a callee's would pass 512 bytes together */
static __always_inline int
#endif
KP_F(kp_ct_continue)(struct __sk_buff *skb, KP_PKT *p)
{
	struct kp_scratch *s;
	KP_CT_KEY *k;
	KP_CT_VAL *v, *cur;
	__u32 zero = 0;
	__u64 now;

	if (!skb || !p)
		return -1;
	s = bpf_map_lookup_elem(&kp_scratch, &zero);
	if (!s)
		return -1;
	k = &s->KP_SCRATCH_CT_KEY;
	v = &s->KP_SCRATCH_CT_VAL;
	now = bpf_ktime_get_ns();
	KP_F(kp_ct_key_of_pkt)(k, p, KP_CT_DIR_FWD);
	cur = KP_F(kp_ct_lookup)(k, now);
	if (!cur)
		return -1;
	*v = *cur;
	KP_F(kp_ct_touch)(k, v, kp_ct_next_state(v->state, p->proto, p->tcp_flags, 0), v->flags, now);
	KP_F(kp_count)(KP_STAT_CT_ORPHAN, p->len);
	/* A pod's flow is plain DNAT or a hairpin (kp_flow_mode, origin pod), never SNAT or DSR. */
	if (KP_F(kp_nat)(skb, p, KP_NAT_DST, v->nat_addr, v->nat_port))
		goto fail;
	if (v->flags & KP_CT_F_HAIRPIN) {
		if (KP_F(kp_nat)(skb, p, KP_NAT_SRC, v->snat_addr, v->snat_port))
			goto fail;
		return kp_bounce(skb);
	}
	return TC_ACT_OK;
fail:
	KP_F(kp_count)(KP_DROP_NAT_FAILED, p->len);
	return TC_ACT_SHOT;
}
