/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking of one address family (lib/fam.h: included by lib/ct.h once per family).
 * See lib/ct.h for the scheme.
 */

/* A live entry or NULL: expired entries stay in the map until the agent sweeps them or LRU evicts. */
static __always_inline KP_CT_VAL *KP_F(kp_ct_lookup)(const KP_CT_KEY *key, __u64 now)
{
	KP_CT_VAL *val = bpf_map_lookup_elem(&KP_CT_MAP, key);

	if (val && val->expires_ns < now)
		return NULL;
	return val;
}

static __always_inline void KP_F(kp_ct_key_of_pkt)(KP_CT_KEY *key, const KP_PKT *p, __u8 dir)
{
	key->saddr = p->saddr;
	key->daddr = p->daddr;
	key->sport = p->sport;
	key->dport = p->dport;
	key->proto = p->proto;
	key->dir = dir;
	key->pad[0] = 0;
	key->pad[1] = 0;
}

/* The FWD entry matching a REPLY entry. */
static __always_inline void KP_F(kp_ct_fwd_of_reply)(const KP_CT_KEY *rk, const KP_CT_VAL *rv,
					       KP_CT_KEY *fk, KP_CT_VAL *fv)
{
	int hairpin = rv->flags & KP_CT_F_HAIRPIN;

	fk->saddr = hairpin ? rv->snat_addr : rk->daddr;
	fk->daddr = rv->nat_addr;
	fk->sport = hairpin ? rv->snat_port : rk->dport;
	fk->dport = rv->nat_port;
	fk->proto = rk->proto;
	fk->dir = KP_CT_DIR_FWD;
	fk->pad[0] = 0;
	fk->pad[1] = 0;
	*fv = *rv;
	fv->nat_addr = rk->saddr;
	fv->nat_port = rk->sport;
	if (hairpin) {
		fv->snat_addr = rk->daddr;
		fv->snat_port = rk->dport;
	}
}

/* The kp_snat4_v1 / kp_snat6_v1 entry of a SNATed flow, described by its FWD side. A closing flow's entry outlives
 * it by KP_SNAT_TW_HOLD_NS, as a tombstone reserving the port (lib/snat.h). */
static __always_inline void KP_F(kp_snat_of_fwd)(const KP_CT_KEY *fk, const KP_CT_VAL *fv, KP_SNAT_KEY *sk,
						  KP_SNAT_VAL *sv)
{
	sk->saddr = fv->nat_addr;
	sk->daddr = fv->snat_addr;
	sk->sport = fv->nat_port;
	sk->dport = fv->snat_port;
	sk->proto = fk->proto;
	sk->pad[0] = 0;
	sk->pad[1] = 0;
	sk->pad[2] = 0;
	sv->expires_ns = fv->expires_ns + (kp_snat_closing(fv->state) ? KP_SNAT_TW_HOLD_NS : 0);
	sv->client_addr = fk->saddr;
	sv->front_addr = fk->daddr;
	sv->client_port = fk->sport;
	sv->front_port = fk->dport;
	sv->state = fv->state;
	sv->flags = fv->flags;
	sv->tw_key = fv->tw_key;
}

/* The REPLY key of a flow without SNAT, described by its FWD side. */
static __always_inline void KP_F(kp_ct_reply_key_of_fwd)(const KP_CT_KEY *fk, const KP_CT_VAL *fv,
						   KP_CT_KEY *rk)
{
	int hairpin = fv->flags & KP_CT_F_HAIRPIN;

	rk->saddr = fv->nat_addr;
	rk->daddr = hairpin ? fv->snat_addr : fk->saddr;
	rk->sport = fv->nat_port;
	rk->dport = hairpin ? fv->snat_port : fk->sport;
	rk->proto = fk->proto;
	rk->dir = KP_CT_DIR_REPLY;
	rk->pad[0] = 0;
	rk->pad[1] = 0;
}

