/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * XDP acceleration of traffic from outside (the agent's --acceleration): kp_xdp runs on the netdevs
 * before the kernel allocates an skb and does what kp_from_netdev would do with a packet:
 *   a flow's first packet to a frontend       the flow opened as kp_lb_forward opens it (kp_xdp_open, in
 *   (a TCP SYN, a first UDP datagram)           the tail-called kp_xdp_new: the same kp_lb_pick,
 *                                               kp_lb_snat, kp_lb_commit), then handled as below
 *   to a backend on another node (SNAT, DSR    rewritten, encapsulated, sent back out (XDP_TX), or out
 *   option, DSR IPIP)                           another netdev of kp_xdevs_v1 (XDP_REDIRECT)
 *   to a backend on this node (plain DNAT)     DNATed, handed to the stack: kp_from_netdev finds no
 *                                               frontend and passes it
 *   a backend's reply to a SNATed flow          translated back, sent to the client
 * IPv4 and IPv6 alike (kp_xdp4, kp_xdp6). Every other change of a flow's state stays kp_from_netdev's:
 * kp_xdp follows entries (and refreshes them as kp_from_netdev does, state and flags unchanged). So the
 * packets it leaves to the stack (XDP_PASS, untouched) are every packet that changes or ends a flow
 * (TCP FIN, RST, a SYN of a tracked flow; a backend's first reply), a first packet kp_from_netdev
 * answers itself (no backends, a closed ClusterIP), one of a flow whose frontend or backend is gone,
 * one whose route needs a neighbour lookup, is too small, or leaves by a device that takes no XDP
 * frames (any but the one it came in by and those of kp_xdevs_v1: a first packet goes so once its flow
 * is opened, and kp_from_netdev follows the entry), IPv4 with options or fragments, IPv6 with extension headers, and
 * anything that is not a Service's. Turning acceleration on or off, or restarting the agent, moves no
 * flow: both paths read and write the same entries.
 */
#ifndef KPROXY_LIB_XDP_H
#define KPROXY_LIB_XDP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"
#include "lib/parse.h"
#include "lib/ct.h"
#include "lib/csum.h"
#include "lib/stats.h"
#include "lib/dsr.h"
#include "lib/fib.h"
#include "lib/lb.h"
#include "lib/tcp.h"

/* One's-complement update of the 16-bit checksum at sum for a 16-bit word from -> to (RFC 1624). */
static __always_inline void kp_xcsum2(__u16 *sum, __u16 from, __u16 to)
{
	__u32 s = (__u16)~*sum + (__u32)(__u16)~from + to;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	*sum = ~(__u16)s;
}

/* ... for a 32-bit word (an address), as its two 16-bit halves in memory order. */
static __always_inline void kp_xcsum4(__u16 *sum, __u32 from, __u32 to)
{
	kp_xcsum2(sum, (__u16)from, (__u16)to);
	kp_xcsum2(sum, (__u16)(from >> 16), (__u16)(to >> 16));
}

struct kp_xpkt4 {
	struct ethhdr *eth;
	struct iphdr *ip;
	__be16 *ports;     /* source, destination */
	__u16 *l4_csum;    /* NULL: a UDP datagram without checksum */
	__u32 len;         /* frame length, for the counters */
	__u8 proto;
	__u8 tcp_flags;    /* byte 13 of the TCP header, 0 for UDP */
};

/* Rewrite the address and port of one side (dst: 1 destination, 0 source); both checksums follow. */
static __always_inline void kp_xnat4(struct kp_xpkt4 *x, int dst, __be32 addr, __be16 port)
{
	__be32 *a = dst ? &x->ip->daddr : &x->ip->saddr;
	__be16 *pt = &x->ports[dst ? 1 : 0];

	kp_xcsum4(&x->ip->check, *a, addr);
	if (x->l4_csum) {
		kp_xcsum4(x->l4_csum, *a, addr);   /* the pseudo-header */
		kp_xcsum2(x->l4_csum, *pt, port);
		if (x->proto == IPPROTO_UDP && *x->l4_csum == 0)
			*x->l4_csum = 0xffff;      /* 0 means "no checksum" for UDP */
	}
	*a = addr;
	*pt = port;
}

static __always_inline void kp_xttl_dec4(struct kp_xpkt4 *x)
{
	struct iphdr *ip = x->ip;
	__u16 old = *(__u16 *)&ip->ttl;   /* TTL and protocol share a checksum word */

	ip->ttl--;
	kp_xcsum2(&ip->check, old, *(__u16 *)&ip->ttl);
}

/* The family-generic code's view of a packet (lib/xdp_fam.h): addresses, TTL, IP length. */
static __always_inline __be32 kp_xsaddr4(const struct kp_xpkt4 *x) { return x->ip->saddr; }
static __always_inline __be32 kp_xdaddr4(const struct kp_xpkt4 *x) { return x->ip->daddr; }
static __always_inline __u8 kp_xttl4(const struct kp_xpkt4 *x) { return x->ip->ttl; }
static __always_inline __u32 kp_xiplen4(const struct kp_xpkt4 *x) { return bpf_ntohs(x->ip->tot_len); }

/*
 * Route a packet kp_xdp sends out itself; 0 when XDP can send it: the route is complete (fib holds the
 * MACs) and leaves by the interface the frame came in by (XDP_TX), or by another netdev while both are
 * in kp_xdevs_v1 (XDP_REDIRECT: the agent lists the netdevs kp_xdp runs on whose drivers carry out a
 * redirect and take redirected frames). No neighbour yet, too big for the route (frag needed), no
 * route, another device (one that takes no XDP frames: a bridge, a VLAN, a tunnel would drop it): the
 * stack's to handle.
 */
static __always_inline int kp_xfib_run(struct xdp_md *ctx, struct bpf_fib_lookup *fib, __u32 tot_len)
{
	__u32 in = ctx->ingress_ifindex, out;

	fib->ifindex = in;
	fib->tot_len = tot_len;
	if (bpf_fib_lookup(ctx, fib, sizeof(*fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	out = fib->ifindex;
	if (out == in)
		return 0;
	return bpf_map_lookup_elem(&kp_xdevs_v1, &out) && bpf_map_lookup_elem(&kp_xdevs_v1, &in) ? 0 : -1;
}

static __always_inline int kp_xfib4(struct xdp_md *ctx, struct bpf_fib_lookup *fib, const __be32 *src,
				   const __be32 *dst, __u32 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = KP_AF_INET;
	fib->ipv4_src = *src;
	fib->ipv4_dst = *dst;
	return kp_xfib_run(ctx, fib, tot_len);
}

/* Send a packet kp_xfib_run routed: back out where it came in, or out the accelerated netdev of its
 * route. Counted in FAM's counters (XDP_REDIRECT). */
static __always_inline int kp_xsend(struct xdp_md *ctx, struct bpf_fib_lookup *fib, int fam, __u32 len)
{
	void *data = (void *)(long)ctx->data;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	kp_count_fam(fam, KP_STAT_XDP_REDIRECT, len);
	return bpf_redirect(fib->ifindex, 0);
}

/* Whether the flow entry v (state for this packet unchanged) needs no write now: kp_from_netdev writes
 * entries at most once a KP_CT_REFRESH_NS, so a packet past that is left to it. */
static __always_inline int kp_xfresh(__u8 state, __u8 proto, __u64 expires_ns, __u64 now)
{
	return (__s64)(now + kp_ct_timeout_ns(state, proto) - expires_ns) <= (__s64)KP_CT_REFRESH_NS;
}

/*
 * Lay DSR's headers out in the room kp_xroom made, as kp_dsr_opt_push4 and kp_tunnel_push4 do: the
 * Ethernet header first, then (IPIP) an outer header from saddr to daddr, then the (translated) IPv4
 * header, then (opt) DSR's option with the frontend, before the L4 header, which stays where it is.
 */
static __always_inline int kp_xdsr_layout4(struct xdp_md *ctx, __u32 extra, int opt, int ipip,
					   const __be32 *saddr, const __be32 *daddr, const __be32 *svc_addr,
					   __be16 svc_port)
{
	struct kp_dsr_opt o = {
		.type = KP_DSR_OPT_TYPE, .len = KP_DSR_OPT_LEN, .port = svc_port, .addr = *svc_addr,
	};
	struct iphdr ip, outer = {};
	struct ethhdr eth;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u16 old_w0, new_w0, tot_len;
	__u32 at = sizeof(eth);

	if (extra > KP_DSR_OPT_LEN + KP_IPIP_HLEN || data + extra + sizeof(eth) + sizeof(ip) > end)
		return -1;
	__builtin_memcpy(&eth, data + extra, sizeof(eth));
	__builtin_memcpy(&ip, data + extra + sizeof(eth), sizeof(ip));
	if (opt) {
		/* version/ihl share their checksum word with the TOS byte; the total length has its own */
		old_w0 = *(__u16 *)&ip;
		ip.ihl += KP_DSR_OPT_LEN / 4;
		new_w0 = *(__u16 *)&ip;
		kp_xcsum2(&ip.check, old_w0, new_w0);
		tot_len = bpf_htons(bpf_ntohs(ip.tot_len) + KP_DSR_OPT_LEN);
		kp_xcsum2(&ip.check, ip.tot_len, tot_len);
		ip.tot_len = tot_len;
		kp_xcsum4(&ip.check, 0, *(__u32 *)&o);
		kp_xcsum4(&ip.check, 0, o.addr);
	}
	__builtin_memcpy(data, &eth, sizeof(eth));
	if (ipip) {
		kp_ipip_outer(&outer, &ip, bpf_ntohs(ip.tot_len), *saddr, *daddr);
		if (data + sizeof(eth) + sizeof(outer) + sizeof(ip) > end)
			return -1;
		__builtin_memcpy(data + at, &outer, sizeof(outer));
		__builtin_memcpy(data + sizeof(eth) + sizeof(outer), &ip, sizeof(ip));
		if (opt) {
			if (data + sizeof(eth) + sizeof(outer) + sizeof(ip) + sizeof(o) > end)
				return -1;
			__builtin_memcpy(data + sizeof(eth) + sizeof(outer) + sizeof(ip), &o, sizeof(o));
		}
		return 0;
	}
	__builtin_memcpy(data + sizeof(eth), &ip, sizeof(ip));
	if (opt) {
		if (data + sizeof(eth) + sizeof(ip) + sizeof(o) > end)
			return -1;
		__builtin_memcpy(data + sizeof(eth) + sizeof(ip), &o, sizeof(o));
	}
	return 0;
}

/* ---- IPv6: as above, with 16-byte addresses (no header checksum; the L4 checksum's pseudo-header) ---- */
struct kp_xpkt6 {
	struct ethhdr *eth;
	struct ipv6hdr *ip;
	__be16 *ports;     /* source, destination */
	__u16 *l4_csum;
	__u32 len;         /* frame length, for the counters */
	__u8 proto;
	__u8 tcp_flags;    /* byte 13 of the TCP header, 0 for UDP */
};

static __always_inline void kp_xcsum16(__u16 *sum, const union kp_in6 *from, const union kp_in6 *to)
{
	kp_xcsum4(sum, from->w[0], to->w[0]);
	kp_xcsum4(sum, from->w[1], to->w[1]);
	kp_xcsum4(sum, from->w[2], to->w[2]);
	kp_xcsum4(sum, from->w[3], to->w[3]);
}

static __always_inline void kp_xnat6(struct kp_xpkt6 *x, int dst, union kp_in6 addr, __be16 port)
{
	union kp_in6 *a = dst ? (union kp_in6 *)&x->ip->daddr : (union kp_in6 *)&x->ip->saddr;
	__be16 *pt = &x->ports[dst ? 1 : 0];

	if (x->l4_csum) {   /* always here: kp_xdp6 leaves zero-checksum datagrams to TC */
		kp_xcsum16(x->l4_csum, a, &addr);   /* the pseudo-header */
		kp_xcsum2(x->l4_csum, *pt, port);
		if (x->proto == IPPROTO_UDP && *x->l4_csum == 0)
			*x->l4_csum = 0xffff;
	}
	*a = addr;
	*pt = port;
}

static __always_inline int kp_xfib6(struct xdp_md *ctx, struct bpf_fib_lookup *fib, const union kp_in6 *src,
				   const union kp_in6 *dst, __u32 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = KP_AF_INET6;
	__builtin_memcpy(fib->ipv6_src, src, sizeof(*src));
	__builtin_memcpy(fib->ipv6_dst, dst, sizeof(*dst));
	return kp_xfib_run(ctx, fib, tot_len);
}

static __always_inline void kp_xttl_dec6(struct kp_xpkt6 *x)
{
	x->ip->hop_limit--;   /* no header checksum */
}

static __always_inline union kp_in6 kp_xsaddr6(const struct kp_xpkt6 *x)
{
	union kp_in6 a;

	__builtin_memcpy(&a, &x->ip->saddr, sizeof(a));
	return a;
}

static __always_inline union kp_in6 kp_xdaddr6(const struct kp_xpkt6 *x)
{
	union kp_in6 a;

	__builtin_memcpy(&a, &x->ip->daddr, sizeof(a));
	return a;
}

static __always_inline __u8 kp_xttl6(const struct kp_xpkt6 *x) { return x->ip->hop_limit; }
static __always_inline __u32 kp_xiplen6(const struct kp_xpkt6 *x) { return KP_IP6_HLEN + bpf_ntohs(x->ip->payload_len); }

/* kp_xdsr_layout for IPv6: the destination options header of kp_dsr_opt_push6, the outer header of
 * kp_tunnel_push6 (the inner header's first word, then the tunnel's length, next header and hop limit). */
struct kp_xlay6 {
	struct ipv6hdr ip, outer;
	struct kp_dsr6_opt o;
	struct ethhdr eth;
};
_Static_assert(sizeof(struct kp_xlay6) <= sizeof(((struct kp_scratch *)0)->xlay6), "kp_scratch.xlay6 too small");

static __always_inline int kp_xdsr_layout6(struct xdp_md *ctx, __u32 extra, int opt, int tunnel,
					   const union kp_in6 *saddr, const union kp_in6 *daddr,
					   const union kp_in6 *svc_addr, __be16 svc_port)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct kp_scratch *s;
	struct kp_xlay6 *l;
	__u32 zero = 0;

	s = bpf_map_lookup_elem(&kp_scratch, &zero);
	if (!s)
		return -1;
	l = (struct kp_xlay6 *)s->xlay6;
	if (extra > KP_DSR6_HDR_LEN + KP_IP6IP6_HLEN || data + extra + sizeof(l->eth) + sizeof(l->ip) > end)
		return -1;
	__builtin_memcpy(&l->eth, data + extra, sizeof(l->eth));
	__builtin_memcpy(&l->ip, data + extra + sizeof(l->eth), sizeof(l->ip));
	if (opt) {
		__builtin_memset(&l->o, 0, sizeof(l->o));
		l->o.nexthdr = l->ip.nexthdr;
		l->o.hdrlen = KP_DSR6_HDR_LEN / 8 - 1;
		l->o.type = KP_DSR6_OPT_TYPE;
		l->o.len = KP_DSR6_OPT_LEN;
		l->o.addr = *svc_addr;
		l->o.port = svc_port;
		l->ip.nexthdr = IPPROTO_DSTOPTS;
		l->ip.payload_len = bpf_htons(bpf_ntohs(l->ip.payload_len) + KP_DSR6_HDR_LEN);
	}
	__builtin_memcpy(data, &l->eth, sizeof(l->eth));
	if (tunnel) {
		l->outer = l->ip;
		l->outer.payload_len = bpf_htons(KP_IP6_HLEN + bpf_ntohs(l->ip.payload_len));
		l->outer.nexthdr = IPPROTO_IPV6;
		l->outer.hop_limit = KP_IPIP_TTL;
		__builtin_memcpy(&l->outer.saddr, saddr, sizeof(*saddr));
		__builtin_memcpy(&l->outer.daddr, daddr, sizeof(*daddr));
		if (data + sizeof(l->eth) + sizeof(l->outer) + sizeof(l->ip) > end)
			return -1;
		__builtin_memcpy(data + sizeof(l->eth), &l->outer, sizeof(l->outer));
		__builtin_memcpy(data + sizeof(l->eth) + sizeof(l->outer), &l->ip, sizeof(l->ip));
		if (opt) {
			if (data + sizeof(l->eth) + sizeof(l->outer) + sizeof(l->ip) + sizeof(l->o) > end)
				return -1;
			__builtin_memcpy(data + sizeof(l->eth) + sizeof(l->outer) + sizeof(l->ip), &l->o, sizeof(l->o));
		}
		return 0;
	}
	__builtin_memcpy(data + sizeof(l->eth), &l->ip, sizeof(l->ip));
	if (opt) {
		if (data + sizeof(l->eth) + sizeof(l->ip) + sizeof(l->o) > end)
			return -1;
		__builtin_memcpy(data + sizeof(l->eth) + sizeof(l->ip), &l->o, sizeof(l->o));
	}
	return 0;
}

/*
 * An IPv6 frame kp_xdp may handle: TCP or UDP right after the fixed header (a flow with extension
 * headers is SNATed by kp_from_netdev6 and stays its), its length within the frame, a UDP checksum (a
 * zero one, tunnels' udp6zerocsumtx: kp_from_netdev6 keeps it zero, and so it is its). 0 with x filled,
 * -1 for the stack.
 */
static __always_inline int kp_xparse6(struct xdp_md *ctx, struct kp_xpkt6 *x)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip = data + sizeof(struct ethhdr);

	x->eth = data;
	x->len = end - data;
	if ((void *)(ip + 1) > end || x->eth->h_proto != bpf_htons(ETH_P_IPV6) || ip->version != 6 ||
	    KP_IP6_HLEN + bpf_ntohs(ip->payload_len) + sizeof(struct ethhdr) > x->len ||
	    bpf_ntohs(ip->payload_len) < sizeof(struct udphdr))
		return -1;
	x->ip = ip;
	x->proto = ip->nexthdr;
	x->ports = (void *)(ip + 1);
	x->tcp_flags = 0;
	if (x->proto == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(ip + 1);

		if ((void *)(th + 1) > end || bpf_ntohs(ip->payload_len) < sizeof(*th))
			return -1;
		x->tcp_flags = ((__u8 *)th)[13];
		x->l4_csum = (__u16 *)&th->check;
	} else if (x->proto == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(ip + 1);

		if ((void *)(uh + 1) > end || !uh->check)
			return -1;
		x->l4_csum = (__u16 *)&uh->check;
	} else {
		return -1;
	}
	return 0;
}

/*
 * An IPv4 frame kp_xdp may handle, as kp_parse4 takes them: IPv4 without options, not a fragment, its
 * length within the frame (as a number: the verifier follows no bound through a pointer moved by a
 * packet field), TCP or UDP. 0 with x filled, -1 for the stack.
 */
static __always_inline int kp_xparse4(struct xdp_md *ctx, struct kp_xpkt4 *x)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);

	x->eth = data;
	x->len = end - data;
	if ((void *)(ip + 1) > end || x->eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4 ||
	    ip->ihl != 5 || (ip->frag_off & bpf_htons(KP_IP_MF | KP_IP_OFFSET)) ||
	    bpf_ntohs(ip->tot_len) + sizeof(struct ethhdr) > x->len ||
	    bpf_ntohs(ip->tot_len) < sizeof(*ip) + sizeof(struct udphdr))
		return -1;
	x->ip = ip;
	x->proto = ip->protocol;
	x->ports = (void *)(ip + 1);
	x->tcp_flags = 0;
	if (x->proto == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(ip + 1);

		if ((void *)(th + 1) > end || bpf_ntohs(ip->tot_len) < sizeof(*ip) + sizeof(*th))
			return -1;
		x->tcp_flags = ((__u8 *)th)[13];
		x->l4_csum = (__u16 *)&th->check;
	} else if (x->proto == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(ip + 1);

		if ((void *)(uh + 1) > end)
			return -1;
		x->l4_csum = uh->check ? (__u16 *)&uh->check : NULL;
	} else {
		return -1;
	}
	return 0;
}

