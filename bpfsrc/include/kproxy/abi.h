/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * kproxy map ABI: every key, value, flag and size shared between the BPF
 * programs and the agent. This file is the one source of truth; the Python
 * mirror lives in kproxy/abi.py and tests/abi/ checks every size and
 * field offset of that mirror against the BTF of the built object.
 *
 * Rules: fixed-width fields, explicit padding, no bitfields. Each field says
 * its byte order: NBO = network byte order, HBO = host byte order.
 * A layout change gets a new map name (bump _vN) and a migration, never an
 * in-place edit of a pinned map.
 */
#ifndef KPROXY_ABI_H
#define KPROXY_ABI_H

#include <linux/types.h>

/* ---- map names (<= 15 characters, carry the layout version) ---- */
#define KP_MAP_SVC4     kp_svc4_v1   /* frontend (VIP, port, proto, scope, slot) -> service / backend slot */
#define KP_MAP_BE4      kp_be4_v1    /* backend id -> backend address */
#define KP_MAP_CT4      kp_ct4_v1    /* LRU conntrack, one entry per direction */
#define KP_MAP_AFF4     kp_aff4_v1   /* LRU sessionAffinity ClientIP (client, service) -> backend */
#define KP_MAP_CFG      kp_cfg_v1    /* array[1]: node settings changeable at run time */
#define KP_MAP_STATS    kp_stats_v1  /* per-CPU array of counters, indexed by enum kp_stat */
#define KP_MAP_SNAT4    kp_snat4_v1  /* LRU SNAT of external flows: backend reply tuple -> client, frontend */

/* ---- default capacities (overridable at load time) ---- */
#define KP_SVC4_MAX     262144
#define KP_BE4_MAX      262144
#define KP_CT4_MAX      262144
#define KP_AFF4_MAX     65536
#define KP_SNAT4_MAX    262144

/* ---- service map ---- */
enum kp_scope {
	KP_SCOPE_EXT = 0,   /* traffic from outside the cluster (and all traffic of one-scope services) */
	KP_SCOPE_INT = 1,   /* traffic from pods, when KP_SVC_F_TWO_SCOPES is set */
};

struct kp_svc4_key {
	__be32 addr;        /* NBO frontend address (ClusterIP, node address, LB or external IP) */
	__be16 port;        /* NBO frontend port */
	__u16  slot;        /* HBO 0 = the service entry; 1..count = backend slots */
	__u8   proto;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   scope;       /* enum kp_scope */
	__u8   pad[2];      /* zero */
};

/* slot-0 flags */
#define KP_SVC_F_NODEPORT      0x0001  /* frontend is a NodePort on a node address */
#define KP_SVC_F_LOADBALANCER  0x0002  /* frontend is a LoadBalancer ingress IP */
#define KP_SVC_F_EXTERNAL_IP   0x0004  /* frontend is a spec.externalIPs address */
#define KP_SVC_F_AFFINITY      0x0008  /* sessionAffinity ClientIP, timeout in affinity_timeout */
#define KP_SVC_F_ETP_LOCAL     0x0010  /* externalTrafficPolicy: Local */
#define KP_SVC_F_ITP_LOCAL     0x0020  /* internalTrafficPolicy: Local */
#define KP_SVC_F_TWO_SCOPES    0x0040  /* a KP_SCOPE_INT entry exists: pods look that one up */
#define KP_SVC_F_SRC_RANGES    0x0080  /* loadBalancerSourceRanges apply (checked by a later map) */
#define KP_SVC_F_NO_LOCAL_DROP 0x0100  /* count == 0 because no local endpoint: drop, do not reject */
#define KP_SVC_F_MAGLEV        0x0200  /* new flows pick their backend from the Maglev table of svc_id
				        * (kp_maglev_v1), else from a random slot */

struct kp_svc4_val {
	__u32 backend_id;        /* HBO slot > 0: backend id (kp_be4_v1 key); slot 0: 0 */
	__u32 svc_id;            /* HBO service-port id shared by all frontends of one Service port */
	__u16 count;             /* HBO slot 0: number of active backend slots (1..count) */
	__u16 flags;             /* HBO slot 0: KP_SVC_F_* */
	__u32 affinity_timeout;  /* HBO slot 0: sessionAffinity timeout in seconds, 0 = none */
};

/* ---- backend map ---- */
#define KP_BE_F_LOCAL        0x01  /* backend runs on this node */
#define KP_BE_F_TERMINATING  0x02  /* endpoint is terminating: keeps its flows, gets no new ones */

struct kp_be4_val {
	__be32 addr;        /* NBO backend (pod) address */
	__be16 port;        /* NBO backend port */
	__u8   proto;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   flags;       /* KP_BE_F_* */
	__be32 node_addr;   /* NBO address of the node running the backend, 0 if unknown */
};

/* ---- conntrack ---- */
enum kp_ct_dir {
	KP_CT_DIR_FWD = 0,    /* key: client -> frontend tuple, as the client sent it */
	KP_CT_DIR_REPLY = 1,  /* key: backend -> client tuple, as the backend sends it */
};

