/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Maglev consistent hashing: a new flow of a KP_SVC_F_MAGLEV frontend takes the backend its hash
 * selects in the service port's table (kp_maglev_v1, built by the agent from the backend set alone:
 * see struct kp_maglev_hdr), so every node sends the same flow to the same backend, and removing one
 * of N backends moves about 1/N of the flows that have no conntrack entry yet.
 */
#ifndef KPROXY_LIB_MAGLEV_H
#define KPROXY_LIB_MAGLEV_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

static __always_inline __u32 kp_rol32(__u32 w, unsigned int s)
{
	return (w << s) | (w >> (32 - s));
}

/*
 * The flow's hash: Linux's jhash final mix over (client address folded to 32 bits, client port << 16 |
 * frontend port, protocol), all in host order, so nodes of any byte order agree. kproxy's
 * sync/maglev.py flow_hash is its mirror. The frontend address is left out: a client reaching one
 * Service through several nodes' NodePorts gets the same backend from each.
 */
static __always_inline __u32 kp_maglev_hash(__u32 fold_nbo, __be16 sport, __be16 dport, __u8 proto)
{
	const __u32 init = 0xdeadbeef + 12;
	__u32 a = bpf_ntohl(fold_nbo) + init;
	__u32 b = (((__u32)bpf_ntohs(sport) << 16) | bpf_ntohs(dport)) + init;
	__u32 c = proto + init;

	c ^= b; c -= kp_rol32(b, 14);
	a ^= c; a -= kp_rol32(c, 11);
	b ^= a; b -= kp_rol32(a, 25);
	c ^= b; c -= kp_rol32(b, 16);
	a ^= c; a -= kp_rol32(c, 4);
	b ^= a; b -= kp_rol32(a, 14);
	c ^= b; c -= kp_rol32(b, 24);
	return c;
}

/*
 * The backend id the table of service port SVC_ID holds for hash H, or 0 (no table, a malformed one):
 * the caller then draws a random slot. A global function, verified once apart from its callers: the
 * new-flow path of kp_from_netdev is the longest the verifier walks.
 */
__attribute__((noinline)) int kp_maglev_backend(__u32 svc_id, __u32 h)
{
	struct kp_maglev_hdr *hdr;
	struct kp_maglev_row *row;
	__u32 zero = 0, idx, at, slot;
	void *table;

	table = bpf_map_lookup_elem(&kp_maglev_v1, &svc_id);
	if (!table)
		return 0;
	hdr = bpf_map_lookup_elem(table, &zero);
	if (!hdr || !hdr->m || !hdr->n)
		return 0;
	idx = h % hdr->m;
	if (hdr->width == 1) {
		at = 1 + idx / KP_MAGLEV_ROW;
		row = bpf_map_lookup_elem(table, &at);
		if (!row)
			return 0;
		slot = row->b[idx % KP_MAGLEV_ROW];
	} else {
		at = 1 + idx / (KP_MAGLEV_ROW / 2);
		row = bpf_map_lookup_elem(table, &at);
		if (!row)
			return 0;
		slot = ((__u16 *)row->b)[idx % (KP_MAGLEV_ROW / 2)];
	}
	if (slot >= hdr->n)
		return 0;
	at = hdr->list_row + slot / KP_MAGLEV_LIST_PER_ROW;
	row = bpf_map_lookup_elem(table, &at);
	if (!row)
		return 0;
	return ((__u32 *)row->b)[slot % KP_MAGLEV_LIST_PER_ROW];
}

#endif /* KPROXY_LIB_MAGLEV_H */
