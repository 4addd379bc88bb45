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

/* An ICMP error that could not be made: the packet (of family fam, 4 or 6) is dropped, counted. */
static __always_inline int kp_icmp_failed(int fam, __u32 len)
{
	kp_count_fam(fam, KP_DROP_REJECT_FAILED, len);
	return TC_ACT_SHOT;
}

/*
 * The last step of an ICMP error made of the packet itself: cut the packet to its first quote_len bytes
 * after Ethernet, put the new IP and ICMP headers h (hlen bytes) in front of them, swap the MACs of
 * eth (the frame's as it came), count it as stat of family fam (len: the packet's length as it came) and send it
 * back out of the interface it came in on.
 */
static __always_inline int kp_icmp_send_back(struct __sk_buff *skb, const struct ethhdr *eth, const void *h,
					     __u32 hlen, __u32 quote_len, int fam, __u32 stat, __u32 len)
{
	if (bpf_skb_change_tail(skb, ETH_HLEN + quote_len, 0) ||
	    bpf_skb_adjust_room(skb, hlen, BPF_ADJ_ROOM_MAC, 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, h, hlen, 0) ||
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), eth->h_source, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), eth->h_dest, ETH_ALEN, 0))
		return kp_icmp_failed(fam, len);
	kp_count_fam(fam, stat, len);
	return bpf_redirect(skb->ifindex, 0);
}

/* How much of the L4 header an ICMP error quotes: UDP's 8 bytes, TCP's and SCTP's headers up to and with
 * their checksum field (see kp_icmp_send_error; SCTP: ports and verification tag, which the sender's
 * stack matches, RFC 9260 appendix C). */
static __always_inline __u32 kp_icmp_quote_l4(__u8 proto)
{
	return proto == IPPROTO_TCP ? 20 : proto == KP_IPPROTO_SCTP ? KP_SCTP_HLEN : 8;
}

/*
 * Turn the packet in place into ICMP port unreachable from the service address back to the sender
 * and send it out of the interface it came in on. The quote is the original IP header plus 8 bytes
 * of UDP, 12 of SCTP or 20 bytes of TCP: a TCP (or SCTP) packet from a local pod is CHECKSUM_PARTIAL, and
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
		kp_count4(KP_DROP_FRAGMENT, p->len);
		return TC_ACT_SHOT;
	}
	quote_len = p->ip_hlen;
	/* clang-19 knows ip_hlen <= 60 and drops any mask or range check, so the verifier (6.18) sees
	 * an unbounded length. Hide the value from clang, then bound it where the verifier sees it. */
	kp_barrier_var(quote_len);
	quote_len &= 0x3c;
	quote_len += kp_icmp_quote_l4(p->proto);
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

	return kp_icmp_send_back(skb, &eth, &h, sizeof(h), quote_len, 4,
				 code == KP_ICMP_FRAG_NEEDED ? KP_STAT_FRAG_NEEDED : KP_STAT_REJECT, p->len);
fail:
	return kp_icmp_failed(4, p->len);
}

static __always_inline int kp_icmp_reject4(struct __sk_buff *skb, const struct kp_pkt *p)
{
	return kp_icmp_send_error(skb, p, KP_ICMP_PORT_UNREACH, 0);
}

/* "Fragmentation needed, next-hop MTU mtu" for a DF packet that is too big once a DSR header is added. */
static __always_inline int kp_icmp_frag_needed4(struct __sk_buff *skb, const struct kp_pkt *p, __u16 mtu)
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
	if (inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP && inner.protocol != KP_IPPROTO_SCTP)
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
	if (inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP && inner.protocol != KP_IPPROTO_SCTP)
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
	cur = kp_ct_lookup4(&rk, bpf_ktime_get_ns());
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
	kp_count4(KP_STAT_ICMP_REVNAT, p->len);
	return TC_ACT_OK;
fail:
	kp_count4(KP_DROP_NAT_FAILED, p->len);
	return TC_ACT_SHOT;
}

/* ---- ICMPv6 ---- */

#define KP_ICMP6_HOP_LIMIT   64
/* Quoted original: the IPv6 header, 64 bytes of extension headers, a full 20-byte TCP header. */
#define KP_ICMP6_QUOTE_MAX   (40 + 64 + 20)