enum kp_ct_state {
	/* SCTP flows use the TCP states, their chunks mapped onto TCP flags (lib/sctp.h: kp_sctp_flags) */
	KP_CT_SYN_SENT = 1,     /* TCP: SYN seen, no reply yet; SCTP: no reply yet (INIT sent) */
	KP_CT_ESTABLISHED = 2,  /* TCP: reply seen; SCTP: reply seen (INIT ACK onwards) */
	KP_CT_CLOSING = 3,      /* TCP: FIN seen; SCTP: SHUTDOWN or SHUTDOWN ACK seen */
	KP_CT_CLOSED = 4,       /* TCP: RST seen; SNAT: also FIN seen from both ends (kp_snat_fin_state);
				 * SCTP: ABORT or SHUTDOWN COMPLETE seen */
	KP_CT_UDP = 5,          /* UDP flow */
};

#define KP_CT_F_SEEN_REPLY  0x01  /* a packet of the reply direction was seen */
#define KP_CT_F_LOCAL_BE    0x02  /* backend is local to this node */
#define KP_CT_F_EXTERNAL    0x04  /* flow entered through a netdev (from outside) */
#define KP_CT_F_SNAT        0x08  /* ingress node: source rewritten to snat_addr:snat_port (kp_snat4_v1) */
#define KP_CT_F_DSR_OPT     0x10  /* DSR, IPv4 option or IPv6 destination option: sent so / received so */
#define KP_CT_F_DSR_IPIP    0x20  /* DSR, BPF-made IPIP or IPv6-in-IPv6: sent so / received so */
#define KP_CT_F_HAIRPIN     0x40  /* pod balanced to itself: source rewritten to the hairpin address */
#define KP_CT_F_TW_TS       0x80  /* SNAT: tw_key is a TCP timestamp (else a sequence number) */

struct kp_ct4_key {
	__be32 saddr;       /* NBO source address */
	__be32 daddr;       /* NBO destination address */
	__be16 sport;       /* NBO source port */
	__be16 dport;       /* NBO destination port */
	__u8   proto;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   dir;         /* enum kp_ct_dir */
	__u8   pad[2];      /* zero */
};

struct kp_ct4_val {
	__u64  expires_ns;  /* HBO CLOCK_MONOTONIC (bpf_ktime_get_ns) time after which the entry is dead */
	__u32  backend_id;  /* HBO backend chosen for the flow */
	__u32  svc_id;      /* HBO service-port id */
	__be32 nat_addr;    /* NBO FWD: backend address to DNAT to; REPLY: frontend address to restore */
	__be16 nat_port;    /* NBO FWD: backend port; REPLY: frontend port */
	__u8   state;       /* enum kp_ct_state */
	__u8   flags;       /* KP_CT_F_* */
	__be32 snat_addr;   /* NBO FWD of SNAT/HAIRPIN: source address toward the backend; REPLY of HAIRPIN: client address */
	__be16 snat_port;   /* NBO FWD of SNAT/HAIRPIN: source port toward the backend; REPLY of HAIRPIN: client port */
	__u16  tw_key;      /* HBO SNAT, once the client sent its FIN: what the backend's TIME_WAIT accepts a new
	                     * SYN beyond (lib/snat.h); 0 = not known. Was zero padding: same layout. */
};

/* Entries are rewritten at most this often per flow unless the state changes. */
#define KP_CT_REFRESH_NS  1000000000ULL

/* ---- session affinity ---- */
struct kp_aff4_key {
	__be32 client_addr; /* NBO client address */
	__u32  svc_id;      /* HBO service-port id */
};

struct kp_aff4_val {
	__u64 last_used_ns; /* HBO CLOCK_MONOTONIC time of the last new connection */
	__u32 backend_id;   /* HBO backend chosen */
	__u32 pad;          /* zero */
};

/* ---- run-time config (array of one) ---- */
enum kp_dsr_mode {
	KP_DSR_OFF = 0,
	KP_DSR_OPT = 1,   /* an IPv4 option / IPv6 destination option carries the service address */
	KP_DSR_IPIP = 2,  /* BPF-made IPIP / IPv6-in-IPv6 encapsulation (the option inside) */
};

struct kp_config {
	__be32 node_addr;        /* NBO this node's primary address (SNAT source, DSR) */
	__u32  flags;            /* HBO KP_CFG_F_* */
	__u32  dsr_mode;         /* HBO enum kp_dsr_mode */
	__u32  ct_syn_timeout;   /* HBO seconds, TCP before a reply is seen */
	__u32  ct_tcp_timeout;   /* HBO seconds, established TCP */
	__u32  ct_fin_timeout;   /* HBO seconds, TCP after FIN or RST */
	__u32  ct_udp_timeout;   /* HBO seconds, UDP */
	__u32  ct_sctp_timeout;  /* HBO seconds, established SCTP (was zero padding: same layout) */
	__be32 hairpin_addr;     /* NBO source of a pod's packets balanced to itself; 0 = KP_HAIRPIN_ADDR_DEFAULT */
	__u16  snat_port_min;    /* HBO first SNAT source port; 0 = KP_SNAT_PORT_MIN_DEFAULT */
	__u16  snat_port_max;    /* HBO last SNAT source port; 0 = KP_SNAT_PORT_MAX_DEFAULT */
	__u32  lan_mtu;          /* HBO MTU between nodes, for the DSR IPIP MSS clamp; 0 = KP_LAN_MTU_DEFAULT */
	__u16  ct_sctp_init_timeout;  /* HBO seconds, SCTP before a reply is seen (was zero padding: same layout) */
	__u16  ct_sctp_close_timeout; /* HBO seconds, SCTP after SHUTDOWN, ABORT or SHUTDOWN COMPLETE (idem) */
	__u64  orphan_until_ns;  /* CLOCK_MONOTONIC: until then, TCP packets from a netdev to no frontend are
				  * looked up in conntrack (a frontend was deleted while its flows lived);
				  * 0 = never */
	__u64  host_netns_cookie; /* HBO the agent's network namespace cookie (SO_NETNS_COOKIE): the node's,
				   * for KP_CFG_F_SOCK_HOST_NETNS_ONLY and KP_CFG_F_LOCALHOST_NODEPORTS; 0 =
				   * unknown. Was "reserved" (zero): same layout */
};

