/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * kproxy socket iterators: connected UDP sockets follow the removal of their backend.
 *
 * Socket-level balancing (kproxy_sock.bpf.c) gives a connected UDP socket its backend once, at
 * connect(): the socket keeps sending there after the backend left the Service (a DNS client's
 * resolver socket, a Go program's connected socket). kube-proxy's answer for the same flows is to
 * clear their conntrack entries; a socket's peer is no conntrack entry, so the socket itself must go.
 *
 * kp_iter_udp runs for every UDP socket of the network namespace the iterator fd was created in
 * (bpf_iter_init_seq_net: the creating thread's namespace; the agent enters each namespace of the
 * socket-LB cgroup in turn). A connected socket whose peer is a backend listed in kp_skd_v1 for a
 * Service, and whose reverse entry (kp_sknat4_v1 / kp_sknat6_v1, same cookie and peer) says socket LB
 * sent it there through that Service, is destroyed with bpf_sock_destroy (kernel >= 6.5): the
 * application's next call fails with ECONNABORTED and the socket is no longer connected, so it
 * connects again and socket LB picks a live backend. A socket connected straight to the backend's
 * address has no reverse entry and is left alone. Each matched socket is written to the iterator's
 * output (struct kp_skd_event), so the agent counts what was destroyed.
 *
 * No vmlinux.h: the few kernel types read here are declared below with preserve_access_index, and
 * libbpf relocates their fields against the kernel's BTF (CO-RE).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "include/kproxy/abi.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* ---- kernel types (CO-RE) ---- */
struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));

struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
} __attribute__((preserve_access_index));

struct udp_sock;

/* The context of iter/udp programs (kernel: DEFINE_BPF_ITER_FUNC(udp, ...)); udp_sk NULL at the end. */
struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

/* kfunc, Linux >= 6.5; an older kernel has no such BTF function and libbpf refuses the whole object,
 * which is how the agent learns it must fall back (kproxy.bpf.sockdestroy). */
extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

#define KP_AF_INET        2
#define KP_AF_INET6       10
#define KP_TCP_ESTABLISHED 1  /* sk_state of a connected UDP socket */

/* ---- maps ---- */
/* Reverse entries of the socket-LB object, re-used by their pins. */
#include "sknat_maps.h"

/* Backends that left a Service, filled by the agent for one run of the iterator (struct kp_skd_key). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct kp_skd_key);
	__type(value, __u32);
	__uint(max_entries, KP_SKD_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} kp_skd_v1 SEC(".maps");

/* Keeps struct kp_skd_event in the BTF (a stack variable's type is not): tests/bpf/test_sockdestroy.py
 * checks the agent's mirror of it against that. */
struct kp_skd_event kp_skd_event_btf;

/* Whether a is an IPv4-mapped IPv6 address (::ffff:a.b.c.d). */
static __always_inline int kp_in6_is_v4mapped(const union kp_in6 *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0x0000ffff);
}

/* The Service a socket's peer stands for: the reverse entry's svc_id, or -1 when it has none. */
static __always_inline __s64 kp_skd_svc4(__u64 cookie, __be32 addr, __be16 port)
{
	struct kp_sknat4_key rk = {};
	struct kp_sknat4_val *rv;

	rk.cookie = cookie;
	rk.addr = addr;
	rk.port = port;
	rv = bpf_map_lookup_elem(&kp_sknat4_v1, &rk);
	return rv ? (__s64)rv->svc_id : -1;
}

static __always_inline __s64 kp_skd_svc6(__u64 cookie, const union kp_in6 *addr, __be16 port)
{
	struct kp_sknat6_key rk = {};
	struct kp_sknat6_val *rv;

	rk.cookie = cookie;
	rk.addr = *addr;
	rk.port = port;
	rv = bpf_map_lookup_elem(&kp_sknat6_v1, &rk);
	return rv ? (__s64)rv->svc_id : -1;
}

/* Iterator: every UDP socket of the iterator's network namespace, one call each. */
SEC("iter/udp")
int kp_iter_udp(struct bpf_iter__udp *ctx)
{
	struct sock_common *sk = (struct sock_common *)ctx->udp_sk;
	struct kp_skd_event ev = {};
	struct kp_skd_key key = {};
	__s64 svc;

	if (!sk || sk->skc_state != KP_TCP_ESTABLISHED)
		return 0;
	ev.cookie = bpf_get_socket_cookie(sk);
	ev.port = sk->skc_dport;
	if (sk->skc_family == KP_AF_INET) {
		ev.family = 4;
		ev.addr.w[0] = sk->skc_daddr;
	} else if (sk->skc_family == KP_AF_INET6) {
		ev.addr.w[0] = sk->skc_v6_daddr.in6_u.u6_addr32[0];
		ev.addr.w[1] = sk->skc_v6_daddr.in6_u.u6_addr32[1];
		ev.addr.w[2] = sk->skc_v6_daddr.in6_u.u6_addr32[2];
		ev.addr.w[3] = sk->skc_v6_daddr.in6_u.u6_addr32[3];
		if (kp_in6_is_v4mapped(&ev.addr)) {
			/* a dual-stack socket's IPv4 flow: connect6 wrote its entry to kp_sknat4_v1 */
			ev.family = 4;
			ev.addr.w[0] = ev.addr.w[3];
			ev.addr.w[2] = 0;
			ev.addr.w[3] = 0;
		} else {
			ev.family = 6;
		}
	} else {
		return 0;
	}
	if (ev.family == 4)
		svc = kp_skd_svc4(ev.cookie, ev.addr.w[0], ev.port);
	else
		svc = kp_skd_svc6(ev.cookie, &ev.addr, ev.port);
	if (svc < 0)
		return 0; /* not sent there by socket LB: connected to the backend's address itself */
	key.addr = ev.addr;
	key.svc_id = (__u32)svc;
	key.port = ev.port;
	key.family = ev.family;
	key.proto = IPPROTO_UDP;
	if (!bpf_map_lookup_elem(&kp_skd_v1, &key))
		return 0;
	ev.svc_id = (__u32)svc;
	ev.err = bpf_sock_destroy(sk);
	bpf_seq_write(ctx->meta->seq, &ev, sizeof(ev));
	return 0;
}
