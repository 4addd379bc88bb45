/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * kproxy socket-level load balancing: cgroup sock_addr programs for clients in the node's own
 * network namespace (hostNetwork pods, node processes), which never cross a pod veth and so never
 * meet the TC programs.
 *
 * connect4/6 and sendmsg4/6 rewrite the address a socket asks for (a frontend in kp_svc4_v1 or
 * kp_svc6_v1) to a backend before the kernel routes anything: the flow is born with the backend as
 * its peer, so no packet is translated and no conntrack entry is needed. What the application must
 * keep seeing is the frontend: recvmsg4/6 (UDP reply sources) and getpeername4/6 restore it from
 * kp_sknat4_v1 / kp_sknat6_v1, keyed by the socket cookie and the backend. Backend choice is the TC
 * path's own (lib/lb.h): affinity first, else a random slot of the INT scope (or EXT for one-scope
 * services).
 *
 * A dual-stack AF_INET6 socket (IPV6_V6ONLY off) reaches IPv4 peers through IPv4-mapped addresses
 * (::ffff:a.b.c.d); its flow is IPv4. connect6 balances such a frontend from kp_svc4_v1 to the mapped
 * IPv4 backend, recvmsg6/getpeername6 restore it from kp_sknat4_v1 (the entry is an IPv4 flow's, as
 * the backend and service ids are). Its unconnected sendmsg() never reaches sendmsg6: the kernel hands
 * a mapped destination to the IPv4 path, where sendmsg4 balances it. A v6-only socket cannot reach
 * a mapped address at all (the kernel fails it with ENETUNREACH): connect6 leaves it alone.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
/* Socket hooks run in process context and may be preempted on their CPU: every count, the shared
 * helpers' too (source ranges, affinity hits), adds atomically (lib/stats.h). */
#define KP_COUNT_ATOMIC 1
#include "maps.h"
#include "lib/lb.h"
#include "lib/svcnet.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#include "sknat_maps.h"

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

/* fam: the flow's family (4 or 6; an IPv4-mapped destination is an IPv4 flow); no bytes. */
static __always_inline void kp_sock_count(int fam, __u32 stat)
{
	kp_count_fam(fam, stat, 0);
}

/*
 * The service address space (lib/svcnet.h) for a destination that is no frontend, as for pods: a
 * ClusterIP's unknown port or protocol is refused as kube-proxy's REJECT refuses it; an unallocated
 * service address fails at once instead of timing out behind kube-proxy's DROP. ACTION: what
 * kp_svcnet_action*() says about the address, 0 for nothing.
 */
static __always_inline int kp_sock_svcnet(int fam, __u32 action)
{
	switch (action) {
	case KP_SVCNET_REJECT:
		kp_sock_count(fam, KP_STAT_SVCNET_REJECT);
		return KP_SOCK_REFUSE;
	case KP_SVCNET_DROP:
		kp_sock_count(fam, KP_DROP_SVCNET);
		return KP_SOCK_UNREACH;
	}
	return KP_SOCK_PASS;
}

/*
 * The client address sessionAffinity and loadBalancerSourceRanges see. The kernel picks the source
 * address only after these hooks (at route lookup), so an unbound socket has none yet: use the node's
 * address, which is the source such a socket gets towards the cluster in the usual set-up and what
 * kube-proxy's affinity would see. An explicit source (bind(), IP_PKTINFO) wins. For a dual-stack
 * AF_INET6 socket sent to a mapped address (sendmsg 0), src_ip4 is the IPv4 address it is bound to.
 */
static __always_inline __be32 kp_sock_client4(struct bpf_sock_addr *ctx, int sendmsg)
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

static __always_inline union kp_in6 kp_sock_client6(struct bpf_sock_addr *ctx, int sendmsg)
{
	struct bpf_sock *sk;
	union kp_in6 addr = {};

	if (sendmsg) {
		addr.w[0] = ctx->msg_src_ip6[0];
		addr.w[1] = ctx->msg_src_ip6[1];
		addr.w[2] = ctx->msg_src_ip6[2];
		addr.w[3] = ctx->msg_src_ip6[3];
	}
	if (kp_in6_is_zero(addr)) {
		sk = ctx->sk;
		if (sk) {
			addr.w[0] = sk->src_ip6[0];
			addr.w[1] = sk->src_ip6[1];
			addr.w[2] = sk->src_ip6[2];
			addr.w[3] = sk->src_ip6[3];
		}
	}
	if (kp_in6_is_zero(addr))
		addr = kp_node_addr6(NULL);
	return addr;
}

