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
#include "lib/svcnet.h"
#include "lib/srcrange.h"
#include "lib/xdp.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline int kp_parse_counted(struct __sk_buff *skb, struct kp_pkt *p)
{
	int ret = kp_parse4(skb, p);

	if (ret == KP_PARSE_FRAG)
		kp_count4(KP_STAT_PASS_FRAGMENT, skb->len);
	else if (ret == KP_PARSE_L4) {
		__u32 frag = kp_frag_get();

		if (frag)
			kp_count4(frag == KP_FRAG_FIRST ? KP_STAT_FRAG_FIRST : KP_STAT_FRAG_LATER, skb->len);
	}
	return ret;
}

/* An ICMP error about a SNATed flow, translated by kp_icmp_snat(), forwarded to the client; -1 if the
 * packet is no such error. */
static __always_inline int kp_icmp_snat_forward(struct __sk_buff *skb, const struct kp_pkt *p)
{
	struct bpf_fib_lookup *fib;
	__be32 dst = 0, src = 0;
	int res;

	res = kp_icmp_snat(skb, p, &dst, &src);
	if (res == 0)
		return -1;
	if (res < 0) {
		kp_count4(KP_DROP_NAT_FAILED, p->len);
		return TC_ACT_SHOT;
	}
	fib = kp_fib_room();
	res = kp_fib_lookup4(skb, fib, src, dst, 0);
	if (res != KP_FIB_OK && res != KP_FIB_NEIGH) {
		kp_count4(KP_DROP_FIB, p->len);
		return TC_ACT_SHOT;
	}
	kp_count4(KP_STAT_ICMP_SNAT, p->len);
	return kp_fib_redirect4(skb, fib, res);
}

/*
 * Hook: tc ingress of a pod's host-side veth. Direction: pod -> node (what the pod sends).
 *   to a service frontend: DNAT (kp_lb4_forward, scope INT for TWO_SCOPES services)
 *   a reply of a flow DNATed to this pod: the frontend restored as its source (kp_revnat4)
 *   a reply to this node's address of a flow SNATed to this pod: the client restored, forwarded to it.
 *     An ingress node SNATs to a backend it does not know as local (an EndpointSlice without nodeName
 *     names a pod of this node), so that reply arrives here, not on the netdev.
 */
static __always_inline int kp_from_pod4(struct __sk_buff *skb)
{
	struct kp_svc4_key svc_key;
	struct kp_svc4_val *svc;
	struct kp_config *cfg;
	struct kp_pkt p;
	int ret;

	switch (kp_parse_counted(skb, &p)) {
	case KP_PARSE_L4:
		svc = kp_svc_lookup4(&p, KP_ORIGIN_POD, &svc_key);
		if (svc)
			return kp_lb_forward4(skb, &p, &svc_key, svc, KP_ORIGIN_POD);
		if (kp_svcnet_opens_flow(&p, KP_PARSE_L4)) {
			ret = kp_svcnet_enforce(skb, &p, kp_svcnet_action4(p.daddr));
			if (ret >= 0)
				return ret;
		} else if (p.proto == IPPROTO_TCP && kp_svcnet_span_has(p.daddr)) {
			/* a connection to a ClusterIP port deleted while it lived */
			ret = kp_ct_continue4(skb, &p);
			if (ret >= 0)
				return ret;
		}
		kp_ct_direct_syn4(&p, bpf_ktime_get_ns());
		cfg = kp_config();
		if (cfg && cfg->node_addr && p.daddr == cfg->node_addr) {
			ret = kp_snat_revnat4(skb, &p);
			if (ret >= 0)
				return ret;
		}
		return kp_revnat4(skb, &p, 1);
	case KP_PARSE_ICMP:
		if (kp_svcnet_opens_flow(&p, KP_PARSE_ICMP)) {
			ret = kp_svcnet_enforce(skb, &p, kp_svcnet_action4(p.daddr));
			if (ret >= 0)
				return ret;
		}
		/* An error this pod sends about a flow SNATed to it (it answers the node's address). */
		cfg = kp_config();
		if (cfg && cfg->node_addr && p.daddr == cfg->node_addr) {
			ret = kp_icmp_snat_forward(skb, &p);
			if (ret >= 0)
				return ret;
		}
		return kp_icmp_revnat(skb, &p);
	}
	return TC_ACT_OK;
}

