/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * XDP acceleration of traffic from outside (the agent's --acceleration): kp_xdp runs on the netdevs
 * before the kernel allocates an skb and does, for the packets of flows kp_from_netdev has tracked,
 * what kp_from_netdev would do with them:
 *   to a backend on another node (SNAT, DSR option, DSR IPIP)   rewritten, encapsulated, sent back out
 *                                                             (XDP_TX)
 *   to a backend on this node (plain DNAT)                    DNATed, handed to the stack: kp_from_netdev
 *                                                             finds no frontend and passes it
 *   a backend's reply to a SNATed flow                          translated back, sent to the client
 * IPv4 and IPv6 alike (kp_xdp4, kp_xdp6). Every decision and every change of a flow's state stays kp_from_netdev's: kp_xdp only follows
 * entries (and refreshes them as kp_from_netdev does, state and flags unchanged). So the packets it
 * leaves to the stack (XDP_PASS, untouched) are every packet that opens, changes or ends a flow (TCP
 * SYN, FIN, RST; a flow's first UDP datagram; a backend's first reply), one of a flow whose frontend or
 * backend is gone, one whose route needs a neighbour lookup, is too small, or leaves by another
 * device (XDP can only send back out where the frame came in), IPv4 with options or fragments, IPv6
 * with extension headers, and anything that is not a Service's. Turning acceleration on or off, or restarting the agent, moves
 * no flow: both paths read the same entries.
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

struct kp_xpkt {
	struct ethhdr *eth;
	struct iphdr *ip;
	__be16 *ports;     /* source, destination */
	__u16 *l4_csum;    /* NULL: a UDP datagram without checksum */
	__u32 len;         /* frame length, for the counters */
	__u8 proto;
};

/* Rewrite the address and port of one side (dst: 1 destination, 0 source); both checksums follow. */
static __always_inline void kp_xnat(struct kp_xpkt *x, int dst, __be32 addr, __be16 port)
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

static __always_inline void kp_xttl_dec(struct iphdr *ip)
{
	__u16 old = *(__u16 *)&ip->ttl;   /* TTL and protocol share a checksum word */

	ip->ttl--;
	kp_xcsum2(&ip->check, old, *(__u16 *)&ip->ttl);
}

/* Route a packet kp_xdp sends out itself; 0 when XDP can send it (fib holds the egress and MACs). */
static __always_inline int kp_xfib(struct xdp_md *ctx, struct bpf_fib_lookup *fib, __be32 src, __be32 dst,
				  __u32 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = KP_AF_INET;
	fib->ipv4_src = src;
	fib->ipv4_dst = dst;
	fib->ifindex = ctx->ingress_ifindex;
	fib->tot_len = tot_len;
	/* no neighbour yet, too big for the route (frag needed), no route: the stack's to handle */
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0) == BPF_FIB_LKUP_RET_SUCCESS ? 0 : -1;
}

static __always_inline int kp_xsend(struct xdp_md *ctx, struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	return XDP_TX;   /* the route leaves by the interface the frame came in by (checked before) */
}

/* Whether the flow entry v (state for this packet unchanged) needs no write now: kp_from_netdev writes
 * entries at most once a KP_CT_REFRESH_NS, so a packet past that is left to it. */
static __always_inline int kp_xfresh(__u8 state, __u64 expires_ns, __u64 now)
{
	return (__s64)(now + kp_ct_timeout_ns(state) - expires_ns) <= (__s64)KP_CT_REFRESH_NS;
}

/*
 * Make room in front for DSR's bytes (EXTRA: the option, the IPIP header, or both) before anything is
 * rewritten: a driver without the headroom refuses, and the packet goes to the stack untouched. x then
 * points at the packet where it lies now, EXTRA bytes in.
 */
static __always_inline int kp_xroom(struct xdp_md *ctx, struct kp_xpkt *x, __u32 extra)
{
	void *data, *end;

	if (bpf_xdp_adjust_head(ctx, -(int)extra))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (extra > KP_DSR_OPT_LEN + KP_IPIP_HLEN)
		return -1;
	x->eth = data + extra;
	x->ip = (void *)(x->eth + 1);
	x->ports = (void *)(x->ip + 1);
	if ((void *)(x->ip + 1) + sizeof(struct udphdr) > end)
		return -1;
	if (x->proto == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(x->ip + 1);

		x->l4_csum = uh->check ? (__u16 *)&uh->check : NULL;
	} else {
		struct tcphdr *th = (void *)(x->ip + 1);

		if ((void *)(th + 1) > end)
			return -1;
		x->l4_csum = (__u16 *)&th->check;
	}
	return 0;
}