/* Whether a is an IPv4-mapped IPv6 address (::ffff:a.b.c.d, RFC 4291 2.5.5.2). */
static __always_inline int kp_in6_is_v4mapped(const union kp_in6 *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0x0000ffff);
}

/* CO-RE view of the kernel's struct sock_common: the one field read here, relocated by libbpf. */
struct sock_common___kp {
	unsigned char skc_ipv6only : 1;
} __attribute__((preserve_access_index));

/*
 * Whether the socket of a connect6 is IPv6-only (IPV6_V6ONLY, or bound to an IPv6 address that is not
 * mapped). struct bpf_sock does not say; the socket behind bpf_skc_to_*6_sock() does. 1 when it
 * cannot be told: a socket the hook does not understand is left alone.
 */
static __always_inline int kp_sock_v6only(struct bpf_sock_addr *ctx, __u8 proto)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock_common___kp *skc;

	if (!sk)
		return 1;
	if (proto == IPPROTO_TCP)
		skc = (void *)bpf_skc_to_tcp6_sock(sk);
	else
		skc = (void *)bpf_skc_to_udp6_sock(sk);
	if (!skc)
		return 1;
	return BPF_CORE_READ_BITFIELD(skc, skc_ipv6only);
}

/*
 * kube-proxy's localhost NodePorts (--iptables-localhost-nodeports, on by default; IPv4 only, never
 * ::1): a node process asking for 127.0.0.0/8:<nodePort> is served as if it had asked for the node's
 * address (kp_config.node_addr), when the agent set KP_CFG_F_LOCALHOST_NODEPORTS. Only a frontend the
 * agent flagged KP_SVC_F_NODEPORT there matches: a LoadBalancer or external IP that happens to be
 * the node address, or a ClusterIP port, does not. Only sockets of the node's own network namespace
 * (kp_config.host_netns_cookie): a pod's loopback is its own, which kube-proxy's rules never see either.
 * Backend choice is the node address's (INT scope for two-scope services). The slot 0 the lookup
 * found, key left at it, as kp_svc_lookup4; NULL: no localhost NodePort. p is not changed: the reverse
 * entry keeps the loopback address the socket asked for.
 */
static __always_inline struct kp_svc4_val *kp_sock_localhost_nodeport4(struct bpf_sock_addr *ctx,
									const struct kp_pkt *p,
									struct kp_svc4_key *key)
{
	struct kp_config *cfg = kp_config();
	struct kp_svc4_val *ext;
	struct kp_pkt q;

	if ((bpf_ntohl(p->daddr) >> 24) != 127)
		return NULL;
	if (!cfg || !(cfg->flags & KP_CFG_F_LOCALHOST_NODEPORTS) || !cfg->node_addr)
		return NULL;
	if (!cfg->host_netns_cookie || bpf_get_netns_cookie(ctx) != cfg->host_netns_cookie)
		return NULL;
	kp_svc_key_ext4(key, cfg->node_addr, p->dport, p->proto);
	ext = bpf_map_lookup_elem(&kp_svc4_v1, key);
	if (!ext || !(ext->flags & KP_SVC_F_NODEPORT))
		return NULL;
	q = *p;
	q.daddr = cfg->node_addr;
	return kp_svc_lookup4(&q, KP_ORIGIN_POD, key);
}

/*
 * Whether the socket's network namespace is one the forward hooks translate. With
 * KP_CFG_F_SOCK_HOST_NETNS_ONLY (Cilium's socketLB.hostNamespaceOnly) only the agent's own (the node's,
 * kp_config.host_netns_cookie): a pod's sockets are left to the TC programs on its veth, which translate
 * after the pod's own netfilter OUTPUT (a service mesh sidecar's REDIRECT then sees the Service address,
 * and SO_ORIGINAL_DST gives it). The reverse hooks need no check: only translated sockets have entries.
 */
static __always_inline int kp_sock_netns_wanted(struct bpf_sock_addr *ctx)
{
	struct kp_config *cfg = kp_config();

	if (!cfg || !(cfg->flags & KP_CFG_F_SOCK_HOST_NETNS_ONLY))
		return 1;
	/* An unknown cookie (0: an agent that could not read it) translates nothing rather than pods. */
	return cfg->host_netns_cookie && bpf_get_netns_cookie(ctx) == cfg->host_netns_cookie;
}