/* Hook: tc egress of a pod's host-side veth. Direction: node -> pod (replies of remote backends). */
static __always_inline int kp_to_pod4(struct __sk_buff *skb)
{
	struct kp_pkt p;

	switch (kp_parse_counted(skb, &p)) {
	case KP_PARSE_L4:
		return kp_revnat4(skb, &p, 0);
	case KP_PARSE_ICMP:
		return kp_icmp_revnat(skb, &p);
	}
	return TC_ACT_OK;
}

/*
 * A TCP packet from outside that matched no frontend and does not open a flow, while the agent says a
 * frontend was deleted recently (kp_config.orphan_until_ns): it may belong to a connection that
 * outlived its Service port (kp_lb4_forward with no svc). Other times no conntrack lookup is paid.
 */
static __always_inline int kp_netdev_orphan_possible(__u8 proto, __u8 tcp_flags)
{
	struct kp_config *cfg;

	if (proto != IPPROTO_TCP || (tcp_flags & (KP_TCP_SYN | KP_TCP_ACK)) == KP_TCP_SYN)
		return 0;
	cfg = kp_config();
	return cfg && cfg->orphan_until_ns > bpf_ktime_get_ns();
}

/* A flow-opening packet from outside that matched no frontend, to the service address space. With
 * ClusterIPs closed to the outside, a ClusterIP's unknown port is dropped too, not answered. */
static __always_inline int kp_netdev_svcnet(struct __sk_buff *skb, const struct kp_pkt *p)
{
	__u32 action = kp_svcnet_action4(p->daddr);

	if (action == KP_SVCNET_REJECT && kp_no_external_cluster_ip()) {
		kp_count4(KP_DROP_CLUSTER_IP_EXTERNAL, p->len);
		return TC_ACT_SHOT;
	}
	return kp_svcnet_enforce(skb, p, action);
}

static __always_inline int kp_netdev_svcnet6(struct __sk_buff *skb, const struct kp_pkt6 *p)
{
	__u32 action = kp_svcnet_action6(p->daddr);

	if (action == KP_SVCNET_REJECT && kp_no_external_cluster_ip()) {
		kp_count6(KP_DROP_CLUSTER_IP_EXTERNAL, p->len);
		return TC_ACT_SHOT;
	}
	return kp_svcnet_enforce6(skb, p, action);
}

/* kp_from_netdev4's TCP, UDP and SCTP packets (p: parsed, KP_PARSE_L4). */
static __always_inline int kp_netdev_l4_4(struct __sk_buff *skb, struct kp_pkt *p)
{
	struct kp_svc4_key svc_key;
	struct kp_svc4_val *svc;
	int ret;

	svc = kp_svc_lookup4(p, KP_ORIGIN_NETDEV, &svc_key);
	if (svc && !(svc->flags & KP_SVC_F_TYPED) && kp_no_external_cluster_ip()) {
		kp_count4(KP_DROP_CLUSTER_IP_EXTERNAL, p->len);
		return TC_ACT_SHOT;
	}
	if (svc || kp_netdev_orphan_possible(p->proto, p->tcp_flags)) {
		ret = kp_lb_forward4(skb, p, &svc_key, svc, KP_ORIGIN_NETDEV);
		if (ret >= 0)
			return ret;
	}
	if (kp_svcnet_opens_flow(p, KP_PARSE_L4)) {
		ret = kp_netdev_svcnet(skb, p);
		if (ret >= 0)
			return ret;
	}
	/* SCTP never takes DSR (kp_flow_mode): no option to look for */
	if (p->ip_hlen > sizeof(struct iphdr) && p->proto != KP_IPPROTO_SCTP) {
		ret = kp_dsr_rx4(skb, p, KP_CT_F_DSR_OPT);
		if (ret >= 0)
			return ret;
	}
	kp_ct_direct_syn4(p, bpf_ktime_get_ns());
	ret = kp_snat_revnat4(skb, p);
	return ret < 0 ? TC_ACT_OK : ret;
}