static __always_inline int KP_F(kp_ct_key_eq)(const KP_CT_KEY *a, const KP_CT_KEY *b)
{
	return KP_ADDR_EQ(a->saddr, b->saddr) && KP_ADDR_EQ(a->daddr, b->daddr) && a->sport == b->sport &&
	       a->dport == b->dport && a->proto == b->proto && a->dir == b->dir;
}

/*
 * Delete the flow a REPLY entry (rk, rv) belongs to. Its FWD entry goes only if it still points at
 * this REPLY's backend: the client may have re-used the FWD tuple for a new flow to another backend
 * (KP_STAT_CT_REOPEN), which must survive.
 */
static __always_inline void KP_F(kp_ct_forget_reply)(const KP_CT_KEY *rk, const KP_CT_VAL *rv)
{
	KP_CT_KEY fk;
	KP_CT_VAL fv;
	KP_CT_VAL *cur;

	KP_F(kp_ct_fwd_of_reply)(rk, rv, &fk, &fv);
	cur = bpf_map_lookup_elem(&KP_CT_MAP, &fk);
	if (cur && KP_ADDR_EQ(cur->nat_addr, rk->saddr) && cur->nat_port == rk->sport)
		bpf_map_delete_elem(&KP_CT_MAP, &fk);
	bpf_map_delete_elem(&KP_CT_MAP, rk);
}

/*
 * A TCP SYN (no ACK) that is no Service's, from a client straight to a pod: if its reversed tuple is
 * the REPLY key of a closing or closed Service flow (the client re-used the source port it had for
 * that flow, now toward the backend itself), that entry would rewrite the backend's SYN-ACK to come
 * from the frontend and the connection could never open. The client's kernel has moved on, so the
 * old flow goes. A live (SYN_SENT, ESTABLISHED) flow is kept: the backend sees both connections as
 * the same 4-tuple and cannot serve both; the older one keeps working. Per SYN only, never per packet.
 */
static __always_inline void KP_F(kp_ct_direct_syn)(const KP_PKT *p, __u64 now)
{
	KP_CT_KEY rk = {
		.saddr = p->daddr,
		.daddr = p->saddr,
		.sport = p->dport,
		.dport = p->sport,
		.proto = p->proto,
		.dir = KP_CT_DIR_REPLY,
	};
	KP_CT_VAL *cur, rv;

	if (p->proto != IPPROTO_TCP || (p->tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) != KP_TCP_SYN)
		return;
	cur = KP_F(kp_ct_lookup)(&rk, now);
	if (!cur || !kp_ct_closing(cur->state))
		return;
	rv = *cur;
	KP_F(kp_ct_forget_reply)(&rk, &rv);
	KP_F(kp_count)(KP_STAT_CT_TAKEOVER, p->len);
}

/*
 * Whether the REPLY key a new TCP flow fk without SNAT would have with backend be_addr:be_port (and the
 * hairpin address as its client side when not 0) is held by a live ESTABLISHED flow with another FWD tuple: the same client address and port reach the same backend through another frontend
 * (two Services sharing a backend, or a DSR flow entering through another node). Linux connect() re-uses
 * a local port for another destination whenever the 4-tuple differs, so the client's kernel considers
 * both connections alive; the backend sees them as one 4-tuple and can serve only one. The established
 * one keeps it: taking it over would delete its FWD entry, and the backend's challenge ACK to the new
 * SYN, answered by a RST of the new socket, resets the established connection on the backend.
 */
