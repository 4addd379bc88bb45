/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* SNAT port allocation of one address family (lib/fam.h: included by lib/snat.h once per family; the
 * scheme is described there). The two families' ports are apart: their SNAT addresses differ. */

/* The flow behind an entry is over (a tombstone's expiry includes the TIME_WAIT hold). */
static __always_inline int KP_F(kp_snat_flow_over)(const KP_SNAT_VAL *v, __u64 now)
{
	__u64 hold = kp_snat_closing(v->state) ? KP_SNAT_TW_HOLD_NS : 0;

	return v->expires_ns < now + hold;
}

static __always_inline int KP_F(kp_snat_same_client)(const KP_SNAT_VAL *v, const KP_CT_KEY *fk)
{
	return KP_ADDR_EQ(v->client_addr, fk->saddr) && v->client_port == fk->sport &&
	       KP_ADDR_EQ(v->front_addr, fk->daddr) && v->front_port == fk->dport;
}

/*
 * First candidate for a client tuple: its own port shifted by a per-(client address, frontend)
 * offset. The same tuple always gets the same port (its timestamps continue there, rule 1), and the
 * tuples of one client address never collide with each other (a shift is a bijection), however
 * fast the client re-uses its ports. Tuples of different clients may collide: the cursor then.
 */
static __always_inline __u32 KP_F(kp_snat_home)(const KP_CT_KEY *fk)
{
	__u32 h = (KP_ADDR_FOLD(fk->saddr) ^ (KP_ADDR_FOLD(fk->daddr) * 0x9e3779b1U) ^ ((__u32)fk->dport << 7)) *
		  0x85ebca6bU;

	return (h ^ (h >> 16)) + bpf_ntohs(fk->sport);
}

/*
 * A client FIN of a SNATed TCP flow (fv: a copy of its FWD value): the tw_key the flow gets, and
 * KP_CT_F_TW_TS in *flags. The backend holds the tuple in TIME_WAIT when it closed first, and then
 * the client's FIN is the last segment it took from the client; a retransmitted FIN does not change
 * what TIME_WAIT holds (it is not in sequence any more). But the first FIN may have been lost after
 * this node, and the backend then kept a retransmission's TSval, higher by the RTO (more than 65,536
 * with microsecond timestamps, tcp_usec_ts): so a later FIN raises the key, never lowers it. FINs
 * only, a few per connection: the option walk is not per packet.
 */
static __always_inline __u16 KP_F(kp_snat_tw_mark)(struct __sk_buff *skb, const KP_PKT *p,
					     const KP_CT_VAL *fv, __u8 *flags)
{
	__u16 key;
	__u64 m;

	if (!(fv->flags & KP_CT_F_SNAT) || p->proto != IPPROTO_TCP || !(p->tcp_flags & KP_TCP_FIN))
		return fv->tw_key;
	m = kp_tcp_mark(skb, p);
	if (!m)
		return fv->tw_key;
	key = kp_snat_tw_key_of((m & KP_TCP_MARK_TS) ? KP_TCP_MARK_TS_HI(m) : KP_TCP_MARK_SEQ_HI(m));
	if (fv->tw_key) {
		/* Keyed already: only a higher value of the same kind moves it. */
		if (!!(m & KP_TCP_MARK_TS) != !!(fv->flags & KP_CT_F_TW_TS) || (__s16)(key - fv->tw_key) <= 0)
			return fv->tw_key;
	}
	if (m & KP_TCP_MARK_TS)
		*flags |= KP_CT_F_TW_TS;
	else
		*flags &= ~KP_CT_F_TW_TS;
	return key;
}

/*
 * Whether the backend's TIME_WAIT for the tombstone t accepts a SYN with mark syn (kp_tcp_mark; 0
 * when the flow was not opened by a readable SYN). 1: yes, 0: no, -1: unknown.
 * Unknown: t has no key (written by an older program, or the client never sent a FIN), or t is keyed
 * by a timestamp and the SYN has none: the backend then skips PAWS and runs the sequence test,
 * against a value not recorded (half of such SYNs pass). The caller takes an unknown tombstone only
 * as the last resort, so that clients without timestamps (Windows by default) are not starved.
 * A tombstone of a flow closed by a reset and never keyed holds nothing in TIME_WAIT: an in-window
 * RST ends TIME_WAIT and FIN_WAIT2 (net.ipv4.tcp_rfc1337=0, the default). (The key can also be lost:
 * a reply rewrites the entries from a copy read before the FIN wrote its key; the tombstone then
 * counts as unknown, or as reset if a RST follows. Rare, and the cost is at most one 1-s retry.)
 */
