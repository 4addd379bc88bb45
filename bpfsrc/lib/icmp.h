/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * ICMP: the port-unreachable answer for services without backends (kube-proxy's REJECT), and
 * reverse translation of ICMP errors about translated flows.
 */
#ifndef KPROXY_LIB_ICMP_H
#define KPROXY_LIB_ICMP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/ct.h"
#include "lib/stats.h"

#define KP_ICMP_TTL          64
/* Quoted original: IPv4 header (<= 60 bytes) + up to a full 20-byte TCP header. */
#define KP_ICMP_QUOTE_MAX    (60 + 20)

struct kp_icmp_hdrs {
	struct iphdr ip;
	struct kp_icmphdr icmp;
};

/*
 * Turn the packet in place into ICMP port unreachable from the service address back to the sender
 * and send it out of the interface it came in on. The quote is the original IP header plus 8 bytes
 * of UDP or 20 bytes of TCP: a TCP packet from a local pod is CHECKSUM_PARTIAL, and
 * bpf_skb_change_tail() refuses to cut into the checksum field that csum_start/csum_offset point
 * at (TCP check is at +16). The receiver accepts the CHECKSUM_PARTIAL skb as already verified;
 * our ICMP checksum is complete anyway.
 */
static __always_inline int kp_icmp_send_error(struct __sk_buff *skb, const struct kp_pkt *p, __u8 code,
					      __u16 mtu)
{
	__u32 quote[KP_ICMP_QUOTE_MAX / 4] = {};
	struct kp_icmp_hdrs h = {};
	struct ethhdr eth;
	__u32 quote_len;
	__s64 sum;

	if (kp_frag_get() == KP_FRAG_LATER) {
		/* nothing to quote that the sender could match: its first fragment was answered */
		kp_count(KP_DROP_FRAGMENT, p->len);
		return TC_ACT_SHOT;
	}
	quote_len = p->ip_hlen;
	/* clang-19 knows ip_hlen <= 60 and drops any mask or range check, so the verifier (6.18) sees
	 * an unbounded length. Hide the value from clang, then bound it where the verifier sees it. */
	kp_barrier_var(quote_len);
	quote_len &= 0x3c;
	quote_len += p->proto == IPPROTO_TCP ? 20 : 8;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		goto fail;
	if (bpf_skb_load_bytes(skb, KP_IP_OFF, quote, quote_len))
		goto fail;
	/* The rest of quote stays zero, which adds nothing to the sum: one constant-size csum_diff. */
	sum = kp_csum_add(quote, sizeof(quote), 0);
	if (sum < 0)
		goto fail;

	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tot_len = bpf_htons(sizeof(h) + quote_len);
	h.ip.ttl = KP_ICMP_TTL;
	h.ip.protocol = IPPROTO_ICMP;
	h.ip.saddr = p->daddr;
	h.ip.daddr = p->saddr;
	h.ip.check = kp_csum_fold(kp_csum_add(&h.ip, sizeof(h.ip), 0));
	h.icmp.type = KP_ICMP_DEST_UNREACH;
	h.icmp.code = code;
	/* Fragmentation needed: 16 unused bits, then the next-hop MTU (RFC 1191). */
	h.icmp.rest = bpf_htonl((__u32)mtu);
	h.icmp.checksum = kp_csum_fold(kp_csum_add(&h.icmp, sizeof(h.icmp), sum));

	if (bpf_skb_change_tail(skb, ETH_HLEN + quote_len, 0))
		goto fail;
	if (bpf_skb_adjust_room(skb, sizeof(h), BPF_ADJ_ROOM_MAC, 0))
		goto fail;
	if (bpf_skb_store_bytes(skb, KP_IP_OFF, &h, sizeof(h), 0))
		goto fail;
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), eth.h_source, ETH_ALEN, 0))
		goto fail;
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), eth.h_dest, ETH_ALEN, 0))
		goto fail;
	kp_count(code == KP_ICMP_FRAG_NEEDED ? KP_STAT_FRAG_NEEDED : KP_STAT_REJECT, p->len);
	return bpf_redirect(skb->ifindex, 0);
fail:
	kp_count(KP_DROP_REJECT_FAILED, p->len);
	return TC_ACT_SHOT;
}

static __always_inline int kp_icmp_reject(struct __sk_buff *skb, const struct kp_pkt *p)
{
	return kp_icmp_send_error(skb, p, KP_ICMP_PORT_UNREACH, 0);
}