/*
 * Hook: tc ingress of a node's external interface. Direction: outside -> node.
 *   NodePort / LoadBalancer / ExternalIP frontends (scope EXT): DNAT, and SNAT or DSR to remote backends
 *   ClusterIPs routed to this node (BGP, static routes), as kube-proxy serves them, unless the agent
 *   set KP_CFG_F_NO_EXTERNAL_CLUSTER_IP; their unknown ports rejected, unallocated service addresses
 *   dropped (lib/svcnet.h)
 *   IPIP to this node, or the DSR option: DSR from an ingress node to a local backend
 *   replies of SNATed flows and ICMP errors about them: back to the client
 *   packets of connections whose frontend was deleted while they lived: translated as before
 */
static __always_inline int kp_from_netdev4(struct __sk_buff *skb)
{
	struct kp_config *cfg;
	struct kp_pkt p;
	int ret;
	switch (kp_parse_counted(skb, &p)) {
	case KP_PARSE_IPIP:
		cfg = kp_config();
		if (!cfg || !cfg->node_addr || p.daddr != cfg->node_addr || p.ip_hlen != sizeof(struct iphdr) ||
		    !kp_tunnel_is_dsr4(skb, &p))
			return TC_ACT_OK;
		if (kp_tunnel_pop4(skb)) {
			kp_count4(KP_DROP_ENCAP_FAILED, p.len);
			return TC_ACT_SHOT;
		}
		/* SCTP never takes DSR (kp_flow_mode) */
		if (kp_parse4(skb, &p) != KP_PARSE_L4 || p.proto == KP_IPPROTO_SCTP)
			return TC_ACT_OK;
		ret = kp_dsr_rx4(skb, &p, KP_CT_F_DSR_IPIP);
		return ret < 0 ? TC_ACT_OK : ret;
	case KP_PARSE_ICMP:
		if (kp_svcnet_opens_flow(&p, KP_PARSE_ICMP)) {
			ret = kp_netdev_svcnet(skb, &p);
			if (ret >= 0)
				return ret;
		}
		ret = kp_icmp_snat_forward(skb, &p);
		return ret < 0 ? TC_ACT_OK : ret;
	case KP_PARSE_L4:
		/* SCTP has a program of its own (kp_netdev_sctp4, tail-called by kp_from_netdev): beside TCP and
		 * UDP it would take this one past the verifier's 1M processed instructions (the verifier walks
		 * the path once per protocol). Not here (kp_from_netdev passes it when that call fails). */
		if (p.proto == KP_IPPROTO_SCTP)
			return TC_ACT_OK;
		return kp_netdev_l4_4(skb, &p);
	}
	return TC_ACT_OK;
}

/*
 * Hook: tc egress of a node's external interface. Direction: node -> outside.
 *   replies of this node's own processes to flows DNATed to them (a hostNetwork backend on this node
 *   behind a NodePort, LoadBalancer or external IP; its address is the node's primary address): the
 *   frontend restored as their source
 *   ICMP errors this node's own stack sends about a flow it delivers to a local backend (DSR, or a
 *   NodePort/LB/external IP served here): e.g. fragmentation needed when the pod's veth has a smaller
 *   MTU. They quote client -> backend; the client only knows client -> frontend, so the quote is
 *   translated (found by the flow's REPLY entry, as kp_to_pod does for pod clients). Without this the
 *   client never learns the path MTU of a DSR flow, whose packets never pass the ingress node again.
 */
static __always_inline int kp_to_netdev4(struct __sk_buff *skb)
{
	struct kp_config *cfg;
	struct kp_pkt p;

	switch (kp_parse_counted(skb, &p)) {
	case KP_PARSE_L4:
		/* Only the node's own replies can need it (a hostNetwork endpoint's address is the node's):
		 * forwarded pod traffic does not pay the conntrack lookup. */
		cfg = kp_config();
		if (cfg && cfg->node_addr && p.saddr == cfg->node_addr)
			return kp_revnat4(skb, &p, 0);
		return TC_ACT_OK;
	case KP_PARSE_ICMP:
		return kp_icmp_revnat(skb, &p);
	}
	return TC_ACT_OK;
}

/* ---- IPv6: the same hooks, for IPv6 packets (lib/<topic>_fam.h's logic built for family 6) ---- */

