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
#include "lib/csum.h"

enum kp_nat_side {
	KP_NAT_SRC = 0,  /* rewrite saddr/sport (reverse NAT) */
	KP_NAT_DST = 1,  /* rewrite daddr/dport (DNAT) */
};

/*
 * SCTP's port rewrite: the CRC32c follows incrementally (lib/sctp.h); no address is in it. sctp_len: from
 * the IP header's length (kp_parse4/kp_parse6 pass SCTP only with it known).
 */
static __always_inline int kp_nat_sctp_port(struct __sk_buff *skb, __u32 l4_off, __u32 sctp_len, int side,
					    __be16 old_port, __be16 new_port)
{
	__u32 port_off = l4_off + (side == KP_NAT_DST ? offsetof(struct kp_sctphdr, dest)
						     : offsetof(struct kp_sctphdr, source));

	if (old_port == new_port)
		return 0;
	if (kp_sctp_csum_port(skb, l4_off, sctp_len, side == KP_NAT_DST, old_port, new_port))
		return -1;
	return bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), BPF_F_RECOMPUTE_CSUM) ? -1 : 0;
}

/*
 * Rewrite one address and port of a parsed TCP/UDP/SCTP packet.
 * The address is in the L4 pseudo-header, hence BPF_F_PSEUDO_HDR: with CHECKSUM_PARTIAL (packets
 * from a local pod) only the pseudo-header part of the checksum field must change. The port is not
 * (plain replace, a no-op under CHECKSUM_PARTIAL). UDP: BPF_F_MARK_MANGLED_0 keeps a zero ("no
 * checksum") field zero and turns a computed zero into 0xffff. SCTP: kp_nat_sctp_port.
 */
static __always_inline int kp_nat4(struct __sk_buff *skb, const struct kp_pkt *p, int side, __be32 new_addr,
				   __be16 new_port)
{
	__u32 addr_off = side == KP_NAT_DST ? KP_IP_DADDR_OFF : KP_IP_SADDR_OFF;
	__u32 port_off = p->l4_off + (side == KP_NAT_DST ? offsetof(struct tcphdr, dest)
							   : offsetof(struct tcphdr, source));
	__be32 old_addr = side == KP_NAT_DST ? p->daddr : p->saddr;
	__be16 old_port = side == KP_NAT_DST ? p->dport : p->sport;
	__u32 csum_off = kp_l4_csum_off4(p);
	__u64 l4_flags = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (kp_frag_get() == KP_FRAG_LATER) {
		/* No L4 header here: the first fragment's checksum covers the datagram and was updated. */
		if (old_addr != new_addr &&
		    (bpf_l3_csum_replace(skb, KP_IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) ||
		     bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0)))
			return -1;
		return 0;
	}
	if (p->proto == KP_IPPROTO_SCTP) {
		if (old_addr != new_addr &&
		    (bpf_l3_csum_replace(skb, KP_IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) ||
		     bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0)))
			return -1;
		return kp_nat_sctp_port(skb, p->l4_off, ETH_HLEN + p->tot_len - p->l4_off, side, old_port, new_port);
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

static __always_inline __be32 kp_hairpin_addr4(const struct kp_config *cfg)
{
	return cfg && cfg->hairpin_addr ? cfg->hairpin_addr : bpf_htonl(KP_HAIRPIN_ADDR_DEFAULT);
}

static __always_inline struct kp_config6 *kp_config6(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&kp_cfg6_v1, &zero);
}

/* The IPv6 hairpin address (kp_config6); cfg (IPv4's) is not read: the signature is kp_hairpin_addr4's. */
static __always_inline union kp_in6 kp_hairpin_addr6(const struct kp_config *cfg)
{
	struct kp_config6 *c6 = kp_config6();
	union kp_in6 a = {};

	if (c6 && !kp_in6_is_zero(c6->hairpin_addr))
		return c6->hairpin_addr;
	a.w[0] = bpf_htonl(KP_HAIRPIN6_DEFAULT_W0);
	a.w[3] = bpf_htonl(KP_HAIRPIN6_DEFAULT_W3);
	return a;
}