/*
 * kp_sock_xlate4 / kp_sock_xlate6 (lib/sock_fam.h): the frontend *daddr:*dport a socket asks for -> a
 * backend, written back, and the socket's reverse entry (kp_sknat4_v1 / kp_sknat6_v1).
 */
#undef KP_FAM
#define KP_FAM 4
#include "lib/fam.h"
#define KP_SKNAT_KEY struct kp_sknat4_key
#define KP_SKNAT_VAL struct kp_sknat4_val
#define KP_SKNAT_MAP kp_sknat4_v1
#include "lib/sock_fam.h"
#undef KP_SKNAT_KEY
#undef KP_SKNAT_VAL
#undef KP_SKNAT_MAP
#undef KP_FAM
#define KP_FAM 6
#include "lib/fam.h"
#define KP_SKNAT_KEY struct kp_sknat6_key
#define KP_SKNAT_VAL struct kp_sknat6_val
#define KP_SKNAT_MAP kp_sknat6_v1
#include "lib/sock_fam.h"
#undef KP_SKNAT_KEY
#undef KP_SKNAT_VAL
#undef KP_SKNAT_MAP
#undef KP_FAM

static __always_inline int kp_sock_verdict(int v, int fam, __u32 stat)
{
	switch (v) {
	case KP_SOCK_XLATED:
		kp_sock_count(fam, stat);
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

/* connect4, sendmsg4: the destination in user_ip4/user_port. */
static __always_inline int kp_sock4_fwd(struct bpf_sock_addr *ctx, int sendmsg)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	__u8 proto = ctx->protocol;
	int v;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return KP_SOCK_PASS;
	if (!kp_sock_netns_wanted(ctx))
		return KP_SOCK_PASS;
	v = kp_sock_xlate4(ctx, &addr, &port, proto, sendmsg);
	if (v == KP_SOCK_XLATED) {
		ctx->user_ip4 = addr;
		ctx->user_port = (__u32)port;
	}
	return v;
}

static __always_inline union kp_in6 kp_sock_user_ip6(const struct bpf_sock_addr *ctx)
{
	union kp_in6 a;

	a.w[0] = ctx->user_ip6[0];
	a.w[1] = ctx->user_ip6[1];
	a.w[2] = ctx->user_ip6[2];
	a.w[3] = ctx->user_ip6[3];
	return a;
}

static __always_inline void kp_sock_set_user_ip6(struct bpf_sock_addr *ctx, const union kp_in6 *a)
{
	ctx->user_ip6[0] = a->w[0];
	ctx->user_ip6[1] = a->w[1];
	ctx->user_ip6[2] = a->w[2];
	ctx->user_ip6[3] = a->w[3];
}

/* connect6, sendmsg6: the destination in user_ip6/user_port, an IPv6 or IPv4-mapped frontend (*fam
 * becomes 4: an IPv4 flow). */
static __always_inline int kp_sock6_fwd(struct bpf_sock_addr *ctx, int sendmsg, int *fam)
{
	union kp_in6 addr = kp_sock_user_ip6(ctx);
	__be16 port = (__be16)ctx->user_port;
	__u8 proto = ctx->protocol;
	__be32 addr4;
	int v;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return KP_SOCK_PASS;
	if (!kp_sock_netns_wanted(ctx))
		return KP_SOCK_PASS;
	if (kp_in6_is_v4mapped(&addr)) {
		/* sendmsg6 never sees one (udpv6_sendmsg() passes it to udp_sendmsg(), i.e. sendmsg4,
		 * and refuses a mapped address sendmsg6 would write); a v6-only socket cannot use one. */
		if (sendmsg || kp_sock_v6only(ctx, proto))
			return KP_SOCK_PASS;
		addr4 = addr.w[3];
		*fam = 4;
		v = kp_sock_xlate4(ctx, &addr4, &port, proto, 0);
		addr.w[3] = addr4;
	} else {
		v = kp_sock_xlate6(ctx, &addr, &port, proto, sendmsg);
	}
	if (v == KP_SOCK_XLATED) {
		kp_sock_set_user_ip6(ctx, &addr);
		ctx->user_port = (__u32)port;
	}
	return v;
}

/* The frontend a backend *addr:*port stands for on this socket, written back; 0 if it stands for none. */
static __always_inline int kp_sock4_peer(struct bpf_sock_addr *ctx, __be32 *addr, __be16 *port)
{
	struct kp_sknat4_key rk = {};
	struct kp_sknat4_val *rv;

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = *addr;
	rk.port = *port;
	rv = bpf_map_lookup_elem(&kp_sknat4_v1, &rk);
	if (!rv)
		return 0;
	*addr = rv->addr;
	*port = rv->port;
	return 1;
}

static __always_inline int kp_sock6_peer(struct bpf_sock_addr *ctx, union kp_in6 *addr, __be16 *port)
{
	struct kp_sknat6_key rk = {};
	struct kp_sknat6_val *rv;

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = *addr;
	rk.port = *port;
	rv = bpf_map_lookup_elem(&kp_sknat6_v1, &rk);
	if (!rv)
		return 0;
	*addr = rv->addr;
	*port = rv->port;
	return 1;
}

/* Restore the frontend as the peer of a socket the forward hooks sent to a backend. */
static __always_inline int kp_sock4_revnat(struct bpf_sock_addr *ctx, __u32 stat)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;

	if (kp_sock4_peer(ctx, &addr, &port)) {
		ctx->user_ip4 = addr;
		ctx->user_port = (__u32)port;
		kp_sock_count(4, stat);
	}
	return KP_SYS_PROCEED;
}

