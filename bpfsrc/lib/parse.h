/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Ethernet + IPv4 + TCP/UDP/SCTP/ICMP header parsing. One bounds-check idiom: `(void *)(hdr + 1) > data_end`
 * (the cast keeps clang-19 -Wcompare-distinct-pointer-types quiet).
 * The parser only reads; what it learns goes into struct kp_pkt as offsets and values, because
 * every packet-rewriting helper invalidates packet pointers.
 */
#ifndef KPROXY_LIB_PARSE_H
#define KPROXY_LIB_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

#define KP_IP_OFF        ETH_HLEN                         /* IPv4 header right after Ethernet */
#define KP_IP_CSUM_OFF   (KP_IP_OFF + offsetof(struct iphdr, check))
#define KP_IP_SADDR_OFF  (KP_IP_OFF + offsetof(struct iphdr, saddr))
#define KP_IP_DADDR_OFF  (KP_IP_OFF + offsetof(struct iphdr, daddr))
#define KP_IP_MF         0x2000
#define KP_IP_OFFSET     0x1fff
/* Headers we may need in the linear area: Ethernet, the largest IPv4 header, a TCP header. */
#define KP_PULL_LEN      (ETH_HLEN + 60 + sizeof(struct tcphdr))

/* <linux/icmp.h> pulls glibc's <sys/socket.h> in through <linux/if.h>, which does not build
 * for -target bpf; the few ICMP definitions we need are restated here. */
#define KP_ICMP_DEST_UNREACH   3
#define KP_ICMP_PORT_UNREACH   3
#define KP_ICMP_FRAG_NEEDED    4
#define KP_ICMP_TIME_EXCEEDED  11

struct kp_icmphdr {
	__u8   type;
	__u8   code;
	__sum16 checksum;   /* covers the ICMP header and everything after it, no pseudo-header */
	__be32 rest;        /* unused (zero) for dest unreachable port, next-hop MTU for frag needed */
};

/* Make clang forget what it knows about a value, so a bound we add is kept for the verifier. */
#define kp_barrier_var(var) asm volatile("" : "+r"(var))

#define KP_TCP_FIN 0x01
#define KP_TCP_SYN 0x02
#define KP_TCP_RST 0x04
#define KP_TCP_ACK 0x10

#include "lib/sctp.h"

enum kp_parse_result {
	KP_PARSE_PASS = 0,   /* not ours: non-IPv4, truncated, other protocol */
	KP_PARSE_FRAG = 1,   /* IPv4 fragment whose datagram's ports are unknown: passed untouched */
	KP_PARSE_L4 = 2,     /* TCP, UDP or SCTP, ports valid (of the datagram, for a later fragment) */
	KP_PARSE_ICMP = 3,   /* ICMP, type/code valid */
	KP_PARSE_IPIP = 4,   /* IPv4-in-IPv4 or IPv6-in-IPv6 (DSR dispatch), outer header fields valid */
};

#define KP_IP_DF         0x4000

struct kp_pkt {
	__u32  len;        /* HBO skb->len */
	__u32  l4_off;     /* HBO offset of the L4 header from the start of the frame */
	__u32  ip_hlen;    /* HBO IPv4 header length in bytes, 20..60 */
	__be32 saddr;      /* NBO */
	__be32 daddr;      /* NBO */
	__be16 sport;      /* NBO TCP/UDP/SCTP only */
	__be16 dport;      /* NBO TCP/UDP/SCTP only */
	__u8   proto;      /* IPPROTO_* */
	__u8   tcp_flags;  /* byte 13 of the TCP header; SCTP: its first chunk as TCP flags (kp_sctp_flags) */
	__u8   icmp_type;  /* ICMP only */
	__u8   icmp_code;  /* ICMP only */
	__u8   ttl;        /* IPv4 TTL */
	__u8   df;         /* 1 if the IPv4 DF bit is set */
	__u16  tot_len;    /* HBO IPv4 total length, 0 for BIG TCP GSO packets */
};

/* An IPv6 packet as kp_parse6() found it: kp_pkt's fields with 16-byte addresses, under the same names
 * (the family-generic code of lib/<topic>_fam.h reads both). */
