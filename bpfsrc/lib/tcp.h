/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TCP header fields and options that kproxy reads at the edges of a connection (its SYN, its FIN,
 * a SYN-ACK to clamp), never on the packets in between: the option walk costs a helper call per
 * option, which is fine once per connection and too much per packet.
 */
#ifndef KPROXY_LIB_TCP_H
#define KPROXY_LIB_TCP_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lib/parse.h"

/* Options a walk looks at before giving up (Linux puts MSS first and the timestamp third). */
#define KP_TCP_OPT_WALK_MAX 8
#define KP_TCPOPT_EOL 0
#define KP_TCPOPT_NOP 1
#define KP_TCPOPT_MSS 2
#define KP_TCPOPT_TS  8
#define KP_TCPOLEN_MSS 4
#define KP_TCPOLEN_TS  10

/*
 * Frame offset of the value of the first TCP option of `kind` with length `len` (the byte after its
 * kind and length), or 0 if the header has none. The walk looks at most at KP_TCP_OPT_WALK_MAX
 * options; malformed options end it. A global (non-inlined) function: the verifier checks it once,
 * on its own, instead of once per caller path, and the loop stays a loop (unrolled, every option
 * layout was its own path and 6.18 hit the 1M-instruction limit).
 */
__attribute__((noinline)) __u32 kp_tcp_opt_off(struct __sk_buff *skb, __u32 l4_off, __u32 kind, __u32 len)
{
	__u32 base = l4_off + sizeof(struct tcphdr);
	__u32 optlen, i = 0;
	__u8 doff_byte = 0, kl[2] = {};

	if (!skb || bpf_skb_load_bytes(skb, l4_off + 12, &doff_byte, 1))
		return 0;
	optlen = (doff_byte >> 4) * 4;
	if (optlen <= sizeof(struct tcphdr))
		return 0;
	optlen -= sizeof(struct tcphdr);
	/* Option bytes are read through the helper (offsets checked at run time): a stack buffer indexed
	 * by the walk loses its bounds in clang-19's output and the 6.18 verifier rejects it. */
#pragma clang loop unroll(disable)
	for (int n = 0; n < KP_TCP_OPT_WALK_MAX; n++) {
		if (i >= optlen)
			return 0;
		if (bpf_skb_load_bytes(skb, base + i, kl, 1))
			return 0;
		if (kl[0] == KP_TCPOPT_EOL)
			return 0;
		if (kl[0] == KP_TCPOPT_NOP) {
			i++;
			continue;
		}
		if (i + 2 > optlen || bpf_skb_load_bytes(skb, base + i, kl, 2) || kl[1] < 2)
			return 0;
		if (kl[0] == kind && kl[1] == len)
			return i + len <= optlen ? base + i + 2 : 0;
		i += kl[1];
	}
	return 0;
}

/*
 * What a connection's SYN or FIN says about where it starts or ends: its sequence number (SYN: the
 * initial one; FIN: the one after the FIN) and the TSval of its timestamp option if it has one.
 * Only the upper 16 bits of each are kept, all that the TIME_WAIT keys of lib/snat.h compare, packed
 * in one scalar: the callers run deep in the programs, where the 512 bytes of stack are nearly gone.
 */
#define KP_TCP_MARK_OK        (1ULL << 33)  /* the header was read */
#define KP_TCP_MARK_TS        (1ULL << 32)  /* it has a timestamp option */
#define KP_TCP_MARK_TS_HI(m)  ((__u16)((m) >> 16))
#define KP_TCP_MARK_SEQ_HI(m) ((__u16)(m))

/* The mark of the TCP segment at l4_off whose IP packet ends at frame offset end, or 0 if its header
 * cannot be read or is malformed (a receiver drops such a segment, so it must not count). */
static __always_inline __u64 kp_tcp_mark_at(struct __sk_buff *skb, __u32 l4_off, __u32 end, __u8 tcp_flags)
{
	__u32 ts_off, l4_len, hdr_len, seq_hbo;
	__be32 seq, tsval;
	__u8 doff_byte;
	__u64 mark = KP_TCP_MARK_OK;

	if (bpf_skb_load_bytes(skb, l4_off + 4, &seq, sizeof(seq)) ||
	    bpf_skb_load_bytes(skb, l4_off + 12, &doff_byte, 1))
		return 0;
	l4_len = end - l4_off;
	hdr_len = (doff_byte >> 4) * 4;
	if (hdr_len < sizeof(struct tcphdr) || hdr_len > l4_len)
		return 0;
	seq_hbo = bpf_ntohl(seq);
	if (tcp_flags & KP_TCP_FIN)
		seq_hbo += l4_len - hdr_len + 1;   /* the FIN takes one sequence number after the data */
	mark |= seq_hbo >> 16;
	ts_off = kp_tcp_opt_off(skb, l4_off, KP_TCPOPT_TS, KP_TCPOLEN_TS);
	if (ts_off && !bpf_skb_load_bytes(skb, ts_off, &tsval, sizeof(tsval)))
		mark |= KP_TCP_MARK_TS | (__u64)(bpf_ntohl(tsval) >> 16) << 16;
	return mark;
}

/* kp_tcp_mark_at for a parsed packet of either family (struct kp_pkt or kp_pkt6). Where the segment
 * ends: Ethernet padding is not data, the IP total length says (0 for BIG TCP: the skb does). */
#define kp_tcp_mark(skb, p) \
	kp_tcp_mark_at((skb), (p)->l4_off, (p)->tot_len ? ETH_HLEN + (p)->tot_len : (p)->len, (p)->tcp_flags)

/* Lower the MSS option of a TCP SYN (or SYN-ACK) whose TCP header starts at l4_off to max_mss.
 * Returns 1 if lowered. */
static __always_inline int kp_mss_clamp(struct __sk_buff *skb, __u32 l4_off, __u32 csum_off, __u32 max_mss)
{
	__u32 off = kp_tcp_opt_off(skb, l4_off, KP_TCPOPT_MSS, KP_TCPOLEN_MSS);
	__be16 old_mss = 0, new_mss;

	if (!off || bpf_skb_load_bytes(skb, off, &old_mss, sizeof(old_mss)))
		return 0;
	if (bpf_ntohs(old_mss) <= max_mss)
		return 0;
	new_mss = bpf_htons(max_mss);
	if (bpf_l4_csum_replace(skb, csum_off, old_mss, new_mss, sizeof(new_mss)))
		return 0;
	if (bpf_skb_store_bytes(skb, off, &new_mss, sizeof(new_mss), 0))
		return 0;
	return 1;
}

#endif /* KPROXY_LIB_TCP_H */
