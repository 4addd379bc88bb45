/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Address/port rewrites with incremental checksums, and reverse NAT of replies. */
#ifndef KPROXY_LIB_NAT_H
#define KPROXY_LIB_NAT_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "lib/parse.h"
#include "lib/ct.h"
#include "lib/stats.h"
#include "lib/fib.h"
#include "lib/dsr.h"
#include "lib/tcp.h"

enum kp_nat_side {
	KP_NAT_SRC = 0,  /* rewrite saddr/sport (reverse NAT) */
	KP_NAT_DST = 1,  /* rewrite daddr/dport (DNAT) */
};

/*
 * Rewrite one address and port of a parsed TCP/UDP packet.
 * The address is in the L4 pseudo-header, hence BPF_F_PSEUDO_HDR: with CHECKSUM_PARTIAL (packets
 * from a local pod) only the pseudo-header part of the checksum field must change. The port is not
 * (plain replace, a no-op under CHECKSUM_PARTIAL). UDP: BPF_F_MARK_MANGLED_0 keeps a zero ("no
 * checksum") field zero and turns a computed zero into 0xffff.
 */
static __always_inline int kp_nat4(struct __sk_buff *skb, const struct kp_pkt *p, int side, __be32 new_addr,
				   __be16 new_port)
{
	__u32 addr_off = side == KP_NAT_DST ? KP_IP_DADDR_OFF : KP_IP_SADDR_OFF;
	__u32 port_off = p->l4_off + (side == KP_NAT_DST ? offsetof(struct tcphdr, dest)
							   : offsetof(struct tcphdr, source));
	__be32 old_addr = side == KP_NAT_DST ? p->daddr : p->saddr;
	__be16 old_port = side == KP_NAT_DST ? p->dport : p->sport;
	__u32 csum_off = kp_l4_csum_off(p);
	__u64 l4_flags = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (kp_frag_get() == KP_FRAG_LATER) {
		/* No L4 header here: the first fragment's checksum covers the datagram and was updated. */
		if (old_addr != new_addr &&
		    (bpf_l3_csum_replace(skb, KP_IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) ||
		     bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0)))
			return -1;
		return 0;
	}
	if (old_addr != new_addr) {
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
					l4_flags | BPF_F_PSEUDO_HDR | sizeof(new_addr)))
			return -1;
		if (bpf_l3_csum_replace(skb, KP_IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0))
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4_flags | sizeof(new_port)))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	return 0;
}

static __always_inline __be32 kp_hairpin_addr(const struct kp_config *cfg)
{
	return cfg && cfg->hairpin_addr ? cfg->hairpin_addr : bpf_htonl(KP_HAIRPIN_ADDR_DEFAULT);
}

/* Largest MSS a client may send through a DSR IPIP flow: the LAN MTU minus both IPv4 headers and TCP. */
static __always_inline __u16 kp_ipip_mss(const struct kp_config *cfg)
{
	__u32 mtu = cfg && cfg->lan_mtu ? cfg->lan_mtu : KP_LAN_MTU_DEFAULT;

	return mtu - 2 * sizeof(struct iphdr) - sizeof(struct tcphdr);
}

/*
 * A reply of a translated flow (backend -> client): restore the frontend as its source.
 * from_pod: the reply leaves a local backend. Replies of flows from outside (local backend or DSR)
 * and those whose restored source is this node's address are forwarded by BPF (kp_fib_*): the
 * kernel would drop a local source arriving on a veth as a martian. Hairpin replies go straight
 * back to the pod. A SYN-ACK of a DSR IPIP flow gets its MSS lowered so the client's segments fit
 * the LAN once encapsulated.
 */