/* kp_config.flags */
#define KP_CFG_F_NO_EXTERNAL_CLUSTER_IP 0x1  /* drop packets to ClusterIPs from outside the node */
#define KP_CFG_F_LOCALHOST_NODEPORTS    0x2  /* socket LB: a NodePort on 127.0.0.0/8 is served as on
					      * node_addr, to sockets of host_netns_cookie's namespace */
#define KP_CFG_F_SOCK_HOST_NETNS_ONLY   0x4  /* socket LB: only sockets of host_netns_cookie's namespace */

#define KP_CT_SYN_TIMEOUT_DEFAULT  60
#define KP_CT_TCP_TIMEOUT_DEFAULT  21600
#define KP_CT_FIN_TIMEOUT_DEFAULT  10
#define KP_CT_UDP_TIMEOUT_DEFAULT  60
/* SCTP as nf_conntrack_proto_sctp: COOKIE_WAIT 3 s, ESTABLISHED 210 s, CLOSED 10 s */
#define KP_CT_SCTP_INIT_TIMEOUT_DEFAULT  3
#define KP_CT_SCTP_TIMEOUT_DEFAULT       210
#define KP_CT_SCTP_CLOSE_TIMEOUT_DEFAULT 10
#define KP_HAIRPIN_ADDR_DEFAULT    0xa9fe2a01  /* HBO 169.254.42.1 */
#define KP_SNAT_PORT_MIN_DEFAULT   32768
#define KP_SNAT_PORT_MAX_DEFAULT   65535
#define KP_LAN_MTU_DEFAULT         1500

/* ---- SNAT of external flows to remote backends (ingress node) ---- */
/* Key: the reply tuple as the backend sends it (backend -> snat_addr:nat_port). */
struct kp_snat4_key {
	__be32 saddr;       /* NBO backend address */
	__be32 daddr;       /* NBO SNAT address (this node's address) */
	__be16 sport;       /* NBO backend port */
	__be16 dport;       /* NBO SNAT port, from kp_config snat_port_min..max */
	__u8   proto;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad[3];      /* zero */
};

struct kp_snat4_val {
	__u64  expires_ns;  /* HBO CLOCK_MONOTONIC death time: the CT FWD expiry, + 60 s (TIME_WAIT hold) once closing/closed */
	__be32 client_addr; /* NBO original client address: destination restored on replies */
	__be32 front_addr;  /* NBO frontend address: source restored on replies */
	__be16 client_port; /* NBO original client port */
	__be16 front_port;  /* NBO frontend port */
	__u8   state;       /* enum kp_ct_state, copy of the CT FWD entry's */
	__u8   flags;       /* KP_CT_F_*, copy of the CT FWD entry's */
	__u16  tw_key;      /* HBO copy of the CT FWD entry's (lib/snat.h); was zero padding: same layout */
};

/* DSR IPv4 option (as Cilium's DSR_IPV4_OPT_TYPE): copied-on-fragmentation bit | 0x1a. */
#define KP_DSR_OPT_TYPE  0x9a
#define KP_DSR_OPT_LEN   8
struct kp_dsr_opt {
	__u8   type;        /* KP_DSR_OPT_TYPE */
	__u8   len;         /* KP_DSR_OPT_LEN */
	__be16 port;        /* NBO service (frontend) port */
	__be32 addr;        /* NBO service (frontend) address */
};

/* ---- counters ---- */
struct kp_counter {
	__u64 packets;      /* HBO */
	__u64 bytes;        /* HBO */
};