static __always_inline int KP_F(kp_ct_reply_held)(const KP_CT_KEY *fk, KP_ADDR be_addr, __be16 be_port,
						   KP_ADDR hairpin_addr, __u64 now)
{
	KP_CT_KEY rk = {
		.saddr = be_addr,
		.daddr = KP_ADDR_IS_ZERO(hairpin_addr) ? fk->saddr : hairpin_addr,
		.sport = be_port,
		.dport = fk->sport,
		.proto = fk->proto,
		.dir = KP_CT_DIR_REPLY,
	};
	KP_CT_VAL *cur;
	KP_ADDR client;
	__be16 cport;

	if (fk->proto != IPPROTO_TCP)
		return 0;
	cur = KP_F(kp_ct_lookup)(&rk, now);
	if (!cur || cur->state != KP_CT_ESTABLISHED)
		return 0;
	/* the FWD tuple of the holder (kp_ct_fwd_of_reply) against ours */
	client = (cur->flags & KP_CT_F_HAIRPIN) ? cur->snat_addr : rk.daddr;
	cport = (cur->flags & KP_CT_F_HAIRPIN) ? cur->snat_port : rk.dport;
	return !(KP_ADDR_EQ(client, fk->saddr) && cport == fk->sport && KP_ADDR_EQ(cur->nat_addr, fk->daddr) &&
		 cur->nat_port == fk->dport);
}

/*
 * A new flow without SNAT (fk, fv) about to be written, whose REPLY key is held by a live entry of
 * another flow that is not ESTABLISHED (closing, closed, a SYN that got no answer, UDP): the client's
 * kernel re-used the port, the new flow takes the REPLY entry over (kp_ct_write overwrites it) and the
 * old FWD entry is deleted. Left alone, the old FWD entry would write its own REPLY value back on its
 * next refresh and send the new flow's replies out from the old frontend. Whether the backend accepts
 * the new SYN on a 4-tuple it holds in TIME_WAIT is its kernel's business (Linux does when the SYN's
 * timestamp or sequence number is higher). An ESTABLISHED TCP flow is never taken over
 * (kp_ct_reply_held): returns -1 then, and nothing changed. One lookup per new flow.
 */
static __always_inline int KP_F(kp_ct_claim_reply)(const KP_CT_KEY *fk, const KP_CT_VAL *fv,
					     __u64 now, __u32 len)
{
	KP_CT_KEY rk, ofk;
	KP_CT_VAL *cur, orv, ofv;

	if (fv->flags & KP_CT_F_SNAT)
		return 0;
	KP_F(kp_ct_reply_key_of_fwd)(fk, fv, &rk);
	cur = KP_F(kp_ct_lookup)(&rk, now);
	if (!cur)
		return 0;
	orv = *cur;
	KP_F(kp_ct_fwd_of_reply)(&rk, &orv, &ofk, &ofv);
	if (KP_F(kp_ct_key_eq)(&ofk, fk))
		return 0;   /* the same FWD tuple re-used: both entries are overwritten anyway */
	if (fk->proto == IPPROTO_TCP && orv.state == KP_CT_ESTABLISHED)
		return -1;
	KP_F(kp_ct_forget_reply)(&rk, &orv);
	KP_F(kp_count)(KP_STAT_CT_TAKEOVER, len);
	return 0;
}

/*
 * A flow re-opened on its FWD tuple (fk; fv its old value): delete the old REPLY entry if it is
 * still this flow's. When the new flow picks another backend the old REPLY key differs and would
 * otherwise live on for the fin timeout: a late packet of the old backend would refresh it and
 * rewrite the FWD entry back to the old backend, and a direct connection to that backend from the
 * same client port would have its replies rewritten.
 */
static __always_inline void KP_F(kp_ct_drop_old_reply)(const KP_CT_KEY *fk, const KP_CT_VAL *fv)
{
	KP_CT_KEY rk, ofk;
	KP_CT_VAL *cur, ofv;

	if (fv->flags & KP_CT_F_SNAT)
		return;
	KP_F(kp_ct_reply_key_of_fwd)(fk, fv, &rk);
	cur = bpf_map_lookup_elem(&KP_CT_MAP, &rk);
	if (!cur)
		return;
	KP_F(kp_ct_fwd_of_reply)(&rk, cur, &ofk, &ofv);
	if (KP_F(kp_ct_key_eq)(&ofk, fk))
		bpf_map_delete_elem(&KP_CT_MAP, &rk);
}

