/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Test probe: every map of bpfsrc/maps.h plus four trivial TC programs named like the real ones.
 * The ABI test checks the BTF of this object (and of the real object when built); loader tests use
 * it as a stand-in whose programs return fixed verdicts they can tell apart.
 */
#include "maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline void probe_count(__u32 index, struct __sk_buff *skb)
{
	struct kp_counter *c = bpf_map_lookup_elem(&kp_stats_v1, &index);

	if (c) {
		c->packets++;
		c->bytes += skb->len;
	}
}

/* Keep every ABI struct in the BTF even if no program touches it. */
struct kp_svc4_key probe_svc4_key;
struct kp_svc4_val probe_svc4_val;
struct kp_be4_val probe_be4_val;
struct kp_ct4_key probe_ct4_key;
struct kp_ct4_val probe_ct4_val;
struct kp_aff4_key probe_aff4_key;
struct kp_aff4_val probe_aff4_val;
struct kp_config probe_config;
struct kp_counter probe_counter;
struct kp_snat4_key probe_snat4_key;
struct kp_snat4_val probe_snat4_val;
struct kp_lbsrc4_key probe_lbsrc4_key;
struct kp_lbsrc4_val probe_lbsrc4_val;
struct kp_svcnet4_key probe_svcnet4_key;
struct kp_svcnet4_val probe_svcnet4_val;
struct kp_svcnet_span probe_svcnet_span;
struct kp_frag4_key probe_frag4_key;
struct kp_frag4_val probe_frag4_val;
struct kp_maglev_hdr probe_maglev_hdr;
enum kp_svcnet_action probe_svcnet_action;
enum kp_scope probe_scope;
enum kp_ct_dir probe_ct_dir;
enum kp_ct_state probe_ct_state;
enum kp_dsr_mode probe_dsr_mode;
enum kp_stat probe_stat;

/* Each program passes the packet (TC_ACT_OK) and counts it under its own index, so a test can tell
 * which one ran from kp_stats_v1. */
SEC("tc") int kp_from_pod(struct __sk_buff *skb) { probe_count(KP_STAT_FROM_POD, skb); return 0; }
SEC("tc") int kp_to_pod(struct __sk_buff *skb) { probe_count(KP_STAT_TO_POD, skb); return 0; }
SEC("tc") int kp_from_netdev(struct __sk_buff *skb) { probe_count(KP_STAT_FROM_NETDEV, skb); return 0; }
SEC("tc") int kp_to_netdev(struct __sk_buff *skb) { probe_count(KP_STAT_TO_NETDEV, skb); return 0; }
SEC("xdp") int kp_xdp(struct xdp_md *ctx) { return XDP_PASS; }