struct kp_icmp6_hdrs {
	struct ipv6hdr ip;
	struct kp_icmphdr icmp;   /* type, code, checksum, then 32 bits: unused, or the MTU of packet too big */
};

/* The pseudo-header ICMPv6's checksum covers (RFC 8200 8.1). */
struct kp_ip6_pseudo {
	union kp_in6 saddr;
	union kp_in6 daddr;
	__be32 len;
	__u8   zero[3];
	__u8   nexthdr;
};

/*
 * kp_icmp_send_error for IPv6: the packet turned in place into an ICMPv6 error from its destination
 * (the service address) back to its sender, out of the interface it came in on. The quote is the IPv6
 * header and extension headers plus 8 bytes of UDP or the 20-byte TCP header (see kp_icmp_send_error
 * on CHECKSUM_PARTIAL), at most KP_ICMP6_QUOTE_MAX bytes; the checksum covers the pseudo-header.
 */
static __always_inline int kp_icmp6_send_error(struct __sk_buff *skb, const struct kp_pkt6 *p, __u8 type,
					       __u8 code, __u32 mtu)
{
	struct kp_icmp6_hdrs h = {};
	struct kp_ip6_pseudo ph = {};
	struct kp_scratch *s;
	struct ethhdr eth;
	__u32 *quote, zero = 0, quote_len;
	__s64 sum;

	_Static_assert(sizeof(s->quote6) == KP_ICMP6_QUOTE_MAX, "kp_scratch.quote6 holds the quote");
	s = bpf_map_lookup_elem(&kp_scratch, &zero);
	if (!s)
		goto fail;
	quote = s->quote6;
	__builtin_memset(quote, 0, sizeof(s->quote6));
	if (kp_frag_get() == KP_FRAG_LATER) {
		kp_count6(KP_DROP_FRAGMENT, p->len);
		return TC_ACT_SHOT;
	}
	quote_len = p->ip_hlen + kp_icmp_quote_l4(p->proto);
	kp_barrier_var(quote_len);
	if (quote_len > sizeof(s->quote6))
		quote_len = sizeof(s->quote6);
	if (quote_len < KP_IP6_HLEN)
		goto fail;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		goto fail;
	if (bpf_skb_load_bytes(skb, KP_IP6_OFF, quote, quote_len))
		goto fail;

	h.ip.version = 6;
	h.ip.payload_len = bpf_htons(sizeof(h.icmp) + quote_len);
	h.ip.nexthdr = IPPROTO_ICMPV6;
	h.ip.hop_limit = KP_ICMP6_HOP_LIMIT;
	__builtin_memcpy(&h.ip.saddr, &p->daddr, sizeof(p->daddr));
	__builtin_memcpy(&h.ip.daddr, &p->saddr, sizeof(p->saddr));
	h.icmp.type = type;
	h.icmp.code = code;
	h.icmp.rest = bpf_htonl(mtu);
	ph.saddr = p->daddr;
	ph.daddr = p->saddr;
	ph.len = bpf_htonl(sizeof(h.icmp) + quote_len);
	ph.nexthdr = IPPROTO_ICMPV6;
	/* the rest of quote stays zero, which adds nothing to the sum */
	sum = kp_csum_add(quote, sizeof(s->quote6), 0);
	if (sum < 0)
		goto fail;
	sum = kp_csum_add(&ph, sizeof(ph), sum);
	if (sum < 0)
		goto fail;
	h.icmp.checksum = kp_csum_fold(kp_csum_add(&h.icmp, sizeof(h.icmp), sum));

	return kp_icmp_send_back(skb, &eth, &h, sizeof(h), quote_len, 6,
				 type == KP_ICMP6_PKT_TOOBIG ? KP_STAT_FRAG_NEEDED : KP_STAT_REJECT, p->len);
fail:
	return kp_icmp_failed(6, p->len);
}

/* kube-proxy's REJECT for IPv6: ICMPv6 destination unreachable, port unreachable. */
static __always_inline int kp_icmp_reject6(struct __sk_buff *skb, const struct kp_pkt6 *p)
{
	return kp_icmp6_send_error(skb, p, KP_ICMP6_DEST_UNREACH, KP_ICMP6_PORT_UNREACH, 0);
}

