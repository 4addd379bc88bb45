/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * SCTP (RFC 9260): the common header, the first chunk's type mapped onto the TCP flags conntrack
 * follows, and the incremental update of the CRC32c checksum when a port changes.
 *
 * The checksum is CRC32c (Castagnoli) over the whole SCTP packet with the checksum field zero, no
 * pseudo-header: address rewrites leave it alone, port rewrites must update it. Linux stores
 * cpu_to_le32(~crc32c(~0, ...)) (net/sctp: sctp_compute_cksum), i.e. the CRC value little-endian.
 * CRC is linear over GF(2): for packets of the same length L, crc(M') = crc(M) ^ crc0(M ^ M'), and a
 * change of the ports only is 4 bytes d followed by L - 4 zero bytes, whose crc0 is d * x^(8L) mod P in
 * the reflected representation (bit 31 = x^0). x^(8L) is a product of the powers x^(8*2^k) whose k are
 * the set bits of L (the x8 table): one carry-less product of KP_GF2_MUL_STEPS steps per set bit, no
 * pass over the packet. kproxy/lab/sctp.py is the same arithmetic in Python, proven against a plain
 * bitwise CRC32c (tests/unit/test_sctp_crc.py).
 *
 * Every byte SCTP's rewrites store goes with BPF_F_RECOMPUTE_CSUM: nothing compensates a port's or the
 * CRC's change in a ones-complement sum, so a CHECKSUM_COMPLETE skb's (a NIC's) skb->csum must follow.
 *
 * A checksum field of zero is left zero: a local pod's stack sends SCTP as CHECKSUM_PARTIAL (veth
 * offers tx-checksum-sctp) with the field zero, and the CRC is computed later over the rewritten
 * packet; TC BPF cannot read ip_summed. A real CRC of exactly 0 (probability 2^-32) is then left
 * stale and costs one retransmission.
 */
#ifndef KPROXY_LIB_SCTP_H
#define KPROXY_LIB_SCTP_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define KP_IPPROTO_SCTP 132   /* restated: the 6.1 uapi <linux/in.h> has it, older ones do not */

/* chunk types (RFC 9260 3.2) */
#define KP_SCTP_INIT              1
#define KP_SCTP_INIT_ACK          2
#define KP_SCTP_ABORT             6
#define KP_SCTP_SHUTDOWN          7
#define KP_SCTP_SHUTDOWN_ACK      8
#define KP_SCTP_COOKIE_ECHO       10
#define KP_SCTP_COOKIE_ACK        11
#define KP_SCTP_SHUTDOWN_COMPLETE 14

struct kp_sctphdr {
	__be16 source;
	__be16 dest;
	__be32 vtag;      /* NBO verification tag, 0 in an INIT */
	__le32 checksum;  /* CRC32c of the packet with this field zero, little-endian (0: not computed yet) */
	__u8   chunk_type;   /* the first chunk's type */
};

#define KP_SCTP_HLEN     12   /* common header */
#define KP_SCTP_CSUM_OFF 8

/*
 * The first chunk's type as the TCP flags kp_ct_next_state() follows (nf_conntrack_proto_sctp's states
 * folded onto conntrack's TCP ones): INIT opens (SYN), INIT ACK answers (SYN|ACK), SHUTDOWN and
 * SHUTDOWN ACK close (FIN|ACK), ABORT and SHUTDOWN COMPLETE end (RST); every other chunk is data (ACK).
 * Branch-free through two constant tables (a 3-bit code per type 0..15, then the flags of each code):
 * a switch would hand the verifier five constant flag values, each a walk of the rest of the program;
 * computed, the flags are one unknown byte as a TCP packet's are.
 */
#define KP_SCTP_FLAG_CODES 0xc00048c0088ULL  /* type t: bits 3t..3t+2; 1 SYN, 2 SYN|ACK, 3 RST, 4 FIN|ACK */
#define KP_SCTP_CODE_FLAGS 0x1104120210ULL   /* code c: byte c; 0 is ACK */

static __always_inline __u8 kp_sctp_flags(__u32 chunk_type)
{
	__u32 low = -(((chunk_type >> 4) - 1) >> 31);   /* all ones for types 0..15 */
	__u32 code = (__u32)(KP_SCTP_FLAG_CODES >> (3 * (chunk_type & 15))) & 7 & low;

	return (__u8)(KP_SCTP_CODE_FLAGS >> (8 * code));
}

