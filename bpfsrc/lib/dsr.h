/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Direct server return. The ingress node DNATs to the backend and tells the backend's node the
 * frontend in a DSR IPv4 option (struct kp_dsr_opt, type 0x9a like Cilium's DSR_IPV4_OPT_TYPE) on
 * the first packet of a TCP connection (every SYN) and on every UDP datagram:
 *   opt   client -> backend [option]                         routed to the backend's pod address
 *   ipip  node -> backend node [client -> backend [option]]  outer header made here
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

/* Does this packet need the option: every UDP datagram, every TCP SYN (not SYN-ACK). */
static __always_inline int kp_dsr_wants_opt(const struct kp_pkt *p)
{
	if (kp_frag_get())
		return 0;   /* a fragment is full-sized: no room; its flow is tracked on the backend node already */
	if (p->proto == IPPROTO_UDP)
		return 1;
	return (p->tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) == KP_TCP_SYN;
}

/* Insert the DSR option as the first IPv4 option; header length, total length and checksum follow. */
static __always_inline int kp_dsr_opt_push(struct __sk_buff *skb, __be32 svc_addr, __be16 svc_port)
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

/* The DSR option of a received packet, if it carries one where kp_dsr_opt_push() puts it. */
static __always_inline int kp_dsr_opt_read(struct __sk_buff *skb, const struct kp_pkt *p, struct kp_dsr_opt *opt)
{
	if (p->ip_hlen < sizeof(struct iphdr) + KP_DSR_OPT_LEN)
		return 0;
	if (bpf_skb_load_bytes(skb, KP_IP_OFF + sizeof(struct iphdr), opt, sizeof(*opt)))
		return 0;
	return opt->type == KP_DSR_OPT_TYPE && opt->len == KP_DSR_OPT_LEN;
}

/* Remove the option kp_dsr_opt_read() found; p follows the shorter header. */
static __always_inline int kp_dsr_opt_pop(struct __sk_buff *skb, struct kp_pkt *p, const struct kp_dsr_opt *opt)
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
static __always_inline int kp_ipip_push(struct __sk_buff *skb, __be32 saddr, __be32 daddr)
{
	struct iphdr inner, outer = {};
	__u16 inner_len;

	if (bpf_skb_load_bytes(skb, KP_IP_OFF, &inner, sizeof(inner)))
		return -1;
	inner_len = bpf_ntohs(inner.tot_len);
	if (!inner_len)
		inner_len = skb->len - ETH_HLEN;   /* BIG TCP: the skb knows */
	outer.version = 4;
	outer.ihl = 5;
	outer.tos = inner.tos;
	outer.tot_len = bpf_htons(inner_len + KP_IPIP_HLEN);
	outer.frag_off = inner.frag_off & bpf_htons(KP_IP_DF);
	outer.ttl = KP_IPIP_TTL;
	outer.protocol = IPPROTO_IPIP;
	outer.saddr = saddr;
	outer.daddr = daddr;
	outer.check = kp_csum_fold(kp_csum_add(&outer, sizeof(outer), 0));
	if (bpf_skb_adjust_room(skb, KP_IPIP_HLEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
		return -1;
	return bpf_skb_store_bytes(skb, KP_IP_OFF, &outer, sizeof(outer), 0);
}

/* Remove the outer header of an IPIP packet (outer ihl 5, as kp_ipip_push() makes them). */
static __always_inline int kp_ipip_pop(struct __sk_buff *skb)
{
	if (!bpf_skb_adjust_room(skb, -KP_IPIP_HLEN, BPF_ADJ_ROOM_MAC, KP_ADJ_ROOM_DECAP_L3_IPV4))
		return 0;
	/* Kernels before 6.3 reject the decap flag; a plain shrink works there for non-GSO packets. */
	return bpf_skb_adjust_room(skb, -KP_IPIP_HLEN, BPF_ADJ_ROOM_MAC, 0) ? -1 : 0;
}

#endif /* KPROXY_LIB_DSR_H */