static __always_inline int KP_F(kp_snat_tw_accepts)(const KP_SNAT_VAL *t, __u64 syn)
{
	if (!t->tw_key)
		return t->state == KP_CT_CLOSED ? 1 : -1;
	if (!syn)
		return 0;
	if (t->flags & KP_CT_F_TW_TS) {
		if (!(syn & KP_TCP_MARK_TS))
			return -1;
		return kp_snat_tw_beyond(KP_TCP_MARK_TS_HI(syn), t->tw_key);
	}
	return kp_snat_tw_beyond(KP_TCP_MARK_SEQ_HI(syn), t->tw_key);
}

/*
 * Replace the entry at sk (seen dead, or a tombstone the SYN may have) by sv, the new flow's; fails
 * (-1) if another CPU got there first. The entry's flow may be closed by both ends with its conntrack
 * entry still live (KP_CT_CLOSED, kp_snat_fin_state): nf_nat evicts such a TIME_WAIT conntrack entry
 * the same way when a new connection needs its tuple (nf_nat_used_tuple_harder). Its FWD entry goes
 * first, if it is still that flow's (the client may have re-opened the tuple toward another backend):
 * left, a late packet of it (a retransmitted FIN or ACK) would write its own client back into the
 * port's entry and send the new flow's replies to the old client. A global function, verified once
 * apart from its caller: inlined in kp_snat_alloc's candidate loop, this cost kp_from_netdev beyond the
 * verifier's 1M processed instructions.
 */
__attribute__((noinline)) int KP_F(kp_snat_take)(const KP_SNAT_KEY *sk, const KP_SNAT_VAL *sv, __u32 len)
{
	KP_SNAT_VAL *cur;
	KP_CT_KEY ofk;
	KP_CT_VAL *ofv;

	if (!sk || !sv)
		return -1;
	cur = bpf_map_lookup_elem(&KP_SNAT_MAP, sk);
	if (cur) {
		ofk.saddr = cur->client_addr;
		ofk.daddr = cur->front_addr;
		ofk.sport = cur->client_port;
		ofk.dport = cur->front_port;
		ofk.proto = sk->proto;
		ofk.dir = KP_CT_DIR_FWD;
		ofk.pad[0] = 0;
		ofk.pad[1] = 0;
		ofv = bpf_map_lookup_elem(&KP_CT_MAP, &ofk);
		if (ofv && (ofv->flags & KP_CT_F_SNAT) && KP_ADDR_EQ(ofv->snat_addr, sk->daddr) &&
		    ofv->snat_port == sk->dport && KP_ADDR_EQ(ofv->nat_addr, sk->saddr) && ofv->nat_port == sk->sport) {
			if (ofv->expires_ns >= bpf_ktime_get_ns())
				KP_F(kp_count)(KP_STAT_CT_TAKEOVER, len);
			bpf_map_delete_elem(&KP_CT_MAP, &ofk);
		}
		bpf_map_delete_elem(&KP_SNAT_MAP, sk);
	}
	return bpf_map_update_elem(&KP_SNAT_MAP, sk, sv, BPF_NOEXIST) ? -1 : 0;
}

/*
 * Give the new SNATed flow (fk, fv; fv->snat_addr and nat_* set) a port: fills fv->snat_port and
 * writes its kp_snat4_v1 entry. old: the flow this one re-opens on the same FWD tuple, or NULL.
 * syn: the kp_tcp_mark of the flow's TCP SYN, or 0 (UDP, or a TCP flow not opened by a SYN).
 * Returns 0, or -1 when no port could be had.
 */
