/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Internet checksum helpers for headers we build ourselves (incremental updates use the skb helpers). */
#ifndef KPROXY_LIB_CSUM_H
#define KPROXY_LIB_CSUM_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Fold the 32-bit one's-complement sum bpf_csum_diff() returns into a finished 16-bit checksum. */
static __always_inline __u16 kp_csum_fold(__s64 csum)
{
	__u32 sum = (__u32)csum;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* One's-complement sum of a buffer on the stack (size a multiple of 4), seeded with `seed`. */
static __always_inline __s64 kp_csum_add(void *buf, __u32 size, __s64 seed)
{
	return bpf_csum_diff(0, 0, buf, size, (__u32)seed);
}

/* bpf_l4_csum_replace's BPF_F_IPV6 (restated: older uapi headers lack it). */
#define KP_F_IPV6 (1ULL << 7)
#define KP_EINVAL 22

/*
 * Fold diff, the change of an IPv6 address (bpf_csum_diff of its 16 bytes), into the L4 checksum at
 * off; flags: BPF_F_PSEUDO_HDR for an address of the pseudo-header, BPF_F_MARK_MANGLED_0 for UDP.
 * BPF_F_IPV6 says the packet is IPv6: for a pseudo-header change of a CHECKSUM_COMPLETE skb the
 * kernel then leaves skb->csum alone (the address and the checksum field change by amounts that
 * cancel; without it the kernel adjusts skb->csum as for IPv4 and the stack later reports a hardware
 * checksum failure). Kernels before the flag (6.16) refuse it with EINVAL: the call is made again
 * without it, as such kernels did before.
 */
static __always_inline long kp_l4_csum_diff6(struct __sk_buff *skb, __u32 off, __s64 diff, __u64 flags)
{
	long ret = bpf_l4_csum_replace(skb, off, 0, diff, flags | KP_F_IPV6);

	if (ret == -KP_EINVAL)
		ret = bpf_l4_csum_replace(skb, off, 0, diff, flags);
	return ret;
}

#endif /* KPROXY_LIB_CSUM_H */