/* This node's primary address of the family (kp_config / kp_config6), the unset address if none. */
static __always_inline __be32 kp_node_addr4(const struct kp_config *cfg)
{
	return cfg ? cfg->node_addr : 0;
}

static __always_inline union kp_in6 kp_node_addr6(const struct kp_config *cfg)
{
	struct kp_config6 *c6 = kp_config6();

	return c6 ? c6->node_addr : (union kp_in6){};
}

/* Whether addr is this node's primary address of its family (kp_config / kp_config6). */
static __always_inline int kp_is_node_addr4(const struct kp_config *cfg, __be32 addr)
{
	return cfg && cfg->node_addr && addr == cfg->node_addr;
}

static __always_inline int kp_is_node_addr6(const struct kp_config *cfg, union kp_in6 addr)
{
	struct kp_config6 *c6 = kp_config6();

	return c6 && !kp_in6_is_zero(c6->node_addr) && kp_in6_eq(addr, c6->node_addr);
}

/*
 * kp_nat4 for IPv6: no header checksum; the addresses are in the L4 pseudo-header (TCP, UDP and ICMPv6
 * alike; not SCTP's CRC32c), so one checksum difference over the 16 bytes goes into the L4 checksum
 * (BPF_F_PSEUDO_HDR with CHECKSUM_PARTIAL, as kp_nat4). A later fragment has no L4 header: only the address changes.
 */
static __always_inline int kp_nat6(struct __sk_buff *skb, const struct kp_pkt6 *p, int side, union kp_in6 new_addr,
				   __be16 new_port)
{
	__u32 addr_off = side == KP_NAT_DST ? KP_IP6_DADDR_OFF : KP_IP6_SADDR_OFF;
	__u32 port_off = p->l4_off + (side == KP_NAT_DST ? offsetof(struct tcphdr, dest)
							   : offsetof(struct tcphdr, source));
	union kp_in6 old_addr = side == KP_NAT_DST ? p->daddr : p->saddr;
	__be16 old_port = side == KP_NAT_DST ? p->dport : p->sport;
	__u32 csum_off = kp_l4_csum_off6(p);
	__u64 l4_flags = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__s64 diff;

	if (p->proto == KP_IPPROTO_SCTP) {
		/* in no checksum: skb->csum follows (CHECKSUM_COMPLETE), as in kp_nat_sctp_port */
		if (!kp_in6_eq(old_addr, new_addr) &&
		    bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), BPF_F_RECOMPUTE_CSUM))
			return -1;
		return kp_nat_sctp_port(skb, p->l4_off, ETH_HLEN + p->tot_len - p->l4_off, side, old_port, new_port);
	}
	if (!kp_in6_eq(old_addr, new_addr)) {
		if (kp_frag_get() != KP_FRAG_LATER) {
			diff = bpf_csum_diff(old_addr.w, sizeof(old_addr), new_addr.w, sizeof(new_addr), 0);
			if (diff < 0)
				return -1;
			if (kp_l4_csum_diff6(skb, csum_off, diff, l4_flags | BPF_F_PSEUDO_HDR))
				return -1;
		}
		if (bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0))
			return -1;
	}
	if (kp_frag_get() == KP_FRAG_LATER)
		return 0;
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4_flags | sizeof(new_port)))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	return 0;
}

/* The MTU between nodes (kp_config.lan_mtu, set by the agent). */
static __always_inline __u32 kp_lan_mtu(const struct kp_config *cfg)
{
	return cfg && cfg->lan_mtu ? cfg->lan_mtu : KP_LAN_MTU_DEFAULT;
}

/* Largest MSS a client may send through a DSR tunnel flow: the LAN MTU minus both IP headers and TCP. */
static __always_inline __u16 kp_tunnel_mss(const struct kp_config *cfg, __u32 ip_hlen)
{
	return kp_lan_mtu(cfg) - 2 * ip_hlen - sizeof(struct tcphdr);
}

#undef KP_FAM
#define KP_FAM 4
#include "lib/fam.h"
#include "lib/nat_fam.h"
#undef KP_FAM
#define KP_FAM 6
#include "lib/fam.h"
#include "lib/nat_fam.h"
#undef KP_FAM

#endif /* KPROXY_LIB_NAT_H */