enum kp_stat {
	/* packets seen per program */
	KP_STAT_FROM_POD = 0,
	KP_STAT_TO_POD = 1,
	KP_STAT_FROM_NETDEV = 2,
	KP_STAT_TO_NETDEV = 3,
	KP_STAT_FROM_XDP = 4,           /* packets seen by kp_xdp (acceleration on the netdevs), every family */
	/* decisions */
	KP_STAT_DNAT = 8,             /* forward packets translated to a backend */
	KP_STAT_REVNAT = 9,           /* reply packets translated back to the frontend */
	KP_STAT_CT_NEW = 10,          /* new flows */
	KP_STAT_AFFINITY_HIT = 11,    /* new flows sent to the backend remembered by affinity */
	KP_STAT_ICMP_REVNAT = 12,     /* ICMP errors translated back to the frontend */
	KP_STAT_REJECT = 13,          /* service without backends answered with ICMP unreachable */
	KP_STAT_PASS_FRAGMENT = 14,   /* IPv4 fragments passed untouched */
	KP_STAT_CT_REOPEN = 15,       /* flows re-balanced because their backend vanished or the tuple was reused */
	KP_STAT_SNAT = 20,            /* external packets SNATed to this node toward a remote backend */
	KP_STAT_SNAT_REVNAT = 21,     /* replies of SNATed flows translated back to the client */
	KP_STAT_SNAT_NEW = 22,        /* SNAT ports allocated (new SNATed flows) */
	KP_STAT_SNAT_RETRY = 23,      /* SNAT port candidates found taken (allocation retries) */
	KP_STAT_DSR_OPT_TX = 24,      /* packets sent to a remote backend with the DSR IPv4 option */
	KP_STAT_DSR_IPIP_TX = 25,     /* packets sent to a remote backend's node IPIP-encapsulated */
	KP_STAT_DSR_RX = 26,          /* DSR packets received for a local backend (option/encapsulation removed) */
	KP_STAT_DSR_FWD = 27,         /* later packets of DSR flows forwarded without option or encapsulation */
	KP_STAT_HAIRPIN = 28,         /* packets of pods balanced to themselves */
	KP_STAT_MSS_CLAMP = 29,       /* SYN-ACKs of DSR IPIP flows whose MSS was lowered */
	KP_STAT_FRAG_NEEDED = 30,     /* ICMP fragmentation-needed sent for packets too big after the DSR header */
	KP_STAT_ICMP_SNAT = 31,       /* ICMP errors about SNATed flows translated to the client */
	KP_STAT_CT_STALE_REPLY = 44,  /* SYN from a backend hit a closing/closed flow's REPLY entry: passed untranslated, flow deleted */
	KP_STAT_CT_TAKEOVER = 45,     /* a new connection (direct SYN or new Service flow) took over another flow's REPLY tuple */
	/* socket-level load balancing (cgroup hooks, bpfsrc/kproxy_sock.bpf.c); bytes stay 0 */
	KP_STAT_SOCK_CONNECT = 16,            /* connect() to a frontend rewritten to a backend */
	KP_STAT_SOCK_SENDMSG = 17,            /* unconnected UDP sendmsg() to a frontend rewritten */
	KP_STAT_SOCK_RECVMSG_REVNAT = 18,     /* UDP recvmsg() source restored to the frontend */
	KP_STAT_SOCK_GETPEERNAME_REVNAT = 19, /* getpeername() answered with the frontend */
	/* drops, by reason */
	KP_DROP_NO_LOCAL_BACKEND = 32,  /* externalTrafficPolicy Local and no local endpoint */
	KP_DROP_CT_FULL = 33,           /* conntrack entry could not be written */
	KP_DROP_REJECT_FAILED = 34,     /* building the ICMP unreachable failed */
	KP_DROP_NAT_FAILED = 35,        /* a packet rewrite helper failed */
	KP_DROP_BACKEND_MISSING = 36,   /* a slot named a backend id the backend map lacks */
	KP_DROP_SRC_RANGE = 37,         /* source not in loadBalancerSourceRanges */
	KP_DROP_SNAT_NO_PORT = 40,      /* no free SNAT port within KP_SNAT_MAX_RETRIES candidates */
	KP_DROP_FIB = 41,               /* forwarding lookup failed for a packet only BPF may forward */
	KP_DROP_DSR_TOO_BIG = 42,       /* packet without DF too big once the DSR option/header is added */
	KP_DROP_ENCAP_FAILED = 43,      /* adding or removing the DSR option or IPIP header failed */
	KP_DROP_SOCK_NO_BACKEND = 38,   /* connect()/sendmsg() to a frontend without backends refused */
	KP_DROP_SOCK_REVNAT_FULL = 39,  /* UDP socket reverse-NAT entry could not be written: refused */
	KP_DROP_TUPLE_HELD = 46,        /* new TCP flow: every backend tried would reuse the reply tuple of a
	                                 * live connection of the same client port (lib/ct.h) */
	KP_STAT_SVCNET_REJECT = 47,     /* to a ClusterIP on a port or protocol it does not serve: ICMP unreachable */
	KP_DROP_SVCNET = 48,            /* to an unallocated address of a service CIDR */
	KP_DROP_CLUSTER_IP_EXTERNAL = 49, /* to a ClusterIP from outside the node, with that switched off */
	KP_STAT_FRAG_FIRST = 50,        /* first fragments of TCP/UDP datagrams: ports recorded (kp_frag4_v1) */
	KP_STAT_FRAG_LATER = 51,        /* later fragments handled with their first fragment's ports */
	KP_DROP_FRAGMENT = 52,          /* a later fragment of a datagram answered port unreachable (its first
	                                 * fragment carried the answer) */
	KP_STAT_CT_ORPHAN = 53,         /* packets of established TCP flows whose frontend is gone, translated
	                                 * from their conntrack entry (kube-proxy's conntrack keeps them) */
	KP_STAT_MAGLEV = 54,            /* new flows sent to the backend their Maglev table holds */
	KP_STAT_MAGLEV_FALLBACK = 55,   /* new flows of a Maglev frontend without a usable table entry (none
	                                 * yet, a terminating backend): a random slot */
	KP_STAT_XDP_FWD = 56,           /* packets kp_xdp sent out itself (to a remote backend, back to a client) */
	KP_STAT_XDP_LOCAL = 57,         /* packets kp_xdp DNATed for a local backend and handed to the stack */
	KP_STAT_XDP_NEW = 58,           /* flows kp_xdp opened itself (backend picked, tracked) on their first packet */
	KP_STAT_XDP_REDIRECT = 59,      /* packets kp_xdp sent out another accelerated netdev (XDP_REDIRECT) */
	KP_STAT_PASS_NO_PROG = 60,      /* packets a TC entry point passed untranslated because the program
	                                 * array slot it tail-calls was empty (kp_progs6_v1, kp_sctp_v1) */
	KP_STAT_MAX = 64,
};

