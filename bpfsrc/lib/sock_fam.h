/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket-level balancing of one address family (lib/fam.h; included by kproxy_sock.bpf.c once per
 * family, with KP_SKNAT_KEY, KP_SKNAT_VAL and KP_SKNAT_MAP naming the family's reverse map, which only
 * the socket object declares).
 *
 * The frontend *daddr:*dport a socket asks for -> a backend, written back to *daddr and *dport (the
 * caller puts them in its family's ctx fields), and the socket's reverse entry. sendmsg: a sendmsg
 * hook (ctx has the message's source address).
 */
static __always_inline int KP_F(kp_sock_xlate)(struct bpf_sock_addr *ctx, KP_ADDR *daddr, __be16 *dport,
						__u8 proto, int sendmsg)
{
	KP_SKNAT_KEY rk = {};
	KP_SKNAT_VAL rv = {};
	KP_SKNAT_VAL *cur;
	KP_SVC_KEY svc_key;
	struct kp_svc4_val *svc;
	struct kp_svc4_val svc_copy;
	KP_BE_VAL be;
	KP_PKT p = {};
	__u32 backend_id;

	p.daddr = *daddr;
	p.dport = *dport;
	p.proto = proto;
	/* As a pod: INT scope for two-scope services; ClusterIP and typed frontends alike. */
	svc = KP_F(kp_svc_lookup)(&p, KP_ORIGIN_POD, &svc_key);
#if KP_FAM == 4
	if (!svc)
		svc = kp_sock_localhost_nodeport4(ctx, &p, &svc_key);
#endif
	if (!svc)
		return kp_sock_svcnet(KP_FAM, KP_F(kp_svcnet_action)(p.daddr));
	svc_copy = *svc;
	if (svc_copy.count == 0) {
		kp_sock_count(KP_FAM, KP_DROP_SOCK_NO_BACKEND);
		return KP_SOCK_REFUSE;
	}
	p.saddr = KP_F(kp_sock_client)(ctx, sendmsg);
	/* loadBalancerSourceRanges hold for node processes too (kube-proxy's KUBE-FW sees OUTPUT). */
	if (KP_F(kp_src_range_drop)(&svc_copy, &p))
		return KP_SOCK_REFUSE;
	if (KP_F(kp_lb_select)(&svc_key, &svc_copy, &p, bpf_ktime_get_ns(), &backend_id, &be, KP_LB_NO_MAGLEV)) {
		kp_sock_count(KP_FAM, KP_DROP_BACKEND_MISSING);
		return KP_SOCK_REFUSE;
	}

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = be.addr;
	rk.port = be.port;
	rv.addr = p.daddr;
	rv.port = p.dport;
	rv.svc_id = svc_copy.svc_id;
	rv.backend_id = backend_id;
	cur = bpf_map_lookup_elem(&KP_SKNAT_MAP, &rk);
	/* An unconnected UDP socket sends many datagrams: write only what changed. */
	if (!cur || !KP_ADDR_EQ(cur->addr, rv.addr) || cur->port != rv.port || cur->svc_id != rv.svc_id ||
	    cur->backend_id != rv.backend_id) {
		/* TCP only needs the entry for getpeername(); UDP needs it to accept the replies. */
		if (bpf_map_update_elem(&KP_SKNAT_MAP, &rk, &rv, BPF_ANY) && proto == IPPROTO_UDP) {
			kp_sock_count(KP_FAM, KP_DROP_SOCK_REVNAT_FULL);
			return KP_SOCK_NOMEM;
		}
	}
	*daddr = be.addr;
	*dport = be.port;
	return KP_SOCK_XLATED;
}