/* The same for an AF_INET6 socket; a mapped peer is an IPv4 flow's (kp_sknat4_v1). */
static __always_inline int kp_sock6_revnat(struct bpf_sock_addr *ctx, __u32 stat)
{
	union kp_in6 addr = kp_sock_user_ip6(ctx);
	__be16 port = (__be16)ctx->user_port;
	__be32 addr4;
	int found, fam = 6;

	if (kp_in6_is_v4mapped(&addr)) {
		addr4 = addr.w[3];
		fam = 4;
		found = kp_sock4_peer(ctx, &addr4, &port);
		addr.w[3] = addr4;
	} else {
		found = kp_sock6_peer(ctx, &addr, &port);
	}
	if (found) {
		kp_sock_set_user_ip6(ctx, &addr);
		ctx->user_port = (__u32)port;
		kp_sock_count(fam, stat);
	}
	return KP_SYS_PROCEED;
}

/* Hook: connect() of TCP and UDP sockets, before routing. */
SEC("cgroup/connect4")
int kp_sock_connect4(struct bpf_sock_addr *ctx)
{
	return kp_sock_verdict(kp_sock4_fwd(ctx, 0), 4, KP_STAT_SOCK_CONNECT);
}

/* Hook: sendmsg() with a destination on an unconnected UDP socket, once per datagram. */
SEC("cgroup/sendmsg4")
int kp_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return kp_sock_verdict(kp_sock4_fwd(ctx, 1), 4, KP_STAT_SOCK_SENDMSG);
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

/* Hook: connect() of AF_INET6 TCP and UDP sockets (IPv4-mapped destinations too), before routing. */
SEC("cgroup/connect6")
int kp_sock_connect6(struct bpf_sock_addr *ctx)
{
	int fam = 6;
	int v = kp_sock6_fwd(ctx, 0, &fam);

	return kp_sock_verdict(v, fam, KP_STAT_SOCK_CONNECT);
}

/* Hook: sendmsg() with an IPv6 destination on an unconnected AF_INET6 UDP socket, once per datagram. */
SEC("cgroup/sendmsg6")
int kp_sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	int fam = 6;
	int v = kp_sock6_fwd(ctx, 1, &fam);

	return kp_sock_verdict(v, fam, KP_STAT_SOCK_SENDMSG);
}

/* Hook: recvmsg() on AF_INET6 UDP sockets; an IPv4 datagram's source is mapped. Must return 1. */
SEC("cgroup/recvmsg6")
int kp_sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return kp_sock6_revnat(ctx, KP_STAT_SOCK_RECVMSG_REVNAT);
}

/* Hook: getpeername() on AF_INET6 TCP and connected UDP sockets. Must return 1. */
SEC("cgroup/getpeername6")
int kp_sock_getpeername6(struct bpf_sock_addr *ctx)
{
	return kp_sock6_revnat(ctx, KP_STAT_SOCK_GETPEERNAME_REVNAT);
}