/* "Packet too big, MTU mtu" for a packet too big for the route BPF forwards it on (kp_lb_xlate6). */
static __always_inline int kp_icmp_frag_needed6(struct __sk_buff *skb, const struct kp_pkt6 *p, __u16 mtu)
{
	return kp_icmp6_send_error(skb, p, KP_ICMP6_PKT_TOOBIG, 0, mtu);
}

/* Fold the change of 16 bytes at off (old -> new) into the ICMPv6 checksum at csum_off, then store them.
 * pseudo: the bytes are in the pseudo-header (the outer addresses), not in the message. */
static __always_inline int kp_icmp6_addr_set(struct __sk_buff *skb, __u32 csum_off, __u32 off, union kp_in6 old,
					     union kp_in6 new, int pseudo)
{
	__s64 diff;

	if (kp_in6_eq(old, new))
		return 0;
	diff = bpf_csum_diff(old.w, sizeof(old), new.w, sizeof(new), 0);
	if (diff < 0)
		return -1;
	if (kp_l4_csum_diff6(skb, csum_off, diff, pseudo ? BPF_F_PSEUDO_HDR : 0))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/*
 * kp_icmp_revnat for ICMPv6: an error (destination unreachable, packet too big, time exceeded,
 * parameter problem) quoting the client -> backend packet of a translated flow is made about
 * client -> frontend. The ICMPv6 checksum covers the quote and the pseudo-header: both changes go
 * into it. The quoted L4 checksum is left stale, as for IPv4.
 */
static __always_inline int kp_icmp_revnat6(struct __sk_buff *skb, const struct kp_pkt6 *p)
{
	__u32 inner_ip_off = p->l4_off + sizeof(struct kp_icmphdr);
	__u32 icmp_csum_off = p->l4_off + offsetof(struct kp_icmphdr, checksum);
	__u32 inner_l4_off;
	struct kp_ct6_val *cur;
	struct kp_ct6_key rk = {};
	struct ipv6hdr inner;
	union kp_in6 isrc, idst, front_addr;
	__be16 ports[2], front_port, frag_off = 0;
	__be32 frag_id = 0;
	__u8 frag_nh = 0;
	int proto;

	if (p->icmp_type < KP_ICMP6_DEST_UNREACH || p->icmp_type > KP_ICMP6_PARAMPROB)
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, inner_ip_off, &inner, sizeof(inner)))
		return TC_ACT_OK;
	if (inner.version != 6)
		return TC_ACT_OK;
	inner_l4_off = inner_ip_off + KP_IP6_HLEN;
	proto = kp_ip6_skip_ext(skb, inner.nexthdr, &inner_l4_off, &frag_off, &frag_id, &frag_nh);
	/* a quoted later fragment has no ports (Linux's icmpv6_notify ignores such errors too) */
	if ((proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != KP_IPPROTO_SCTP) ||
	    (frag_off & bpf_htons(KP_IP6_FRAG_OFFSET)))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, inner_l4_off, ports, sizeof(ports)))
		return TC_ACT_OK;
	__builtin_memcpy(&isrc, &inner.saddr, sizeof(isrc));
	__builtin_memcpy(&idst, &inner.daddr, sizeof(idst));

	rk.saddr = idst;
	rk.daddr = isrc;
	rk.sport = ports[1];
	rk.dport = ports[0];
	rk.proto = proto;
	rk.dir = KP_CT_DIR_REPLY;
	cur = kp_ct_lookup6(&rk, bpf_ktime_get_ns());
	if (!cur)
		return TC_ACT_OK;
	front_addr = cur->nat_addr;
	front_port = cur->nat_port;

	if (kp_icmp6_addr_set(skb, icmp_csum_off, inner_ip_off + offsetof(struct ipv6hdr, daddr), idst, front_addr,
			      0))
		goto fail;
	if (ports[1] != front_port) {
		if (bpf_l4_csum_replace(skb, icmp_csum_off, ports[1], front_port, sizeof(front_port)))
			goto fail;
		if (bpf_skb_store_bytes(skb, inner_l4_off + sizeof(__be16), &front_port, sizeof(front_port), 0))
			goto fail;
	}
	/* Sent by the backend itself (e.g. its port is closed): it must come from the frontend. */
	if (kp_in6_eq(p->saddr, idst) &&
	    kp_icmp6_addr_set(skb, icmp_csum_off, KP_IP6_SADDR_OFF, p->saddr, front_addr, 1))
		goto fail;
	kp_count6(KP_STAT_ICMP_REVNAT, p->len);
	return TC_ACT_OK;