static __always_inline int KP_F(kp_snat_alloc)(const KP_CT_KEY *fk, KP_CT_VAL *fv,
					 const KP_CT_VAL *old, __u64 syn,
					 const struct kp_config *cfg, __u64 now, __u32 len)
{
	__u32 lo = cfg->snat_port_min ? cfg->snat_port_min : KP_SNAT_PORT_MIN_DEFAULT;
	__u32 hi = cfg->snat_port_max ? cfg->snat_port_max : KP_SNAT_PORT_MAX_DEFAULT;
	KP_SNAT_KEY sk;
	KP_SNAT_VAL sv;
	__u64 best_exp = ~0ULL;
	__be16 best = 0;
	__u32 span;

	if (hi < lo)
		hi = lo;
	span = hi - lo + 1;

	if (old && (old->flags & KP_CT_F_SNAT)) {
		KP_SNAT_VAL *ov;

		if (KP_ADDR_EQ(old->nat_addr, fv->nat_addr) && old->nat_port == fv->nat_port &&
		    KP_ADDR_EQ(old->snat_addr, fv->snat_addr)) {
			/* Same backend: keep the port. Its entry is this tuple's (or gone): overwrite it. */
			fv->snat_port = old->snat_port;
			KP_F(kp_snat_of_fwd)(fk, fv, &sk, &sv);
			ov = bpf_map_lookup_elem(&KP_SNAT_MAP, &sk);
			if (!ov || KP_F(kp_snat_same_client)(ov, fk)) {
				if (!bpf_map_update_elem(&KP_SNAT_MAP, &sk, &sv, BPF_ANY))
					return 0;
			}
		} else if (!kp_snat_closing(old->state)) {
			/* Another backend, the old flow never closed (its backend went away): nothing
			 * to keep in TIME_WAIT there, and its entry would hold the port for hours. */
			KP_F(kp_snat_of_fwd)(fk, old, &sk, &sv);
			bpf_map_delete_elem(&KP_SNAT_MAP, &sk);
		}
		/* else: the old port stays as a tombstone toward the old backend. */
	}

	for (int i = 0; i < KP_SNAT_MAX_RETRIES; i++) {
		KP_SNAT_VAL *cur;
		__u64 idx = i == 0 ? KP_F(kp_snat_home)(fk) : kp_snat_next();
		int accepts;

		fv->snat_port = bpf_htons((__u16)(lo + idx % span));
		KP_F(kp_snat_of_fwd)(fk, fv, &sk, &sv);
		if (!bpf_map_update_elem(&KP_SNAT_MAP, &sk, &sv, BPF_NOEXIST))
			return 0;
		cur = bpf_map_lookup_elem(&KP_SNAT_MAP, &sk);
		if (cur) {
			/* Dead (flow timed out, not swept yet); or a tombstone whose flow is over (closed
			 * by both ends, or its conntrack entry expired), ours or one whose TIME_WAIT at the
			 * backend takes this SYN. */
			accepts = KP_F(kp_snat_tw_accepts)(cur, syn);
			if ((cur->expires_ns < now ||
			     (kp_snat_closing(cur->state) &&
			      (cur->state == KP_CT_CLOSED || KP_F(kp_snat_flow_over)(cur, now)) &&
			      (KP_F(kp_snat_same_client)(cur, fk) || accepts == 1))) &&
			    !KP_F(kp_snat_take)(&sk, &sv, len))
				return 0;
			if (accepts < 0 && kp_snat_closing(cur->state) && KP_F(kp_snat_flow_over)(cur, now) &&
			    cur->expires_ns < best_exp) {
				best_exp = cur->expires_ns;
				best = fv->snat_port;
			}
		}
		KP_F(kp_count)(KP_STAT_SNAT_RETRY, len);
	}
	if (best) {
		/* Only tombstones of unknown TIME_WAIT left: the one closed longest ago (its SYN may cost
		 * the client one 1-s retry: the retry keeps the port, rule 1, and its reset ended the
		 * TIME_WAIT). */
		fv->snat_port = best;
		KP_F(kp_snat_of_fwd)(fk, fv, &sk, &sv);
		if (!KP_F(kp_snat_take)(&sk, &sv, len))
			return 0;
	}
	return -1;
}