/* Write both sides of a flow, described by its FWD side. */
static __always_inline int KP_F(kp_ct_write)(const KP_CT_KEY *fk, const KP_CT_VAL *fv)
{
	int hairpin = fv->flags & KP_CT_F_HAIRPIN;

	/* The reply side first: once FWD exists, replies of the flow must find their way back. */
	if (fv->flags & KP_CT_F_SNAT) {
		KP_SNAT_KEY sk;
		KP_SNAT_VAL sv;

		KP_F(kp_snat_of_fwd)(fk, fv, &sk, &sv);
		if (bpf_map_update_elem(&KP_SNAT_MAP, &sk, &sv, BPF_ANY))
			return -1;
	} else {
		KP_CT_KEY rk;
		KP_CT_VAL rv = *fv;

		KP_F(kp_ct_reply_key_of_fwd)(fk, fv, &rk);

		rv.nat_addr = fk->daddr;
		rv.nat_port = fk->dport;
		if (hairpin) {
			rv.snat_addr = fk->saddr;
			rv.snat_port = fk->sport;
		}
		if (bpf_map_update_elem(&KP_CT_MAP, &rk, &rv, BPF_ANY))
			return -1;
	}
	if (bpf_map_update_elem(&KP_CT_MAP, fk, fv, BPF_ANY))
		return -1;
	return 0;
}

/*
 * The state a SNATed TCP flow (fv: a copy of its FWD value before the packet) moves to with a packet
 * whose plain next state is next (kp_ct_next_state); reply: the packet is the backend's; tw_key: the
 * flow's key after the packet (kp_snat_tw_mark). A FIN from the other end than the first FIN's makes
 * the flow KP_CT_CLOSED: both ends closed, nothing more will be sent (the last ACK aside), the state
 * nf_conntrack calls TIME_WAIT. Which end sent the first one shows in tw_key, written by the client's
 * FIN only: a client FIN on a CLOSING flow without a key follows the backend's, a backend FIN on a
 * CLOSING flow with a key follows the client's. Such a flow's port may go to another client at once
 * (lib/snat.h, rule 2), as nf_nat evicts a TIME_WAIT conntrack whose tuple a new connection needs
 * (nf_nat_used_tuple_harder). A half-closed flow (one FIN) stays CLOSING: its other end may still send.
 */
static __always_inline __u8 KP_F(kp_snat_fin_state)(const KP_CT_VAL *fv, __u8 next, __u8 tcp_flags, int reply,
					      __u16 tw_key)
{
	__u8 other_end;

	if (!(fv->flags & KP_CT_F_SNAT) || !(tcp_flags & KP_TCP_FIN) || fv->state != KP_CT_CLOSING)
		return next;
	other_end = reply ? fv->tw_key != 0 : (fv->tw_key == 0) & (tw_key != 0);
	if (other_end && next == KP_CT_CLOSING)
		return KP_CT_CLOSED;
	return next;
}

/*
 * Account one packet of a tracked flow (fv is a copy of its FWD value) whose state, flags and
 * tw_key become these: rewrite both entries only when one of them changes or when the expiry moves
 * by more than KP_CT_REFRESH_NS.
 */
static __always_inline void KP_F(kp_ct_touch_tw)(const KP_CT_KEY *fk, KP_CT_VAL *fv, __u8 state,
					   __u8 flags, __u16 tw_key, __u64 now)
{
	__u64 expires = now + kp_ct_timeout_ns(state, fk->proto);

	if (state == fv->state && flags == fv->flags && tw_key == fv->tw_key &&
	    (__s64)(expires - fv->expires_ns) <= (__s64)KP_CT_REFRESH_NS)
		return;
	fv->state = state;
	fv->flags = flags;
	fv->tw_key = tw_key;
	fv->expires_ns = expires;
	/* A failed refresh keeps the old entries, which still translate until they expire. */
	KP_F(kp_ct_write)(fk, fv);
}

static __always_inline void KP_F(kp_ct_touch)(const KP_CT_KEY *fk, KP_CT_VAL *fv, __u8 state,
					__u8 flags, __u64 now)
{
	KP_F(kp_ct_touch_tw)(fk, fv, state, flags, fv->tw_key, now);
}