fail:
	kp_count6(KP_DROP_NAT_FAILED, p->len);
	return TC_ACT_SHOT;
}

/*
 * kp_icmp_snat for ICMPv6: an error about a SNATed flow (quoted: node:nat_port -> backend) made about
 * client -> frontend and addressed to the client. Returns 1 when translated (*dst, *src: the outer
 * addresses it leaves with), 0 if not ours, -1 if a rewrite failed half-way.
 */
static __always_inline int kp_icmp_snat6(struct __sk_buff *skb, const struct kp_pkt6 *p, union kp_in6 *dst,
					 union kp_in6 *src)
{
	__u32 inner_ip_off = p->l4_off + sizeof(struct kp_icmphdr);
	__u32 icmp_csum_off = p->l4_off + offsetof(struct kp_icmphdr, checksum);
	__u32 inner_l4_off;
	struct kp_snat6_val *cur, sv;
	struct kp_snat6_key sk = {};
	struct ipv6hdr inner;
	union kp_in6 isrc, idst;
	__be16 ports[2], frag_off = 0;
	__be32 frag_id = 0;
	__u8 frag_nh = 0;
	int proto;

	if (p->icmp_type < KP_ICMP6_DEST_UNREACH || p->icmp_type > KP_ICMP6_PARAMPROB)
		return 0;
	if (bpf_skb_load_bytes(skb, inner_ip_off, &inner, sizeof(inner)) || inner.version != 6)
		return 0;
	inner_l4_off = inner_ip_off + KP_IP6_HLEN;
	proto = kp_ip6_skip_ext(skb, inner.nexthdr, &inner_l4_off, &frag_off, &frag_id, &frag_nh);
	/* a quoted later fragment has no ports (Linux's icmpv6_notify ignores such errors too) */
	if ((proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != KP_IPPROTO_SCTP) ||
	    (frag_off & bpf_htons(KP_IP6_FRAG_OFFSET)))
		return 0;
	if (bpf_skb_load_bytes(skb, inner_l4_off, ports, sizeof(ports)))
		return 0;
	__builtin_memcpy(&isrc, &inner.saddr, sizeof(isrc));
	__builtin_memcpy(&idst, &inner.daddr, sizeof(idst));
	sk.saddr = idst;
	sk.daddr = isrc;
	sk.sport = ports[1];
	sk.dport = ports[0];
	sk.proto = proto;
	cur = bpf_map_lookup_elem(&kp_snat6_v1, &sk);
	if (!cur || cur->expires_ns < bpf_ktime_get_ns())
		return 0;
	sv = *cur;
	/* the quote: source node:nat_port -> client, destination backend -> frontend */
	if (kp_icmp6_addr_set(skb, icmp_csum_off, inner_ip_off + offsetof(struct ipv6hdr, saddr), isrc,
			      sv.client_addr, 0) ||
	    kp_icmp6_addr_set(skb, icmp_csum_off, inner_ip_off + offsetof(struct ipv6hdr, daddr), idst,
			      sv.front_addr, 0))
		return -1;
	if (ports[0] != sv.client_port &&
	    (bpf_l4_csum_replace(skb, icmp_csum_off, ports[0], sv.client_port, sizeof(__be16)) ||
	     bpf_skb_store_bytes(skb, inner_l4_off, &sv.client_port, sizeof(__be16), 0)))
		return -1;
	if (ports[1] != sv.front_port &&
	    (bpf_l4_csum_replace(skb, icmp_csum_off, ports[1], sv.front_port, sizeof(__be16)) ||
	     bpf_skb_store_bytes(skb, inner_l4_off + sizeof(__be16), &sv.front_port, sizeof(__be16), 0)))
		return -1;
	/* Sent by the backend itself: it must come from the frontend the client talked to. */
	*src = kp_in6_eq(p->saddr, idst) ? sv.front_addr : p->saddr;
	*dst = sv.client_addr;
	if (kp_icmp6_addr_set(skb, icmp_csum_off, KP_IP6_SADDR_OFF, p->saddr, *src, 1) ||
	    kp_icmp6_addr_set(skb, icmp_csum_off, KP_IP6_DADDR_OFF, p->daddr, *dst, 1))
		return -1;
	return 1;
}

#endif /* KPROXY_LIB_ICMP_H */