/* ---- IPv6 (lib/fam.h builds the family-generic logic once per family over these) ----
 * The *6 maps hold what the *4 maps hold, for IPv6 frontends, backends and flows: the same fields in
 * the same order with 16-byte addresses. Values without an address (kp_svc4_val, kp_aff4_val) are
 * shared. Backend and service-port ids of IPv6 are >= KP_ID6_BASE, so one id names one thing whatever
 * its family: the agent's metadata, the CLI and conntrack never confuse two.
 */
#define KP_MAP_SVC6     kp_svc6_v1   /* frontend (VIP, port, proto, scope, slot) -> kp_svc4_val */
#define KP_MAP_BE6      kp_be6_v1    /* backend id -> backend address */
#define KP_MAP_CT6      kp_ct6_v1    /* LRU conntrack, one entry per direction */
#define KP_MAP_AFF6     kp_aff6_v1   /* LRU sessionAffinity ClientIP (client, service) -> backend */
#define KP_MAP_CFG6     kp_cfg6_v1   /* array[1]: the node's IPv6 settings changeable at run time */

#define KP_MAP_LBSRC6   kp_lbsrc6_v1 /* LPM trie (svc_id, IPv6 source prefix) -> allowed, as kp_lbsrc4_v1 */

#define KP_SVC6_MAX     65536
#define KP_BE6_MAX      65536
#define KP_CT6_MAX      65536
#define KP_AFF6_MAX     16384
#define KP_LBSRC6_MAX   16384

#define KP_ID6_BASE     0x80000000U  /* first backend and service-port id of IPv6 */

union kp_in6 {
	__u8   b[16];       /* NBO IPv6 address */
	__be32 w[4];        /* NBO the same, as four words */
};

/*
 * DSR for IPv6: a destination options extension header right after the fixed header, holding one
 * option (as Cilium's DSR_IPV6_OPT_TYPE): type 0x1b, whose top bits 00 tell a host that does not know
 * it to skip it. 24 bytes: the header's 2, the option's 2, 20 of data (address, port, 2 of padding).
 */
#define KP_DSR6_OPT_TYPE   0x1b
#define KP_DSR6_OPT_LEN    20   /* the option's data length */
#define KP_DSR6_HDR_LEN    24   /* the whole extension header */
struct kp_dsr6_opt {
	__u8   nexthdr;     /* the header that followed the fixed header before this one was inserted */
	__u8   hdrlen;      /* (KP_DSR6_HDR_LEN / 8) - 1 */
	__u8   type;        /* KP_DSR6_OPT_TYPE */
	__u8   len;         /* KP_DSR6_OPT_LEN */
	union kp_in6 addr;  /* NBO service (frontend) address */
	__be16 port;        /* NBO service (frontend) port */
	__u16  pad;         /* zero */
};

struct kp_svc6_key {
	union kp_in6 addr;  /* NBO frontend address */
	__be16 port;        /* NBO frontend port */
	__u16  slot;        /* HBO 0 = the service entry; 1..count = backend slots */
	__u8   proto;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   scope;       /* enum kp_scope */
	__u8   pad[2];      /* zero */
};

struct kp_be6_val {
	union kp_in6 addr;      /* NBO backend (pod) address */
	__be16 port;            /* NBO backend port */
	__u8   proto;           /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   flags;           /* KP_BE_F_* */
	union kp_in6 node_addr; /* NBO IPv6 address of the node running the backend, :: if unknown */
};

struct kp_ct6_key {
	union kp_in6 saddr; /* NBO source address */
	union kp_in6 daddr; /* NBO destination address */
	__be16 sport;       /* NBO source port */
	__be16 dport;       /* NBO destination port */
	__u8   proto;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   dir;         /* enum kp_ct_dir */
	__u8   pad[2];      /* zero */
};

struct kp_ct6_val {
	__u64  expires_ns;      /* HBO as kp_ct4_val */
	__u32  backend_id;      /* HBO backend chosen for the flow (kp_be6_v1 key) */
	__u32  svc_id;          /* HBO service-port id */
	union kp_in6 nat_addr;  /* NBO FWD: backend address to DNAT to; REPLY: frontend address to restore */
	__be16 nat_port;        /* NBO FWD: backend port; REPLY: frontend port */
	__u8   state;           /* enum kp_ct_state */
	__u8   flags;           /* KP_CT_F_* */
	union kp_in6 snat_addr; /* NBO as kp_ct4_val.snat_addr (HAIRPIN: the hairpin address / the client) */
	__be16 snat_port;       /* NBO as kp_ct4_val.snat_port */
	__u16  tw_key;          /* HBO as kp_ct4_val.tw_key */
};

