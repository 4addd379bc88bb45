/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Forwarding done by BPF: a FIB lookup, then a redirect out of the egress device. Needed for packets
 * the kernel's own input path would refuse: a source that is a local address (SNAT to the node,
 * the IPIP outer header, NodePort replies) is a martian on input, and DSR replies must not meet
 * rp_filter on the pod's veth. Measured on 6.18 (DESIGN.md): works from TC ingress, wants
 * tot_len = 0 for GSO packets, forwarding enabled on the ingress device, and NO_NEIGH handled by
 * bpf_redirect_neigh (which resolves the neighbour itself).
 */
#ifndef KPROXY_LIB_FIB_H
#define KPROXY_LIB_FIB_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"
#include "lib/parse.h"

#define KP_AF_INET 2   /* <sys/socket.h> does not build for -target bpf */

enum kp_fib_result {
	KP_FIB_OK = 0,            /* fib->ifindex (and MACs, or a nexthop to resolve) valid */
	KP_FIB_NEIGH = 1,         /* route found, neighbour unknown: bpf_redirect_neigh resolves it */
	KP_FIB_FRAG_NEEDED = 2,   /* tot_len exceeds the route MTU, fib->mtu_result holds it */
	KP_FIB_FAIL = 3,          /* no usable route: only the kernel could deal with it */
};

/* Room for a route lookup (struct kp_scratch): 64 bytes the deepest paths cannot spare on the stack.
 * NULL only if the map is broken: kp_fib_lookup4() then fails, as for a missing route. */
static __always_inline struct bpf_fib_lookup *kp_fib_room(void)
{
	__u32 zero = 0;
	struct kp_scratch *scratch = bpf_map_lookup_elem(&kp_scratch, &zero);

	return scratch ? &scratch->fib : NULL;
}

/* The lookup of a fib whose family and addresses are set (kp_fib_lookup4 / kp_fib_lookup6). */
static __always_inline int kp_fib_run(struct __sk_buff *skb, struct bpf_fib_lookup *fib, __u32 tot_len)
{
	long rc;

	fib->ifindex = skb->ifindex;
	fib->tot_len = skb->gso_size || tot_len > 0xffff ? 0 : tot_len;
	rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		return KP_FIB_OK;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		return KP_FIB_NEIGH;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		return KP_FIB_FRAG_NEEDED;
	}
	return KP_FIB_FAIL;
}

/*
 * Route lookup for a packet that will leave with (saddr, daddr) and total IPv4 length tot_len, into
 * fib (from kp_fib_room(); NULL fails). tot_len 0 skips the MTU check (GSO packets are segmented to
 * gso_size later).
 */
static __always_inline int kp_fib_lookup4(struct __sk_buff *skb, struct bpf_fib_lookup *fib, __be32 saddr,
					 __be32 daddr, __u32 tot_len)
{
	if (!fib)
		return KP_FIB_FAIL;
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = KP_AF_INET;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	return kp_fib_run(skb, fib, tot_len);
}

/* Decrement the TTL as a router does (the caller checked it is > 1). */
static __always_inline int kp_ttl_dec4(struct __sk_buff *skb, __u8 ttl)
{
	/* TTL shares its 16-bit checksum word with the protocol byte. */
	__be16 old = bpf_htons((__u16)ttl << 8), new = bpf_htons((__u16)(ttl - 1) << 8);
	__u8 nttl = ttl - 1;

	if (bpf_l3_csum_replace(skb, KP_IP_CSUM_OFF, old, new, sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, KP_IP_OFF + offsetof(struct iphdr, ttl), &nttl, 1, 0);
}

/* Send the packet out of the route's device to the MACs it found (KP_FIB_OK). */
static __always_inline int kp_fib_send(struct __sk_buff *skb, struct bpf_fib_lookup *fib)
{
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), fib->dmac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), fib->smac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	return bpf_redirect(fib->ifindex, 0);
}

/* Send the packet out as kp_fib_lookup4() found (KP_FIB_OK or KP_FIB_NEIGH). */
static __always_inline int kp_fib_redirect4(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int res)
{
	if (res == KP_FIB_NEIGH) {
		struct bpf_redir_neigh nh = { .nh_family = KP_AF_INET, .ipv4_nh = fib->ipv4_dst };

		return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	return kp_fib_send(skb, fib);
}

/* ---- IPv6 twins of the above ---- */
#define KP_AF_INET6 10

static __always_inline int kp_fib_lookup6(struct __sk_buff *skb, struct bpf_fib_lookup *fib, union kp_in6 saddr,
					  union kp_in6 daddr, __u32 tot_len)
{
	if (!fib)
		return KP_FIB_FAIL;
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = KP_AF_INET6;
	__builtin_memcpy(fib->ipv6_src, &saddr, sizeof(saddr));
	__builtin_memcpy(fib->ipv6_dst, &daddr, sizeof(daddr));
	return kp_fib_run(skb, fib, tot_len);
}

/* Decrement the hop limit as a router does (the caller checked it is > 1); IPv6 has no header checksum. */
static __always_inline int kp_ttl_dec6(struct __sk_buff *skb, __u8 hop_limit)
{
	__u8 nhl = hop_limit - 1;

	/* no header checksum carries it: a CHECKSUM_COMPLETE sum is updated instead */
	return bpf_skb_store_bytes(skb, KP_IP6_HLIM_OFF, &nhl, 1, BPF_F_RECOMPUTE_CSUM);
}

static __always_inline int kp_fib_redirect6(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int res)
{
	if (res == KP_FIB_NEIGH) {
		struct bpf_redir_neigh nh = { .nh_family = KP_AF_INET6 };

		__builtin_memcpy(nh.ipv6_nh, fib->ipv6_dst, sizeof(nh.ipv6_nh));
		return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	return kp_fib_send(skb, fib);
}

/* Swap the Ethernet addresses and send the packet back out of the interface it came in on. */
static __always_inline int kp_bounce(struct __sk_buff *skb)
{
	struct ethhdr eth;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), eth.h_source, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), eth.h_dest, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

#endif /* KPROXY_LIB_FIB_H */