#define KP_CRC32C_POLY   0x82f63b78   /* reflected Castagnoli polynomial */
#define KP_GF2_X0        0x80000000   /* the polynomial 1 in the reflected representation */
#define KP_GF2_MUL_STEPS 32           /* one step per coefficient of a 32-bit polynomial */
#define KP_SCTP_X8_BITS  16           /* lengths below 64 KiB: an IPv4 packet's, an IPv6 non-jumbogram's */

/* a * b mod P, carry-less, in the reflected representation; branch-free so the verifier walks one path. */
static __always_inline __u32 kp_gf2_mul(__u32 a, __u32 b)
{
	__u32 p = 0;
	int i;

	for (i = 0; i < KP_GF2_MUL_STEPS; i++) {
		p ^= b & -((a >> (31 - i)) & 1);
		b = (b >> 1) ^ (KP_CRC32C_POLY & -(b & 1));
	}
	return p;
}

/*
 * The change of the CRC32c of an sctp_len-byte SCTP packet whose first 4 bytes change by d (their xor,
 * as a little-endian word). A global function: the verifier checks it once per program, not once per
 * call site, and every program calls it with scalars only (global functions: kernel >= 5.6).
 * x^(8 * 2^k) mod P for k = 0..15 are immediates of the unrolled outer loop, which multiplies only for
 * L's set bits: about 0.26 us for a 1114-byte packet here (5 set bits, 6 products), where a branch-free
 * loop (16 products) took 0.89 us. The inner loop stays a loop: unrolled, the verifier follows the
 * products' partly known values down every combination of L's bits and gives up.
 */
__attribute__((noinline)) __u32 kp_sctp_crc_delta(__u32 d, __u32 sctp_len)
{
	static const __u32 x8[KP_SCTP_X8_BITS] = {
		0x00800000, 0x00008000, 0x82f63b78, 0x6ea2d55c, 0x18b8ea18, 0x510ac59a, 0xb82be955, 0xb8fdb1e7,
		0x88e56f72, 0x74c360a4, 0xe4172b16, 0x0d65762a, 0x35d73a62, 0x28461564, 0xbf455269, 0xe2ea32dc,
	};
	__u32 p = KP_GF2_X0;
	int k;

	/* only L's set bits cost a product (about 6 for a 1000-byte packet) */
#pragma unroll
	for (k = 0; k < KP_SCTP_X8_BITS; k++)
		if ((sctp_len >> k) & 1)
			p = kp_gf2_mul(x8[k], p);
	return kp_gf2_mul(d, p);
}

#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define kp_le32_to_cpu(x) __builtin_bswap32(x)
#else
#define kp_le32_to_cpu(x) (x)
#endif

/*
 * Fold a port change into the SCTP checksum: side_dst says which port (bytes 2-3 or 0-1), sctp_len is
 * the SCTP packet's length from the IP header's (never skb->len: a short frame carries Ethernet padding
 * outside the packet). Call before storing the new port or after: only the ports' xor counts. 0: done
 * or nothing to do (checksum 0, see above; length unknown: a BIG TCP-style length of 0 is not SCTP's).
 */
static __always_inline int kp_sctp_csum_port(struct __sk_buff *skb, __u32 l4_off, __u32 sctp_len,
					     int side_dst, __be16 old_port, __be16 new_port)
{
	__u32 crc, d;

	if (sctp_len < KP_SCTP_HLEN || bpf_skb_load_bytes(skb, l4_off + KP_SCTP_CSUM_OFF, &crc, sizeof(crc)))
		return -1;
	if (!crc)
		return 0;
	/* the ports' bytes as the low (source) or high (destination) half of a little-endian word */
	d = (__u32)(__u16)(old_port ^ new_port);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	d = (__u32)__builtin_bswap16((__u16)d);
#endif
	if (side_dst)
		d <<= 16;
	crc = kp_le32_to_cpu(crc) ^ kp_sctp_crc_delta(d, sctp_len);
	crc = kp_le32_to_cpu(crc);
	if (bpf_skb_store_bytes(skb, l4_off + KP_SCTP_CSUM_OFF, &crc, sizeof(crc), BPF_F_RECOMPUTE_CSUM))
		return -1;
	return 0;
}

#endif /* KPROXY_LIB_SCTP_H */