struct kp_aff6_key {
	union kp_in6 client_addr; /* NBO client address */
	__u32  svc_id;            /* HBO service-port id */
};

/* prefixlen = KP_LBSRC4_SVC_BITS + CIDR length (0..128); values are struct kp_lbsrc4_val */
struct kp_lbsrc6_key {
	__u32  prefixlen;   /* HBO KP_LBSRC4_SVC_BITS + CIDR prefix length */
	__u32  svc_id;      /* HBO service-port id, always matched in full */
	union kp_in6 addr;  /* NBO network address of the range (host bits zero) */
};

#define KP_MAP_SNAT6   kp_snat6_v1  /* LRU SNAT of external IPv6 flows: backend reply tuple -> client, frontend */
#define KP_SNAT6_MAX   65536

/* As kp_snat4_key / kp_snat4_val, with 16-byte addresses; daddr is the node's IPv6 address. */
struct kp_snat6_key {
	union kp_in6 saddr; /* NBO backend address */
	union kp_in6 daddr; /* NBO SNAT address (this node's primary IPv6 address) */
	__be16 sport;       /* NBO backend port */
	__be16 dport;       /* NBO SNAT port, from kp_config snat_port_min..max */
	__u8   proto;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad[3];      /* zero */
};

struct kp_snat6_val {
	__u64  expires_ns;         /* HBO as kp_snat4_val */
	union kp_in6 client_addr;  /* NBO original client address */
	union kp_in6 front_addr;   /* NBO frontend address */
	__be16 client_port;        /* NBO original client port */
	__be16 front_port;         /* NBO frontend port */
	__u8   state;              /* enum kp_ct_state, copy of the CT FWD entry's */
	__u8   flags;              /* KP_CT_F_*, copy of the CT FWD entry's */
	__u16  tw_key;             /* HBO copy of the CT FWD entry's */
};

#define KP_MAP_FRAG6   kp_frag6_v1  /* LRU (saddr, daddr, fragment id, protocol) -> the datagram's ports */
#define KP_FRAG6_MAX   8192

/*
 * As kp_frag4_key, for IPv6 fragments. Every fragment of a datagram carries the same fragment header
 * (identification, next header), but only the first holds the headers after it (destination options,
 * the TCP/UDP header): the key has the fragment header's next header, the value the upper-layer
 * protocol the first fragment found.
 */
struct kp_frag6_key {
	union kp_in6 saddr; /* NBO */
	union kp_in6 daddr; /* NBO */
	__be32 id;          /* NBO fragment header identification */
	__u8   nexthdr;     /* the fragment header's next header */
	__u8   pad[3];      /* zero */
};

struct kp_frag6_val {
	__be16 sport;       /* NBO */
	__be16 dport;       /* NBO */
	__u8   proto;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad[3];      /* zero */
};

struct kp_config6 {
	union kp_in6 node_addr;    /* NBO this node's primary IPv6 address, :: if none */
	union kp_in6 hairpin_addr; /* NBO source of a pod's packets balanced to itself; :: = KP_HAIRPIN6_DEFAULT */
	__u64  reserved[4];        /* zero, room for later settings */
};

/* 100::a9fe:2a01, in the discard-only prefix 100::/64 (RFC 6666): never a real peer, as 169.254.42.1 */
#define KP_HAIRPIN6_DEFAULT_W0  0x01000000U  /* HBO first word of the address (words 1, 2 zero) */
#define KP_HAIRPIN6_DEFAULT_W3  0xa9fe2a01U  /* HBO last word */

/* ---- test-run context ---- */
/* sizeof(struct __sk_buff) on this kernel, for BPF_PROG_TEST_RUN ctx_in. */
#define KP_SKB_CTX_SIZE 192

/* ---- socket-level load balancing (cgroup connect, sendmsg, recvmsg, getpeername; 4 and 6) ---- */
#define KP_MAP_SKNAT4   kp_sknat4_v1 /* LRU (socket, backend) -> frontend, to restore the peer address */
#define KP_SKNAT4_MAX   65536
#define KP_MAP_SKNAT6   kp_sknat6_v1 /* as kp_sknat4_v1, for IPv6 frontends (IPv4-mapped ones use sknat4) */
#define KP_SKNAT6_MAX   65536

/*
 * The socket hooks rewrite the destination a socket asks for (the frontend) to a backend before the
 * kernel routes it, so no packet carries the frontend. recvmsg4 and getpeername4 see the backend as
 * the peer and look it up here, per socket, to report the frontend instead.
 */
struct kp_sknat4_key {
	__u64  cookie;      /* HBO bpf_get_socket_cookie() of the client socket, unique per boot */
	__be32 addr;        /* NBO backend address the socket was sent to */
	__be16 port;        /* NBO backend port */
	__u16  pad;         /* zero */
};