/* "Fragmentation needed, next-hop MTU mtu" for a DF packet that is too big once a DSR header is added. */
static __always_inline int kp_icmp_frag_needed(struct __sk_buff *skb, const struct kp_pkt *p, __u16 mtu)
{
	return kp_icmp_send_error(skb, p, KP_ICMP_FRAG_NEEDED, mtu);
}

/*
 * Rewrite one address (and port) of the packet quoted in an ICMP error: the quoted IPv4 header's
 * checksum follows, and the ICMP checksum (no pseudo-header, covers every quoted byte) follows
 * both. src selects the quoted source (1) or destination (0).
 */
static __always_inline int kp_icmp_quote_nat(struct __sk_buff *skb, __u32 icmp_csum_off, __u32 inner_ip_off,
					     __u32 inner_l4_off, int src, __be32 old_addr, __be32 new_addr,
					     __be16 old_port, __be16 new_port)
{
	__u32 check_off = inner_ip_off + offsetof(struct iphdr, check);
	__u32 addr_off = inner_ip_off + (src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	__u32 port_off = inner_l4_off + (src ? 0 : sizeof(__be16));
	__sum16 old_check, new_check;

	if (old_addr != new_addr) {
		if (bpf_skb_load_bytes(skb, check_off, &old_check, sizeof(old_check)))
			return -1;
		if (bpf_l3_csum_replace(skb, check_off, old_addr, new_addr, sizeof(new_addr)))
			return -1;
		if (bpf_skb_load_bytes(skb, check_off, &new_check, sizeof(new_check)))
			return -1;
		if (bpf_l4_csum_replace(skb, icmp_csum_off, old_check, new_check, sizeof(new_check)))
			return -1;
		if (bpf_l4_csum_replace(skb, icmp_csum_off, old_addr, new_addr, sizeof(new_addr)))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0))
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, icmp_csum_off, old_port, new_port, sizeof(new_port)))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	return 0;
}

