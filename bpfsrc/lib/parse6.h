/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Ethernet + IPv6 parsing: the fixed header, then the extension headers a router or host may meet
 * before the upper layer (hop-by-hop options, routing, destination options, fragment), then
 * TCP/UDP/SCTP/ICMPv6. As lib/parse.h, it only reads and reports offsets and values in struct kp_pkt6.
 * Everything past the fixed header is read with bpf_skb_load_bytes (its offsets vary).
 */
#ifndef KPROXY_LIB_PARSE6_H
#define KPROXY_LIB_PARSE6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

#define KP_IP6_OFF        ETH_HLEN
#define KP_IP6_SADDR_OFF  (KP_IP6_OFF + offsetof(struct ipv6hdr, saddr))
#define KP_IP6_DADDR_OFF  (KP_IP6_OFF + offsetof(struct ipv6hdr, daddr))
#define KP_IP6_HLIM_OFF   (KP_IP6_OFF + offsetof(struct ipv6hdr, hop_limit))
#define KP_IP6_HLEN       40
#define KP_IP6_MIN_MTU    1280 /* every IPv6 link carries this much (RFC 8200) */
/* Extension headers walked before giving up (the packet is then passed untouched). */
#define KP_IP6_EXT_MAX    6
/* Fragment header: offset in the upper 13 bits of frag_off, the M flag in bit 0. */
#define KP_IP6_FRAG_OFFSET 0xfff8
#define KP_IP6_FRAG_MF     0x0001

/* ICMPv6 (RFC 4443, 4861): restated, as lib/parse.h restates ICMP. */
#define KP_ICMP6_DEST_UNREACH   1
#define KP_ICMP6_PORT_UNREACH   4   /* code of KP_ICMP6_DEST_UNREACH */
#define KP_ICMP6_PKT_TOOBIG     2
#define KP_ICMP6_TIME_EXCEED    3
#define KP_ICMP6_PARAMPROB      4
#define KP_ICMP6_ECHO_REQUEST   128
#define KP_ICMP6_ECHO_REPLY     129
#define KP_ICMP6_NDISC_FIRST    133 /* router solicitation .. redirect (137): never touched */
#define KP_ICMP6_NDISC_LAST     137

static __always_inline int kp_in6_eq(union kp_in6 a, union kp_in6 b)
{
	return ((a.w[0] ^ b.w[0]) | (a.w[1] ^ b.w[1]) | (a.w[2] ^ b.w[2]) | (a.w[3] ^ b.w[3])) == 0;
}

static __always_inline int kp_in6_is_zero(union kp_in6 a)
{
	return (a.w[0] | a.w[1] | a.w[2] | a.w[3]) == 0;
}

/* The four words xor-ed: an IPv6 address as one word, for hashing. */
static __always_inline __u32 kp_in6_fold(union kp_in6 a)
{
	return a.w[0] ^ a.w[1] ^ a.w[2] ^ a.w[3];
}

struct kp_ip6_frag {
	__u8   nexthdr;
	__u8   reserved;
	__be16 frag_off;
	__be32 id;
};

static __always_inline void kp_frag6_key(struct kp_frag6_key *k, const struct kp_pkt6 *p, __be32 id, __u8 nexthdr)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->id = id;
	k->nexthdr = nexthdr;
	k->pad[0] = 0;
	k->pad[1] = 0;
	k->pad[2] = 0;
}

/*
 * Walk the extension headers from the fixed header's next header; *off: where the next header starts
 * (in), where the upper layer starts (out). Returns the upper-layer protocol, or -1 for a header chain
 * we do not follow (ESP, No Next Header, too many headers, truncated). *frag_off, *frag_id and
 * *frag_nh: the fragment header's fields, if there is one. A later fragment (offset > 0) has no
 * headers after its fragment header, only data: the walk ends there and returns the fragment header's
 * next header.
 */
static __always_inline int kp_ip6_skip_ext(struct __sk_buff *skb, __u8 nexthdr, __u32 *off, __be16 *frag_off,
					   __be32 *frag_id, __u8 *frag_nh)
{
	__u8 hdr[2];
	int i;

#pragma unroll
	for (i = 0; i <= KP_IP6_EXT_MAX; i++) {
		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if (i == KP_IP6_EXT_MAX || bpf_skb_load_bytes(skb, *off, hdr, sizeof(hdr)))
				return -1;
			nexthdr = hdr[0];
			*off += ((__u32)hdr[1] + 1) * 8;
			break;
		case IPPROTO_FRAGMENT: {
			struct kp_ip6_frag fh;

			if (i == KP_IP6_EXT_MAX || bpf_skb_load_bytes(skb, *off, &fh, sizeof(fh)))
				return -1;
			nexthdr = fh.nexthdr;
			*frag_off = fh.frag_off;
			*frag_id = fh.id;
			*frag_nh = fh.nexthdr;
			*off += sizeof(fh);
			if (fh.frag_off & bpf_htons(KP_IP6_FRAG_OFFSET))
				return nexthdr;
			break;
		}
		default:
			return nexthdr;
		}
	}
	return -1;
}