static __always_inline int kp_revnat4(struct __sk_buff *skb, const struct kp_pkt *p, int from_pod)
{
	struct kp_config *cfg = kp_config();
	struct bpf_fib_lookup *fib = NULL;
	struct kp_ct4_key rk, fk;
	struct kp_ct4_val rv, fv;
	struct kp_ct4_val *cur;
	__u64 now = bpf_ktime_get_ns();
	int fwd = 0, res = KP_FIB_FAIL;

	kp_ct_key_of_pkt(&rk, p, KP_CT_DIR_REPLY);
	cur = kp_ct_lookup(&rk, now);
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
		kp_ct_forget_reply(&rk, &rv);
		kp_count(KP_STAT_CT_STALE_REPLY, p->len);
		return TC_ACT_OK;
	}
	kp_ct_fwd_of_reply(&rk, &rv, &fk, &fv);
	kp_ct_touch(&fk, &fv, kp_ct_next_state(fv.state, p->proto, p->tcp_flags, 1),
		    fv.flags | KP_CT_F_SEEN_REPLY, now);
	if (from_pod && !(rv.flags & KP_CT_F_HAIRPIN) &&
	    ((rv.flags & KP_CT_F_EXTERNAL) || (cfg && cfg->node_addr && rv.nat_addr == cfg->node_addr)) &&
	    p->ttl > 1) {
		fib = kp_fib_room();
		res = kp_fib_lookup(skb, fib, rv.nat_addr, p->daddr, 0);
		fwd = res == KP_FIB_OK || res == KP_FIB_NEIGH;
	}
	/* whether the backend is a pod or the node's own stack (a hostNetwork endpoint, kp_to_netdev) */
	if ((rv.flags & KP_CT_F_DSR_IPIP) && p->proto == IPPROTO_TCP && (p->tcp_flags & KP_TCP_SYN) &&
	    kp_mss_clamp(skb, p->l4_off, kp_l4_csum_off(p), kp_ipip_mss(cfg)))
		kp_count(KP_STAT_MSS_CLAMP, p->len);
	if (kp_nat4(skb, p, KP_NAT_SRC, rv.nat_addr, rv.nat_port))
		goto fail;
	if (rv.flags & KP_CT_F_HAIRPIN) {
		if (kp_nat4(skb, p, KP_NAT_DST, rv.snat_addr, rv.snat_port))
			goto fail;
		kp_count(KP_STAT_REVNAT, p->len);
		kp_count(KP_STAT_HAIRPIN, p->len);
		return from_pod ? kp_bounce(skb) : TC_ACT_OK;
	}
	kp_count(KP_STAT_REVNAT, p->len);
	if (!fwd)
		return TC_ACT_OK;
	if (kp_ttl_dec(skb, p->ttl))
		goto fail;
	return kp_fib_redirect(skb, fib, res);
fail:
	kp_count(KP_DROP_NAT_FAILED, p->len);
	return TC_ACT_SHOT;
}

/*
 * Ingress node, from a netdev: a reply of a SNATed flow (backend -> node:nat_port). Restore
 * client as destination and frontend as source, forward it to the client. Returns -1 if the packet
 * is not such a reply.
 */
static __always_inline int kp_snat_revnat4(struct __sk_buff *skb, const struct kp_pkt *p)
{
	struct kp_snat4_key sk = {
		.saddr = p->saddr,
		.daddr = p->daddr,
		.sport = p->sport,
		.dport = p->dport,
		.proto = p->proto,
	};
	struct kp_snat4_val *cur, sv;
	struct bpf_fib_lookup *fib;
	struct kp_ct4_key fk;
	struct kp_ct4_val *fcur, fv;
	__u64 now = bpf_ktime_get_ns();
	int res;

	cur = bpf_map_lookup_elem(&kp_snat4_v1, &sk);
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
	fcur = kp_ct_lookup(&fk, now);
	if (fcur) {
		fv = *fcur;
		kp_ct_touch(&fk, &fv,
			    kp_snat_fin_state(&fv, kp_ct_next_state(fv.state, p->proto, p->tcp_flags, 1),
					      p->tcp_flags, 1, fv.tw_key),
			    fv.flags | KP_CT_F_SEEN_REPLY, now);
	}
	if (p->ttl <= 1)
		return TC_ACT_OK;   /* the kernel answers time exceeded to the backend */
	fib = kp_fib_room();
	res = kp_fib_lookup(skb, fib, sv.front_addr, sv.client_addr, 0);
	if (res != KP_FIB_OK && res != KP_FIB_NEIGH) {
		kp_count(KP_DROP_FIB, p->len);
		return TC_ACT_SHOT;
	}
	if (kp_nat4(skb, p, KP_NAT_DST, sv.client_addr, sv.client_port) ||
	    kp_nat4(skb, p, KP_NAT_SRC, sv.front_addr, sv.front_port) || kp_ttl_dec(skb, p->ttl)) {
		kp_count(KP_DROP_NAT_FAILED, p->len);
		return TC_ACT_SHOT;
	}
	kp_count(KP_STAT_SNAT_REVNAT, p->len);
	return kp_fib_redirect(skb, fib, res);
}

#endif /* KPROXY_LIB_NAT_H */
