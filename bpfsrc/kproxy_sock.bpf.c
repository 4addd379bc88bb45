/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * kproxy socket-level load balancing: cgroup sock_addr programs for clients in the node's own
 * network namespace (hostNetwork pods, node processes), which never cross a pod veth and so never
 * meet the TC programs.
 *
 * connect4 and sendmsg4 rewrite the address a socket asks for (a frontend in kp_svc4_v1) to a
 * backend before the kernel routes anything: the flow is born with the backend as its peer, so no
 * packet is translated and no conntrack entry is needed. What the application must keep seeing is
 * the frontend: recvmsg4 (UDP reply sources) and getpeername4 restore it from kp_sknat4_v1, keyed
 * by the socket cookie and the backend. Backend choice is the TC path's own (lib/lb.h): affinity
 * first, else a random slot of the INT scope (or EXT for one-scope services).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "lib/lb.h"
#include "lib/svcnet.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * Socket reverse NAT: per client socket, the frontend each backend stands for. Declared here, not in
 * maps.h: only this object uses it, and an LRU map preallocates all its entries, which agents without
 * socket LB should not pay for. Pinned by name next to the shared maps.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_sknat4_key);
	__type(value, struct kp_sknat4_val);
	__uint(max_entries, KP_SKNAT4_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_sknat4_v1 SEC(".maps");

/* sock_addr verdicts: 0 makes the syscall fail (EPERM unless bpf_set_retval said otherwise). */
#define KP_SYS_REJECT  0
#define KP_SYS_PROCEED 1

/* errno values; <errno.h> is glibc's and does not build for -target bpf. */
#define KP_ENOMEM       12
#define KP_ECONNREFUSED 111
#define KP_EHOSTUNREACH 113

enum kp_sock_verdict {
	KP_SOCK_PASS = 0,      /* not a frontend: leave the address alone */
	KP_SOCK_XLATED = 1,    /* rewritten to a backend */
	KP_SOCK_REFUSE = 2,    /* frontend without a usable backend */
	KP_SOCK_NOMEM = 3,     /* UDP reverse entry not written: replies could not be matched */
	KP_SOCK_UNREACH = 4,   /* an unallocated address of a service CIDR */
};

/* Socket hooks run in process context and may be preempted on their CPU: add atomically. */
static __always_inline void kp_sock_count(__u32 stat)
{
	struct kp_counter *c = bpf_map_lookup_elem(&kp_stats_v1, &stat);

	if (c)
		__sync_fetch_and_add(&c->packets, 1);
}

/*
 * The client address sessionAffinity is keyed by. The kernel picks the source address only after
 * these hooks (at route lookup), so an unbound socket has none yet: use the node's address, which
 * is the source such a socket gets towards the cluster in the usual set-up and what kube-proxy's
 * affinity would see. An explicit source (bind(), IP_PKTINFO) wins.
 */
static __always_inline __be32 kp_sock_client(struct bpf_sock_addr *ctx, int sendmsg)
{
	struct kp_config *cfg;
	struct bpf_sock *sk;
	__be32 addr = 0;

	if (sendmsg)
		addr = ctx->msg_src_ip4;
	if (!addr) {
		sk = ctx->sk;
		if (sk)
			addr = sk->src_ip4;
	}
	if (!addr) {
		cfg = kp_config();
		if (cfg)
			addr = cfg->node_addr;
	}
	return addr;
}

static __always_inline int kp_sock4_xlate(struct bpf_sock_addr *ctx, int sendmsg)
{
	struct kp_sknat4_key rk = {};
	struct kp_sknat4_val rv = {};
	struct kp_sknat4_val *cur;
	struct kp_svc4_key svc_key;
	struct kp_svc4_val *svc;
	struct kp_svc4_val svc_copy;
	struct kp_be4_val be;
	struct kp_pkt p = {};
	__u32 backend_id;
	__u8 proto = ctx->protocol;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return KP_SOCK_PASS;
	p.daddr = ctx->user_ip4;
	p.dport = (__be16)ctx->user_port;
	p.proto = proto;
	/* As a pod: INT scope for two-scope services; ClusterIP and typed frontends alike. */
	svc = kp_svc_lookup4(&p, KP_ORIGIN_POD, &svc_key);
	if (!svc) {
		/* The service address space, as for pods (lib/svcnet.h): a ClusterIP's unknown port or
		 * protocol is refused as kube-proxy's REJECT refuses it; an unallocated service address fails
		 * at once instead of timing out behind kube-proxy's DROP. */
		switch (kp_svcnet_action(p.daddr)) {
		case KP_SVCNET_REJECT:
			kp_sock_count(KP_STAT_SVCNET_REJECT);
			return KP_SOCK_REFUSE;
		case KP_SVCNET_DROP:
			kp_sock_count(KP_DROP_SVCNET);
			return KP_SOCK_UNREACH;
		}
		return KP_SOCK_PASS;
	}
	svc_copy = *svc;
	if (svc_copy.count == 0) {
		kp_sock_count(KP_DROP_SOCK_NO_BACKEND);
		return KP_SOCK_REFUSE;
	}
	p.saddr = kp_sock_client(ctx, sendmsg);
	/* loadBalancerSourceRanges hold for node processes too (kube-proxy's KUBE-FW sees OUTPUT). */
	if (kp_src_range_drop4(&svc_copy, &p))
		return KP_SOCK_REFUSE;
	if (kp_lb_select4(&svc_key, &svc_copy, &p, bpf_ktime_get_ns(), &backend_id, &be)) {
		kp_sock_count(KP_DROP_BACKEND_MISSING);
		return KP_SOCK_REFUSE;
	}

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = be.addr;
	rk.port = be.port;
	rv.addr = p.daddr;
	rv.port = p.dport;
	rv.svc_id = svc_copy.svc_id;
	rv.backend_id = backend_id;
	cur = bpf_map_lookup_elem(&kp_sknat4_v1, &rk);
	/* An unconnected UDP socket sends many datagrams: write only what changed. */
	if (!cur || cur->addr != rv.addr || cur->port != rv.port || cur->svc_id != rv.svc_id ||
	    cur->backend_id != rv.backend_id) {
		/* TCP only needs the entry for getpeername(); UDP needs it to accept the replies. */
		if (bpf_map_update_elem(&kp_sknat4_v1, &rk, &rv, BPF_ANY) && proto == IPPROTO_UDP) {
			kp_sock_count(KP_DROP_SOCK_REVNAT_FULL);
			return KP_SOCK_NOMEM;
		}
	}

	ctx->user_ip4 = be.addr;
	ctx->user_port = (__u32)be.port;
	return KP_SOCK_XLATED;
}

static __always_inline int kp_sock_verdict(int v, __u32 stat)
{
	switch (v) {
	case KP_SOCK_XLATED:
		kp_sock_count(stat);
		return KP_SYS_PROCEED;
	case KP_SOCK_REFUSE:
		/* What a kube-proxy REJECT rule gives a local client (ICMP port unreachable). */
		bpf_set_retval(-KP_ECONNREFUSED);
		return KP_SYS_REJECT;
	case KP_SOCK_NOMEM:
		bpf_set_retval(-KP_ENOMEM);
		return KP_SYS_REJECT;
	case KP_SOCK_UNREACH:
		bpf_set_retval(-KP_EHOSTUNREACH);
		return KP_SYS_REJECT;
	}
	return KP_SYS_PROCEED;
}

/* Restore the frontend as the peer of a socket the forward hooks sent to a backend. */
static __always_inline int kp_sock4_revnat(struct bpf_sock_addr *ctx, __u32 stat)
{
	struct kp_sknat4_key rk = {};
	struct kp_sknat4_val *rv;

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = ctx->user_ip4;
	rk.port = (__be16)ctx->user_port;
	rv = bpf_map_lookup_elem(&kp_sknat4_v1, &rk);
	if (rv) {
		ctx->user_ip4 = rv->addr;
		ctx->user_port = (__u32)rv->port;
		kp_sock_count(stat);
	}
	return KP_SYS_PROCEED;
}

/* Hook: connect() of TCP and UDP sockets, before routing. */
SEC("cgroup/connect4")
int kp_sock_connect4(struct bpf_sock_addr *ctx)
{
	return kp_sock_verdict(kp_sock4_xlate(ctx, 0), KP_STAT_SOCK_CONNECT);
}

/* Hook: sendmsg() with a destination on an unconnected UDP socket, once per datagram. */
SEC("cgroup/sendmsg4")
int kp_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return kp_sock_verdict(kp_sock4_xlate(ctx, 1), KP_STAT_SOCK_SENDMSG);
}

/* Hook: recvmsg() on UDP sockets; user_ip4/user_port hold the datagram's source. Must return 1. */
SEC("cgroup/recvmsg4")
int kp_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return kp_sock4_revnat(ctx, KP_STAT_SOCK_RECVMSG_REVNAT);
}

/* Hook: getpeername() on TCP and connected UDP sockets. Must return 1. */
SEC("cgroup/getpeername4")
int kp_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return kp_sock4_revnat(ctx, KP_STAT_SOCK_GETPEERNAME_REVNAT);
}