static __always_inline int kp_parse6_counted(struct __sk_buff *skb, struct kp_pkt6 *p)
{
	int ret = kp_parse6(skb, p);

	if (ret == KP_PARSE_FRAG)
		kp_count6(KP_STAT_PASS_FRAGMENT, skb->len);
	else if (ret == KP_PARSE_L4) {
		__u32 frag = kp_frag_get();

		if (frag)
			kp_count6(frag == KP_FRAG_FIRST ? KP_STAT_FRAG_FIRST : KP_STAT_FRAG_LATER, skb->len);
	}
	return ret;
}

/* kp_icmp_snat_forward for IPv6. */
static __always_inline int kp_icmp_snat_forward6(struct __sk_buff *skb, const struct kp_pkt6 *p)
{
	struct bpf_fib_lookup *fib;
	union kp_in6 dst = {}, src = {};
	int res;

	res = kp_icmp_snat6(skb, p, &dst, &src);
	if (res == 0)
		return -1;
	if (res < 0) {
		kp_count6(KP_DROP_NAT_FAILED, p->len);
		return TC_ACT_SHOT;
	}
	fib = kp_fib_room();
	res = kp_fib_lookup6(skb, fib, src, dst, 0);
	if (res != KP_FIB_OK && res != KP_FIB_NEIGH) {
		kp_count6(KP_DROP_FIB, p->len);
		return TC_ACT_SHOT;
	}
	kp_count6(KP_STAT_ICMP_SNAT, p->len);
	return kp_fib_redirect6(skb, fib, res);
}

/*
 * The IPv6 programs (tail-called by the entry points below, which count the packet). Their packet and
 * frontend key live in kp_scratch6: with 16-byte addresses kp_from_netdev6's new SNATed flow needs
 * more than the 512 bytes of stack otherwise (with kp_snat_take6's frame and the TCP option walk's).
 */
struct kp_scratch6 {
	struct kp_pkt6 p;
	struct kp_svc6_key svc_key;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct kp_scratch6);
	__uint(max_entries, 1);
} kp_scratch6 SEC(".maps");

static __always_inline struct kp_scratch6 *kp_scratch6_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&kp_scratch6, &zero);
}

/* kp_from_pod for IPv6: DNAT to service frontends, reverse NAT of local backends' replies. */
SEC("tc")
int kp_from_pod6(struct __sk_buff *skb)
{
	struct kp_scratch6 *s6 = kp_scratch6_get();
	struct kp_svc4_val *svc;
	int ret;

	if (!s6)
		return TC_ACT_OK;
	switch (kp_parse6_counted(skb, &s6->p)) {
	case KP_PARSE_L4:
		svc = kp_svc_lookup6(&s6->p, KP_ORIGIN_POD, &s6->svc_key);
		if (svc)
			return kp_lb_forward6(skb, &s6->p, &s6->svc_key, svc, KP_ORIGIN_POD);
		if (kp_svcnet_opens_flow6(&s6->p, KP_PARSE_L4)) {
			ret = kp_svcnet_enforce6(skb, &s6->p, kp_svcnet_action6(s6->p.daddr));
			if (ret >= 0)
				return ret;
		} else if (s6->p.proto == IPPROTO_TCP && kp_svcnet_span_has6(s6->p.daddr)) {
			/* a connection to a ClusterIP port deleted while it lived */
			ret = kp_ct_continue6(skb, &s6->p);
			if (ret >= 0)
				return ret;
		}
		kp_ct_direct_syn6(&s6->p, bpf_ktime_get_ns());
		/* a reply to this node's address of a flow SNATed to this pod (see kp_from_pod4) */
		if (kp_is_node_addr6(NULL, s6->p.daddr)) {
			ret = kp_snat_revnat6(skb, &s6->p);
			if (ret >= 0)
				return ret;
		}
		return kp_revnat6(skb, &s6->p, 1);
	case KP_PARSE_ICMP:
		if (kp_svcnet_opens_flow6(&s6->p, KP_PARSE_ICMP)) {
			ret = kp_svcnet_enforce6(skb, &s6->p, kp_svcnet_action6(s6->p.daddr));
			if (ret >= 0)
				return ret;
		}
		if (kp_is_node_addr6(NULL, s6->p.daddr)) {
			ret = kp_icmp_snat_forward6(skb, &s6->p);
			if (ret >= 0)
				return ret;
		}
		return kp_icmp_revnat6(skb, &s6->p);
	}
	return TC_ACT_OK;
}

