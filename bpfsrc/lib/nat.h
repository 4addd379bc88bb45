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

/* A reply of a translated flow (backend -> client): restore the frontend as its source. */
static __always_inline int kp_revnat4(struct __sk_buff *skb, const struct kp_pkt *p)
{
	struct kp_ct4_key rk, fk;
	struct kp_ct4_val rv, fv;
	struct kp_ct4_val *cur;
	__u64 now = bpf_ktime_get_ns();

	kp_ct_key_of_pkt(&rk, p, KP_CT_DIR_REPLY);
	cur = kp_ct_lookup(&rk, now);
	if (!cur)
		return TC_ACT_OK;
	rv = *cur;
	kp_ct_fwd_of_reply(&rk, &rv, &fk, &fv);
	kp_ct_touch(&fk, &fv, kp_ct_next_state(fv.state, p->proto, p->tcp_flags, 1),
		    fv.flags | KP_CT_F_SEEN_REPLY, now);
	if (kp_nat4(skb, p, KP_NAT_SRC, rv.nat_addr, rv.nat_port)) {
		kp_count(KP_DROP_NAT_FAILED, p->len);
		return TC_ACT_SHOT;
	}
	kp_count(KP_STAT_REVNAT, p->len);
	return TC_ACT_OK;
}

#endif /* KPROXY_LIB_NAT_H */