struct kp_pkt6 {
	__u32  len;        /* HBO skb->len */
	__u32  l4_off;     /* HBO offset of the L4 header from the start of the frame */
	__u32  ip_hlen;    /* HBO IPv6 header and extension headers in bytes (40..) */
	union kp_in6 saddr;   /* NBO */
	union kp_in6 daddr;   /* NBO */
	__be16 sport;      /* NBO TCP/UDP/SCTP only */
	__be16 dport;      /* NBO TCP/UDP/SCTP only */
	__u8   proto;      /* IPPROTO_* of the upper-layer header (after the extension headers) */
	__u8   tcp_flags;  /* byte 13 of the TCP header; SCTP: its first chunk as TCP flags (kp_sctp_flags) */
	__u8   icmp_type;  /* ICMPv6 only */
	__u8   icmp_code;  /* ICMPv6 only */
	__u8   ttl;        /* hop limit */
	__u8   df;         /* 1: IPv6 routers never fragment */
	__u16  tot_len;    /* HBO 40 + payload length, 0 for jumbograms and BIG TCP GSO packets */
};

/*
 * Whether the packet being handled is a fragment. Kept in the per-CPU scratch map, not in struct
 * kp_pkt: the verifier would follow every path of the programs once per value, which the largest
 * (kp_from_netdev) cannot afford; read from a map value it is unknown wherever it is tested.
 */
enum kp_frag {
	KP_FRAG_NONE = 0,   /* a whole datagram */
	KP_FRAG_FIRST = 1,  /* first fragment: has the L4 header */
	KP_FRAG_LATER = 2,  /* later fragment: no L4 header; ports and flags from kp_frag4_v1, tcp_flags 0 */
};

static __always_inline void kp_frag_set(__u32 frag)
{
	__u32 zero = 0;
	struct kp_scratch *s = bpf_map_lookup_elem(&kp_scratch, &zero);

	if (s)
		s->frag = frag;
}

static __always_inline __u32 kp_frag_get(void)
{
	__u32 zero = 0;
	struct kp_scratch *s = bpf_map_lookup_elem(&kp_scratch, &zero);

	return s ? s->frag : KP_FRAG_NONE;
}

static __always_inline void kp_frag_key(struct kp_frag4_key *k, const struct iphdr *ip)
{
	k->saddr = ip->saddr;
	k->daddr = ip->daddr;
	k->id = ip->id;
	k->proto = ip->protocol;
	k->pad = 0;
}

static __always_inline void kp_frag_record(const struct iphdr *ip, const struct kp_pkt *p)
{
	struct kp_frag4_key k;
	struct kp_frag4_val v = { .sport = p->sport, .dport = p->dport };

	kp_frag_key(&k, ip);
	bpf_map_update_elem(&kp_frag4_v1, &k, &v, BPF_ANY);
}

/*
 * The network header of a frame of this ethertype (NBO), its first hlen bytes in the linear area, or
 * NULL. GRO and frag_list skbs may carry headers outside the linear area: they are brought in once.
 * kp_parse4 and kp_parse6 start here.
 */
static __always_inline void *kp_l3_header(struct __sk_buff *skb, __be16 ethertype, __u32 hlen)
{
	void *data, *data_end;
	struct ethhdr *eth;

	if (skb->data_end - skb->data < KP_PULL_LEN && skb->len > skb->data_end - skb->data)
		bpf_skb_pull_data(skb, skb->len < KP_PULL_LEN ? skb->len : KP_PULL_LEN);

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return NULL;
	if (eth->h_proto != ethertype)
		return NULL;
	if ((void *)(eth + 1) + hlen > data_end)
		return NULL;
	return eth + 1;
}

