/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Direct server return. The ingress node DNATs to the backend and tells the backend's node the
 * frontend in a DSR IPv4 option (struct kp_dsr_opt, type 0x9a like Cilium's DSR_IPV4_OPT_TYPE), for
 * IPv6 in a destination options header (struct kp_dsr6_opt, option 0x1b like Cilium's), on the first
 * packet of a TCP connection (every SYN) and on every UDP datagram:
 *   opt   client -> backend [option]                         routed to the backend's pod address
 *   ipip  node -> backend node [client -> backend [option]]  outer header made here (IPv6: 6-in-6)
 * IPIP carries the same DNATed inner packet (with the option when the inner one would carry it),
 * so the backend node runs one code path for both: decapsulate, then read and strip the option.
 * The option is always the first one, right after the fixed 20-byte header, where
 * bpf_skb_adjust_room(BPF_ADJ_ROOM_NET) inserts and removes room; the backend node looks only there.
 */
#ifndef KPROXY_LIB_DSR_H
#define KPROXY_LIB_DSR_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lib/parse.h"
#include "lib/csum.h"

#define KP_IPIP_HLEN        20
#define KP_IPIP_TTL         64
/* BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (kernel >= 6.3) clears the GSO tunnel type of a GRO'd IPIP packet.
 * The 6.1 uapi headers this builds against lack it; drop the define when they have it. */
#define KP_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)

/* First 32-bit word of an IPv4 header: version/ihl, tos, tot_len. */
struct kp_ip_word0 {
	__u8   ver_ihl;
	__u8   tos;
	__be16 tot_len;
};

/* Does a packet need the option: every UDP datagram, every TCP SYN (not SYN-ACK). */
static __always_inline int kp_dsr_wants_opt(__u8 proto, __u8 tcp_flags)
{
	if (kp_frag_get())
		return 0;   /* a fragment is full-sized: no room; its flow is tracked on the backend node already */
	if (proto == IPPROTO_UDP)
		return 1;
	return (tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) == KP_TCP_SYN;
}

static __always_inline int kp_dsr_wants_opt4(const struct kp_pkt *p)
{
	return kp_dsr_wants_opt(p->proto, p->tcp_flags);
}

/* Insert the DSR option as the first IPv4 option; header length, total length and checksum follow. */
static __always_inline int kp_dsr_opt_push4(struct __sk_buff *skb, __be32 svc_addr, __be16 svc_port)
{
	struct {
		struct kp_ip_word0 w0;
		struct kp_dsr_opt opt;
	} new_hdr = {};
	struct kp_ip_word0 old;
	__s64 diff;

	if (bpf_skb_load_bytes(skb, KP_IP_OFF, &old, sizeof(old)))
		return -1;
	if ((old.ver_ihl & 0x0f) > 15 - KP_DSR_OPT_LEN / 4)
		return -1;   /* no room for 8 more option bytes */
	new_hdr.w0 = old;
	new_hdr.w0.ver_ihl = old.ver_ihl + KP_DSR_OPT_LEN / 4;
	new_hdr.w0.tot_len = old.tot_len ? bpf_htons(bpf_ntohs(old.tot_len) + KP_DSR_OPT_LEN) : 0;
	new_hdr.opt.type = KP_DSR_OPT_TYPE;
	new_hdr.opt.len = KP_DSR_OPT_LEN;
	new_hdr.opt.port = svc_port;
	new_hdr.opt.addr = svc_addr;
	/* The header checksum covers the new option bytes too. */
	diff = bpf_csum_diff((__be32 *)&old, sizeof(old), (__be32 *)&new_hdr, sizeof(new_hdr), 0);
	if (diff < 0)
		return -1;
	if (bpf_skb_adjust_room(skb, KP_DSR_OPT_LEN, BPF_ADJ_ROOM_NET, 0))
		return -1;
	if (bpf_l3_csum_replace(skb, KP_IP_CSUM_OFF, 0, diff, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, KP_IP_OFF, &new_hdr.w0, sizeof(new_hdr.w0), 0))
		return -1;
	return bpf_skb_store_bytes(skb, KP_IP_OFF + sizeof(struct iphdr), &new_hdr.opt, sizeof(new_hdr.opt), 0);
}

/* The DSR option of a received packet, if it carries one where kp_dsr_opt_push4() puts it. */
static __always_inline int kp_dsr_opt_read4(struct __sk_buff *skb, const struct kp_pkt *p, struct kp_dsr_opt *opt)
{
	if (p->ip_hlen < sizeof(struct iphdr) + KP_DSR_OPT_LEN)
		return 0;
	if (bpf_skb_load_bytes(skb, KP_IP_OFF + sizeof(struct iphdr), opt, sizeof(*opt)))
		return 0;
	return opt->type == KP_DSR_OPT_TYPE && opt->len == KP_DSR_OPT_LEN;
}

/* Remove the option kp_dsr_opt_read4() found; p follows the shorter header. */
static __always_inline int kp_dsr_opt_pop4(struct __sk_buff *skb, struct kp_pkt *p, const struct kp_dsr_opt *opt)
{
	struct {
		struct kp_ip_word0 w0;
		struct kp_dsr_opt opt;
	} old_hdr;
	struct kp_ip_word0 w0;
	__s64 diff;

	if (bpf_skb_load_bytes(skb, KP_IP_OFF, &old_hdr.w0, sizeof(old_hdr.w0)))
		return -1;
	old_hdr.opt = *opt;
	w0 = old_hdr.w0;
	w0.ver_ihl -= KP_DSR_OPT_LEN / 4;
	w0.tot_len = w0.tot_len ? bpf_htons(bpf_ntohs(w0.tot_len) - KP_DSR_OPT_LEN) : 0;
	diff = bpf_csum_diff((__be32 *)&old_hdr, sizeof(old_hdr), (__be32 *)&w0, sizeof(w0), 0);
	if (diff < 0)
		return -1;
	if (bpf_skb_adjust_room(skb, -KP_DSR_OPT_LEN, BPF_ADJ_ROOM_NET, 0))
		return -1;
	if (bpf_l3_csum_replace(skb, KP_IP_CSUM_OFF, 0, diff, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, KP_IP_OFF, &w0, sizeof(w0), 0))
		return -1;
	p->ip_hlen -= KP_DSR_OPT_LEN;
	p->l4_off -= KP_DSR_OPT_LEN;
	p->len -= KP_DSR_OPT_LEN;
	if (p->tot_len)
		p->tot_len -= KP_DSR_OPT_LEN;
	return 0;
}

/* Wrap the packet in an outer IPv4 header saddr -> daddr (protocol 4), keeping tos and DF. */
/* The outer header DSR's IPIP puts before an inner packet of inner_len bytes (also kp_xdp's, lib/xdp.h). */
static __always_inline void kp_ipip_outer(struct iphdr *outer, const struct iphdr *inner, __u16 inner_len,
					  __be32 saddr, __be32 daddr)
{
	__builtin_memset(outer, 0, sizeof(*outer));
	outer->version = 4;
	outer->ihl = 5;
	outer->tos = inner->tos;
	outer->tot_len = bpf_htons(inner_len + KP_IPIP_HLEN);
	outer->frag_off = inner->frag_off & bpf_htons(KP_IP_DF);
	outer->ttl = KP_IPIP_TTL;
	outer->protocol = IPPROTO_IPIP;
	outer->saddr = saddr;
	outer->daddr = daddr;
	outer->check = kp_csum_fold(kp_csum_add(outer, sizeof(*outer), 0));
}

static __always_inline int kp_tunnel_push4(struct __sk_buff *skb, __be32 saddr, __be32 daddr)
{
	struct iphdr inner, outer;
	__u16 inner_len;

	if (bpf_skb_load_bytes(skb, KP_IP_OFF, &inner, sizeof(inner)))
		return -1;
	inner_len = bpf_ntohs(inner.tot_len);
	if (!inner_len)
		inner_len = skb->len - ETH_HLEN;   /* BIG TCP: the skb knows */
	kp_ipip_outer(&outer, &inner, inner_len, saddr, daddr);
	if (bpf_skb_adjust_room(skb, KP_IPIP_HLEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
		return -1;
	return bpf_skb_store_bytes(skb, KP_IP_OFF, &outer, sizeof(outer), 0);
}

/* Remove the outer header of an IPIP packet (outer ihl 5, as kp_tunnel_push4() makes them). */
static __always_inline int kp_tunnel_pop4(struct __sk_buff *skb)
{
	if (!bpf_skb_adjust_room(skb, -KP_IPIP_HLEN, BPF_ADJ_ROOM_MAC, KP_ADJ_ROOM_DECAP_L3_IPV4))
		return 0;
	/* Kernels before 6.3 reject the decap flag; a plain shrink works there for non-GSO packets. */
	return bpf_skb_adjust_room(skb, -KP_IPIP_HLEN, BPF_ADJ_ROOM_MAC, 0) ? -1 : 0;
}


/* ---- IPv6: the option in a destination options header (struct kp_dsr6_opt), IPv6-in-IPv6 ---- */
#define KP_IP6IP6_HLEN 40
#define KP_IP6_NEXTHDR_OFF (KP_IP6_OFF + offsetof(struct ipv6hdr, nexthdr))
#define KP_IP6_PLEN_OFF    (KP_IP6_OFF + offsetof(struct ipv6hdr, payload_len))
/* BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (kernel >= 6.3), as KP_ADJ_ROOM_DECAP_L3_IPV4. */
#define KP_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)

/* The fixed header's payload length, next header and hop limit (bytes 4..7), rewritten as one word. */
struct kp_ip6_plen_nh {
	__be16 payload_len;
	__u8   nexthdr;
	__u8   hop_limit;
};

static __always_inline int kp_dsr_wants_opt6(const struct kp_pkt6 *p)
{
	return kp_dsr_wants_opt(p->proto, p->tcp_flags);
}

/*
 * Insert the DSR destination options header right after the fixed header: its next header is the
 * fixed header's old one, which becomes IPPROTO_DSTOPTS; the payload length grows by 24. No checksum
 * changes: the L4 pseudo-header holds the upper-layer length, not the payload length. A hop-by-hop
 * header must stay first: such a packet gets no option (-1).
 */
static __always_inline int kp_dsr_opt_push6(struct __sk_buff *skb, union kp_in6 svc_addr, __be16 svc_port)
{
	struct kp_dsr6_opt opt = {};
	struct kp_ip6_plen_nh old, new;

	if (bpf_skb_load_bytes(skb, KP_IP6_PLEN_OFF, &old, sizeof(old)))
		return -1;
	if (old.nexthdr == IPPROTO_HOPOPTS)
		return -1;
	opt.nexthdr = old.nexthdr;
	opt.hdrlen = KP_DSR6_HDR_LEN / 8 - 1;
	opt.type = KP_DSR6_OPT_TYPE;
	opt.len = KP_DSR6_OPT_LEN;
	opt.addr = svc_addr;
	opt.port = svc_port;
	new = old;
	new.payload_len = old.payload_len ? bpf_htons(bpf_ntohs(old.payload_len) + KP_DSR6_HDR_LEN) : 0;
	new.nexthdr = IPPROTO_DSTOPTS;
	if (bpf_skb_adjust_room(skb, KP_DSR6_HDR_LEN, BPF_ADJ_ROOM_NET, 0))
		return -1;
	/* IPv6 has no header checksum to carry the change: a CHECKSUM_COMPLETE sum is updated instead */
	if (bpf_skb_store_bytes(skb, KP_IP6_PLEN_OFF, &new, sizeof(new), BPF_F_RECOMPUTE_CSUM))
		return -1;
	return bpf_skb_store_bytes(skb, KP_IP6_OFF + KP_IP6_HLEN, &opt, sizeof(opt), BPF_F_RECOMPUTE_CSUM);
}

/* The DSR option of a received packet, if it carries one where kp_dsr_opt_push6() puts it. */
static __always_inline int kp_dsr_opt_read6(struct __sk_buff *skb, const struct kp_pkt6 *p,
					    struct kp_dsr6_opt *opt)
{
	__u8 nexthdr;

	if (p->ip_hlen < KP_IP6_HLEN + KP_DSR6_HDR_LEN)
		return 0;
	if (bpf_skb_load_bytes(skb, KP_IP6_NEXTHDR_OFF, &nexthdr, 1) || nexthdr != IPPROTO_DSTOPTS)
		return 0;
	if (bpf_skb_load_bytes(skb, KP_IP6_OFF + KP_IP6_HLEN, opt, sizeof(*opt)))
		return 0;
	return opt->hdrlen == KP_DSR6_HDR_LEN / 8 - 1 && opt->type == KP_DSR6_OPT_TYPE &&
	       opt->len == KP_DSR6_OPT_LEN;
}

/* Remove the header kp_dsr_opt_read6() found; p follows the shorter packet. */
static __always_inline int kp_dsr_opt_pop6(struct __sk_buff *skb, struct kp_pkt6 *p, const struct kp_dsr6_opt *opt)
{
	struct kp_ip6_plen_nh h;

	if (bpf_skb_load_bytes(skb, KP_IP6_PLEN_OFF, &h, sizeof(h)))
		return -1;
	h.payload_len = h.payload_len ? bpf_htons(bpf_ntohs(h.payload_len) - KP_DSR6_HDR_LEN) : 0;
	h.nexthdr = opt->nexthdr;
	if (bpf_skb_adjust_room(skb, -KP_DSR6_HDR_LEN, BPF_ADJ_ROOM_NET, 0))
		return -1;
	/* a CHECKSUM_COMPLETE sum follows the rewritten word (the kernel checks it on local delivery) */
	if (bpf_skb_store_bytes(skb, KP_IP6_PLEN_OFF, &h, sizeof(h), BPF_F_RECOMPUTE_CSUM))
		return -1;
	p->ip_hlen -= KP_DSR6_HDR_LEN;
	p->l4_off -= KP_DSR6_HDR_LEN;
	p->len -= KP_DSR6_HDR_LEN;
	if (p->tot_len)
		p->tot_len -= KP_DSR6_HDR_LEN;
	return 0;
}

/* Wrap the packet in an outer IPv6 header saddr -> daddr (next header 41), keeping the traffic class
 * and flow label (the client's flow keeps its ECMP path between the nodes). */
static __always_inline int kp_tunnel_push6(struct __sk_buff *skb, union kp_in6 saddr, union kp_in6 daddr)
{
	struct ipv6hdr outer;
	__u32 inner_len;

	if (bpf_skb_load_bytes(skb, KP_IP6_OFF, &outer, sizeof(outer)))
		return -1;
	inner_len = outer.payload_len ? KP_IP6_HLEN + bpf_ntohs(outer.payload_len) : skb->len - ETH_HLEN;
	if (inner_len > 0xffff)
		return -1;   /* a BIG TCP (GRO beyond 64K) inner packet: no plain outer header holds its length */
	outer.payload_len = bpf_htons(inner_len);
	outer.nexthdr = IPPROTO_IPV6;
	outer.hop_limit = KP_IPIP_TTL;
	__builtin_memcpy(&outer.saddr, &saddr, sizeof(saddr));
	__builtin_memcpy(&outer.daddr, &daddr, sizeof(daddr));
	if (bpf_skb_adjust_room(skb, KP_IP6IP6_HLEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6))
		return -1;
	/* unlike IPIP's, this header has no checksum that cancels its sum: skb->csum follows it */
	return bpf_skb_store_bytes(skb, KP_IP6_OFF, &outer, sizeof(outer), BPF_F_RECOMPUTE_CSUM);
}

/* Remove the outer header of an IPv6-in-IPv6 packet (no extension headers, as kp_tunnel_push6() makes). */
static __always_inline int kp_tunnel_pop6(struct __sk_buff *skb)
{
	if (!bpf_skb_adjust_room(skb, -KP_IP6IP6_HLEN, BPF_ADJ_ROOM_MAC, KP_ADJ_ROOM_DECAP_L3_IPV6))
		return 0;
	return bpf_skb_adjust_room(skb, -KP_IP6IP6_HLEN, BPF_ADJ_ROOM_MAC, 0) ? -1 : 0;
}

#endif /* KPROXY_LIB_DSR_H */
