/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * kproxy TC programs: thin entry points that parse, then dispatch to bpfsrc/lib/.
 * Every program returns TC_ACT_OK for anything it does not translate, byte for byte unchanged.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/ct.h"
#include "lib/nat.h"
#include "lib/icmp.h"
#include "lib/lb.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline int kp_parse_counted(struct __sk_buff *skb, struct kp_pkt *p)
{
	int ret = kp_parse4(skb, p);

	if (ret == KP_PARSE_FRAG)
		kp_count(KP_STAT_PASS_FRAGMENT, skb->len);
	return ret;
}

/* Hook: tc ingress of a pod's host-side veth. Direction: pod -> node (what the pod sends). */
SEC("tc")
int kp_from_pod(struct __sk_buff *skb)
{
	struct kp_svc4_key svc_key;
	struct kp_svc4_val *svc;
	struct kp_pkt p;

	kp_count(KP_STAT_FROM_POD, skb->len);
	switch (kp_parse_counted(skb, &p)) {
	case KP_PARSE_L4:
		svc = kp_svc_lookup(&p, KP_ORIGIN_POD, &svc_key);
		if (svc)
			return kp_lb4_forward(skb, &p, &svc_key, svc, 0);
		return kp_revnat4(skb, &p);
	case KP_PARSE_ICMP:
		return kp_icmp_revnat(skb, &p);
	}
	return TC_ACT_OK;
}

/* Hook: tc egress of a pod's host-side veth. Direction: node -> pod (replies of remote backends). */
SEC("tc")
int kp_to_pod(struct __sk_buff *skb)
{
	struct kp_pkt p;

	kp_count(KP_STAT_TO_POD, skb->len);
	switch (kp_parse_counted(skb, &p)) {
	case KP_PARSE_L4:
		return kp_revnat4(skb, &p);
	case KP_PARSE_ICMP:
		return kp_icmp_revnat(skb, &p);
	}
	return TC_ACT_OK;
}

/* Hook: tc ingress of a node's external interface. Direction: outside -> node (NodePort, LB, ExternalIP). */
SEC("tc")
int kp_from_netdev(struct __sk_buff *skb)
{
	struct kp_svc4_key svc_key;
	struct kp_svc4_val *svc;
	struct kp_pkt p;

	kp_count(KP_STAT_FROM_NETDEV, skb->len);
	if (kp_parse_counted(skb, &p) != KP_PARSE_L4)
		return TC_ACT_OK;
	svc = kp_svc_lookup(&p, KP_ORIGIN_NETDEV, &svc_key);
	if (svc)
		return kp_lb4_forward(skb, &p, &svc_key, svc, KP_CT_F_EXTERNAL);
	return TC_ACT_OK;
}

/* Hook: tc egress of a node's external interface. Direction: node -> outside. Counts only (SNAT: issue 4). */
SEC("tc")
int kp_to_netdev(struct __sk_buff *skb)
{
	kp_count(KP_STAT_TO_NETDEV, skb->len);
	return TC_ACT_OK;
}