/*
 * Lay DSR's headers out in the room kp_xroom made, as kp_dsr_opt_push4 and kp_tunnel_push4 do: the
 * Ethernet header first, then (IPIP) an outer header from saddr to daddr, then the (translated) IPv4
 * header, then (opt) DSR's option with the frontend, before the L4 header, which stays where it is.
 */
static __always_inline int kp_xdsr_layout(struct xdp_md *ctx, __u32 extra, int opt, int ipip, __be32 saddr,
					  __be32 daddr, __be32 svc_addr, __be16 svc_port)
{
	struct kp_dsr_opt o = {
		.type = KP_DSR_OPT_TYPE, .len = KP_DSR_OPT_LEN, .port = svc_port, .addr = svc_addr,
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
		kp_ipip_outer(&outer, &ip, bpf_ntohs(ip.tot_len), saddr, daddr);
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

/*
 * What kp_from_netdev checks before it follows a flow's entry, checked alike (else the packet is its):
 * the frontend is still there, has backends and is served from outside, and the flow's backend is still
 * known. A flow whose entry outlives its frontend or backend (deleted, re-balanced) is TC's to handle.
 */
static __always_inline int kp_xfollowable(const struct kp_xpkt *x, const struct kp_ct4_val *v)
{
	struct kp_svc4_key sk = {
		.addr = x->ip->daddr, .port = x->ports[1], .slot = 0, .proto = x->proto, .scope = KP_SCOPE_EXT,
	};
	struct kp_svc4_val *svc = bpf_map_lookup_elem(&kp_svc4_v1, &sk);
	__u32 id = v->backend_id;

	if (!svc || !svc->count)
		return 0;
	if (!(svc->flags & KP_SVC_F_TYPED) && kp_no_external_cluster_ip())
		return 0;
	return id && bpf_map_lookup_elem(&kp_be4_v1, &id) != NULL;
}

/* A packet of a tracked flow from outside (fk's FWD entry v): forward it as kp_lb_xlate4 would. */
static __always_inline int kp_xdp_forward(struct xdp_md *ctx, struct kp_xpkt *x, const struct kp_ct4_key *fk,
					 const struct kp_ct4_val *v, __u64 now)
{
	__u8 mode = v->flags & (KP_CT_F_SNAT | KP_CT_F_DSR_OPT | KP_CT_F_DSR_IPIP | KP_CT_F_HAIRPIN);
	/* states a packet without SYN, FIN or RST leaves as they are (kp_ct_next_state); a DSR flow stays
	 * SYN_SENT here: its replies bypass this node */
	int state_kept = x->proto == IPPROTO_TCP ? v->state == KP_CT_ESTABLISHED || v->state == KP_CT_SYN_SENT
						 : v->state == KP_CT_UDP;
	struct bpf_fib_lookup *fib;
	struct kp_config *cfg;
	struct kp_ct4_val fv;
	__be32 nat_addr = v->nat_addr, snat_addr = v->snat_addr, front_addr = x->ip->daddr, src, dst;
	__be16 nat_port = v->nat_port, snat_port = v->snat_port, front_port = x->ports[1];
	__u32 extra = 0, len = x->len;
	int opt = 0, ipip = 0;

	/* the flows of this node's DSR backends (kp_dsr_rx: LOCAL_BE with a DSR flag) are not forwarded */
	if (!(v->flags & KP_CT_F_EXTERNAL) || (mode & KP_CT_F_HAIRPIN) || !state_kept || x->ip->ttl <= 1 ||
	    ((v->flags & KP_CT_F_LOCAL_BE) && (mode & (KP_CT_F_DSR_OPT | KP_CT_F_DSR_IPIP))) ||
	    !kp_xfollowable(x, v))
		return XDP_PASS;
	cfg = kp_config();
	fib = kp_fib_room();
	if (!cfg || !fib)
		return XDP_PASS;
	if (mode) {
		src = x->ip->saddr;
		dst = nat_addr;
		if (mode & KP_CT_F_SNAT) {
			src = snat_addr;
		} else {
			opt = x->proto == IPPROTO_UDP;   /* kp_dsr_wants_opt: every datagram; TCP only its SYN */
			ipip = !!(mode & KP_CT_F_DSR_IPIP);
			extra = (opt ? KP_DSR_OPT_LEN : 0) + (ipip ? KP_IPIP_HLEN : 0);
			if (ipip) {
				src = cfg->node_addr;
				dst = snat_addr;
			}
		}
		/* XDP sends out only where it came in: a frame redirected to another device is dropped
		 * unless that device takes XDP frames (a bridge, a VLAN, a tunnel, a veth without XDP do not) */
		if (kp_xfib(ctx, fib, src, dst, bpf_ntohs(x->ip->tot_len) + extra) ||
		    fib->ifindex != ctx->ingress_ifindex)
			return XDP_PASS;
	}
	/* due a refresh: written as kp_from_netdev would (state and flags as they are), so no packet of the
	 * flow takes the slower path and arrives after later ones */
	if (!kp_xfresh(v->state, v->expires_ns, now)) {
		fv = *v;
		kp_ct_touch4(fk, &fv, fv.state, fv.flags, now);
	}
	if (extra && kp_xroom(ctx, x, extra))
		goto fail;   /* the head moved: the packet cannot go back to the stack as it was */
	kp_xnat(x, 1, nat_addr, nat_port);
	kp_count4(KP_STAT_DNAT, len);
	if (!mode) {
		/*
		 * A backend on this node: DNATed, the stack delivers it. kp_from_netdev then finds no frontend
		 * for it (two misses: the frontend and the SNAT lookup). Telling it so through XDP metadata
		 * would save those: this kernel's XDP programs may not call bpf_xdp_adjust_meta (the verifier:
		 * "program of this type cannot use helper").
		 */
		kp_count4(KP_STAT_XDP_LOCAL, len);
		return XDP_PASS;
	}
	kp_xttl_dec(x->ip);
	if (mode & KP_CT_F_SNAT) {
		kp_xnat(x, 0, snat_addr, snat_port);
		kp_count4(KP_STAT_SNAT, len);
	} else {
		if (extra && kp_xdsr_layout(ctx, extra, opt, ipip, cfg->node_addr, snat_addr, front_addr, front_port))
			goto fail;
		kp_count4(ipip ? KP_STAT_DSR_IPIP_TX : opt ? KP_STAT_DSR_OPT_TX : KP_STAT_DSR_FWD, len);
	}
	kp_count4(KP_STAT_XDP_FWD, len);
	return kp_xsend(ctx, fib);
fail:
	kp_count4(KP_DROP_ENCAP_FAILED, len);
	return XDP_DROP;
}

/* A backend's reply to a SNATed flow (kp_snat_revnat4's job), when its flow is established already. */
static __always_inline int kp_xdp_snat_reply(struct xdp_md *ctx, struct kp_xpkt *x, __u64 now)
{
	struct kp_snat4_key sk = {
		.saddr = x->ip->saddr, .daddr = x->ip->daddr, .sport = x->ports[0], .dport = x->ports[1],
		.proto = x->proto,
	};
	__u8 want_state = x->proto == IPPROTO_TCP ? KP_CT_ESTABLISHED : KP_CT_UDP;
	struct kp_ct4_key fk = { .proto = x->proto, .dir = KP_CT_DIR_FWD };
	struct bpf_fib_lookup *fib;
	struct kp_snat4_val *sv;
	struct kp_ct4_val *cur, fv;
	__be32 client_addr, front_addr;
	__be16 client_port, front_port;

	sv = bpf_map_lookup_elem(&kp_snat4_v1, &sk);
	if (!sv || sv->expires_ns < now)
		return XDP_PASS;
	client_addr = sv->client_addr;
	front_addr = sv->front_addr;
	client_port = sv->client_port;
	front_port = sv->front_port;
	fk.saddr = client_addr;
	fk.daddr = front_addr;
	fk.sport = client_port;
	fk.dport = front_port;
	/* kp_snat_revnat4 changes the flow's entry with its first reply (SEEN_REPLY, ESTABLISHED): that
	 * packet is its */
	cur = bpf_map_lookup_elem(&kp_ct4_v1, &fk);
	if (!cur || cur->expires_ns < now || !(cur->flags & KP_CT_F_SEEN_REPLY) || cur->state != want_state ||
	    x->ip->ttl <= 1)
		return XDP_PASS;
	fib = kp_fib_room();
	if (!fib || kp_xfib(ctx, fib, front_addr, client_addr, bpf_ntohs(x->ip->tot_len)) ||
	    fib->ifindex != ctx->ingress_ifindex)
		return XDP_PASS;
	if (!kp_xfresh(cur->state, cur->expires_ns, now)) {
		fv = *cur;
		kp_ct_touch4(&fk, &fv, fv.state, fv.flags, now);
	}
	kp_xnat(x, 1, client_addr, client_port);
	kp_xnat(x, 0, front_addr, front_port);
	kp_xttl_dec(x->ip);
	kp_count4(KP_STAT_SNAT_REVNAT, x->len);
	kp_count4(KP_STAT_XDP_FWD, x->len);
	return kp_xsend(ctx, fib);
}

/* ---- IPv6: as above, with 16-byte addresses (no header checksum; the L4 checksum's pseudo-header) ---- */
/* Room for a flow's entry being refreshed (kp_scratch's: XDP and TC never run nested on one CPU). */
static __always_inline struct kp_ct6_val *kp_xscratch6(void)
{
	__u32 zero = 0;
	struct kp_scratch *s = bpf_map_lookup_elem(&kp_scratch, &zero);

	return s ? &s->ct6_val : NULL;
}

struct kp_xpkt6 {
	struct ethhdr *eth;
	struct ipv6hdr *ip;
	__be16 *ports;     /* source, destination */
	__u16 *l4_csum;
	__u32 len;         /* frame length, for the counters */
	__u8 proto;
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

	kp_xcsum16(x->l4_csum, a, &addr);   /* the pseudo-header */
	kp_xcsum2(x->l4_csum, *pt, port);
	if (x->proto == IPPROTO_UDP && *x->l4_csum == 0)
		*x->l4_csum = 0xffff;
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
	fib->ifindex = ctx->ingress_ifindex;
	fib->tot_len = tot_len;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0) == BPF_FIB_LKUP_RET_SUCCESS &&
			       fib->ifindex == ctx->ingress_ifindex ? 0 : -1;
}

/* kp_xroom for IPv6 (x's L4 header follows the fixed one: kp_xdp6 takes no extension header). */
static __always_inline int kp_xroom6(struct xdp_md *ctx, struct kp_xpkt6 *x, __u32 extra)
{
	void *data, *end;

	if (bpf_xdp_adjust_head(ctx, -(int)extra))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (extra > KP_DSR6_HDR_LEN + KP_IP6IP6_HLEN)
		return -1;
	x->eth = data + extra;
	x->ip = (void *)(x->eth + 1);
	x->ports = (void *)(x->ip + 1);
	if ((void *)(x->ip + 1) + sizeof(struct udphdr) > end)
		return -1;
	if (x->proto == IPPROTO_UDP) {
		x->l4_csum = (__u16 *)&((struct udphdr *)(x->ip + 1))->check;
	} else {
		struct tcphdr *th = (void *)(x->ip + 1);

		if ((void *)(th + 1) > end)
			return -1;
		x->l4_csum = (__u16 *)&th->check;
	}
	return 0;
}

/* kp_xdsr_layout for IPv6: the destination options header of kp_dsr_opt_push6, the outer header of
 * kp_tunnel_push6 (the inner header's first word, then the tunnel's length, next header and hop limit). */
static __always_inline int kp_xdsr_layout6(struct xdp_md *ctx, __u32 extra, int opt, int tunnel,
					   const union kp_in6 *saddr, const union kp_in6 *daddr,
					   const union kp_in6 *svc_addr, __be16 svc_port)
{
	struct kp_dsr6_opt o = {
		.hdrlen = KP_DSR6_HDR_LEN / 8 - 1, .type = KP_DSR6_OPT_TYPE, .len = KP_DSR6_OPT_LEN,
		.port = svc_port,
	};
	struct ipv6hdr ip, outer;
	struct ethhdr eth;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;

	if (extra > KP_DSR6_HDR_LEN + KP_IP6IP6_HLEN || data + extra + sizeof(eth) + sizeof(ip) > end)
		return -1;
	__builtin_memcpy(&eth, data + extra, sizeof(eth));
	__builtin_memcpy(&ip, data + extra + sizeof(eth), sizeof(ip));
	if (opt) {
		o.nexthdr = ip.nexthdr;
		o.addr = *svc_addr;
		ip.nexthdr = IPPROTO_DSTOPTS;
		ip.payload_len = bpf_htons(bpf_ntohs(ip.payload_len) + KP_DSR6_HDR_LEN);
	}
	__builtin_memcpy(data, &eth, sizeof(eth));
	if (tunnel) {
		outer = ip;
		outer.payload_len = bpf_htons(KP_IP6_HLEN + bpf_ntohs(ip.payload_len));
		outer.nexthdr = IPPROTO_IPV6;
		outer.hop_limit = KP_IPIP_TTL;
		__builtin_memcpy(&outer.saddr, saddr, sizeof(*saddr));
		__builtin_memcpy(&outer.daddr, daddr, sizeof(*daddr));
		if (data + sizeof(eth) + sizeof(outer) + sizeof(ip) > end)
			return -1;
		__builtin_memcpy(data + sizeof(eth), &outer, sizeof(outer));
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

static __always_inline int kp_xfollowable6(const struct kp_xpkt6 *x, const struct kp_ct6_val *v)
{
	struct kp_svc6_key sk = { .port = x->ports[1], .slot = 0, .proto = x->proto, .scope = KP_SCOPE_EXT };
	struct kp_svc4_val *svc;
	__u32 id = v->backend_id;

	__builtin_memcpy(&sk.addr, &x->ip->daddr, sizeof(sk.addr));
	svc = bpf_map_lookup_elem(&kp_svc6_v1, &sk);
	if (!svc || !svc->count)
		return 0;
	if (!(svc->flags & KP_SVC_F_TYPED) && kp_no_external_cluster_ip())
		return 0;
	return id && bpf_map_lookup_elem(&kp_be6_v1, &id) != NULL;
}

/* kp_xdp_forward for IPv6 (kp_lb_xlate6). */
static __always_inline int kp_xdp_forward6(struct xdp_md *ctx, struct kp_xpkt6 *x, const struct kp_ct6_key *fk,
					  const struct kp_ct6_val *v, __u64 now)
{
	__u8 mode = v->flags & (KP_CT_F_SNAT | KP_CT_F_DSR_OPT | KP_CT_F_DSR_IPIP | KP_CT_F_HAIRPIN);
	int state_kept = x->proto == IPPROTO_TCP ? v->state == KP_CT_ESTABLISHED || v->state == KP_CT_SYN_SENT
						 : v->state == KP_CT_UDP;
	struct bpf_fib_lookup *fib;
	struct kp_config6 *c6;
	struct kp_ct6_val *fv;
	union kp_in6 nat_addr = v->nat_addr, snat_addr = v->snat_addr, front_addr, src, dst, node;
	__be16 nat_port = v->nat_port, snat_port = v->snat_port, front_port = x->ports[1];
	__u32 extra = 0, len = x->len;
	int opt = 0, tunnel = 0;

	if (!(v->flags & KP_CT_F_EXTERNAL) || (mode & KP_CT_F_HAIRPIN) || !state_kept || x->ip->hop_limit <= 1 ||
	    ((v->flags & KP_CT_F_LOCAL_BE) && (mode & (KP_CT_F_DSR_OPT | KP_CT_F_DSR_IPIP))) ||
	    !kp_xfollowable6(x, v))
		return XDP_PASS;
	__builtin_memcpy(&front_addr, &x->ip->daddr, sizeof(front_addr));
	fib = kp_fib_room();
	c6 = kp_config6();
	if (!fib || !c6)
		return XDP_PASS;
	node = c6->node_addr;
	if (mode) {
		__builtin_memcpy(&src, &x->ip->saddr, sizeof(src));
		dst = nat_addr;
		if (mode & KP_CT_F_SNAT) {
			src = snat_addr;
		} else {
			opt = x->proto == IPPROTO_UDP;
			tunnel = !!(mode & KP_CT_F_DSR_IPIP);
			extra = (opt ? KP_DSR6_HDR_LEN : 0) + (tunnel ? KP_IP6IP6_HLEN : 0);
			if (tunnel) {
				src = node;
				dst = snat_addr;
			}
		}
		if (kp_xfib6(ctx, fib, &src, &dst, KP_IP6_HLEN + bpf_ntohs(x->ip->payload_len) + extra))
			return XDP_PASS;
	}
	if (!kp_xfresh(v->state, v->expires_ns, now) && (fv = kp_xscratch6())) {
		*fv = *v;
		kp_ct_touch6(fk, fv, fv->state, fv->flags, now);
	}
	if (extra && kp_xroom6(ctx, x, extra))
		goto fail;
	kp_xnat6(x, 1, nat_addr, nat_port);
	kp_count6(KP_STAT_DNAT, len);
	if (!mode) {
		kp_count6(KP_STAT_XDP_LOCAL, len);
		return XDP_PASS;
	}
	x->ip->hop_limit--;
	if (mode & KP_CT_F_SNAT) {
		kp_xnat6(x, 0, snat_addr, snat_port);
		kp_count6(KP_STAT_SNAT, len);
	} else {
		if (extra && kp_xdsr_layout6(ctx, extra, opt, tunnel, &node, &snat_addr, &front_addr, front_port))
			goto fail;
		kp_count6(tunnel ? KP_STAT_DSR_IPIP_TX : opt ? KP_STAT_DSR_OPT_TX : KP_STAT_DSR_FWD, len);
	}
	kp_count6(KP_STAT_XDP_FWD, len);
	return kp_xsend(ctx, fib);
fail:
	kp_count6(KP_DROP_ENCAP_FAILED, len);
	return XDP_DROP;
}

/* kp_xdp_snat_reply for IPv6 (kp_snat_revnat6). */
static __always_inline int kp_xdp_snat_reply6(struct xdp_md *ctx, struct kp_xpkt6 *x, __u64 now)
{
	struct kp_snat6_key sk = { .sport = x->ports[0], .dport = x->ports[1], .proto = x->proto };
	__u8 want_state = x->proto == IPPROTO_TCP ? KP_CT_ESTABLISHED : KP_CT_UDP;
	struct kp_ct6_key fk = { .proto = x->proto, .dir = KP_CT_DIR_FWD };
	struct bpf_fib_lookup *fib;
	struct kp_snat6_val *sv;
	struct kp_ct6_val *cur, *fv;
	union kp_in6 client_addr, front_addr;
	__be16 client_port, front_port;

	__builtin_memcpy(&sk.saddr, &x->ip->saddr, sizeof(sk.saddr));
	__builtin_memcpy(&sk.daddr, &x->ip->daddr, sizeof(sk.daddr));
	sv = bpf_map_lookup_elem(&kp_snat6_v1, &sk);
	if (!sv || sv->expires_ns < now)
		return XDP_PASS;
	client_addr = sv->client_addr;
	front_addr = sv->front_addr;
	client_port = sv->client_port;
	front_port = sv->front_port;
	fk.saddr = client_addr;
	fk.daddr = front_addr;
	fk.sport = client_port;
	fk.dport = front_port;
	cur = bpf_map_lookup_elem(&kp_ct6_v1, &fk);
	if (!cur || cur->expires_ns < now || !(cur->flags & KP_CT_F_SEEN_REPLY) || cur->state != want_state ||
	    x->ip->hop_limit <= 1)
		return XDP_PASS;
	fib = kp_fib_room();
	if (!fib || kp_xfib6(ctx, fib, &front_addr, &client_addr, KP_IP6_HLEN + bpf_ntohs(x->ip->payload_len)))
		return XDP_PASS;
	if (!kp_xfresh(cur->state, cur->expires_ns, now) && (fv = kp_xscratch6())) {
		*fv = *cur;
		kp_ct_touch6(&fk, fv, fv->state, fv->flags, now);
	}
	kp_xnat6(x, 1, client_addr, client_port);
	kp_xnat6(x, 0, front_addr, front_port);
	x->ip->hop_limit--;
	kp_count6(KP_STAT_SNAT_REVNAT, x->len);
	kp_count6(KP_STAT_XDP_FWD, x->len);
	return kp_xsend(ctx, fib);
}

/* An IPv6 frame: TCP or UDP right after the fixed header (a flow with extension headers is SNATed by
 * kp_from_netdev6 and stays its), its length within the frame. */
static __attribute__((noinline)) int kp_xdp6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 len = end - data;
	struct kp_xpkt6 x = { .eth = eth, .len = len };
	struct kp_ct6_key fk = { .dir = KP_CT_DIR_FWD };
	struct ipv6hdr *ip = (void *)(eth + 1);
	struct kp_ct6_val *v;
	__u64 now;

	if (!ctx || (void *)(eth + 1) > end)
		return XDP_PASS;
	if ((void *)(ip + 1) > end || ip->version != 6 ||
	    KP_IP6_HLEN + bpf_ntohs(ip->payload_len) + sizeof(struct ethhdr) > len ||
	    bpf_ntohs(ip->payload_len) < sizeof(struct udphdr))
		return XDP_PASS;
	x.ip = ip;
	x.proto = ip->nexthdr;
	x.ports = (void *)(ip + 1);
	if (x.proto == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(ip + 1);

		if ((void *)(th + 1) > end || th->syn || th->fin || th->rst ||
		    bpf_ntohs(ip->payload_len) < sizeof(*th))
			return XDP_PASS;
		x.l4_csum = (__u16 *)&th->check;
	} else if (x.proto == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(ip + 1);

		if ((void *)(uh + 1) > end)
			return XDP_PASS;
		x.l4_csum = (__u16 *)&uh->check;
	} else {
		return XDP_PASS;
	}
	now = bpf_ktime_get_ns();
	__builtin_memcpy(&fk.saddr, &ip->saddr, sizeof(fk.saddr));
	__builtin_memcpy(&fk.daddr, &ip->daddr, sizeof(fk.daddr));
	fk.sport = x.ports[0];
	fk.dport = x.ports[1];
	fk.proto = x.proto;
	v = bpf_map_lookup_elem(&kp_ct6_v1, &fk);
	if (v && v->expires_ns >= now)
		return kp_xdp_forward6(ctx, &x, &fk, v, now);
	return kp_xdp_snat_reply6(ctx, &x, now);
}


/* An IPv4 frame (or of no family: counted here). A function of its own, as kp_xdp6: each has its stack. */
static __attribute__((noinline)) int kp_xdp4(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct kp_xpkt x = { .eth = data, .len = end - data };
	struct kp_ct4_key fk = { .dir = KP_CT_DIR_FWD };
	struct kp_ct4_val *v;
	struct iphdr *ip;
	__u64 now;

	if (!ctx || (void *)(x.eth + 1) > end)
		return XDP_PASS;
	kp_count4(KP_STAT_FROM_XDP, x.len);
	if (x.eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip = (void *)(x.eth + 1);
	/* as kp_parse4 takes them: IPv4 without options, not a fragment, its length within the frame (as
	 * a number: the verifier follows no bound through a pointer moved by a packet field) */
	if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl != 5 ||
	    (ip->frag_off & bpf_htons(KP_IP_MF | KP_IP_OFFSET)) ||
	    bpf_ntohs(ip->tot_len) + sizeof(struct ethhdr) > x.len ||
	    bpf_ntohs(ip->tot_len) < sizeof(*ip) + sizeof(struct udphdr))
		return XDP_PASS;
	x.ip = ip;
	x.proto = ip->protocol;
	x.ports = (void *)(ip + 1);
	if (x.proto == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(ip + 1);

		if ((void *)(th + 1) > end || th->syn || th->fin || th->rst ||
		    bpf_ntohs(ip->tot_len) < sizeof(*ip) + sizeof(*th))
			return XDP_PASS;
		x.l4_csum = (__u16 *)&th->check;
	} else if (x.proto == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(ip + 1);

		if ((void *)(uh + 1) > end)
			return XDP_PASS;
		x.l4_csum = uh->check ? (__u16 *)&uh->check : NULL;
	} else {
		return XDP_PASS;
	}
	now = bpf_ktime_get_ns();
	fk.saddr = ip->saddr;
	fk.daddr = ip->daddr;
	fk.sport = x.ports[0];
	fk.dport = x.ports[1];
	fk.proto = x.proto;
	v = bpf_map_lookup_elem(&kp_ct4_v1, &fk);
	if (v && v->expires_ns >= now)
		return kp_xdp_forward(ctx, &x, &fk, v, now);
	return kp_xdp_snat_reply(ctx, &x, now);
}

static __always_inline int kp_xdp_main(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) <= end && eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		kp_count6(KP_STAT_FROM_XDP, end - data);
		return kp_xdp6(ctx);
	}
	return kp_xdp4(ctx);
}

#endif /* KPROXY_LIB_XDP_H */
