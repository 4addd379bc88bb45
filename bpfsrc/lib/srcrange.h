/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * loadBalancerSourceRanges, as kube-proxy's KUBE-FW chains: a new flow to a LoadBalancer IP of a
 * Service with source ranges is dropped unless its source is in one of them. Only new flows are
 * checked (as kube-proxy's firewall matches ctstate NEW): established flows keep going when the
 * ranges change. ClusterIP, NodePort and external IP frontends never carry the flag.
 */
#ifndef KPROXY_LIB_SRCRANGE_H
#define KPROXY_LIB_SRCRANGE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "lib/parse.h"
#include "lib/stats.h"

/* 1 (counted KP_DROP_SRC_RANGE) when the frontend restricts sources and p's source is not allowed. */
static __always_inline int kp_src_range_drop4(const struct kp_svc4_val *svc, const struct kp_pkt *p)
{
	struct kp_lbsrc4_key k;

	if (!(svc->flags & KP_SVC_F_SRC_RANGES))
		return 0;
	k.prefixlen = KP_LBSRC4_SVC_BITS + 32;
	k.svc_id = svc->svc_id;
	k.addr = p->saddr;
	if (bpf_map_lookup_elem(&kp_lbsrc4_v1, &k))
		return 0;
	kp_count4(KP_DROP_SRC_RANGE, p->len);
	return 1;
}

static __always_inline int kp_src_range_drop6(const struct kp_svc4_val *svc, const struct kp_pkt6 *p)
{
	struct kp_lbsrc6_key k;

	if (!(svc->flags & KP_SVC_F_SRC_RANGES))
		return 0;
	k.prefixlen = KP_LBSRC4_SVC_BITS + 128;
	k.svc_id = svc->svc_id;
	k.addr = p->saddr;
	if (bpf_map_lookup_elem(&kp_lbsrc6_v1, &k))
		return 0;
	kp_count6(KP_DROP_SRC_RANGE, p->len);
	return 1;
}

#endif /* KPROXY_LIB_SRCRANGE_H */