struct kp_sknat4_val {
	__be32 addr;        /* NBO frontend address to report as the peer */
	__be16 port;        /* NBO frontend port */
	__u16  pad;         /* zero */
	__u32  svc_id;      /* HBO service-port id of the frontend */
	__u32  backend_id;  /* HBO backend id chosen (kp_be4_v1 key) */
};

/*
 * As kp_sknat4_key, for sockets sent to an IPv6 backend. An AF_INET6 socket sent to an IPv4-mapped
 * frontend (::ffff:a.b.c.d, a dual-stack socket) has an IPv4 flow: its entry is kp_sknat4_v1's.
 */
struct kp_sknat6_key {
	__u64  cookie;      /* HBO bpf_get_socket_cookie() of the client socket, unique per boot */
	union kp_in6 addr;  /* NBO backend address the socket was sent to */
	__be16 port;        /* NBO backend port */
	__u16  pad[3];      /* zero */
};

struct kp_sknat6_val {
	union kp_in6 addr;  /* NBO frontend address to report as the peer */
	__be16 port;        /* NBO frontend port */
	__u16  pad;         /* zero */
	__u32  svc_id;      /* HBO service-port id of the frontend */
	__u32  backend_id;  /* HBO backend id chosen (kp_be6_v1 key) */
};

/* ---- connected UDP sockets of removed backends (kproxy_iter.bpf.c, iter/udp + bpf_sock_destroy) ---- */
#define KP_MAP_SKD      kp_skd_v1    /* hash: (family, svc_id, backend) that left a Service, for one iteration */
#define KP_SKD_MAX      4096         /* entries per iteration; the agent runs more iterations for more */

/*
 * A backend that left a Service in one sync. The agent fills kp_skd_v1 with them, runs the UDP socket
 * iterator in each network namespace of the socket-LB cgroup, then empties it. A connected UDP socket
 * whose peer is ADDR:PORT and whose reverse entry (kp_sknat4_v1 / kp_sknat6_v1: same cookie, same
 * backend) names SVC_ID is destroyed (ECONNABORTED): it reached that backend through that Service.
 * Not pinned: it lives as long as the agent's iterator.
 */
struct kp_skd_key {
	union kp_in6 addr;  /* NBO backend address; IPv4: w[0], words 1..3 zero */
	__u32  svc_id;      /* HBO service-port id the backend left */
	__be16 port;        /* NBO backend port */
	__u8   family;      /* 4 or 6: the flow's family (a v4-mapped peer of an AF_INET6 socket is 4) */
	__u8   proto;       /* IPPROTO_UDP */
};

/* What the iterator writes (bpf_seq_write) for each socket it matched, destroyed or not. */
struct kp_skd_event {
	__u64  cookie;      /* HBO socket cookie */
	union kp_in6 addr;  /* NBO backend (peer) address; IPv4: w[0] */
	__u32  svc_id;      /* HBO service-port id (kp_sknat*_val.svc_id) */
	__s32  err;         /* HBO bpf_sock_destroy() result: 0, or -errno */
	__be16 port;        /* NBO backend port */
	__u8   family;      /* 4 or 6, as kp_skd_key.family */
	__u8   pad[5];      /* zero */
};

/* ---- loadBalancerSourceRanges (LPM trie) ---- */
#define KP_MAP_LBSRC4   kp_lbsrc4_v1 /* LPM trie (svc_id, source prefix) -> allowed, for KP_SVC_F_SRC_RANGES */
#define KP_LBSRC4_MAX   65536

/*
 * One entry per (service port, allowed IPv4 source range). The trie's prefix covers svc_id in full
 * and then the range's bits: prefixlen = KP_LBSRC4_SVC_BITS + CIDR length (0..32). A new flow to a
 * frontend flagged KP_SVC_F_SRC_RANGES looks up (64, svc_id, source address): a miss drops it
 * (KP_DROP_SRC_RANGE). The agent writes the ranges before the slot-0 flag, and deletes them after
 * clearing it.
 */
#define KP_LBSRC4_SVC_BITS 32
struct kp_lbsrc4_key {
	__u32  prefixlen;   /* HBO KP_LBSRC4_SVC_BITS + CIDR prefix length */
	__u32  svc_id;      /* HBO service-port id (kp_svc4_val.svc_id), always matched in full */
	__be32 addr;        /* NBO network address of the range (host bits zero) */
};

struct kp_lbsrc4_val {
	__u32 flags;        /* HBO reserved, zero: the entry's presence allows the range */
};

/* ---- the service address space (kube-proxy's cluster-ips-check) ---- */
#define KP_MAP_SVCNET4      kp_svcnet4_v1      /* LPM trie: ClusterIPs (/32) and service CIDRs */
#define KP_MAP_SVCNET_SPAN  kp_svcnet_span_v1  /* array of one struct kp_svcnet_span */
#define KP_SVCNET4_MAX      65536

/*
 * A packet that matches no frontend and opens a flow (TCP SYN, UDP, ICMP echo request) is looked up
 * here by destination: a ClusterIP (/32, KP_SVCNET_REJECT: a port or protocol the Service does not
 * have) is answered with ICMP port unreachable, any other address of a service CIDR
 * (KP_SVCNET_DROP: not allocated) is dropped, as kube-proxy's nftables cluster-ips-check chain does.
 * The span (lowest and highest address any entry covers) lets all other traffic skip the lookup.
 */
