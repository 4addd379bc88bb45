/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The service address space for packets that match no frontend: kube-proxy's cluster-ips-check
 * (REJECT to a ClusterIP's unknown port or protocol, DROP to an unallocated service address).
 */
#ifndef KPROXY_LIB_SVCNET_H
#define KPROXY_LIB_SVCNET_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"
#include "lib/parse.h"
#include "lib/icmp.h"
#include "lib/stats.h"

#define KP_ICMP_ECHO_REQUEST 8

/* Whether the packet would open a flow: the only packets the check applies to (kube-proxy: ct state
 * new), so established traffic of pods pays nothing. */
static __always_inline int kp_svcnet_opens_flow(const struct kp_pkt *p, int parsed)
{
	if (parsed == KP_PARSE_ICMP)
		return p->icmp_type == KP_ICMP_ECHO_REQUEST;
	if (p->proto == IPPROTO_UDP)
		return 1;
	return (p->tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) == KP_TCP_SYN;
}

/*
 * The action for a packet to daddr that matched no frontend: KP_SVCNET_REJECT, KP_SVCNET_DROP, or 0
 * (not a service address). The span check keeps the trie lookup off every other packet.
 */
static __always_inline __u32 kp_svcnet_action4(__be32 daddr)
{
	struct kp_svcnet4_key k = { .prefixlen = 32, .addr = daddr };
	struct kp_svcnet_span *span;
	struct kp_svcnet4_val *v;
	__u32 zero = 0, a = bpf_ntohl(daddr);

	span = bpf_map_lookup_elem(&kp_svcnet_span_v1, &zero);
	if (!span || a < span->lo || a > span->hi)
		return 0;
	v = bpf_map_lookup_elem(&kp_svcnet4_v1, &k);
	return v ? v->action : 0;
}

/* Whether daddr lies within the service address space's span (where ClusterIPs are). */
static __always_inline int kp_svcnet_span_has(__be32 daddr)
{
	struct kp_svcnet_span *span;
	__u32 zero = 0, a = bpf_ntohl(daddr);

	span = bpf_map_lookup_elem(&kp_svcnet_span_v1, &zero);
	return span && a >= span->lo && a <= span->hi;
}

/* Apply the action to a flow-opening packet: TC verdict, or -1 to let it pass. */
static __always_inline int kp_svcnet_enforce(struct __sk_buff *skb, const struct kp_pkt *p, __u32 action)
{
	if (action == KP_SVCNET_REJECT) {
		kp_count4(KP_STAT_SVCNET_REJECT, p->len);
		return kp_icmp_reject4(skb, p);
	}
	if (action == KP_SVCNET_DROP) {
		kp_count4(KP_DROP_SVCNET, p->len);
		return TC_ACT_SHOT;
	}
	return -1;
}

/* ---- IPv6: kp_svcnet6_v1, its span over the upper 64 bits ---- */

static __always_inline int kp_svcnet_opens_flow6(const struct kp_pkt6 *p, int parsed)
{
	if (parsed == KP_PARSE_ICMP)
		return p->icmp_type == KP_ICMP6_ECHO_REQUEST;
	if (p->proto == IPPROTO_UDP)
		return 1;
	return (p->tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) == KP_TCP_SYN;
}

/* The upper 64 bits of an address, host byte order: what kp_svcnet6_span compares. */
static __always_inline __u64 kp_in6_hi64(union kp_in6 a)
{
	return ((__u64)bpf_ntohl(a.w[0]) << 32) | bpf_ntohl(a.w[1]);
}

static __always_inline int kp_svcnet_span_has6(union kp_in6 daddr)
{
	struct kp_svcnet6_span *span;
	__u32 zero = 0;
	__u64 a = kp_in6_hi64(daddr);

	span = bpf_map_lookup_elem(&kp_svcnet6_span_v1, &zero);
	return span && a >= span->lo && a <= span->hi;
}

/* kp_svcnet_action4 for IPv6. */
static __always_inline __u32 kp_svcnet_action6(union kp_in6 daddr)
{
	struct kp_svcnet6_key k = { .prefixlen = 128, .addr = daddr };
	struct kp_svcnet4_val *v;

	if (!kp_svcnet_span_has6(daddr))
		return 0;
	v = bpf_map_lookup_elem(&kp_svcnet6_v1, &k);
	return v ? v->action : 0;
}

static __always_inline int kp_svcnet_enforce6(struct __sk_buff *skb, const struct kp_pkt6 *p, __u32 action)
{
	if (action == KP_SVCNET_REJECT) {
		kp_count6(KP_STAT_SVCNET_REJECT, p->len);
		return kp_icmp_reject6(skb, p);
	}
	if (action == KP_SVCNET_DROP) {
		kp_count6(KP_DROP_SVCNET, p->len);
		return TC_ACT_SHOT;
	}
	return -1;
}

#endif /* KPROXY_LIB_SVCNET_H */
