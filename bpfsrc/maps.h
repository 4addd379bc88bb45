/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map of kproxy, each pinned by name under the agent's bpffs directory (but kp_scratch). */
#ifndef KPROXY_MAPS_H
#define KPROXY_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "include/kproxy/abi.h"

/* Frontends: slot 0 describes the service port, slots 1..count name its active backends. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct kp_svc4_key);
	__type(value, struct kp_svc4_val);
	__uint(max_entries, KP_SVC4_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_svc4_v1 SEC(".maps");

/* Backends by stable id: the same (address, port, protocol) keeps its id across updates and restarts. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct kp_be4_val);
	__uint(max_entries, KP_BE4_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_be4_v1 SEC(".maps");

/* Connection tracking: one entry per direction of each translated flow. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_ct4_key);
	__type(value, struct kp_ct4_val);
	__uint(max_entries, KP_CT4_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_ct4_v1 SEC(".maps");

/* sessionAffinity ClientIP: the backend a client was last sent to, per service port. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_aff4_key);
	__type(value, struct kp_aff4_val);
	__uint(max_entries, KP_AFF4_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_aff4_v1 SEC(".maps");

/* Node settings the agent may change at run time (DSR mode, timeouts). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct kp_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_cfg_v1 SEC(".maps");

/* Packet and drop counters, indexed by enum kp_stat. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct kp_counter);
	__uint(max_entries, KP_STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_stats_v1 SEC(".maps");

/* The same counters for IPv6 packets (lib/stats.h: kp_count6). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct kp_counter);
	__uint(max_entries, KP_STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_stats6_v1 SEC(".maps");

/* SNAT of external flows sent to remote backends: the backend's reply tuple -> client and frontend. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_snat4_key);
	__type(value, struct kp_snat4_val);
	__uint(max_entries, KP_SNAT4_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_snat4_v1 SEC(".maps");

/* loadBalancerSourceRanges: allowed source prefixes per service port (see struct kp_lbsrc4_key). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct kp_lbsrc4_key);
	__type(value, struct kp_lbsrc4_val);
	__uint(max_entries, KP_LBSRC4_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_lbsrc4_v1 SEC(".maps");

/* IPv4 fragments: the ports of a datagram, from its first fragment (see struct kp_frag4_key). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_frag4_key);
	__type(value, struct kp_frag4_val);
	__uint(max_entries, KP_FRAG4_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_frag4_v1 SEC(".maps");

/* The service address space: ClusterIPs and service CIDRs (see struct kp_svcnet4_key). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct kp_svcnet4_key);
	__type(value, struct kp_svcnet4_val);
	__uint(max_entries, KP_SVCNET4_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_svcnet4_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct kp_svcnet_span);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_svcnet_span_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct kp_svcnet6_key);
	__type(value, struct kp_svcnet4_val);
	__uint(max_entries, KP_SVCNET6_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_svcnet6_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct kp_svcnet6_span);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_svcnet6_span_v1 SEC(".maps");

/* ---- IPv6: as their *4 twins above ---- */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct kp_svc6_key);
	__type(value, struct kp_svc4_val);
	__uint(max_entries, KP_SVC6_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_svc6_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct kp_be6_val);
	__uint(max_entries, KP_BE6_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_be6_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_ct6_key);
	__type(value, struct kp_ct6_val);
	__uint(max_entries, KP_CT6_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_ct6_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_aff6_key);
	__type(value, struct kp_aff4_val);
	__uint(max_entries, KP_AFF6_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_aff6_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct kp_lbsrc6_key);
	__type(value, struct kp_lbsrc4_val);
	__uint(max_entries, KP_LBSRC6_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_lbsrc6_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_snat6_key);
	__type(value, struct kp_snat6_val);
	__uint(max_entries, KP_SNAT6_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_snat6_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct kp_frag6_key);
	__type(value, struct kp_frag6_val);
	__uint(max_entries, KP_FRAG6_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_frag6_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct kp_config6);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_cfg6_v1 SEC(".maps");

/* Maglev: service-port id -> its table (see struct kp_maglev_hdr); tables are made by the agent. */
struct kp_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct kp_maglev_row));
	__uint(max_entries, 1);
};

/*
 * The netdevs kp_xdp runs on in native mode (ifindex -> 0), written by the agent as it attaches and
 * removes XDP: a packet kp_xdp forwards whose route leaves by one of them is redirected there in XDP
 * (XDP_REDIRECT; that driver takes XDP frames), one leaving by any other device goes to TC.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, KP_XDEVS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kp_xdevs_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, KP_MAGLEV_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct kp_maglev_inner);
} kp_maglev_v1 SEC(".maps");

/*
 * Per-CPU room for structures too large for the 512-byte stack on the deepest path (kp_from_netdev
 * forwarding a new SNATed flow: the verifier adds the TCP option walk's frame to it). Not pinned:
 * nothing in it outlives one program run, and a TC program runs to its end on one CPU.
 */
struct kp_scratch {
	struct bpf_fib_lookup fib;  /* kp_lb4_xlate's route lookup */
	__u32 frag;                 /* enum kp_frag of the packet being handled (lib/parse.h) */
	__u32 pad;
	struct kp_ct4_key ct_key;   /* kp_ct_continue's flow: its frame adds to kp_from_pod's; kp_xdp's
				     * flow being opened (lib/xdp_fam.h) */
	struct kp_ct4_val ct_val;   /* and the entry of either, or of kp_xdp's flow being refreshed */
	__u32 quote6[31];           /* kp_icmp6_send_error's quote (KP_ICMP6_QUOTE_MAX bytes) */
	__u64 xlay6[16];            /* kp_xdsr_layout6's headers (struct kp_xlay6, lib/xdp.h): kp_xdp6's
				     * frame leaves no room for them */
	struct kp_ct6_val old6;     /* kp_lb_forward6: the value of the flow a new one re-opens */
	struct kp_ct6_key ct6_key;  /* kp_ct_continue6's flow; kp_xdp6's being opened */
	struct kp_ct6_val ct6_val;  /* and kp_xdp6's, as ct_val */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct kp_scratch);
	__uint(max_entries, 1);
} kp_scratch SEC(".maps");

#endif /* KPROXY_MAPS_H */
