/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket reverse NAT: per client socket, the frontend each backend stands for (written by the socket
 * object's connect/sendmsg hooks, read by its recvmsg/getpeername hooks and by the iterator object,
 * which destroys the connected UDP sockets of removed backends). Not in maps.h: the TC object does not
 * use them, and an LRU map preallocates all its entries, which agents without socket LB should not pay
 * for. Pinned by name next to the shared maps; both objects include this one definition.
 */
#ifndef KPROXY_SKNAT_MAPS_H
#define KPROXY_SKNAT_MAPS_H

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_sknat4_key);
	__type(value, struct kp_sknat4_val);
	__uint(max_entries, KP_SKNAT4_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_sknat4_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_sknat6_key);
	__type(value, struct kp_sknat6_val);
	__uint(max_entries, KP_SKNAT6_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_sknat6_v1 SEC(".maps");

#endif /* KPROXY_SKNAT_MAPS_H */