/* kp_to_pod for IPv6: reverse NAT of remote backends' replies. */
SEC("tc")
int kp_to_pod6(struct __sk_buff *skb)
{
	struct kp_scratch6 *s6 = kp_scratch6_get();

	if (!s6)
		return TC_ACT_OK;
	switch (kp_parse6_counted(skb, &s6->p)) {
	case KP_PARSE_L4:
		return kp_revnat6(skb, &s6->p, 0);
	case KP_PARSE_ICMP:
		return kp_icmp_revnat6(skb, &s6->p);
	}
	return TC_ACT_OK;
}

/* kp_from_netdev for IPv6: NodePort, LoadBalancer and external IP frontends (and ClusterIPs routed to
 * the node, unless KP_CFG_F_NO_EXTERNAL_CLUSTER_IP): DNAT, SNAT or DSR to remote backends; DSR from
 * an ingress node to a local backend (IPv6-in-IPv6 to this node, or the destination option); replies
 * of SNATed flows and ICMPv6 errors about them back to the client; packets of connections whose
 * frontend was deleted while they lived. */
SEC("tc")
int kp_from_netdev6(struct __sk_buff *skb)
{
	struct kp_scratch6 *s6 = kp_scratch6_get();
	struct kp_svc4_val *svc;
	int ret;

	if (!s6)
		return TC_ACT_OK;
	switch (kp_parse6_counted(skb, &s6->p)) {
	case KP_PARSE_IPIP:
		if (!kp_is_node_addr6(NULL, s6->p.daddr) || !kp_tunnel_is_dsr6(skb, &s6->p))
			return TC_ACT_OK;
		if (kp_tunnel_pop6(skb)) {
			kp_count6(KP_DROP_ENCAP_FAILED, s6->p.len);
			return TC_ACT_SHOT;
		}
		if (kp_parse6(skb, &s6->p) != KP_PARSE_L4 || s6->p.proto == KP_IPPROTO_SCTP)
			return TC_ACT_OK;
		ret = kp_dsr_rx6(skb, &s6->p, KP_CT_F_DSR_IPIP);
		return ret < 0 ? TC_ACT_OK : ret;
	case KP_PARSE_ICMP:
		if (kp_svcnet_opens_flow6(&s6->p, KP_PARSE_ICMP)) {
			ret = kp_netdev_svcnet6(skb, &s6->p);
			if (ret >= 0)
				return ret;
		}
		ret = kp_icmp_snat_forward6(skb, &s6->p);
		return ret < 0 ? TC_ACT_OK : ret;
	case KP_PARSE_L4:
		svc = kp_svc_lookup6(&s6->p, KP_ORIGIN_NETDEV, &s6->svc_key);
		if (svc && !(svc->flags & KP_SVC_F_TYPED) && kp_no_external_cluster_ip()) {
			kp_count6(KP_DROP_CLUSTER_IP_EXTERNAL, s6->p.len);
			return TC_ACT_SHOT;
		}
		if (svc || kp_netdev_orphan_possible(s6->p.proto, s6->p.tcp_flags)) {
			ret = kp_lb_forward6(skb, &s6->p, &s6->svc_key, svc, KP_ORIGIN_NETDEV);
			if (ret >= 0)
				return ret;
		}
		if (kp_svcnet_opens_flow6(&s6->p, KP_PARSE_L4)) {
			ret = kp_netdev_svcnet6(skb, &s6->p);
			if (ret >= 0)
				return ret;
		}
		if (s6->p.ip_hlen > KP_IP6_HLEN && s6->p.proto != KP_IPPROTO_SCTP) {
			ret = kp_dsr_rx6(skb, &s6->p, KP_CT_F_DSR_OPT);
			if (ret >= 0)
				return ret;
		}
		kp_ct_direct_syn6(&s6->p, bpf_ktime_get_ns());
		ret = kp_snat_revnat6(skb, &s6->p);
		return ret < 0 ? TC_ACT_OK : ret;
	}
	return TC_ACT_OK;
}

/* kp_to_netdev for IPv6: replies of the node's own processes (hostNetwork backends), ICMPv6 errors. */
SEC("tc")
int kp_to_netdev6(struct __sk_buff *skb)
{
	struct kp_scratch6 *s6 = kp_scratch6_get();

	if (!s6)
		return TC_ACT_OK;
	switch (kp_parse6_counted(skb, &s6->p)) {
	case KP_PARSE_L4:
		if (kp_is_node_addr6(NULL, s6->p.saddr))
			return kp_revnat6(skb, &s6->p, 0);
		return TC_ACT_OK;
	case KP_PARSE_ICMP:
		return kp_icmp_revnat6(skb, &s6->p);
	}
	return TC_ACT_OK;
}