static __always_inline int kp_parse4(struct __sk_buff *skb, struct kp_pkt *p)
{
	void *data_end, *l4;
	struct iphdr *ip;
	__u32 ip_hlen, tot_len, frag = KP_FRAG_NONE;

	ip = kp_l3_header(skb, bpf_htons(ETH_P_IP), sizeof(*ip));
	if (!ip)
		return KP_PARSE_PASS;
	data_end = (void *)(long)skb->data_end;
	if (ip->version != 4 || ip->ihl < 5)
		return KP_PARSE_PASS;
	if (ip->frag_off & bpf_htons(KP_IP_MF | KP_IP_OFFSET)) {
		if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
			return KP_PARSE_FRAG;
		frag = (ip->frag_off & bpf_htons(KP_IP_OFFSET)) ? KP_FRAG_LATER : KP_FRAG_FIRST;
	}
	kp_frag_set(frag);

	ip_hlen = ip->ihl * 4;
	tot_len = bpf_ntohs(ip->tot_len);
	/* A frame shorter than the IP total length is truncated. tot_len 0 is legal for BIG TCP
	 * GSO packets (kernel >= 6.3), whose length only the skb knows. */
	if (tot_len && (tot_len < ip_hlen || skb->len < ETH_HLEN + tot_len))
		return KP_PARSE_PASS;

	p->len = skb->len;
	p->ip_hlen = ip_hlen;
	p->l4_off = ETH_HLEN + ip_hlen;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->tcp_flags = 0;
	p->sport = 0;
	p->dport = 0;
	p->icmp_type = 0;
	p->icmp_code = 0;
	p->ttl = ip->ttl;
	p->df = !!(ip->frag_off & bpf_htons(KP_IP_DF));
	p->tot_len = tot_len;
	l4 = (void *)ip + ip_hlen;

	if (frag == KP_FRAG_LATER) {
		struct kp_frag4_key fk;
		struct kp_frag4_val *fv;

		kp_frag_key(&fk, ip);
		fv = bpf_map_lookup_elem(&kp_frag4_v1, &fk);
		if (!fv)
			return KP_PARSE_FRAG;
		p->sport = fv->sport;
		p->dport = fv->dport;
		return KP_PARSE_L4;
	}

	switch (ip->protocol) {
	case IPPROTO_TCP: {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end)
			return KP_PARSE_PASS;
		if (tot_len && tot_len < ip_hlen + sizeof(*tcp))
			return KP_PARSE_PASS;
		p->sport = tcp->source;
		p->dport = tcp->dest;
		p->tcp_flags = ((__u8 *)tcp)[13];
		if (frag == KP_FRAG_FIRST)
			kp_frag_record(ip, p);
		return KP_PARSE_L4;
	}
	case IPPROTO_UDP: {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return KP_PARSE_PASS;
		if (tot_len && tot_len < ip_hlen + sizeof(*udp))
			return KP_PARSE_PASS;
		p->sport = udp->source;
		p->dport = udp->dest;
		if (frag == KP_FRAG_FIRST)
			kp_frag_record(ip, p);
		return KP_PARSE_L4;
	}
	case KP_IPPROTO_SCTP: {
		/* never a fragment here (SCTP fragments are KP_PARSE_FRAG above: the CRC covers the whole
		 * packet, which no fragment holds), so its length is known */
		struct kp_sctphdr *sh = l4;

		if ((void *)(sh + 1) > data_end || !tot_len || tot_len < ip_hlen + sizeof(*sh))
			return KP_PARSE_PASS;
		p->sport = sh->source;
		p->dport = sh->dest;
		p->tcp_flags = kp_sctp_flags(sh->chunk_type);
		return KP_PARSE_L4;
	}
	case IPPROTO_ICMP: {
		struct kp_icmphdr *icmp = l4;

		if ((void *)(icmp + 1) > data_end)
			return KP_PARSE_PASS;
		p->icmp_type = icmp->type;
		p->icmp_code = icmp->code;
		return KP_PARSE_ICMP;
	}
	case IPPROTO_IPIP:
		return KP_PARSE_IPIP;
	}
	return KP_PARSE_PASS;
}

static __always_inline __u32 kp_l4_csum_off4(const struct kp_pkt *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
						     : offsetof(struct udphdr, check));
}

static __always_inline __u32 kp_l4_csum_off6(const struct kp_pkt6 *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
						     : offsetof(struct udphdr, check));
}

#include "lib/parse6.h"

#endif /* KPROXY_LIB_PARSE_H */
