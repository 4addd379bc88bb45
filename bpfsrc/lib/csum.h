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

#endif /* KPROXY_LIB_CSUM_H */