/* ---- entry points: count, then the family's path ---- */
#define KP_ETH_P_IPV6 0x86DD

enum kp_prog6 {
	KP_PROG6_FROM_POD = 0,
	KP_PROG6_TO_POD = 1,
	KP_PROG6_FROM_NETDEV = 2,
	KP_PROG6_TO_NETDEV = 3,
};

/*
 * The IPv6 programs, tail-called by the entry points: each is verified on its own, with its own budget
 * of 1M processed instructions (kp_from_netdev's IPv4 path alone takes most of one) and its own stack.
 * Filled by libbpf when the object loads (also when it re-uses the pin: an upgrade's new object points
 * it at its own IPv6 programs, then the links move to its entry points). Pinned: the kernel empties a
 * program array when its last file descriptor or pin goes, and the attached programs must keep
 * reaching their IPv6 halves while no agent runs.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 4);
	__uint(key_size, sizeof(__u32));   /* not __type: the kernel takes no BTF for a program array */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, int(struct __sk_buff *));
} kp_progs6_v1 SEC(".maps") = {
	.values = {
		[KP_PROG6_FROM_POD] = (void *)&kp_from_pod6,
		[KP_PROG6_TO_POD] = (void *)&kp_to_pod6,
		[KP_PROG6_FROM_NETDEV] = (void *)&kp_from_netdev6,
		[KP_PROG6_TO_NETDEV] = (void *)&kp_to_netdev6,
	},
};

/*
 * Count the packet in its family's counters (stat); an IPv6 one is handed to its program (prog6) and 1
 * returned only if that call failed (an empty slot: the packet passes, counted as pass_no_prog); 0 for an
 * IPv4 packet, whose path the caller runs.
 */
static __always_inline int kp_enter(struct __sk_buff *skb, __u32 stat, __u32 prog6)
{
	if (skb->protocol != bpf_htons(KP_ETH_P_IPV6)) {
		kp_count4(stat, skb->len);
		return 0;
	}
	kp_count6(stat, skb->len);
	bpf_tail_call(skb, &kp_progs6_v1, prog6);
	kp_count6(KP_STAT_PASS_NO_PROG, skb->len);
	return 1;
}

SEC("tc")
int kp_from_pod(struct __sk_buff *skb)
{
	return kp_enter(skb, KP_STAT_FROM_POD, KP_PROG6_FROM_POD) ? TC_ACT_OK : kp_from_pod4(skb);
}

SEC("tc")
int kp_to_pod(struct __sk_buff *skb)
{
	return kp_enter(skb, KP_STAT_TO_POD, KP_PROG6_TO_POD) ? TC_ACT_OK : kp_to_pod4(skb);
}

/*
 * kp_from_netdev's SCTP packets (IPv4), tail-called through kp_sctp_v1: verified on its own, with its own
 * budget, as the IPv6 programs are. The packet was counted by kp_from_netdev; a fragment is counted here
 * (pass_fragment), as kp_from_netdev4 counts other protocols' fragments.
 */
SEC("tc")
int kp_netdev_sctp4(struct __sk_buff *skb)
{
	struct kp_pkt p;

	if (kp_parse_counted(skb, &p) != KP_PARSE_L4 || p.proto != KP_IPPROTO_SCTP)
		return TC_ACT_OK;
	return kp_netdev_l4_4(skb, &p);
}

/* kp_netdev_sctp4, filled by libbpf at each load and pinned, as kp_progs6_v1. An empty slot: passed,
 * counted (pass_no_prog). */
#define KP_SCTP_NETDEV4 0
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));   /* not __type: the kernel takes no BTF for a program array */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, int(struct __sk_buff *));
} kp_sctp_v1 SEC(".maps") = {
	.values = {
		[KP_SCTP_NETDEV4] = (void *)&kp_netdev_sctp4,
	},
};

