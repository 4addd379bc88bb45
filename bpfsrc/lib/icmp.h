/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * ICMP: the port-unreachable answer for services without backends (kube-proxy's REJECT), and
 * reverse translation of ICMP errors about translated flows.
 */
#ifndef KPROXY_LIB_ICMP_H
#define KPROXY_LIB_ICMP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/ct.h"
#include "lib/stats.h"

#define KP_ICMP_TTL          64
/* Quoted original: IPv4 header (<= 60 bytes) + up to a full 20-byte TCP header. */
#define KP_ICMP_QUOTE_MAX    (60 + 20)

struct kp_icmp_hdrs {
	struct iphdr ip;
	struct kp_icmphdr icmp;
};

/*
 * Turn the packet in place into ICMP port unreachable from the service address back to the sender
 * and send it out of the interface it came in on. The quote is the original IP header plus 8 bytes
 * of UDP or 20 bytes of TCP: a TCP packet from a local pod is CHECKSUM_PARTIAL, and
 * bpf_skb_change_tail() refuses to cut into the checksum field that csum_start/csum_offset point
 * at (TCP check is at +16). The receiver accepts the CHECKSUM_PARTIAL skb as already verified;
 * our ICMP checksum is complete anyway.
 */
static __always_inline int kp_icmp_reject(struct __sk_buff *skb, const struct kp_pkt *p)
{
	__u32 quote[KP_ICMP_QUOTE_MAX / 4] = {};
	struct kp_icmp_hdrs h = {};
	struct ethhdr eth;
	__u32 quote_len;
	__s64 sum;

	quote_len = p->ip_hlen;
	/* clang-19 knows ip_hlen <= 60 and drops any mask or range check, so the verifier (6.18) sees
	 * an unbounded length. Hide the value from clang, then bound it where the verifier sees it. */
	kp_barrier_var(quote_len);
	quote_len &= 0x3c;
	quote_len += p->proto == IPPROTO_TCP ? 20 : 8;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		goto fail;
	if (bpf_skb_load_bytes(skb, KP_IP_OFF, quote, quote_len))
		goto fail;
	/* The rest of quote stays zero, which adds nothing to the sum: one constant-size csum_diff. */
	sum = kp_csum_add(quote, sizeof(quote), 0);
	if (sum < 0)
		goto fail;

	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tot_len = bpf_htons(sizeof(h) + quote_len);
	h.ip.ttl = KP_ICMP_TTL;
	h.ip.protocol = IPPROTO_ICMP;
	h.ip.saddr = p->daddr;
	h.ip.daddr = p->saddr;
	h.ip.check = kp_csum_fold(kp_csum_add(&h.ip, sizeof(h.ip), 0));
	h.icmp.type = KP_ICMP_DEST_UNREACH;
	h.icmp.code = KP_ICMP_PORT_UNREACH;
	h.icmp.checksum = kp_csum_fold(kp_csum_add(&h.icmp, sizeof(h.icmp), sum));

	if (bpf_skb_change_tail(skb, ETH_HLEN + quote_len, 0))
		goto fail;
	if (bpf_skb_adjust_room(skb, sizeof(h), BPF_ADJ_ROOM_MAC, 0))
		goto fail;
	if (bpf_skb_store_bytes(skb, KP_IP_OFF, &h, sizeof(h), 0))
		goto fail;
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), eth.h_source, ETH_ALEN, 0))
		goto fail;
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), eth.h_dest, ETH_ALEN, 0))
		goto fail;
	kp_count(KP_STAT_REJECT, p->len);
	return bpf_redirect(skb->ifindex, 0);
fail:
	kp_count(KP_DROP_REJECT_FAILED, p->len);
	return TC_ACT_SHOT;
}

/*
 * An ICMP error (dest unreachable incl. frag needed, time exceeded) whose quoted packet is the
 * client -> backend packet of a translated flow: make it about client -> frontend, so the client's
 * socket finds it. The quoted L4 checksum is left stale: it covers data the quote does not carry,
 * and no receiver verifies it (Linux's icmp_err handlers read only ports/sequence).
 */
static __always_inline int kp_icmp_revnat(struct __sk_buff *skb, const struct kp_pkt *p)
{
	__u32 inner_ip_off = p->l4_off + sizeof(struct kp_icmphdr);
	__u32 icmp_csum_off = p->l4_off + offsetof(struct kp_icmphdr, checksum);
	__u32 inner_l4_off;
	struct kp_ct4_val *cur;
	struct kp_ct4_key rk = {};
	struct iphdr inner;
	__be16 ports[2];
	__be32 front_addr;
	__be16 front_port;
	__sum16 new_check;

	if (p->icmp_type != KP_ICMP_DEST_UNREACH && p->icmp_type != KP_ICMP_TIME_EXCEEDED)
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, inner_ip_off, &inner, sizeof(inner)))
		return TC_ACT_OK;
	if (inner.version != 4 || inner.ihl < 5)
		return TC_ACT_OK;
	if (inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	inner_l4_off = inner_ip_off + inner.ihl * 4;
	if (bpf_skb_load_bytes(skb, inner_l4_off, ports, sizeof(ports)))
		return TC_ACT_OK;

	rk.saddr = inner.daddr;
	rk.daddr = inner.saddr;
	rk.sport = ports[1];
	rk.dport = ports[0];
	rk.proto = inner.protocol;
	rk.dir = KP_CT_DIR_REPLY;
	cur = kp_ct_lookup(&rk, bpf_ktime_get_ns());
	if (!cur)
		return TC_ACT_OK;
	front_addr = cur->nat_addr;
	front_port = cur->nat_port;

	/* Quoted IP header: address and its checksum. The ICMP checksum covers every quoted byte
	 * (no pseudo-header in ICMPv4), so each changed 16-bit-aligned word is folded into it too. */
	if (bpf_l3_csum_replace(skb, inner_ip_off + offsetof(struct iphdr, check), inner.daddr, front_addr,
				sizeof(front_addr)))
		goto fail;
	if (bpf_skb_load_bytes(skb, inner_ip_off + offsetof(struct iphdr, check), &new_check, sizeof(new_check)))
		goto fail;
	if (bpf_l4_csum_replace(skb, icmp_csum_off, inner.check, new_check, sizeof(new_check)))
		goto fail;
	if (bpf_l4_csum_replace(skb, icmp_csum_off, inner.daddr, front_addr, sizeof(front_addr)))
		goto fail;
	if (bpf_skb_store_bytes(skb, inner_ip_off + offsetof(struct iphdr, daddr), &front_addr,
				sizeof(front_addr), 0))
		goto fail;
	if (ports[1] != front_port) {
		if (bpf_l4_csum_replace(skb, icmp_csum_off, ports[1], front_port, sizeof(front_port)))
			goto fail;
		if (bpf_skb_store_bytes(skb, inner_l4_off + sizeof(__be16), &front_port, sizeof(front_port), 0))
			goto fail;
	}
	/* Sent by the backend itself (e.g. its port is closed): it must come from the frontend. */
	if (p->saddr == inner.daddr) {
		if (bpf_l3_csum_replace(skb, KP_IP_CSUM_OFF, p->saddr, front_addr, sizeof(front_addr)))
			goto fail;
		if (bpf_skb_store_bytes(skb, KP_IP_SADDR_OFF, &front_addr, sizeof(front_addr), 0))
			goto fail;
	}
	kp_count(KP_STAT_ICMP_REVNAT, p->len);
	return TC_ACT_OK;
fail:
	kp_count(KP_DROP_NAT_FAILED, p->len);
	return TC_ACT_SHOT;
}

#endif /* KPROXY_LIB_ICMP_H */
