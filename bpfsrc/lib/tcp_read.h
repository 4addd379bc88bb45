/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The TCP header reads of lib/tcp.h, for one kind of program context: included by lib/tcp.h once for
 * TC (struct __sk_buff, bpf_skb_load_bytes: kp_tcp_opt_off, kp_tcp_mark_at) and once for XDP (struct
 * xdp_md, kp_xload_bytes: kp_xtcp_opt_off, kp_xtcp_mark_at), with KP_TCP_CTX, KP_TCP_LOAD and
 * KP_TCP_N(name) defined. Offsets are from the start of the frame in both.
 */

/*
 * Frame offset of the value of the first TCP option of `kind` with length `len` (the byte after its
 * kind and length), or 0 if the header has none. The walk looks at most at KP_TCP_OPT_WALK_MAX
 * options; malformed options end it. A global (non-inlined) function: the verifier checks it once,
 * on its own, instead of once per caller path, and the loop stays a loop (unrolled, every option
 * layout was its own path and 6.18 hit the 1M-instruction limit).
 */
__attribute__((noinline)) __u32 KP_TCP_N(opt_off)(KP_TCP_CTX *skb, __u32 l4_off, __u32 kind, __u32 len)
{
	__u32 base = l4_off + sizeof(struct tcphdr);
	__u32 optlen, i = 0;
	__u8 doff_byte = 0, kl[2] = {};

	if (!skb || KP_TCP_LOAD(skb, l4_off + 12, &doff_byte, 1))
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
		if (KP_TCP_LOAD(skb, base + i, kl, 1))
			return 0;
		if (kl[0] == KP_TCPOPT_EOL)
			return 0;
		if (kl[0] == KP_TCPOPT_NOP) {
			i++;
			continue;
		}
		if (i + 2 > optlen || KP_TCP_LOAD(skb, base + i, kl, 2) || kl[1] < 2)
			return 0;
		if (kl[0] == kind && kl[1] == len)
			return i + len <= optlen ? base + i + 2 : 0;
		i += kl[1];
	}
	return 0;
}

/* The mark of the TCP segment at l4_off whose IP packet ends at frame offset end, or 0 if its header
 * cannot be read or is malformed (a receiver drops such a segment, so it must not count). */
static __always_inline __u64 KP_TCP_N(mark_at)(KP_TCP_CTX *skb, __u32 l4_off, __u32 end, __u8 tcp_flags)
{
	__u32 ts_off, l4_len, hdr_len, seq_hbo;
	__be32 seq, tsval;
	__u8 doff_byte;
	__u64 mark = KP_TCP_MARK_OK;

	if (KP_TCP_LOAD(skb, l4_off + 4, &seq, sizeof(seq)) ||
	    KP_TCP_LOAD(skb, l4_off + 12, &doff_byte, 1))
		return 0;
	l4_len = end - l4_off;
	hdr_len = (doff_byte >> 4) * 4;
	if (hdr_len < sizeof(struct tcphdr) || hdr_len > l4_len)
		return 0;
	seq_hbo = bpf_ntohl(seq);
	if (tcp_flags & KP_TCP_FIN)
		seq_hbo += l4_len - hdr_len + 1;   /* the FIN takes one sequence number after the data */
	mark |= seq_hbo >> 16;
	ts_off = KP_TCP_N(opt_off)(skb, l4_off, KP_TCPOPT_TS, KP_TCPOLEN_TS);
	if (ts_off && !KP_TCP_LOAD(skb, ts_off, &tsval, sizeof(tsval)))
		mark |= KP_TCP_MARK_TS | (__u64)(bpf_ntohl(tsval) >> 16) << 16;
	return mark;
}