/* Rewrite an address of the outer IPv4 header of an ICMP message (no pseudo-header in ICMPv4). */
static __always_inline int kp_ip_addr_set(struct __sk_buff *skb, __u32 off, __be32 old_addr, __be32 new_addr)
{
	if (old_addr == new_addr)
		return 0;
	if (bpf_l3_csum_replace(skb, KP_IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new_addr, sizeof(new_addr), 0);
}

/*
 * Ingress node, from a netdev: an ICMP error about a SNATed flow (quoted: node:nat_port -> backend,
 * sent by a router on the way or by the backend itself) is made about client -> frontend and
 * addressed to the client. Returns 1 when translated (*dst, *src: the outer addresses it leaves
 * with), 0 if not ours, -1 if a rewrite failed half-way.
 */
static __always_inline int kp_icmp_snat(struct __sk_buff *skb, const struct kp_pkt *p, __be32 *dst,
					__be32 *src)
{
	__u32 inner_ip_off = p->l4_off + sizeof(struct kp_icmphdr);
	__u32 icmp_csum_off = p->l4_off + offsetof(struct kp_icmphdr, checksum);
	__u32 inner_l4_off;
	struct kp_snat4_val *cur, sv;
	struct kp_snat4_key sk = {};
	struct iphdr inner;
	__be16 ports[2];

	if (p->icmp_type != KP_ICMP_DEST_UNREACH && p->icmp_type != KP_ICMP_TIME_EXCEEDED)
		return 0;
	if (bpf_skb_load_bytes(skb, inner_ip_off, &inner, sizeof(inner)))
		return 0;
	if (inner.version != 4 || inner.ihl < 5)
		return 0;
	if (inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP)
		return 0;
	inner_l4_off = inner_ip_off + inner.ihl * 4;
	if (bpf_skb_load_bytes(skb, inner_l4_off, ports, sizeof(ports)))
		return 0;
	sk.saddr = inner.daddr;
	sk.daddr = inner.saddr;
	sk.sport = ports[1];
	sk.dport = ports[0];
	sk.proto = inner.protocol;
	cur = bpf_map_lookup_elem(&kp_snat4_v1, &sk);
	if (!cur || cur->expires_ns < bpf_ktime_get_ns())
		return 0;
	sv = *cur;
	if (kp_icmp_quote_nat(skb, icmp_csum_off, inner_ip_off, inner_l4_off, 1, inner.saddr, sv.client_addr,
			      ports[0], sv.client_port))
		return -1;
	if (kp_icmp_quote_nat(skb, icmp_csum_off, inner_ip_off, inner_l4_off, 0, inner.daddr, sv.front_addr,
			      ports[1], sv.front_port))
		return -1;
	/* Sent by the backend itself: it must come from the frontend the client talked to. */
	*src = p->saddr == inner.daddr ? sv.front_addr : p->saddr;
	*dst = sv.client_addr;
	if (kp_ip_addr_set(skb, KP_IP_SADDR_OFF, p->saddr, *src))
		return -1;
	if (kp_ip_addr_set(skb, KP_IP_DADDR_OFF, p->daddr, *dst))
		return -1;
	return 1;
}

/*
 * An ICMP error (dest unreachable incl. frag needed, time exceeded) whose quoted packet is the
 * client -> backend packet of a translated flow: make it about client -> frontend, so the client's
 * socket finds it. The quoted L4 checksum is left stale: it covers data the quote does not carry,
 * and no receiver verifies it (Linux's icmp_err handlers read only ports/sequence).
 */
static __always_inline int kp_icmp_revnat(struct __sk_buff *skb, const struct kp_pkt *p)
{
	__u32 inner_ip_off = p->l4_off + sizeof(struct kp_icmphdr);
	__u32 icmp_csum_off = p->l4_off + offsetof(struct kp_icmphdr, checksum);
	__u32 inner_l4_off;
	struct kp_ct4_val *cur;
	struct kp_ct4_key rk = {};
	struct iphdr inner;
	__be16 ports[2];
	__be32 front_addr;
	__be16 front_port;
	__sum16 new_check;

	if (p->icmp_type != KP_ICMP_DEST_UNREACH && p->icmp_type != KP_ICMP_TIME_EXCEEDED)
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, inner_ip_off, &inner, sizeof(inner)))
		return TC_ACT_OK;
	if (inner.version != 4 || inner.ihl < 5)
		return TC_ACT_OK;
	if (inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	inner_l4_off = inner_ip_off + inner.ihl * 4;
	if (bpf_skb_load_bytes(skb, inner_l4_off, ports, sizeof(ports)))
		return TC_ACT_OK;

	rk.saddr = inner.daddr;
	rk.daddr = inner.saddr;
	rk.sport = ports[1];
	rk.dport = ports[0];
	rk.proto = inner.protocol;
	rk.dir = KP_CT_DIR_REPLY;
	cur = kp_ct_lookup(&rk, bpf_ktime_get_ns());
	if (!cur)
		return TC_ACT_OK;
	front_addr = cur->nat_addr;
	front_port = cur->nat_port;

	/* Quoted IP header: address and its checksum. The ICMP checksum covers every quoted byte
	 * (no pseudo-header in ICMPv4), so each changed 16-bit-aligned word is folded into it too. */
	if (bpf_l3_csum_replace(skb, inner_ip_off + offsetof(struct iphdr, check), inner.daddr, front_addr,
				sizeof(front_addr)))
		goto fail;
	if (bpf_skb_load_bytes(skb, inner_ip_off + offsetof(struct iphdr, check), &new_check, sizeof(new_check)))
		goto fail;
	if (bpf_l4_csum_replace(skb, icmp_csum_off, inner.check, new_check, sizeof(new_check)))
		goto fail;
	if (bpf_l4_csum_replace(skb, icmp_csum_off, inner.daddr, front_addr, sizeof(front_addr)))
		goto fail;
	if (bpf_skb_store_bytes(skb, inner_ip_off + offsetof(struct iphdr, daddr), &front_addr,
				sizeof(front_addr), 0))
		goto fail;
	if (ports[1] != front_port) {
		if (bpf_l4_csum_replace(skb, icmp_csum_off, ports[1], front_port, sizeof(front_port)))
			goto fail;
		if (bpf_skb_store_bytes(skb, inner_l4_off + sizeof(__be16), &front_port, sizeof(front_port), 0))
			goto fail;
	}
	/* Sent by the backend itself (e.g. its port is closed): it must come from the frontend. */
	if (p->saddr == inner.daddr) {
		if (bpf_l3_csum_replace(skb, KP_IP_CSUM_OFF, p->saddr, front_addr, sizeof(front_addr)))
			goto fail;
		if (bpf_skb_store_bytes(skb, KP_IP_SADDR_OFF, &front_addr, sizeof(front_addr), 0))
			goto fail;
	}
	kp_count(KP_STAT_ICMP_REVNAT, p->len);
	return TC_ACT_OK;
fail:
	kp_count(KP_DROP_NAT_FAILED, p->len);
	return TC_ACT_SHOT;
}

#endif /* KPROXY_LIB_ICMP_H */
