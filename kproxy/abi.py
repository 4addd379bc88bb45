"""ctypes mirror of bpfsrc/include/kproxy/abi.h.

abi.h is the source of truth. tests/abi/ compares every structure below, size and field offsets,
with the BTF of the built object, so the two cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
import enum
import socket
import struct

# ---- map names ----
MAP_SVC4 = "kp_svc4_v1"
MAP_BE4 = "kp_be4_v1"
MAP_CT4 = "kp_ct4_v1"
MAP_AFF4 = "kp_aff4_v1"
MAP_CFG = "kp_cfg_v1"
MAP_STATS = "kp_stats_v1"  # IPv4 packets's counters (and those of no family)
MAP_STATS6 = "kp_stats6_v1"  # IPv6 packets' counters
MAP_SNAT4 = "kp_snat4_v1"
MAP_LBSRC4 = "kp_lbsrc4_v1"
MAP_SVCNET4 = "kp_svcnet4_v1"
MAP_SVCNET_SPAN = "kp_svcnet_span_v1"
MAP_FRAG4 = "kp_frag4_v1"
MAP_SVC6 = "kp_svc6_v1"
MAP_BE6 = "kp_be6_v1"
MAP_CT6 = "kp_ct6_v1"
MAP_AFF6 = "kp_aff6_v1"
MAP_CFG6 = "kp_cfg6_v1"
MAP_LBSRC6 = "kp_lbsrc6_v1"
MAP_FRAG6 = "kp_frag6_v1"
MAP_SNAT6 = "kp_snat6_v1"
MAP_SVCNET6 = "kp_svcnet6_v1"
MAP_SVCNET6_SPAN = "kp_svcnet6_span_v1"
# The program array of the IPv6 programs the TC entry points tail-call (kproxy_tc.bpf.c), pinned so the
# attached programs keep reaching them while no agent runs. Not a data map: no ctypes layout, no size.
MAP_PROGS6 = "kp_progs6_v1"
MAP_XPROGS = "kp_xprogs_v1"  # the same for kp_xdp's IPv6 program (kp_xdp6)
MAP_XNEW = "kp_xnew_v1"  # kp_xdp's programs for a flow's first packet (kp_xdp_new, kp_xdp_new6)
MAP_SCTP = "kp_sctp_v1"  # kp_from_netdev's IPv4 SCTP program (kp_netdev_sctp4)
# Maglev tables (a hash of maps: its values are inner maps, see MaglevHdr): no ctypes value layout.
MAP_MAGLEV = "kp_maglev_v1"
# The netdevs kp_xdp runs on natively (ifindex -> 0): kp_xdp redirects to them (XDP_REDIRECT).
MAP_XDEVS = "kp_xdevs_v1"
PROG_MAPS = (MAP_PROGS6, MAP_XPROGS, MAP_XNEW, MAP_SCTP)
ALL_MAPS = (
    MAP_SVC4, MAP_BE4, MAP_CT4, MAP_AFF4, MAP_CFG, MAP_STATS, MAP_SNAT4, MAP_LBSRC4, MAP_SVCNET4,
    MAP_SVCNET_SPAN, MAP_FRAG4,
    MAP_SVC6, MAP_BE6, MAP_CT6, MAP_AFF6, MAP_CFG6, MAP_LBSRC6, MAP_FRAG6, MAP_SNAT6, MAP_SVCNET6,
    MAP_SVCNET6_SPAN, MAP_STATS6, MAP_MAGLEV, MAP_XDEVS,
)  # fmt: skip

# ---- default capacities ----
SVC4_MAX = 262144
BE4_MAX = 262144
CT4_MAX = 262144
AFF4_MAX = 65536
SNAT4_MAX = 262144
LBSRC4_MAX = 65536
SVCNET4_MAX = 65536
FRAG4_MAX = 16384
SVC6_MAX = 65536
BE6_MAX = 65536
CT6_MAX = 65536
AFF6_MAX = 16384
LBSRC6_MAX = 16384
FRAG6_MAX = 8192
SNAT6_MAX = 65536
SVCNET6_MAX = 16384
MAGLEV_MAX = 65536
XDEVS_MAX = 256


class XdevVal(ctypes.Structure):
    """kp_xdevs_v1 value (key: the netdev's ifindex, u32 HBO)."""

    _fields_ = [("flags", ctypes.c_uint32)]  # reserved, 0


MAGLEV_ROW = 64  # bytes a row of a Maglev table's inner array
# Backend and service-port ids of IPv6 start here (abi.h KP_ID6_BASE): one id names one thing.
ID6_BASE = 0x80000000

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMP = 1
IPPROTO_SCTP = 132


class Scope(enum.IntEnum):
    EXT = 0
    INT = 1


class SvcFlag(enum.IntFlag):
    NODEPORT = 0x0001
    LOADBALANCER = 0x0002
    EXTERNAL_IP = 0x0004
    AFFINITY = 0x0008
    ETP_LOCAL = 0x0010
    ITP_LOCAL = 0x0020
    TWO_SCOPES = 0x0040
    SRC_RANGES = 0x0080
    NO_LOCAL_DROP = 0x0100
    MAGLEV = 0x0200


class BackendFlag(enum.IntFlag):
    LOCAL = 0x01
    TERMINATING = 0x02


class CtDir(enum.IntEnum):
    FWD = 0
    REPLY = 1


class CtState(enum.IntEnum):
    SYN_SENT = 1
    ESTABLISHED = 2
    CLOSING = 3
    CLOSED = 4
    UDP = 5


class CtFlag(enum.IntFlag):
    SEEN_REPLY = 0x01
    LOCAL_BE = 0x02
    EXTERNAL = 0x04
    SNAT = 0x08
    DSR_OPT = 0x10
    DSR_IPIP = 0x20
    HAIRPIN = 0x40
    TW_TS = 0x80


class ConfigFlag(enum.IntFlag):
    NO_EXTERNAL_CLUSTER_IP = 0x1  # drop packets to ClusterIPs from outside the node
    LOCALHOST_NODEPORTS = 0x2  # socket LB: a NodePort on 127.0.0.0/8 is served as on node_addr
    SOCK_HOST_NETNS_ONLY = 0x4  # socket LB: only sockets of host_netns_cookie's network namespace


class SvcnetAction(enum.IntEnum):
    REJECT = 1  # a ClusterIP: ports and protocols it does not serve are answered port unreachable
    DROP = 2  # a service CIDR: addresses not allocated are dropped
    PASS = 3  # a ClusterIP another proxy serves (service-proxy-name label): left to it


class DsrMode(enum.IntEnum):
    OFF = 0
    OPT = 1
    IPIP = 2


CT_REFRESH_NS = 1_000_000_000
CT_SYN_TIMEOUT_DEFAULT = 60
CT_TCP_TIMEOUT_DEFAULT = 21600
CT_FIN_TIMEOUT_DEFAULT = 10
CT_UDP_TIMEOUT_DEFAULT = 60
CT_SCTP_INIT_TIMEOUT_DEFAULT = 3
CT_SCTP_TIMEOUT_DEFAULT = 210
CT_SCTP_CLOSE_TIMEOUT_DEFAULT = 10
HAIRPIN_ADDR_DEFAULT = "169.254.42.1"
SNAT_PORT_MIN_DEFAULT = 32768
SNAT_PORT_MAX_DEFAULT = 65535
LAN_MTU_DEFAULT = 1500
DSR_OPT_TYPE = 0x9A
DSR_OPT_LEN = 8
DSR6_OPT_TYPE = 0x1B  # the option in DSR's IPv6 destination options header (struct kp_dsr6_opt)
DSR6_OPT_LEN = 20
DSR6_HDR_LEN = 24

SKB_CTX_SIZE = 192


class Stat(enum.IntEnum):
    FROM_POD = 0
    TO_POD = 1
    FROM_NETDEV = 2
    TO_NETDEV = 3
    FROM_XDP = 4
    DNAT = 8
    REVNAT = 9
    CT_NEW = 10
    AFFINITY_HIT = 11
    ICMP_REVNAT = 12
    REJECT = 13
    PASS_FRAGMENT = 14
    CT_REOPEN = 15
    SNAT = 20
    SNAT_REVNAT = 21
    SNAT_NEW = 22
    SNAT_RETRY = 23
    DSR_OPT_TX = 24
    DSR_IPIP_TX = 25
    DSR_RX = 26
    DSR_FWD = 27
    HAIRPIN = 28
    MSS_CLAMP = 29
    FRAG_NEEDED = 30
    ICMP_SNAT = 31
    CT_STALE_REPLY = 44
    CT_TAKEOVER = 45
    SOCK_CONNECT = 16
    SOCK_SENDMSG = 17
    SOCK_RECVMSG_REVNAT = 18
    SOCK_GETPEERNAME_REVNAT = 19
    DROP_NO_LOCAL_BACKEND = 32
    DROP_CT_FULL = 33
    DROP_REJECT_FAILED = 34
    DROP_NAT_FAILED = 35
    DROP_BACKEND_MISSING = 36
    DROP_SRC_RANGE = 37
    DROP_SNAT_NO_PORT = 40
    DROP_FIB = 41
    DROP_DSR_TOO_BIG = 42
    DROP_ENCAP_FAILED = 43
    DROP_SOCK_NO_BACKEND = 38
    DROP_SOCK_REVNAT_FULL = 39
    DROP_TUPLE_HELD = 46
    SVCNET_REJECT = 47
    DROP_SVCNET = 48
    DROP_CLUSTER_IP_EXTERNAL = 49
    FRAG_FIRST = 50
    FRAG_LATER = 51
    DROP_FRAGMENT = 52
    CT_ORPHAN = 53
    MAGLEV = 54
    MAGLEV_FALLBACK = 55
    XDP_FWD = 56
    XDP_LOCAL = 57
    XDP_NEW = 58
    XDP_REDIRECT = 59
    PASS_NO_PROG = 60


STAT_MAX = 64


class Svc4Key(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),  # NBO
        ("port", ctypes.c_uint16),  # NBO
        ("slot", ctypes.c_uint16),  # HBO
        ("proto", ctypes.c_uint8),
        ("scope", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class Svc4Val(ctypes.Structure):
    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("svc_id", ctypes.c_uint32),
        ("count", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("affinity_timeout", ctypes.c_uint32),
    ]


class Be4Val(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),  # NBO
        ("port", ctypes.c_uint16),  # NBO
        ("proto", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("node_addr", ctypes.c_uint32),  # NBO
    ]


class Ct4Key(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint32),  # NBO
        ("daddr", ctypes.c_uint32),  # NBO
        ("sport", ctypes.c_uint16),  # NBO
        ("dport", ctypes.c_uint16),  # NBO
        ("proto", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class Ct4Val(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),
        ("backend_id", ctypes.c_uint32),
        ("svc_id", ctypes.c_uint32),
        ("nat_addr", ctypes.c_uint32),  # NBO
        ("nat_port", ctypes.c_uint16),  # NBO
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("snat_addr", ctypes.c_uint32),  # NBO
        ("snat_port", ctypes.c_uint16),  # NBO
        ("tw_key", ctypes.c_uint16),  # HBO SNAT: what the backend's TIME_WAIT accepts beyond; 0 = unknown
    ]


class Aff4Key(ctypes.Structure):
    _fields_ = [
        ("client_addr", ctypes.c_uint32),  # NBO
        ("svc_id", ctypes.c_uint32),
    ]


class Aff4Val(ctypes.Structure):
    _fields_ = [
        ("last_used_ns", ctypes.c_uint64),
        ("backend_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class Config(ctypes.Structure):
    _fields_ = [
        ("node_addr", ctypes.c_uint32),  # NBO
        ("flags", ctypes.c_uint32),
        ("dsr_mode", ctypes.c_uint32),
        ("ct_syn_timeout", ctypes.c_uint32),
        ("ct_tcp_timeout", ctypes.c_uint32),
        ("ct_fin_timeout", ctypes.c_uint32),
        ("ct_udp_timeout", ctypes.c_uint32),
        ("ct_sctp_timeout", ctypes.c_uint32),  # established SCTP (was padding)
        ("hairpin_addr", ctypes.c_uint32),  # NBO, 0 = HAIRPIN_ADDR_DEFAULT
        ("snat_port_min", ctypes.c_uint16),  # HBO, 0 = SNAT_PORT_MIN_DEFAULT
        ("snat_port_max", ctypes.c_uint16),  # HBO, 0 = SNAT_PORT_MAX_DEFAULT
        ("lan_mtu", ctypes.c_uint32),  # HBO, 0 = LAN_MTU_DEFAULT
        ("ct_sctp_init_timeout", ctypes.c_uint16),  # HBO seconds, SCTP before a reply (was padding)
        ("ct_sctp_close_timeout", ctypes.c_uint16),  # HBO seconds, SCTP after SHUTDOWN/ABORT/SHUTDOWN_COMPL.
        # CLOCK_MONOTONIC ns: until then, TCP from a netdev to no frontend is looked up in conntrack
        ("orphan_until_ns", ctypes.c_uint64),
        # HBO the agent's network namespace cookie (SO_NETNS_COOKIE), for SOCK_HOST_NETNS_ONLY; 0 = unknown
        ("host_netns_cookie", ctypes.c_uint64),
    ]


class Snat4Key(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint32),  # NBO backend address
        ("daddr", ctypes.c_uint32),  # NBO SNAT address (node)
        ("sport", ctypes.c_uint16),  # NBO backend port
        ("dport", ctypes.c_uint16),  # NBO SNAT port
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class Snat4Val(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),  # HBO CLOCK_MONOTONIC
        ("client_addr", ctypes.c_uint32),  # NBO
        ("front_addr", ctypes.c_uint32),  # NBO
        ("client_port", ctypes.c_uint16),  # NBO
        ("front_port", ctypes.c_uint16),  # NBO
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("tw_key", ctypes.c_uint16),  # HBO copy of the CT FWD entry's
    ]


class LbSrc4Key(ctypes.Structure):
    """kp_lbsrc4_v1 (LPM trie) key: prefixlen counts svc_id's 32 bits plus the range's prefix length."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),  # HBO LBSRC4_SVC_BITS + CIDR prefix length
        ("svc_id", ctypes.c_uint32),  # HBO
        ("addr", ctypes.c_uint32),  # NBO network address of the range
    ]


class LbSrc4Val(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint32),  # HBO reserved, zero: presence allows the range
    ]


LBSRC4_SVC_BITS = 32


class Svcnet4Key(ctypes.Structure):
    """kp_svcnet4_v1 (LPM trie) key: a ClusterIP (/32) or a service CIDR."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),  # HBO
        ("addr", ctypes.c_uint32),  # NBO network address
    ]


class Svcnet4Val(ctypes.Structure):
    _fields_ = [
        ("action", ctypes.c_uint32),  # HBO SvcnetAction
    ]


class Frag4Key(ctypes.Structure):
    """kp_frag4_v1 key: one IPv4 datagram being fragmented."""

    _fields_ = [
        ("saddr", ctypes.c_uint32),  # NBO
        ("daddr", ctypes.c_uint32),  # NBO
        ("id", ctypes.c_uint16),  # NBO IPv4 identification
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class Frag4Val(ctypes.Structure):
    _fields_ = [
        ("sport", ctypes.c_uint16),  # NBO
        ("dport", ctypes.c_uint16),  # NBO
    ]


class SvcnetSpan(ctypes.Structure):
    _fields_ = [
        ("lo", ctypes.c_uint32),  # HBO lowest address any entry covers; lo > hi: no entry
        ("hi", ctypes.c_uint32),  # HBO highest
    ]


class DsrOpt(ctypes.Structure):
    """Wire format of the DSR IPv4 option (no map holds it, so it is not in BTF_NAMES)."""

    _fields_ = [
        ("type", ctypes.c_uint8),
        ("len", ctypes.c_uint8),
        ("port", ctypes.c_uint16),  # NBO service port
        ("addr", ctypes.c_uint32),  # NBO service address
    ]


class Counter(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


In6 = ctypes.c_uint8 * 16  # union kp_in6: an IPv6 address in network order


class Dsr6Opt(ctypes.Structure):
    """Wire format of DSR's IPv6 destination options header (no map holds it, so not in BTF_NAMES)."""

    _fields_ = [
        ("nexthdr", ctypes.c_uint8),
        ("hdrlen", ctypes.c_uint8),  # DSR6_HDR_LEN / 8 - 1
        ("type", ctypes.c_uint8),  # DSR6_OPT_TYPE
        ("len", ctypes.c_uint8),  # DSR6_OPT_LEN
        ("addr", In6),  # NBO service address
        ("port", ctypes.c_uint16),  # NBO service port
        ("pad", ctypes.c_uint16),
    ]


class Svcnet6Key(ctypes.Structure):
    """kp_svcnet6_v1 (LPM trie) key: an IPv6 ClusterIP (/128) or service CIDR; values are Svcnet4Val."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),  # HBO
        ("addr", In6),  # NBO network address
    ]


class Svcnet6Span(ctypes.Structure):
    """kp_svcnet6_span_v1's value: the upper 64 bits (HBO) of the lowest and highest address covered."""

    _fields_ = [
        ("lo", ctypes.c_uint64),
        ("hi", ctypes.c_uint64),
    ]


class MaglevHdr(ctypes.Structure):
    """Row 0 of a Maglev table's inner array (struct kp_maglev_hdr; kproxy.sync.maglev packs them)."""

    _fields_ = [
        ("m", ctypes.c_uint32),  # HBO table size (a prime)
        ("n", ctypes.c_uint32),  # HBO backends in the list
        ("width", ctypes.c_uint16),  # HBO bytes an entry: 1 or 2
        ("pad", ctypes.c_uint16),
        ("list_row", ctypes.c_uint32),  # HBO first row of the backend list
        ("digest", ctypes.c_uint32),  # HBO the agent's digest of (m, backends)
        ("pad2", ctypes.c_uint8 * 44),
    ]


class Svc6Key(ctypes.Structure):
    _fields_ = [
        ("addr", In6),  # NBO
        ("port", ctypes.c_uint16),  # NBO
        ("slot", ctypes.c_uint16),  # HBO
        ("proto", ctypes.c_uint8),
        ("scope", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


Svc6Val = Svc4Val  # kp_svc6_v1 values are struct kp_svc4_val


class Be6Val(ctypes.Structure):
    _fields_ = [
        ("addr", In6),  # NBO
        ("port", ctypes.c_uint16),  # NBO
        ("proto", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("node_addr", In6),  # NBO
    ]


class Ct6Key(ctypes.Structure):
    _fields_ = [
        ("saddr", In6),  # NBO
        ("daddr", In6),  # NBO
        ("sport", ctypes.c_uint16),  # NBO
        ("dport", ctypes.c_uint16),  # NBO
        ("proto", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class Ct6Val(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),
        ("backend_id", ctypes.c_uint32),
        ("svc_id", ctypes.c_uint32),
        ("nat_addr", In6),  # NBO
        ("nat_port", ctypes.c_uint16),  # NBO
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("snat_addr", In6),  # NBO
        ("snat_port", ctypes.c_uint16),  # NBO
        ("tw_key", ctypes.c_uint16),
    ]


class Aff6Key(ctypes.Structure):
    _fields_ = [
        ("client_addr", In6),  # NBO
        ("svc_id", ctypes.c_uint32),
    ]


Aff6Val = Aff4Val  # kp_aff6_v1 values are struct kp_aff4_val


class LbSrc6Key(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),  # HBO LBSRC4_SVC_BITS + CIDR length
        ("svc_id", ctypes.c_uint32),
        ("addr", In6),  # NBO
    ]


LbSrc6Val = LbSrc4Val  # kp_lbsrc6_v1 values are struct kp_lbsrc4_val


class Snat6Key(ctypes.Structure):
    _fields_ = [
        ("saddr", In6),  # NBO backend address
        ("daddr", In6),  # NBO SNAT address
        ("sport", ctypes.c_uint16),  # NBO
        ("dport", ctypes.c_uint16),  # NBO
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class Snat6Val(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),
        ("client_addr", In6),  # NBO
        ("front_addr", In6),  # NBO
        ("client_port", ctypes.c_uint16),  # NBO
        ("front_port", ctypes.c_uint16),  # NBO
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("tw_key", ctypes.c_uint16),
    ]


class Frag6Key(ctypes.Structure):
    _fields_ = [
        ("saddr", In6),  # NBO
        ("daddr", In6),  # NBO
        ("id", ctypes.c_uint32),  # NBO fragment header identification
        ("nexthdr", ctypes.c_uint8),  # the fragment header's next header
        ("pad", ctypes.c_uint8 * 3),
    ]


class Frag6Val(ctypes.Structure):
    _fields_ = [
        ("sport", ctypes.c_uint16),  # NBO
        ("dport", ctypes.c_uint16),  # NBO
        ("proto", ctypes.c_uint8),  # the upper-layer protocol of the datagram
        ("pad", ctypes.c_uint8 * 3),
    ]


class Config6(ctypes.Structure):
    _fields_ = [
        ("node_addr", In6),  # NBO, :: if none
        ("hairpin_addr", In6),  # NBO, :: = HAIRPIN6_ADDR_DEFAULT
        ("reserved", ctypes.c_uint64 * 4),
    ]


HAIRPIN6_ADDR_DEFAULT = "100::a9fe:2a01"


# BTF type name of each mirrored structure, for the ABI check.
BTF_NAMES: dict[str, type[ctypes.Structure]] = {
    "kp_svc4_key": Svc4Key,
    "kp_maglev_hdr": MaglevHdr,
    "kp_svc4_val": Svc4Val,
    "kp_be4_val": Be4Val,
    "kp_ct4_key": Ct4Key,
    "kp_ct4_val": Ct4Val,
    "kp_aff4_key": Aff4Key,
    "kp_aff4_val": Aff4Val,
    "kp_config": Config,
    "kp_snat4_key": Snat4Key,
    "kp_snat4_val": Snat4Val,
    "kp_lbsrc4_key": LbSrc4Key,
    "kp_lbsrc4_val": LbSrc4Val,
    "kp_svcnet4_key": Svcnet4Key,
    "kp_svcnet4_val": Svcnet4Val,
    "kp_svcnet_span": SvcnetSpan,
    "kp_frag4_key": Frag4Key,
    "kp_frag4_val": Frag4Val,
    "kp_counter": Counter,
    "kp_svc6_key": Svc6Key,
    "kp_be6_val": Be6Val,
    "kp_ct6_key": Ct6Key,
    "kp_ct6_val": Ct6Val,
    "kp_aff6_key": Aff6Key,
    "kp_config6": Config6,
    "kp_lbsrc6_key": LbSrc6Key,
    "kp_frag6_key": Frag6Key,
    "kp_frag6_val": Frag6Val,
    "kp_snat6_key": Snat6Key,
    "kp_snat6_val": Snat6Val,
    "kp_svcnet6_key": Svcnet6Key,
    "kp_svcnet6_span": Svcnet6Span,
}


# ---- address helpers: the one place that converts between text and NBO integers ----
unpack_u32 = struct.Struct("=I").unpack


def is_ipv4(address: str) -> bool:
    """Whether a textual address is IPv4 (a cheap test for addresses already validated)."""
    return "." in address and ":" not in address


def ip_to_nbo(address: str) -> int:
    """'10.96.0.1' -> the u32 whose in-memory bytes are the address in network order."""
    return int(unpack_u32(socket.inet_aton(address))[0])


def nbo_to_ip(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def ip6_to_bytes(address: str) -> bytes:
    """'fd00::1' -> its 16 bytes in network order (union kp_in6)."""
    return socket.inet_pton(socket.AF_INET6, address)


def bytes_to_ip6(value: bytes | ctypes.Array[ctypes.c_uint8]) -> str:
    return socket.inet_ntop(socket.AF_INET6, bytes(value))


def ip_family(address: str) -> int:
    """4 or 6 for a textual address already validated."""
    return 6 if ":" in address else 4


def addr_port(address: str, port: int) -> str:
    """'10.0.0.1:80' or '[fd00::1]:80', as kube-proxy and the CLI print endpoints."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# An alias rather than a wrapper: sync converts a port per backend (100,000s on a cold start).
port_to_nbo = socket.htons


def nbo_to_port(value: int) -> int:
    return socket.ntohs(value)


def nbo_to_hbo(value: int) -> int:
    """A u32 in network byte order (as the maps hold addresses) -> the same number in host order."""
    return int.from_bytes(struct.pack("=I", value), "big")


# ---- packed map entries: the one place that lays out keys and values as bytes ----
# Keys and values are packed straight into bytes: sync writes ~200,000 of them on a cold start, and a
# ctypes structure per entry cost more than everything else sync does. MapOps implementations take
# anything bytes() accepts (they join the bytes into one batch buffer). Layouts equal abi.h's,
# checked below against the ctypes mirror above.
pack_svc4_key = struct.Struct("=IHHBBxx").pack  # addr, port, slot, proto, scope, pad[2]
pack_svc4_val = struct.Struct("=IIHHI").pack  # backend_id, svc_id, count, flags, affinity_timeout
pack_be4_key = pack_u32 = struct.Struct("=I").pack  # kp_be4 keys are backend ids
pack_u16 = struct.Struct("=H").pack
pack_be4_val = struct.Struct("=IHBBI").pack  # addr, port, proto, flags, node_addr
pack_lbsrc4_key = struct.Struct("=III").pack  # prefixlen, svc_id, addr
LBSRC4_VAL_ALLOW = bytes(struct.calcsize("=I"))  # kp_lbsrc4_val: flags 0
pack_svcnet4_key = struct.Struct("=II").pack  # prefixlen, addr
pack_svcnet4_val = struct.Struct("=I").pack  # action
pack_svcnet_span = struct.Struct("=II").pack  # lo, hi
SVCNET_SPAN_KEY = struct.pack("=I", 0)  # kp_svcnet_span_v1 is an array of one
pack_svc6_key = struct.Struct("=16sHHBBxx").pack  # addr, port, slot, proto, scope, pad[2]
pack_be6_val = struct.Struct("=16sHBB16s").pack  # addr, port, proto, flags, node_addr
pack_aff6_key = struct.Struct("=16sI").pack  # client_addr, svc_id
pack_lbsrc6_key = struct.Struct("=II16s").pack  # prefixlen, svc_id, addr
pack_svcnet6_key = struct.Struct("=I16s").pack  # prefixlen, addr
pack_svcnet6_span = struct.Struct("=QQ").pack  # lo, hi (upper 64 bits)
SVC4_KEY_SIZE = ctypes.sizeof(Svc4Key)
SVC6_KEY_SIZE = ctypes.sizeof(Svc6Key)
assert struct.calcsize("=16sHHBBxx") == SVC6_KEY_SIZE
assert struct.calcsize("=16sHBB16s") == ctypes.sizeof(Be6Val)
assert struct.calcsize("=16sI") == ctypes.sizeof(Aff6Key)
assert struct.calcsize("=II16s") == ctypes.sizeof(LbSrc6Key)
assert struct.calcsize("=IHHBBxx") == SVC4_KEY_SIZE
assert struct.calcsize("=IIHHI") == ctypes.sizeof(Svc4Val)
assert struct.calcsize("=IHBBI") == ctypes.sizeof(Be4Val)
assert struct.calcsize("=III") == ctypes.sizeof(LbSrc4Key)
assert struct.calcsize("=I") == ctypes.sizeof(LbSrc4Val)
assert struct.calcsize("=II") == ctypes.sizeof(Svcnet4Key) == ctypes.sizeof(SvcnetSpan)
assert struct.calcsize("=I") == ctypes.sizeof(Svcnet4Val)
assert struct.calcsize("=I16s") == ctypes.sizeof(Svcnet6Key)
assert struct.calcsize("=QQ") == ctypes.sizeof(Svcnet6Span)


# ---- socket-level load balancing (bpfsrc/kproxy_sock.bpf.c) ----
# Declared by kproxy_sock.bpf.o only (not in maps.h, so not in ALL_MAPS): agents without socket LB do not
# preallocate them. SocketLB.cleanup() unpins them.
MAP_SKNAT4 = "kp_sknat4_v1"
SKNAT4_MAX = 65536
MAP_SKNAT6 = "kp_sknat6_v1"  # IPv6 frontends; an IPv4-mapped one (dual-stack socket) is kp_sknat4_v1's
SKNAT6_MAX = 65536
SOCK_MAPS = (MAP_SKNAT4, MAP_SKNAT6)


class Sknat4Key(ctypes.Structure):
    _fields_ = [
        ("cookie", ctypes.c_uint64),  # HBO socket cookie
        ("addr", ctypes.c_uint32),  # NBO backend address
        ("port", ctypes.c_uint16),  # NBO backend port
        ("pad", ctypes.c_uint16),
    ]


class Sknat4Val(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),  # NBO frontend address
        ("port", ctypes.c_uint16),  # NBO frontend port
        ("pad", ctypes.c_uint16),
        ("svc_id", ctypes.c_uint32),
        ("backend_id", ctypes.c_uint32),
    ]


class Sknat6Key(ctypes.Structure):
    _fields_ = [
        ("cookie", ctypes.c_uint64),  # HBO socket cookie
        ("addr", In6),  # NBO backend address
        ("port", ctypes.c_uint16),  # NBO backend port
        ("pad", ctypes.c_uint16 * 3),
    ]


class Sknat6Val(ctypes.Structure):
    _fields_ = [
        ("addr", In6),  # NBO frontend address
        ("port", ctypes.c_uint16),  # NBO frontend port
        ("pad", ctypes.c_uint16),
        ("svc_id", ctypes.c_uint32),
        ("backend_id", ctypes.c_uint32),
    ]


# Checked against the BTF of kproxy_sock.bpf.o (tests/bpf/test_socklb.py); the probe and TC objects
# do not carry these types.
SOCK_BTF_NAMES: dict[str, type[ctypes.Structure]] = {
    "kp_sknat4_key": Sknat4Key,
    "kp_sknat4_val": Sknat4Val,
    "kp_sknat6_key": Sknat6Key,
    "kp_sknat6_val": Sknat6Val,
}


# ---- connected UDP sockets of removed backends (bpfsrc/kproxy_iter.bpf.c) ----
# Not pinned: the filter of one iterator run, private to the agent's loaded iterator object.
MAP_SKD = "kp_skd_v1"
SKD_MAX = 4096


class SkdKey(ctypes.Structure):
    _fields_ = [
        ("addr", In6),  # NBO backend address; IPv4: word 0, the rest zero
        ("svc_id", ctypes.c_uint32),  # HBO service-port id the backend left
        ("port", ctypes.c_uint16),  # NBO backend port
        ("family", ctypes.c_uint8),  # 4 or 6 (the flow's: a v4-mapped peer is 4)
        ("proto", ctypes.c_uint8),  # IPPROTO_UDP
    ]


class SkdEvent(ctypes.Structure):
    _fields_ = [
        ("cookie", ctypes.c_uint64),  # HBO socket cookie
        ("addr", In6),  # NBO backend (peer) address; IPv4: word 0
        ("svc_id", ctypes.c_uint32),
        ("err", ctypes.c_int32),  # bpf_sock_destroy() result: 0 or -errno
        ("port", ctypes.c_uint16),  # NBO backend port
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    ]


# Checked against the BTF of kproxy_iter.bpf.o (tests/abi/test_abi.py).
ITER_BTF_NAMES: dict[str, type[ctypes.Structure]] = {"kp_skd_key": SkdKey, "kp_skd_event": SkdEvent}