enum kp_svcnet_action {
	KP_SVCNET_REJECT = 1,
	KP_SVCNET_DROP = 2,
	KP_SVCNET_PASS = 3,   /* a ClusterIP another proxy serves (service-proxy-name): not judged */
};

struct kp_svcnet4_key {
	__u32  prefixlen;   /* HBO prefix length: 32 for a ClusterIP */
	__be32 addr;        /* NBO network address (host bits zero) */
};

struct kp_svcnet4_val {
	__u32 action;       /* HBO enum kp_svcnet_action */
};

struct kp_svcnet_span {
	__u32 lo;           /* HBO lowest address of any entry; lo > hi: no entry */
	__u32 hi;           /* HBO highest address of any entry */
};

/*
 * IPv6: the same trie with 128-bit prefixes (values are struct kp_svcnet4_val). Its span is over the
 * upper 64 bits of the addresses: a service CIDR (a /108 or /112 by default) and its ClusterIPs share
 * them, so every other destination skips the lookup.
 */
#define KP_MAP_SVCNET6      kp_svcnet6_v1       /* LPM trie: IPv6 ClusterIPs (/128) and service CIDRs */
#define KP_MAP_SVCNET6_SPAN kp_svcnet6_span_v1  /* array of one struct kp_svcnet6_span */
#define KP_SVCNET6_MAX      16384

struct kp_svcnet6_key {
	__u32  prefixlen;   /* HBO prefix length: 128 for a ClusterIP */
	union kp_in6 addr;  /* NBO network address (host bits zero) */
};

struct kp_svcnet6_span {
	__u64 lo;           /* HBO upper 64 bits of the lowest address of any entry; lo > hi: no entry */
	__u64 hi;           /* HBO upper 64 bits of the highest address of any entry */
};

/* ---- IPv4 fragments (lib/parse.h) ---- */
#define KP_MAP_FRAG4   kp_frag4_v1  /* LRU (saddr, daddr, IP id, protocol) -> the datagram's ports */
#define KP_FRAG4_MAX   16384

/*
 * Only the first fragment of a datagram carries its TCP/UDP header. The parser records the ports
 * under the fragment's identity when it sees a first fragment, and gives them to the later fragments
 * of the same datagram, which are then looked up and translated like it (addresses only: they have
 * no L4 header, and the L4 checksum in the first fragment covers the whole datagram). As Cilium's
 * IPV4_FRAG_DATAGRAMS_MAP; a later fragment that arrives before its first is passed untouched.
 */
struct kp_frag4_key {
	__be32 saddr;       /* NBO */
	__be32 daddr;       /* NBO */
	__be16 id;          /* NBO IPv4 identification */
	__u8   proto;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad;         /* zero */
};

struct kp_frag4_val {
	__be16 sport;       /* NBO */
	__be16 dport;       /* NBO */
};

/* ---- Maglev consistent hashing (Eisenbud et al., NSDI 2016) ----
 * kp_maglev_v1 maps a service-port id to a table of its own: an inner BPF array (key u32 row, value
 * struct kp_maglev_row) the agent builds from the backend set alone, so every node picks the same
 * backend for the same flow. A table is replaced whole (a new inner map swapped in), never edited,
 * so a reader sees one table or the other. Rows:
 *   0                    struct kp_maglev_hdr
 *   1 .. list_row - 1    the m entries, `width` bytes each (64 / width a row): an index in the list
 *   list_row ..          the backend list: 16 HBO u32 backend ids (kp_be4_v1 / kp_be6_v1 keys) a row
 * Inner maps differ in max_entries (BPF_F_INNER_MAP): each is as long as its table and list.
 * The flow hash (lib/maglev.h kp_maglev_hash) covers the client address and port, the frontend port
 * and the protocol, not the frontend address: the NodePorts of every node agree too.
 */
#define KP_MAP_XDEVS    kp_xdevs_v1    /* hash: ifindex -> 0, the netdevs kp_xdp runs on natively (the agent's) */
#define KP_XDEVS_MAX    256
#define KP_MAP_MAGLEV   kp_maglev_v1   /* hash of maps: svc_id -> its Maglev table (inner array) */
#define KP_MAGLEV_MAX   65536          /* tables (service ports with Maglev) */
#define KP_MAGLEV_ROW   64             /* bytes a row */
#define KP_MAGLEV_LIST_PER_ROW 16

struct kp_maglev_hdr {
	__u32 m;            /* HBO table size, a prime */
	__u32 n;            /* HBO backends in the list (1..65535) */
	__u16 width;        /* HBO bytes an entry: 1 (n <= 256) or 2 */
	__u16 pad;          /* zero */
	__u32 list_row;     /* HBO row of the first list entry: 1 + the table's rows */
	__u32 digest;       /* HBO the agent's digest of (m, backends), to keep an unchanged table on restart */
	__u8  pad2[44];     /* zero */
};

struct kp_maglev_row {
	__u8 b[KP_MAGLEV_ROW];  /* a row of entries (u8, or HBO u16) or of the list (HBO u32) */
};

#endif /* KPROXY_ABI_H */