static __always_inline int kp_parse6(struct __sk_buff *skb, struct kp_pkt6 *p)
{
	struct ipv6hdr *ip;
	__be16 frag_off = 0;
	__be32 frag_id = 0;
	__u8 frag_nh = 0;
	__u32 off, payload, frag = KP_FRAG_NONE;
	int proto;

	ip = kp_l3_header(skb, bpf_htons(ETH_P_IPV6), sizeof(*ip));
	if (!ip || ip->version != 6)
		return KP_PARSE_PASS;
	payload = bpf_ntohs(ip->payload_len);
	/* payload_len 0: a jumbogram (hop-by-hop option) or a BIG TCP GSO packet; only the skb knows */
	if (payload && skb->len < ETH_HLEN + KP_IP6_HLEN + payload)
		return KP_PARSE_PASS;
	__builtin_memcpy(&p->saddr, &ip->saddr, sizeof(p->saddr));
	__builtin_memcpy(&p->daddr, &ip->daddr, sizeof(p->daddr));
	p->ttl = ip->hop_limit;
	off = ETH_HLEN + KP_IP6_HLEN;
	proto = kp_ip6_skip_ext(skb, ip->nexthdr, &off, &frag_off, &frag_id, &frag_nh);
	if (proto < 0)
		return KP_PARSE_PASS;
	if (frag_off & bpf_htons(KP_IP6_FRAG_OFFSET))
		frag = KP_FRAG_LATER;   /* its protocol is the first fragment's (kp_frag6_v1) */
	else if (frag_off & bpf_htons(KP_IP6_FRAG_MF)) {
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
			return KP_PARSE_FRAG;
		frag = KP_FRAG_FIRST;
	}
	kp_frag_set(frag);
	if (payload && off > ETH_HLEN + KP_IP6_HLEN + payload)
		return KP_PARSE_PASS;

	p->len = skb->len;
	p->ip_hlen = off - ETH_HLEN;
	p->l4_off = off;
	p->proto = proto;
	p->tcp_flags = 0;
	p->sport = 0;
	p->dport = 0;
	p->icmp_type = 0;
	p->icmp_code = 0;
	p->df = 1;
	p->tot_len = payload && payload <= 0xffff - KP_IP6_HLEN ? payload + KP_IP6_HLEN : 0;

	if (frag == KP_FRAG_LATER) {
		struct kp_frag6_key fk;
		struct kp_frag6_val *fv;

		kp_frag6_key(&fk, p, frag_id, frag_nh);
		fv = bpf_map_lookup_elem(&kp_frag6_v1, &fk);
		if (!fv)
			return KP_PARSE_FRAG;
		p->proto = fv->proto;
		p->sport = fv->sport;
		p->dport = fv->dport;
		return KP_PARSE_L4;
	}

	switch (proto) {
	case IPPROTO_TCP: {
		struct tcphdr tcp;

		if (bpf_skb_load_bytes(skb, off, &tcp, sizeof(tcp)))
			return KP_PARSE_PASS;
		if (payload && off + sizeof(tcp) > ETH_HLEN + KP_IP6_HLEN + payload)
			return KP_PARSE_PASS;
		p->sport = tcp.source;
		p->dport = tcp.dest;
		p->tcp_flags = ((__u8 *)&tcp)[13];
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr udp;

		if (bpf_skb_load_bytes(skb, off, &udp, sizeof(udp)))
			return KP_PARSE_PASS;
		if (payload && off + sizeof(udp) > ETH_HLEN + KP_IP6_HLEN + payload)
			return KP_PARSE_PASS;
		p->sport = udp.source;
		p->dport = udp.dest;
		break;
	}
	case KP_IPPROTO_SCTP: {
		struct kp_sctphdr sh;

		/* never a fragment (KP_PARSE_FRAG above); a jumbogram's length is unknown: not translated */
		if (frag != KP_FRAG_NONE || !payload || bpf_skb_load_bytes(skb, off, &sh, sizeof(sh)))
			return KP_PARSE_PASS;
		if (off + sizeof(sh) > ETH_HLEN + KP_IP6_HLEN + payload)
			return KP_PARSE_PASS;
		p->sport = sh.source;
		p->dport = sh.dest;
		p->tcp_flags = kp_sctp_flags(sh.chunk_type);
		return KP_PARSE_L4;
	}
	case IPPROTO_ICMPV6: {
		__u8 tc[2];

		if (bpf_skb_load_bytes(skb, off, tc, sizeof(tc)))
			return KP_PARSE_PASS;
		p->icmp_type = tc[0];
		p->icmp_code = tc[1];
		/* neighbour discovery and router messages: the node's own business */
		if (tc[0] >= KP_ICMP6_NDISC_FIRST && tc[0] <= KP_ICMP6_NDISC_LAST)
			return KP_PARSE_PASS;
		return KP_PARSE_ICMP;
	}
	case IPPROTO_IPV6:
		/* IPv6-in-IPv6 as DSR sends it (lib/dsr.h): the outer header alone, whole */
		return off == ETH_HLEN + KP_IP6_HLEN && frag == KP_FRAG_NONE ? KP_PARSE_IPIP : KP_PARSE_PASS;
	default:
		return KP_PARSE_PASS;
	}
	if (frag == KP_FRAG_FIRST) {
		struct kp_frag6_key fk;
		struct kp_frag6_val fv = { .sport = p->sport, .dport = p->dport, .proto = p->proto };

		kp_frag6_key(&fk, p, frag_id, frag_nh);
		bpf_map_update_elem(&kp_frag6_v1, &fk, &fv, BPF_ANY);
	}
	return KP_PARSE_L4;
}

#endif /* KPROXY_LIB_PARSE6_H */
