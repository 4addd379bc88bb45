/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The address family a family-generic header (lib/<topic>_fam.h) is built for. Those headers hold the logic
 * IPv4 and IPv6 share (conntrack, backend selection, forward and reverse NAT): each is included once
 * with KP_FAM 4 and once with KP_FAM 6, after this header, which maps the names they use to the
 * family's types and maps:
 *   KP_F(name)       name4 / name6: every function a _fam.h header defines, and its callers, use it
 *   KP_ADDR          __be32 / union kp_in6
 *   KP_PKT           struct kp_pkt / struct kp_pkt6 (the parser's output, same field names)
 *   KP_SVC_KEY, KP_BE_VAL, KP_CT_KEY, KP_CT_VAL, KP_AFF_KEY, KP_SNAT_KEY, KP_SNAT_VAL: the family's
 *   map structs; KP_SVC_MAP, KP_BE_MAP, KP_CT_MAP, KP_AFF_MAP, KP_SNAT_MAP: the family's maps
 *   KP_ADDR_EQ(a, b), KP_ADDR_IS_ZERO(a), KP_ADDR_NONE: address comparisons and the unset address;
 *   KP_ADDR_FOLD(a): the address as one 32-bit word, for hashing
 *   KP_DSR_OPT_T, KP_DSR_EXTRA, KP_TUNNEL_HLEN: DSR's option (its struct, the bytes it adds to a packet)
 *   and its tunnel header's length (IPIP / IPv6-in-IPv6), lib/dsr.h
 *   KP_SCRATCH_CT_KEY, KP_SCRATCH_CT_VAL: the family's flow members of struct kp_scratch
 * Code outside the _fam.h headers names the family explicitly (kp_ct_lookup4, kp_lb_forward6).
 * May be included again with another KP_FAM: every name is redefined.
 */
#include "lib/parse.h"   /* kp_in6_eq, kp_in6_is_zero, struct kp_pkt6 */

#ifndef KP_FAM
#error "define KP_FAM (4 or 6) before including lib/fam.h"
#endif

#ifndef KPROXY_LIB_FAM_ONCE
#define KPROXY_LIB_FAM_ONCE
#define KP_CAT2(a, b) a##b
#define KP_CAT(a, b) KP_CAT2(a, b)
#define KP_F(name) KP_CAT(name, KP_FAM)
#endif

#undef KP_ADDR
#undef KP_PKT
#undef KP_SVC_KEY
#undef KP_BE_VAL
#undef KP_CT_KEY
#undef KP_CT_VAL
#undef KP_AFF_KEY
#undef KP_SVC_MAP
#undef KP_BE_MAP
#undef KP_CT_MAP
#undef KP_AFF_MAP
#undef KP_SNAT_KEY
#undef KP_SNAT_VAL
#undef KP_SNAT_MAP
#undef KP_ADDR_EQ
#undef KP_ADDR_IS_ZERO
#undef KP_ADDR_NONE
#undef KP_ADDR_FOLD
#undef KP_DSR_OPT_T
#undef KP_DSR_EXTRA
#undef KP_TUNNEL_HLEN
#undef KP_SCRATCH_CT_KEY
#undef KP_SCRATCH_CT_VAL

#if KP_FAM == 4
#define KP_ADDR            __be32
#define KP_PKT             struct kp_pkt
#define KP_SVC_KEY         struct kp_svc4_key
#define KP_BE_VAL          struct kp_be4_val
#define KP_CT_KEY          struct kp_ct4_key
#define KP_CT_VAL          struct kp_ct4_val
#define KP_AFF_KEY         struct kp_aff4_key
#define KP_SVC_MAP         kp_svc4_v1
#define KP_BE_MAP          kp_be4_v1
#define KP_CT_MAP          kp_ct4_v1
#define KP_AFF_MAP         kp_aff4_v1
#define KP_SNAT_KEY        struct kp_snat4_key
#define KP_SNAT_VAL        struct kp_snat4_val
#define KP_SNAT_MAP        kp_snat4_v1
#define KP_ADDR_EQ(a, b)   ((a) == (b))
#define KP_ADDR_IS_ZERO(a) ((a) == 0)
#define KP_ADDR_NONE       0
#define KP_ADDR_FOLD(a)    (a)
#define KP_DSR_OPT_T       struct kp_dsr_opt
#define KP_DSR_EXTRA       KP_DSR_OPT_LEN
#define KP_TUNNEL_HLEN     20
#define KP_SCRATCH_CT_KEY  ct_key
#define KP_SCRATCH_CT_VAL  ct_val
#elif KP_FAM == 6
#define KP_ADDR            union kp_in6
#define KP_PKT             struct kp_pkt6
#define KP_SVC_KEY         struct kp_svc6_key
#define KP_BE_VAL          struct kp_be6_val
#define KP_CT_KEY          struct kp_ct6_key
#define KP_CT_VAL          struct kp_ct6_val
#define KP_AFF_KEY         struct kp_aff6_key
#define KP_SVC_MAP         kp_svc6_v1
#define KP_BE_MAP          kp_be6_v1
#define KP_CT_MAP          kp_ct6_v1
#define KP_AFF_MAP         kp_aff6_v1
#define KP_SNAT_KEY        struct kp_snat6_key
#define KP_SNAT_VAL        struct kp_snat6_val
#define KP_SNAT_MAP        kp_snat6_v1
#define KP_ADDR_EQ(a, b)   kp_in6_eq((a), (b))
#define KP_ADDR_IS_ZERO(a) kp_in6_is_zero(a)
#define KP_ADDR_NONE       ((union kp_in6){})
#define KP_ADDR_FOLD(a)    kp_in6_fold(a)
#define KP_DSR_OPT_T       struct kp_dsr6_opt
#define KP_DSR_EXTRA       KP_DSR6_HDR_LEN
#define KP_TUNNEL_HLEN     40
#define KP_SCRATCH_CT_KEY  ct6_key
#define KP_SCRATCH_CT_VAL  ct6_val
#else
#error "KP_FAM must be 4 or 6"
#endif
