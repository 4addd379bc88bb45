/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Service lookup, backend selection (random slot, sessionAffinity) and the forward (DNAT) path. */
#ifndef KPROXY_LIB_LB_H
#define KPROXY_LIB_LB_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "lib/parse.h"
#include "lib/ct.h"
#include "lib/nat.h"
#include "lib/icmp.h"
#include "lib/stats.h"
#include "lib/fib.h"
#include "lib/dsr.h"
#include "lib/snat.h"
#include "lib/srcrange.h"
#include "lib/maglev.h"

/* Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds, used when the entry says 0. */
#define KP_AFFINITY_TIMEOUT_DEFAULT 10800

#define KP_SVC_F_TYPED (KP_SVC_F_NODEPORT | KP_SVC_F_LOADBALANCER | KP_SVC_F_EXTERNAL_IP)

/* ClusterIPs are not served to packets from outside the node (--no-external-cluster-ip). */
static __always_inline int kp_no_external_cluster_ip(void)
{
	struct kp_config *cfg = kp_config();

	return cfg && (cfg->flags & KP_CFG_F_NO_EXTERNAL_CLUSTER_IP);
}

enum kp_origin {
	KP_ORIGIN_POD = 0,     /* packet from a local pod: INT scope for TWO_SCOPES services */
	KP_ORIGIN_NETDEV = 1,  /* packet from outside: EXT scope (kp_from_netdev decides about ClusterIPs) */
};

/* kp_lb_select's use of a KP_SVC_F_MAGLEV frontend's table (lib/lb_fam.h) */
enum kp_lb_maglev {
	KP_LB_NO_MAGLEV = 0,  /* never (the socket hooks: connect() has no source port to hash yet) */
	KP_LB_MAGLEV = 1,     /* a packet's first draw */
	KP_LB_REDRAW = 2,     /* a later draw: the first backend's reply tuple was held, another is wanted */
};

static __always_inline struct kp_ct6_val *kp_scratch_old6(void)
{
	__u32 zero = 0;
	struct kp_scratch *s = bpf_map_lookup_elem(&kp_scratch, &zero);

	return s ? &s->old6 : NULL;
}

#undef KP_FAM
#define KP_FAM 4
#include "lib/fam.h"
#include "lib/lb_fam.h"
#undef KP_FAM
#define KP_FAM 6
#include "lib/fam.h"
#include "lib/lb_fam.h"
#undef KP_FAM

/*
 * Whether a tunnel packet to this node's address is DSR's, judged before anything is removed: its inner
 * packet carries DSR's option where lib/dsr.h puts it, or belongs to a flow this node received through
 * DSR's tunnel (its reply entry says so: later TCP segments carry no option). Anything else (the
 * node's own tunnels, another load balancer's, a forged one) is left to the kernel as it came: an
 * outer header removed here would let anyone who reaches the node's address inject packets with any
 * source. Inner fragments are never DSR's here (a full-sized one does not fit the tunnel).
 */
static __always_inline int kp_tunnel_is_dsr4(struct __sk_buff *skb, const struct kp_pkt *outer)
{
	struct {
		struct iphdr ip;
		__u8 next[4];   /* the first option's type and length, or the L4 ports */
	} in;
	struct kp_ct4_key rk = {};
	struct kp_ct4_val *v;

	if (bpf_skb_load_bytes(skb, KP_IP_OFF + KP_IPIP_HLEN, &in, sizeof(in)) || in.ip.version != 4)
		return 0;
	/* as kp_tunnel_push4 makes them: the outer length is the inner one's plus the outer header */
	if (!outer->tot_len || outer->tot_len != KP_IPIP_HLEN + bpf_ntohs(in.ip.tot_len))
		return 0;
	if (in.ip.ihl > 5)
		return in.next[0] == KP_DSR_OPT_TYPE && in.next[1] == KP_DSR_OPT_LEN;
	if (in.ip.ihl != 5 || (in.ip.protocol != IPPROTO_TCP && in.ip.protocol != IPPROTO_UDP) ||
	    (in.ip.frag_off & bpf_htons(KP_IP_MF | KP_IP_OFFSET)))
		return 0;
	rk.saddr = in.ip.daddr;
	rk.daddr = in.ip.saddr;
	__builtin_memcpy(&rk.sport, &in.next[2], sizeof(rk.sport));
	__builtin_memcpy(&rk.dport, &in.next[0], sizeof(rk.dport));
	rk.proto = in.ip.protocol;
	rk.dir = KP_CT_DIR_REPLY;
	v = bpf_map_lookup_elem(&kp_ct4_v1, &rk);
	return v && (v->flags & KP_CT_F_DSR_IPIP);
}

/* kp_tunnel_is_dsr4 for IPv6-in-IPv6: DSR's destination options header first, or a DSR tunnel flow. */
static __always_inline int kp_tunnel_is_dsr6(struct __sk_buff *skb, const struct kp_pkt6 *outer)
{
	struct {
		struct ipv6hdr ip;
		__u8 next[4];   /* DSR's header: next header, length, option type and length; or the L4 ports */
	} in;
	struct kp_ct6_key rk = {};
	struct kp_ct6_val *v;

	if (bpf_skb_load_bytes(skb, KP_IP6_OFF + KP_IP6IP6_HLEN, &in, sizeof(in)) || in.ip.version != 6)
		return 0;
	/* as kp_tunnel_push6 makes them: the outer payload is the whole inner packet */
	if (!outer->tot_len || outer->tot_len != KP_IP6IP6_HLEN + KP_IP6_HLEN + bpf_ntohs(in.ip.payload_len))
		return 0;
	if (in.ip.nexthdr == IPPROTO_DSTOPTS)
		return in.next[1] == KP_DSR6_HDR_LEN / 8 - 1 && in.next[2] == KP_DSR6_OPT_TYPE &&
		       in.next[3] == KP_DSR6_OPT_LEN;
	if (in.ip.nexthdr != IPPROTO_TCP && in.ip.nexthdr != IPPROTO_UDP)
		return 0;
	__builtin_memcpy(&rk.saddr, &in.ip.daddr, sizeof(rk.saddr));
	__builtin_memcpy(&rk.daddr, &in.ip.saddr, sizeof(rk.daddr));
	__builtin_memcpy(&rk.sport, &in.next[2], sizeof(rk.sport));
	__builtin_memcpy(&rk.dport, &in.next[0], sizeof(rk.dport));
	rk.proto = in.ip.nexthdr;
	rk.dir = KP_CT_DIR_REPLY;
	v = bpf_map_lookup_elem(&kp_ct6_v1, &rk);
	return v && (v->flags & KP_CT_F_DSR_IPIP);
}

#endif /* KPROXY_LIB_LB_H */
