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

static __always_inline __u64 kp_ct_timeout_ns(__u8 state)
{
	struct kp_config *cfg = kp_config();
	__u32 secs = 0;

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

/* A live entry or NULL: expired entries stay in the map until the agent sweeps them or LRU evicts. */
static __always_inline struct kp_ct4_val *kp_ct_lookup(const struct kp_ct4_key *key, __u64 now)
{
	struct kp_ct4_val *val = bpf_map_lookup_elem(&kp_ct4_v1, key);

	if (val && val->expires_ns < now)
		return NULL;
	return val;
}

static __always_inline void kp_ct_key_of_pkt(struct kp_ct4_key *key, const struct kp_pkt *p, __u8 dir)
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
static __always_inline void kp_ct_fwd_of_reply(const struct kp_ct4_key *rk, const struct kp_ct4_val *rv,
					       struct kp_ct4_key *fk, struct kp_ct4_val *fv)
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

/* How long a closed SNATed flow keeps its port from other clients: the backend's TIME_WAIT (lib/snat.h). */
#define KP_SNAT_TW_HOLD_NS (60 * KP_NS_PER_SEC)

static __always_inline int kp_snat_closing(__u8 state)
{
	return state == KP_CT_CLOSING || state == KP_CT_CLOSED;
}

/* The kp_snat4_v1 entry of a SNATed flow, described by its FWD side. A closing flow's entry outlives
 * it by KP_SNAT_TW_HOLD_NS, as a tombstone reserving the port (lib/snat.h). */
static __always_inline void kp_snat_of_fwd(const struct kp_ct4_key *fk, const struct kp_ct4_val *fv,
					   struct kp_snat4_key *sk, struct kp_snat4_val *sv)
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
static __always_inline void kp_ct_reply_key_of_fwd(const struct kp_ct4_key *fk, const struct kp_ct4_val *fv,
						   struct kp_ct4_key *rk)
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

static __always_inline int kp_ct_key_eq(const struct kp_ct4_key *a, const struct kp_ct4_key *b)
{
	return a->saddr == b->saddr && a->daddr == b->daddr && a->sport == b->sport && a->dport == b->dport &&
	       a->proto == b->proto && a->dir == b->dir;
}

/*
 * Delete the flow a REPLY entry (rk, rv) belongs to. Its FWD entry goes only if it still points at
 * this REPLY's backend: the client may have re-used the FWD tuple for a new flow to another backend
 * (KP_STAT_CT_REOPEN), which must survive.
 */
static __always_inline void kp_ct_forget_reply(const struct kp_ct4_key *rk, const struct kp_ct4_val *rv)
{
	struct kp_ct4_key fk;
	struct kp_ct4_val fv;
	struct kp_ct4_val *cur;

	kp_ct_fwd_of_reply(rk, rv, &fk, &fv);
	cur = bpf_map_lookup_elem(&kp_ct4_v1, &fk);
	if (cur && cur->nat_addr == rk->saddr && cur->nat_port == rk->sport)
		bpf_map_delete_elem(&kp_ct4_v1, &fk);
	bpf_map_delete_elem(&kp_ct4_v1, rk);
}

static __always_inline int kp_ct_closing(__u8 state)
{
	return state == KP_CT_CLOSING || state == KP_CT_CLOSED;
}

/*
 * A TCP SYN (no ACK) that is no Service's, from a client straight to a pod: if its reversed tuple is
 * the REPLY key of a closing or closed Service flow (the client re-used the source port it had for
 * that flow, now toward the backend itself), that entry would rewrite the backend's SYN-ACK to come
 * from the frontend and the connection could never open. The client's kernel has moved on, so the
 * old flow goes. A live (SYN_SENT, ESTABLISHED) flow is kept: the backend sees both connections as
 * the same 4-tuple and cannot serve both; the older one keeps working. Per SYN only, never per packet.
 */
static __always_inline void kp_ct_direct_syn(const struct kp_pkt *p, __u64 now)
{
	struct kp_ct4_key rk = {
		.saddr = p->daddr,
		.daddr = p->saddr,
		.sport = p->dport,
		.dport = p->sport,
		.proto = p->proto,
		.dir = KP_CT_DIR_REPLY,
	};
	struct kp_ct4_val *cur, rv;

	if (p->proto != IPPROTO_TCP || (p->tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) != KP_TCP_SYN)
		return;
	cur = kp_ct_lookup(&rk, now);
	if (!cur || !kp_ct_closing(cur->state))
		return;
	rv = *cur;
	kp_ct_forget_reply(&rk, &rv);
	kp_count(KP_STAT_CT_TAKEOVER, p->len);
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
static __always_inline int kp_ct_reply_held(const struct kp_ct4_key *fk, __be32 be_addr, __be16 be_port,
					    __be32 hairpin_addr, __u64 now)
{
	struct kp_ct4_key rk = {
		.saddr = be_addr,
		.daddr = hairpin_addr ? hairpin_addr : fk->saddr,
		.sport = be_port,
		.dport = fk->sport,
		.proto = fk->proto,
		.dir = KP_CT_DIR_REPLY,
	};
	struct kp_ct4_val *cur;
	__be32 client;
	__be16 cport;

	if (fk->proto != IPPROTO_TCP)
		return 0;
	cur = kp_ct_lookup(&rk, now);
	if (!cur || cur->state != KP_CT_ESTABLISHED)
		return 0;
	/* the FWD tuple of the holder (kp_ct_fwd_of_reply) against ours */
	client = (cur->flags & KP_CT_F_HAIRPIN) ? cur->snat_addr : rk.daddr;
	cport = (cur->flags & KP_CT_F_HAIRPIN) ? cur->snat_port : rk.dport;
	return !(client == fk->saddr && cport == fk->sport && cur->nat_addr == fk->daddr &&
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
static __always_inline int kp_ct_claim_reply(const struct kp_ct4_key *fk, const struct kp_ct4_val *fv,
					     __u64 now, __u32 len)
{
	struct kp_ct4_key rk, ofk;
	struct kp_ct4_val *cur, orv, ofv;

	if (fv->flags & KP_CT_F_SNAT)
		return 0;
	kp_ct_reply_key_of_fwd(fk, fv, &rk);
	cur = kp_ct_lookup(&rk, now);
	if (!cur)
		return 0;
	orv = *cur;
	kp_ct_fwd_of_reply(&rk, &orv, &ofk, &ofv);
	if (kp_ct_key_eq(&ofk, fk))
		return 0;   /* the same FWD tuple re-used: both entries are overwritten anyway */
	if (fk->proto == IPPROTO_TCP && orv.state == KP_CT_ESTABLISHED)
		return -1;
	kp_ct_forget_reply(&rk, &orv);
	kp_count(KP_STAT_CT_TAKEOVER, len);
	return 0;
}

/*
 * A flow re-opened on its FWD tuple (fk; fv its old value): delete the old REPLY entry if it is
 * still this flow's. When the new flow picks another backend the old REPLY key differs and would
 * otherwise live on for the fin timeout: a late packet of the old backend would refresh it and
 * rewrite the FWD entry back to the old backend, and a direct connection to that backend from the
 * same client port would have its replies rewritten.
 */
static __always_inline void kp_ct_drop_old_reply(const struct kp_ct4_key *fk, const struct kp_ct4_val *fv)
{
	struct kp_ct4_key rk, ofk;
	struct kp_ct4_val *cur, ofv;

	if (fv->flags & KP_CT_F_SNAT)
		return;
	kp_ct_reply_key_of_fwd(fk, fv, &rk);
	cur = bpf_map_lookup_elem(&kp_ct4_v1, &rk);
	if (!cur)
		return;
	kp_ct_fwd_of_reply(&rk, cur, &ofk, &ofv);
	if (kp_ct_key_eq(&ofk, fk))
		bpf_map_delete_elem(&kp_ct4_v1, &rk);
}

/* Write both sides of a flow, described by its FWD side. */
static __always_inline int kp_ct_write(const struct kp_ct4_key *fk, const struct kp_ct4_val *fv)
{
	int hairpin = fv->flags & KP_CT_F_HAIRPIN;

	/* The reply side first: once FWD exists, replies of the flow must find their way back. */
	if (fv->flags & KP_CT_F_SNAT) {
		struct kp_snat4_key sk;
		struct kp_snat4_val sv;

		kp_snat_of_fwd(fk, fv, &sk, &sv);
		if (bpf_map_update_elem(&kp_snat4_v1, &sk, &sv, BPF_ANY))
			return -1;
	} else {
		struct kp_ct4_key rk;
		struct kp_ct4_val rv = *fv;

		kp_ct_reply_key_of_fwd(fk, fv, &rk);

		rv.nat_addr = fk->daddr;
		rv.nat_port = fk->dport;
		if (hairpin) {
			rv.snat_addr = fk->saddr;
			rv.snat_port = fk->sport;
		}
		if (bpf_map_update_elem(&kp_ct4_v1, &rk, &rv, BPF_ANY))
			return -1;
	}
	if (bpf_map_update_elem(&kp_ct4_v1, fk, fv, BPF_ANY))
		return -1;
	return 0;
}

static __always_inline __u8 kp_ct_next_state(__u8 state, __u8 proto, __u8 tcp_flags, int reply)
{
	if (proto != IPPROTO_TCP)
		return KP_CT_UDP;
	if (tcp_flags & KP_TCP_RST)
		return KP_CT_CLOSED;
	if (tcp_flags & KP_TCP_FIN)
		return state == KP_CT_CLOSED ? KP_CT_CLOSED : KP_CT_CLOSING;
	if (reply && state == KP_CT_SYN_SENT)
		return KP_CT_ESTABLISHED;
	return state;
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
static __always_inline __u8 kp_snat_fin_state(const struct kp_ct4_val *fv, __u8 next, __u8 tcp_flags, int reply,
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

/* A fresh SYN on a closing or closed flow reuses the tuple: it is a new connection. */
static __always_inline int kp_ct_tuple_reused(__u8 state, __u8 tcp_flags)
{
	return (tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) == KP_TCP_SYN &&
	       (state == KP_CT_CLOSING || state == KP_CT_CLOSED);
}

/*
 * Account one packet of a tracked flow (fv is a copy of its FWD value) whose state, flags and
 * tw_key become these: rewrite both entries only when one of them changes or when the expiry moves
 * by more than KP_CT_REFRESH_NS.
 */
static __always_inline void kp_ct_touch_tw(const struct kp_ct4_key *fk, struct kp_ct4_val *fv, __u8 state,
					   __u8 flags, __u16 tw_key, __u64 now)
{
	__u64 expires = now + kp_ct_timeout_ns(state);

	if (state == fv->state && flags == fv->flags && tw_key == fv->tw_key &&
	    (__s64)(expires - fv->expires_ns) <= (__s64)KP_CT_REFRESH_NS)
		return;
	fv->state = state;
	fv->flags = flags;
	fv->tw_key = tw_key;
	fv->expires_ns = expires;
	/* A failed refresh keeps the old entries, which still translate until they expire. */
	kp_ct_write(fk, fv);
}

static __always_inline void kp_ct_touch(const struct kp_ct4_key *fk, struct kp_ct4_val *fv, __u8 state,
					__u8 flags, __u64 now)
{
	kp_ct_touch_tw(fk, fv, state, flags, fv->tw_key, now);
}

#endif /* KPROXY_LIB_CT_H */
