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
 * What a connection's SYN or FIN says about where it starts or ends: its sequence number (SYN: the
 * initial one; FIN: the one after the FIN) and the TSval of its timestamp option if it has one.
 * Only the upper 16 bits of each are kept, all that the TIME_WAIT keys of lib/snat.h compare, packed
 * in one scalar: the callers run deep in the programs, where the 512 bytes of stack are nearly gone.
 */
#define KP_TCP_MARK_OK        (1ULL << 33)  /* the header was read */
#define KP_TCP_MARK_TS        (1ULL << 32)  /* it has a timestamp option */
#define KP_TCP_MARK_TS_HI(m)  ((__u16)((m) >> 16))
#define KP_TCP_MARK_SEQ_HI(m) ((__u16)(m))

#define KP_TCP_CTX struct __sk_buff
#define KP_TCP_LOAD bpf_skb_load_bytes
#define KP_TCP_N(name) kp_tcp_##name
#include "lib/tcp_read.h"
#undef KP_TCP_CTX
#undef KP_TCP_LOAD
#undef KP_TCP_N
/*
 * bpf_skb_load_bytes for XDP, by direct packet access: bpf_xdp_load_bytes came with kernel 5.18, and
 * the object must load on older kernels (acceleration off or not). LEN is a constant at every caller.
 */
static __always_inline long kp_xload_bytes(struct xdp_md *ctx, __u32 off, void *to, const __u32 len)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	void *from;

	if (off > 0x7fff)   /* beyond any linear XDP buffer; and off + len stays within the verifier's 0xffff */
		return -1;
	/* the bound again where the verifier sees it (clang tests a copy of off above, and would drop a
	 * mask it knows changes nothing) */
	kp_barrier_var(off);
	from = data + (off & 0x7fff);
	if (from + len > end)
		return -1;
	__builtin_memcpy(to, from, len);
	return 0;
}

#define KP_TCP_CTX struct xdp_md
#define KP_TCP_LOAD kp_xload_bytes
#define KP_TCP_N(name) kp_xtcp_##name
#include "lib/tcp_read.h"
#undef KP_TCP_CTX
#undef KP_TCP_LOAD
#undef KP_TCP_N

/* kp_tcp_mark_at for a parsed packet of either family (struct kp_pkt or kp_pkt6). Where the segment
 * ends: Ethernet padding is not data, the IP total length says (0 for BIG TCP: the skb does). */
#define kp_tcp_mark(skb, p) \
	kp_tcp_mark_at((skb), (p)->l4_off, (p)->tot_len ? ETH_HLEN + (p)->tot_len : (p)->len, (p)->tcp_flags)
/* ... for kp_xdp's first packets (lib/xdp_fam.h), whose KP_PKT holds the frame's numbers */
#define kp_xtcp_mark(ctx, p) \
	kp_xtcp_mark_at((ctx), (p)->l4_off, (p)->tot_len ? ETH_HLEN + (p)->tot_len : (p)->len, (p)->tcp_flags)

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