/* What kp_xpkt_of (lib/xdp_fam.h) needs of a frame beyond the accessors above: its IP header's length
 * (no IPv4 options, no IPv6 extension headers: kp_xparse4/6) and whether it may not be fragmented. */
static __always_inline __u32 kp_xiphlen4(const struct kp_xpkt4 *x) { return sizeof(struct iphdr); }
static __always_inline __u32 kp_xiphlen6(const struct kp_xpkt6 *x) { return KP_IP6_HLEN; }
static __always_inline __u8 kp_xdf4(const struct kp_xpkt4 *x) { return !!(x->ip->frag_off & bpf_htons(KP_IP_DF)); }
static __always_inline __u8 kp_xdf6(const struct kp_xpkt6 *x) { return 1; }   /* routers never fragment IPv6 */

/* kp_xdp4/6's answer for a flow's first packet to a frontend: the caller tail-calls kp_xdp_new(6),
 * whose stack and verification are their own. */
#define KP_XDP_NEW 0x100

/* The family-generic part: following a flow's entry, forwarding its packet, a SNAT reply, opening a flow. */
#undef KP_FAM
#define KP_FAM 4
#include "lib/fam.h"
#include "lib/xdp_fam.h"
#undef KP_FAM
#define KP_FAM 6
#include "lib/fam.h"
#include "lib/xdp_fam.h"
#undef KP_FAM

/* An IPv6 frame (kp_xdp6). */
static __always_inline int kp_xdp6_main(struct xdp_md *ctx)
{
	struct kp_xpkt6 x;

	if ((void *)(long)ctx->data + sizeof(struct ethhdr) > (void *)(long)ctx->data_end)
		return XDP_PASS;
	kp_count6(KP_STAT_FROM_XDP, (void *)(long)ctx->data_end - (void *)(long)ctx->data);
	if (kp_xparse6(ctx, &x))
		return XDP_PASS;
	return kp_xdp_main6(ctx, &x);
}

/* An IPv4 frame (or of no family: counted here). */
static __attribute__((noinline)) int kp_xdp4(struct xdp_md *ctx)
{
	struct kp_xpkt4 x;

	if (!ctx || (void *)(long)ctx->data + sizeof(struct ethhdr) > (void *)(long)ctx->data_end)
		return XDP_PASS;
	kp_count4(KP_STAT_FROM_XDP, (void *)(long)ctx->data_end - (void *)(long)ctx->data);
	if (kp_xparse4(ctx, &x))
		return XDP_PASS;
	return kp_xdp_main4(ctx, &x);
}

#endif /* KPROXY_LIB_XDP_H */