SEC("tc")
int kp_from_netdev(struct __sk_buff *skb)
{
	__u8 proto;

	if (kp_enter(skb, KP_STAT_FROM_NETDEV, KP_PROG6_FROM_NETDEV))
		return TC_ACT_OK;
	/* not IPv6 (kp_enter): an IPv4 packet's protocol byte decides before any parsing */
	if (skb->protocol == bpf_htons(ETH_P_IP) &&
	    !bpf_skb_load_bytes(skb, KP_IP_OFF + offsetof(struct iphdr, protocol), &proto, sizeof(proto)) &&
	    proto == KP_IPPROTO_SCTP) {
		bpf_tail_call(skb, &kp_sctp_v1, KP_SCTP_NETDEV4);
		/* an empty slot: passed untranslated, counted (kp_from_netdev4 has no SCTP path) */
		kp_count4(KP_STAT_PASS_NO_PROG, skb->len);
		return TC_ACT_OK;
	}
	return kp_from_netdev4(skb);
}

SEC("tc")
int kp_to_netdev(struct __sk_buff *skb)
{
	return kp_enter(skb, KP_STAT_TO_NETDEV, KP_PROG6_TO_NETDEV) ? TC_ACT_OK : kp_to_netdev4(skb);
}

/*
 * The first packet of a flow from outside to a frontend (lib/xdp_fam.h, kp_xdp_open): XDP programs of
 * their own, reached by tail call from kp_xdp and kp_xdp6 through the pinned kp_xnew_v1, so their
 * stack and verification are apart from the per-packet path's.
 */
SEC("xdp")
int kp_xdp_new(struct xdp_md *ctx)
{
	struct kp_svc4_key sk;
	struct kp_xpkt4 x;
	struct kp_pkt p;

	return kp_xparse4(ctx, &x) ? XDP_PASS : kp_xdp_open4(ctx, &x, &p, &sk);
}

SEC("xdp")
int kp_xdp_new6(struct xdp_md *ctx)
{
	struct kp_scratch6 *s = kp_scratch6_get();   /* the stack of SNAT's deepest path has no room for them */
	struct kp_xpkt6 x;

	return !s || kp_xparse6(ctx, &x) ? XDP_PASS : kp_xdp_open6(ctx, &x, &s->p, &s->svc_key);
}

#define KP_XNEW4 0
#define KP_XNEW6 1
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 2);
	__uint(key_size, sizeof(__u32));
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, int(struct xdp_md *));
} kp_xnew_v1 SEC(".maps") = {
	.values = {
		[KP_XNEW4] = (void *)&kp_xdp_new,
		[KP_XNEW6] = (void *)&kp_xdp_new6,
	},
};

/* kp_xdp's IPv6 half (lib/xdp.h), tail-called through kp_xprogs_v1. */
SEC("xdp")
int kp_xdp6(struct xdp_md *ctx)
{
	int ret = kp_xdp6_main(ctx);

	if (ret == KP_XDP_NEW) {
		bpf_tail_call(ctx, &kp_xnew_v1, KP_XNEW6);
		return XDP_PASS;   /* an empty slot: kp_from_netdev6 opens the flow */
	}
	return ret;
}

/*
 * kp_xdp's IPv6 program, an XDP program of its own (its stack would not fit beside kp_xdp's in one call
 * chain), filled by libbpf at each load and pinned, as kp_progs6_v1.
 */
#define KP_XPROG6 0
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));   /* not __type: the kernel takes no BTF for a program array */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, int(struct xdp_md *));
} kp_xprogs_v1 SEC(".maps") = {
	.values = {
		[KP_XPROG6] = (void *)&kp_xdp6,
	},
};

/* XDP acceleration on the netdevs (lib/xdp.h): packets of tracked external flows, and the first packets
 * of new ones (kp_xdp_new), before any skb. IPv6 frames go to kp_xdp6 (an empty slot: passed). */
SEC("xdp")
int kp_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	int ret;

	if ((void *)(eth + 1) <= end && eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		bpf_tail_call(ctx, &kp_xprogs_v1, KP_XPROG6);
		return XDP_PASS;
	}
	ret = kp_xdp4(ctx);
	if (ret == KP_XDP_NEW) {
		bpf_tail_call(ctx, &kp_xnew_v1, KP_XNEW4);
		return XDP_PASS;   /* an empty slot: kp_from_netdev opens the flow */
	}
	return ret;
}
