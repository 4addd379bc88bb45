"""PROG_TEST_RUN tables for the TC datapath (bpfsrc/kproxy_tc.bpf.c).

Single-packet cases are one table of {what, map setup, program, input frame, verdict, output frame};
flows that need several packets (conntrack, replies, affinity, ICMP errors) are separate tests.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from datapath import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, Backend, Datapath, ct_key
from frames import (
    ETH_P_ARP,
    ETH_P_IPV6,
    IP_MF,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    SYN_OPTIONS,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    addr,
    checksum_errors,
    ether,
    icmp,
    ipv4,
    ones_sum_ok,
    parse,
    pseudo_header,
    swap_macs,
    tcp,
    tcp_frame,
    udp,
    udp_frame,
)

from kproxy.abi import (
    Aff4Key,
    Aff4Val,
    Config,
    ConfigFlag,
    CtDir,
    CtFlag,
    CtState,
    Scope,
    Stat,
    SvcFlag,
    SvcnetAction,
    ip_to_nbo,
    port_to_nbo,
)
from kproxy.bpf.libbpf import LibbpfError

pytestmark = pytest.mark.root

CLIENT, CPORT = "10.244.1.5", 40000
SVC, SPORT = "10.96.0.10", 80
NODE, NODEPORT = "192.168.1.10", 30080
LB_IP = "198.51.100.20"
EXT_CLIENT = "203.0.113.9"
BE1 = Backend(1, "10.244.2.7", 8080)
BE2 = Backend(2, "10.244.3.9", 9090)
BE3 = Backend(3, "10.244.4.11", 8080)
BE4 = Backend(4, "10.244.5.13", 8080)
ROUTER = "10.244.2.1"
ROUTER_ALERT = bytes.fromhex("94040000")  # a 4-byte IPv4 option: ihl 6

UNCHANGED = object()


def syn(src: str = CLIENT, dst: str = SVC, sport: int = CPORT, dport: int = SPORT, **kw: object) -> bytes:
    return tcp_frame(src, dst, sport, dport, TCP_SYN, options=SYN_OPTIONS, **kw)  # type: ignore[arg-type]


def no_setup(dp: Datapath) -> None:
    pass


def tcp_service(*backends: Backend, flags: int = 0) -> Callable[[Datapath], None]:
    return lambda dp: dp.add_service(SVC, SPORT, IPPROTO_TCP, list(backends), flags=flags)


def udp_service(*backends: Backend, flags: int = 0) -> Callable[[Datapath], None]:
    return lambda dp: dp.add_service(SVC, SPORT, IPPROTO_UDP, list(backends), flags=flags)


def nodeport_and_clusterip(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1], svc_id=1)
    dp.add_service(NODE, NODEPORT, IPPROTO_TCP, [BE1], svc_id=1, flags=SvcFlag.NODEPORT)


def two_scopes(dp: Datapath) -> None:
    """EXT (from outside) -> BE2; INT (from pods) -> BE1, e.g. internalTrafficPolicy Local."""
    flags = SvcFlag.LOADBALANCER | SvcFlag.TWO_SCOPES
    dp.add_service(LB_IP, SPORT, IPPROTO_TCP, [BE1], flags=flags, scope=Scope.INT)
    dp.add_service(LB_IP, SPORT, IPPROTO_TCP, [BE2], flags=flags, scope=Scope.EXT)


def icmp_reject(frame: bytes, quote_l4: int) -> bytes:
    """The port unreachable kproxy builds from `frame`: IP header + quote_l4 bytes of L4 quoted."""
    p = parse(frame)
    quote = p.l3 + p.l4[:quote_l4]
    reply = ipv4(p.dst, p.src, IPPROTO_ICMP, icmp(3, 3, 0, quote), ident=0, flags_frag=0, ttl=64)
    return swap_macs(frame[:14]) + reply


def service_space(*backends: Backend, flags: int = 0) -> Callable[[Datapath], None]:
    """A TCP service SVC:SPORT, its ClusterIP as a REJECT entry and the service CIDR 10.96.0.0/16 as DROP."""

    def setup(dp: Datapath) -> None:
        dp.add_service(SVC, SPORT, IPPROTO_TCP, list(backends))
        dp.add_svcnet("10.96.0.0/16", SvcnetAction.DROP)
        dp.add_svcnet(f"{SVC}/32", SvcnetAction.REJECT)
        if flags:
            dp.cfg.update(ctypes.c_uint32(0), Config(flags=flags))

    return setup


def icmp_echo(src: str = CLIENT, dst: str = SVC) -> bytes:
    return ether(ipv4(src, dst, IPPROTO_ICMP, icmp(8, 0, 0x12340001, b"ping payload")))


@dataclass
class Case:
    what: str
    setup: Callable[[Datapath], None]
    prog: str
    frame: bytes
    verdict: int
    expected: object = UNCHANGED  # bytes, or UNCHANGED
    counters: dict[Stat, int] = field(default_factory=dict)


CASES = [
    Case(
        "TCP SYN to a ClusterIP is DNATed to its backend",
        tcp_service(BE1),
        "kp_from_pod",
        syn(),
        TC_ACT_OK,
        syn(dst=BE1.addr, dport=BE1.port),
        {Stat.FROM_POD: 1, Stat.DNAT: 1, Stat.CT_NEW: 1},
    ),
    Case(
        "TCP SYN with IPv4 options (ihl 6) is DNATed, options kept",
        tcp_service(BE1),
        "kp_from_pod",
        syn(ip_options=ROUTER_ALERT),
        TC_ACT_OK,
        syn(dst=BE1.addr, dport=BE1.port, ip_options=ROUTER_ALERT),
        {Stat.DNAT: 1},
    ),
    Case(
        "TCP with 40 bytes of IPv4 options (ihl 15) is DNATed",
        tcp_service(BE1),
        "kp_from_pod",
        syn(ip_options=b"\x01" * 39 + b"\x00"),
        TC_ACT_OK,
        syn(dst=BE1.addr, dport=BE1.port, ip_options=b"\x01" * 39 + b"\x00"),
        {Stat.DNAT: 1},
    ),
    Case(
        "UDP with checksum is DNATed",
        udp_service(BE2),
        "kp_from_pod",
        udp_frame(CLIENT, SVC, CPORT, SPORT, b"query"),
        TC_ACT_OK,
        udp_frame(CLIENT, BE2.addr, CPORT, BE2.port, b"query"),
        {Stat.DNAT: 1, Stat.CT_NEW: 1},
    ),
    Case(
        "UDP without checksum is DNATed and keeps checksum 0",
        udp_service(BE2),
        "kp_from_pod",
        udp_frame(CLIENT, SVC, CPORT, SPORT, b"query", checksum=False),
        TC_ACT_OK,
        udp_frame(CLIENT, BE2.addr, CPORT, BE2.port, b"query", checksum=False),
        {Stat.DNAT: 1},
    ),
    Case(
        "TCP to an address that is no service",
        tcp_service(BE1),
        "kp_from_pod",
        syn(dst="10.96.0.99"),
        TC_ACT_OK,
        counters={Stat.DNAT: 0},
    ),
    Case(
        "TCP to a service address on another port",
        tcp_service(BE1),
        "kp_from_pod",
        syn(dport=443),
        TC_ACT_OK,
        counters={Stat.DNAT: 0},
    ),
    Case(
        "UDP to a TCP-only service",
        tcp_service(BE1),
        "kp_from_pod",
        udp_frame(CLIENT, SVC, CPORT, SPORT),
        TC_ACT_OK,
        counters={Stat.DNAT: 0},
    ),
    Case("ARP passes", tcp_service(BE1), "kp_from_pod", ether(b"\x00\x01" * 14, ETH_P_ARP), TC_ACT_OK),
    Case("IPv6 passes", tcp_service(BE1), "kp_from_pod", ether(bytes(60), ETH_P_IPV6), TC_ACT_OK),
    Case(
        "first fragment (MF) to a service is DNATed like a whole datagram, its ports recorded",
        tcp_service(BE1),
        "kp_from_pod",
        ether(ipv4(CLIENT, SVC, IPPROTO_TCP, tcp(CLIENT, SVC, CPORT, SPORT), flags_frag=IP_MF)),
        TC_ACT_OK,
        ether(ipv4(CLIENT, BE1.addr, IPPROTO_TCP, tcp(CLIENT, BE1.addr, CPORT, BE1.port), flags_frag=IP_MF)),
        counters={Stat.FRAG_FIRST: 1, Stat.DNAT: 1, Stat.PASS_FRAGMENT: 0},
    ),
    Case(
        "later fragment (offset 185) whose first was never seen passes untouched",
        udp_service(BE1),
        "kp_from_pod",
        ether(ipv4(CLIENT, SVC, IPPROTO_UDP, udp(CLIENT, SVC, CPORT, SPORT, b"x" * 32), flags_frag=185)),
        TC_ACT_OK,
        counters={Stat.PASS_FRAGMENT: 1, Stat.DNAT: 0},
    ),
    Case(
        "no backend: TCP SYN answered with ICMP port unreachable out the same interface",
        tcp_service(),
        "kp_from_pod",
        syn(),
        TC_ACT_REDIRECT,
        icmp_reject(syn(), 20),
        {Stat.REJECT: 1, Stat.DNAT: 0},
    ),
    Case(
        "no backend: TCP with IPv4 options answered, options quoted",
        tcp_service(),
        "kp_from_pod",
        syn(ip_options=ROUTER_ALERT),
        TC_ACT_REDIRECT,
        icmp_reject(syn(ip_options=ROUTER_ALERT), 20),
        {Stat.REJECT: 1},
    ),
    Case(
        "no backend: UDP answered with ICMP port unreachable",
        udp_service(),
        "kp_from_pod",
        udp_frame(CLIENT, SVC, CPORT, SPORT, b"query payload"),
        TC_ACT_REDIRECT,
        icmp_reject(udp_frame(CLIENT, SVC, CPORT, SPORT, b"query payload"), 8),
        {Stat.REJECT: 1},
    ),
    Case(
        "no local backend with NO_LOCAL_DROP: dropped, not rejected",
        tcp_service(flags=SvcFlag.NO_LOCAL_DROP),
        "kp_from_pod",
        syn(),
        TC_ACT_SHOT,
        counters={Stat.DROP_NO_LOCAL_BACKEND: 1, Stat.REJECT: 0},
    ),
    # ---- the service address space (kube-proxy's cluster-ips-check) ----
    Case(
        "ClusterIP on a port the Service does not have: SYN answered port unreachable",
        service_space(BE1),
        "kp_from_pod",
        syn(dport=81),
        TC_ACT_REDIRECT,
        icmp_reject(syn(dport=81), 20),
        {Stat.SVCNET_REJECT: 1, Stat.REJECT: 1, Stat.DNAT: 0},
    ),
    Case(
        "UDP to a TCP-only ClusterIP port: answered port unreachable",
        service_space(BE1),
        "kp_from_pod",
        udp_frame(CLIENT, SVC, CPORT, SPORT, b"dns?"),
        TC_ACT_REDIRECT,
        icmp_reject(udp_frame(CLIENT, SVC, CPORT, SPORT, b"dns?"), 8),
        {Stat.SVCNET_REJECT: 1},
    ),
    Case(
        "ping to a ClusterIP: answered port unreachable (nftables kube-proxy rejects all protocols)",
        service_space(BE1),
        "kp_from_pod",
        icmp_echo(),
        TC_ACT_REDIRECT,
        icmp_reject(icmp_echo(), 8),
        {Stat.SVCNET_REJECT: 1},
    ),
    Case(
        "an ACK to a ClusterIP's unknown port does not open a flow: passed, not judged",
        service_space(BE1),
        "kp_from_pod",
        tcp_frame(CLIENT, SVC, CPORT, 81, TCP_ACK),
        TC_ACT_OK,
        counters={Stat.SVCNET_REJECT: 0, Stat.DROP_SVCNET: 0},
    ),
    Case(
        "unallocated address of a service CIDR: dropped",
        service_space(BE1),
        "kp_from_pod",
        syn(dst="10.96.7.7"),
        TC_ACT_SHOT,
        counters={Stat.DROP_SVCNET: 1, Stat.REJECT: 0},
    ),
    Case(
        "UDP to an unallocated service address: dropped",
        service_space(BE1),
        "kp_from_pod",
        udp_frame(CLIENT, "10.96.255.255", CPORT, 53, b"q"),
        TC_ACT_SHOT,
        counters={Stat.DROP_SVCNET: 1},
    ),
    Case(
        "outside the service address space: passed untouched",
        service_space(BE1),
        "kp_from_pod",
        syn(dst="10.97.0.1"),
        TC_ACT_OK,
        counters={Stat.DROP_SVCNET: 0, Stat.SVCNET_REJECT: 0},
    ),
    Case(
        "from a netdev: a ClusterIP routed to the node is served (kube-proxy does)",
        service_space(BE1),
        "kp_from_netdev",
        syn(src=EXT_CLIENT),
        TC_ACT_OK,
        syn(src=EXT_CLIENT, dst=BE1.addr, dport=BE1.port),
        {Stat.DNAT: 1},
    ),
    Case(
        "from a netdev, external ClusterIPs switched off: dropped",
        service_space(BE1, flags=ConfigFlag.NO_EXTERNAL_CLUSTER_IP),
        "kp_from_netdev",
        syn(src=EXT_CLIENT),
        TC_ACT_SHOT,
        counters={Stat.DROP_CLUSTER_IP_EXTERNAL: 1, Stat.DNAT: 0},
    ),
    Case(
        "from a netdev: a ClusterIP's unknown port rejected",
        service_space(BE1),
        "kp_from_netdev",
        syn(src=EXT_CLIENT, dport=81),
        TC_ACT_REDIRECT,
        icmp_reject(syn(src=EXT_CLIENT, dport=81), 20),
        {Stat.SVCNET_REJECT: 1},
    ),
    Case(
        "from a netdev, external ClusterIPs off: a ClusterIP's unknown port dropped, not answered",
        service_space(BE1, flags=ConfigFlag.NO_EXTERNAL_CLUSTER_IP),
        "kp_from_netdev",
        syn(src=EXT_CLIENT, dport=81),
        TC_ACT_SHOT,
        counters={Stat.DROP_CLUSTER_IP_EXTERNAL: 1, Stat.SVCNET_REJECT: 0},
    ),
    Case(
        "from a netdev: unallocated service address dropped",
        service_space(BE1),
        "kp_from_netdev",
        syn(src=EXT_CLIENT, dst="10.96.1.1"),
        TC_ACT_SHOT,
        counters={Stat.DROP_SVCNET: 1},
    ),
    Case(
        "from a netdev: NodePort is DNATed",
        nodeport_and_clusterip,
        "kp_from_netdev",
        syn(src=EXT_CLIENT, dst=NODE, dport=NODEPORT),
        TC_ACT_OK,
        syn(src=EXT_CLIENT, dst=BE1.addr, dport=BE1.port),
        {Stat.FROM_NETDEV: 1, Stat.DNAT: 1},
    ),
    Case(
        "TWO_SCOPES: a pod gets the INT backends",
        two_scopes,
        "kp_from_pod",
        syn(dst=LB_IP),
        TC_ACT_OK,
        syn(dst=BE1.addr, dport=BE1.port),
    ),
    Case(
        "TWO_SCOPES: outside gets the EXT backends",
        two_scopes,
        "kp_from_netdev",
        syn(src=EXT_CLIENT, dst=LB_IP),
        TC_ACT_OK,
        syn(src=EXT_CLIENT, dst=BE2.addr, dport=BE2.port),
    ),
    Case(
        "to_netdev counts and passes",
        tcp_service(BE1),
        "kp_to_netdev",
        syn(),
        TC_ACT_OK,
        counters={Stat.TO_NETDEV: 1, Stat.DNAT: 0},
    ),
    Case(
        "to_pod passes a packet of no tracked flow",
        tcp_service(BE1),
        "kp_to_pod",
        syn(src=BE1.addr, dst=CLIENT, sport=BE1.port, dport=CPORT),
        TC_ACT_OK,
        counters={Stat.TO_POD: 1, Stat.REVNAT: 0},
    ),
    Case(
        "ICMP echo to a service passes",
        tcp_service(BE1),
        "kp_from_pod",
        ether(ipv4(CLIENT, SVC, IPPROTO_ICMP, icmp(8, 0, 0x10001, b"ping"))),
        TC_ACT_OK,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_single_packet(dp: Datapath, case: Case) -> None:
    assert not checksum_errors(case.frame), "the input frame itself is broken"
    case.setup(dp)
    out = dp.run(case.prog, case.frame)
    assert out.retval == case.verdict
    expected = case.frame if case.expected is UNCHANGED else case.expected
    assert isinstance(expected, bytes)
    assert out.data_out.hex() == expected.hex()
    assert checksum_errors(out.data_out) == []
    for stat, packets in case.counters.items():
        assert dp.stat(stat)[0] == packets, stat.name


def test_syn_creates_fwd_and_reply_entries(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1], svc_id=7)
    before = time.monotonic_ns()
    assert dp.run("kp_from_pod", syn()).retval == TC_ACT_OK
    after = time.monotonic_ns()

    fwd = dp.ct(ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_TCP, CtDir.FWD))
    rep = dp.ct(ct_key(BE1.addr, CLIENT, BE1.port, CPORT, IPPROTO_TCP, CtDir.REPLY))
    assert fwd is not None and rep is not None
    assert len(dp.ct_entries()) == 2
    assert (fwd.nat_addr, fwd.nat_port) == (ip_to_nbo(BE1.addr), port_to_nbo(BE1.port))
    assert (rep.nat_addr, rep.nat_port) == (ip_to_nbo(SVC), port_to_nbo(SPORT))
    for v in (fwd, rep):
        assert (v.backend_id, v.svc_id, v.state, v.flags) == (BE1.id, 7, CtState.SYN_SENT, 0)
        # SYN_SENT lives for the default syn timeout (60 s) from when the packet was seen.
        assert before + 60 * 10**9 <= v.expires_ns <= after + 60 * 10**9


def test_later_packets_follow_their_backend(dp: Datapath) -> None:
    backends = [BE1, BE3, BE4, Backend(5, "10.244.6.15", 8080)]
    dp.add_service(SVC, SPORT, IPPROTO_TCP, backends)
    by_addr = {b.addr: b for b in backends}
    for sport in range(41000, 41012):
        first = parse(dp.run("kp_from_pod", syn(sport=sport)).data_out)
        assert first.dst in by_addr
        for flags in (TCP_ACK, TCP_ACK | TCP_PSH, TCP_ACK):
            frame = tcp_frame(CLIENT, SVC, sport, SPORT, flags, seq=1001, ack=5001, payload=b"GET /")
            out = dp.run("kp_from_pod", frame)
            assert out.retval == TC_ACT_OK
            later = parse(out.data_out)
            assert (later.dst, later.dport) == (first.dst, first.dport)
            assert checksum_errors(out.data_out) == []
    assert dp.stat(Stat.CT_NEW)[0] == 12
    assert dp.stat(Stat.DNAT)[0] == 48


@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod"])
def test_reply_is_reverse_translated(dp: Datapath, prog: str) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.run("kp_from_pod", syn())
    synack = tcp_frame(
        BE1.addr, CLIENT, BE1.port, CPORT, TCP_SYN | TCP_ACK, seq=5000, ack=1001, options=SYN_OPTIONS
    )
    out = dp.run(prog, synack)
    assert out.retval == TC_ACT_OK
    expected = tcp_frame(
        SVC, CLIENT, SPORT, CPORT, TCP_SYN | TCP_ACK, seq=5000, ack=1001, options=SYN_OPTIONS
    )
    assert out.data_out.hex() == expected.hex()
    assert dp.stat(Stat.REVNAT)[0] == 1
    for key in (
        ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_TCP, CtDir.FWD),
        ct_key(BE1.addr, CLIENT, BE1.port, CPORT, IPPROTO_TCP, CtDir.REPLY),
    ):
        v = dp.ct(key)
        assert v is not None
        assert v.state == CtState.ESTABLISHED
        assert v.flags & CtFlag.SEEN_REPLY


@pytest.mark.parametrize("checksum", [True, False], ids=["udp-csum", "udp-csum-0"])
def test_udp_both_ways(dp: Datapath, checksum: bool) -> None:
    dp.add_service(SVC, 53, IPPROTO_UDP, [BE2])
    out = dp.run("kp_from_pod", udp_frame(CLIENT, SVC, CPORT, 53, b"query", checksum=checksum))
    assert (
        out.data_out.hex() == udp_frame(CLIENT, BE2.addr, CPORT, BE2.port, b"query", checksum=checksum).hex()
    )
    reply = udp_frame(BE2.addr, CLIENT, BE2.port, CPORT, b"answer", checksum=checksum)
    out = dp.run("kp_to_pod", reply)
    assert out.retval == TC_ACT_OK
    assert out.data_out.hex() == udp_frame(SVC, CLIENT, 53, CPORT, b"answer", checksum=checksum).hex()
    fwd = dp.ct(ct_key(CLIENT, SVC, CPORT, 53, IPPROTO_UDP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.UDP and fwd.flags & CtFlag.SEEN_REPLY


def test_fin_closes_and_new_syn_reopens(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    fwd_key = ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_TCP, CtDir.FWD)
    dp.run("kp_from_pod", syn())
    dp.run("kp_from_pod", tcp_frame(CLIENT, SVC, CPORT, SPORT, TCP_FIN | TCP_ACK))
    fwd = dp.ct(fwd_key)
    assert fwd is not None and fwd.state == CtState.CLOSING
    dp.run("kp_to_pod", tcp_frame(BE1.addr, CLIENT, BE1.port, CPORT, TCP_RST))
    fwd = dp.ct(fwd_key)
    assert fwd is not None and fwd.state == CtState.CLOSED
    assert dp.stat(Stat.CT_REOPEN)[0] == 0
    out = dp.run("kp_from_pod", syn())
    assert parse(out.data_out).dst == BE1.addr
    fwd = dp.ct(fwd_key)
    assert fwd is not None and fwd.state == CtState.SYN_SENT
    assert dp.stat(Stat.CT_REOPEN)[0] == 1


def test_vanished_backend_reselects(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    assert parse(dp.run("kp_from_pod", syn()).data_out).dst == BE1.addr
    dp.be4.delete(ctypes.c_uint32(BE1.id))
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE2])
    out = dp.run("kp_from_pod", tcp_frame(CLIENT, SVC, CPORT, SPORT, TCP_ACK))
    p = parse(out.data_out)
    assert (p.dst, p.dport) == (BE2.addr, BE2.port)
    assert checksum_errors(out.data_out) == []
    assert dp.stat(Stat.CT_REOPEN)[0] == 1
    fwd = dp.ct(ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.backend_id == BE2.id


def test_expired_entry_is_ignored(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.add_backends([BE2], IPPROTO_TCP)
    dp.run("kp_from_pod", syn())
    key = ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_TCP, CtDir.FWD)
    stale = dp.ct(key)
    assert stale is not None
    stale.backend_id, stale.nat_addr, stale.nat_port = BE2.id, ip_to_nbo(BE2.addr), port_to_nbo(BE2.port)
    stale.expires_ns = time.monotonic_ns() - 10**9
    dp.put_ct(key, stale)
    out = dp.run("kp_from_pod", syn())
    assert parse(out.data_out).dst == BE1.addr
    assert dp.stat(Stat.CT_NEW)[0] == 2


def test_affinity_sticks(dp: Datapath) -> None:
    backends = [BE1, BE3, BE4, Backend(5, "10.244.6.15", 8080)]
    dp.add_service(SVC, SPORT, IPPROTO_TCP, backends, flags=SvcFlag.AFFINITY, svc_id=9, affinity_timeout=100)
    first = parse(dp.run("kp_from_pod", syn(sport=42000)).data_out).dst
    aff = dp.aff(CLIENT, 9)
    assert aff is not None
    for sport in range(42001, 42011):
        assert parse(dp.run("kp_from_pod", syn(sport=sport)).data_out).dst == first
    assert dp.stat(Stat.AFFINITY_HIT)[0] == 10
    later = dp.aff(CLIENT, 9)
    assert later is not None and later.last_used_ns >= aff.last_used_ns
    # Packets of existing connections do not touch the affinity entry.
    before = dp.aff(CLIENT, 9)
    dp.run("kp_from_pod", tcp_frame(CLIENT, SVC, 42001, SPORT, TCP_ACK))
    after = dp.aff(CLIENT, 9)
    assert before is not None and after is not None and after.last_used_ns == before.last_used_ns


def test_affinity_expired_is_not_used(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1], flags=SvcFlag.AFFINITY, svc_id=9, affinity_timeout=100)
    dp.add_backends([BE2], IPPROTO_TCP)
    dp.aff4.update(Aff4Key(ip_to_nbo(CLIENT), 9), Aff4Val(time.monotonic_ns() - 101 * 10**9, BE2.id, 0))
    assert parse(dp.run("kp_from_pod", syn()).data_out).dst == BE1.addr
    assert dp.stat(Stat.AFFINITY_HIT)[0] == 0
    aff = dp.aff(CLIENT, 9)
    assert aff is not None and aff.backend_id == BE1.id


@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod", "kp_from_netdev", "kp_to_netdev"])
def test_every_truncation_passes_unchanged(dp: Datapath, prog: str) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1], flags=SvcFlag.NODEPORT)
    frame = syn(ip_options=ROUTER_ALERT)
    for length in range(14, len(frame)):
        try:
            out = dp.run(prog, frame[:length])
        except LibbpfError as e:
            # PROG_TEST_RUN (6.18) itself refuses an IPv4 frame without a full 20-byte IPv4 header:
            # such lengths are "not run". Everything from 34 bytes on must run.
            assert e.errno == errno.EINVAL and length < 14 + 20, length
            continue
        assert out.retval == TC_ACT_OK, length
        assert out.data_out == frame[:length], length
    assert dp.ct_entries() == {}
    assert dp.stat(Stat.DNAT)[0] == 0


def _frag_needed(outer_src: str, inner: bytes, mtu: int = 1400) -> bytes:
    return ether(ipv4(outer_src, CLIENT, IPPROTO_ICMP, icmp(3, 4, mtu, inner)), dst=bytes(6))


@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod"])
def test_icmp_frag_needed_is_reverse_translated(dp: Datapath, prog: str) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    client_syn = syn()
    dnated = dp.run("kp_from_pod", client_syn).data_out
    # A router between node and backend quotes the packet as it saw it: client -> backend.
    seen = parse(dnated)
    frame = _frag_needed(ROUTER, seen.l3 + seen.l4[:8])
    out = dp.run(prog, frame)
    assert out.retval == TC_ACT_OK
    orig = parse(client_syn)
    assert out.data_out.hex() == _frag_needed(ROUTER, orig.l3 + orig.l4[:8]).hex()
    assert checksum_errors(out.data_out) == []
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 1


def test_icmp_from_the_backend_gets_the_frontend_source(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_UDP, [BE2])
    query = udp_frame(CLIENT, SVC, CPORT, SPORT, b"query")
    seen = parse(dp.run("kp_from_pod", query).data_out)
    frame = ether(ipv4(BE2.addr, CLIENT, IPPROTO_ICMP, icmp(3, 3, 0, seen.l3 + seen.l4[:8])))
    out = dp.run("kp_from_pod", frame)
    assert out.retval == TC_ACT_OK
    got = parse(out.data_out)
    assert got.src == SVC
    inner = got.l4[8:]
    orig = parse(query)
    assert inner[:20] == orig.l3
    # The quoted UDP header carries the port of the frontend again; its checksum stays stale.
    assert inner[20:26] == orig.l4[:6]
    assert inner[26:28] == seen.l4[6:8]
    assert checksum_errors(out.data_out) == []


def test_icmp_error_about_unknown_flow_passes(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    inner = parse(syn(dst=BE1.addr, dport=BE1.port))
    frame = _frag_needed(ROUTER, inner.l3 + inner.l4[:8])
    out = dp.run("kp_to_pod", frame)
    assert (out.retval, out.data_out) == (TC_ACT_OK, frame)
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 0


def test_counters_count_packets_and_bytes(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    frames = [syn(), tcp_frame(CLIENT, SVC, CPORT, SPORT, TCP_ACK, payload=b"x" * 100), syn(dst="10.1.1.1")]
    for f in frames:
        dp.run("kp_from_pod", f)
    assert dp.stat(Stat.FROM_POD) == (3, sum(len(f) for f in frames))
    assert dp.stat(Stat.DNAT) == (2, len(frames[0]) + len(frames[1]))
    assert dp.stat(Stat.CT_NEW)[0] == 1
    assert dp.stat(Stat.TO_POD)[0] == 0


def test_ct_is_not_rewritten_per_packet(dp: Datapath) -> None:
    """Entries are refreshed only when their expiry would move by more than a second."""
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.run("kp_from_pod", syn())
    key = ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_TCP, CtDir.FWD)
    val = dp.ct(key)
    assert val is not None
    far = time.monotonic_ns() + 10**15
    val.expires_ns = far
    dp.put_ct(key, val)
    dp.run("kp_from_pod", tcp_frame(CLIENT, SVC, CPORT, SPORT, TCP_ACK))
    kept = dp.ct(key)
    assert kept is not None and kept.expires_ns == far
    # Close to expiry: the next packet pushes both entries a full syn timeout ahead.
    val.expires_ns = time.monotonic_ns() + 10**9
    dp.put_ct(key, val)
    before = time.monotonic_ns()
    dp.run("kp_from_pod", tcp_frame(CLIENT, SVC, CPORT, SPORT, TCP_ACK))
    for k in (key, ct_key(BE1.addr, CLIENT, BE1.port, CPORT, IPPROTO_TCP, CtDir.REPLY)):
        refreshed = dp.ct(k)
        assert refreshed is not None and refreshed.expires_ns >= before + 60 * 10**9


def test_icmp_time_exceeded_is_reverse_translated(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    client_syn = syn(ip_options=ROUTER_ALERT)
    seen = parse(dp.run("kp_from_pod", client_syn).data_out)
    frame = ether(ipv4(ROUTER, CLIENT, IPPROTO_ICMP, icmp(11, 0, 0, seen.l3 + seen.l4[:8])))
    out = dp.run("kp_to_pod", frame)
    orig = parse(client_syn)
    assert (
        out.data_out.hex()
        == ether(ipv4(ROUTER, CLIENT, IPPROTO_ICMP, icmp(11, 0, 0, orig.l3 + orig.l4[:8]))).hex()
    )
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 1


def test_nodeport_without_backend_is_rejected_from_netdev(dp: Datapath) -> None:
    dp.add_service(NODE, NODEPORT, IPPROTO_TCP, [], flags=SvcFlag.NODEPORT)
    frame = syn(src=EXT_CLIENT, dst=NODE, dport=NODEPORT)
    out = dp.run("kp_from_netdev", frame)
    assert out.retval == TC_ACT_REDIRECT
    assert out.data_out.hex() == icmp_reject(frame, 20).hex()
    assert checksum_errors(out.data_out) == []


def test_timeouts_come_from_config(dp: Datapath) -> None:
    cfg = Config()
    cfg.ct_syn_timeout, cfg.ct_udp_timeout = 5, 7
    dp.cfg.update(ctypes.c_uint32(0), cfg)
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.add_service(SVC, SPORT, IPPROTO_UDP, [BE2], svc_id=2)
    before = time.monotonic_ns()
    dp.run("kp_from_pod", syn())
    dp.run("kp_from_pod", udp_frame(CLIENT, SVC, CPORT, SPORT))
    after = time.monotonic_ns()
    tcp_val = dp.ct(ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_TCP, CtDir.FWD))
    udp_val = dp.ct(ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_UDP, CtDir.FWD))
    assert tcp_val is not None and before + 5 * 10**9 <= tcp_val.expires_ns <= after + 5 * 10**9
    assert udp_val is not None and before + 7 * 10**9 <= udp_val.expires_ns <= after + 7 * 10**9


# ---- IPv4 fragments: later fragments follow their first (kp_frag4_v1) ----
def fragments(
    src: str, dst: str, l4: bytes, proto: int = IPPROTO_UDP, ident: int = 0x4242, mtu: int = 1500
) -> list[bytes]:
    """Ethernet frames of the IPv4 datagram carrying `l4`, fragmented as Linux does for `mtu`."""
    step = (mtu - 20) // 8 * 8
    out = []
    for off in range(0, len(l4), step):
        more = off + step < len(l4)
        ff = (IP_MF if more else 0) | off // 8
        out.append(ether(ipv4(src, dst, proto, l4[off : off + step], ident=ident, flags_frag=ff)))
    return out


def reassemble(frames: list[bytes]) -> tuple[str, str, bytes]:
    """(source, destination, L4 bytes) of fragments, checking their IPv4 headers."""
    l4 = b""
    srcs, dsts = set(), set()
    for f in frames:
        p = parse(f)
        assert ones_sum_ok(p.l3), "fragment IPv4 header checksum"
        srcs.add(p.l3[12:16])
        dsts.add(p.l3[16:20])
        l4 += p.l4
    assert len(srcs) == len(dsts) == 1, "fragments of one datagram disagree on its addresses"
    return socket.inet_ntoa(srcs.pop()), socket.inet_ntoa(dsts.pop()), l4


def test_udp_datagram_of_8k_fragments_to_a_clusterip_and_its_reply(dp: Datapath) -> None:
    """Every fragment of an 8 KB datagram reaches the backend with the translation of the first; the
    backend's fragmented reply comes back from the Service address. The L4 checksum (in the first
    fragment) verifies over the reassembled datagram, in both directions."""
    dp.add_service(SVC, SPORT, IPPROTO_UDP, [BE1])
    payload = bytes(range(256)) * 32  # 8 KB
    request = fragments(CLIENT, SVC, udp(CLIENT, SVC, CPORT, SPORT, payload))
    assert len(request) == 6
    out = []
    for f in request:
        r = dp.run("kp_from_pod", f)
        assert r.retval == TC_ACT_OK
        out.append(r.data_out)
    src, dst, l4 = reassemble(out)
    assert (src, dst) == (CLIENT, BE1.addr)
    assert struct.unpack("!HH", l4[:4]) == (CPORT, BE1.port) and l4[8:] == payload
    assert ones_sum_ok(pseudo_header(addr(src), addr(dst), IPPROTO_UDP, len(l4)) + l4), "UDP checksum"
    assert dp.stat(Stat.FRAG_FIRST)[0] == 1 and dp.stat(Stat.FRAG_LATER)[0] == 5
    assert dp.stat(Stat.PASS_FRAGMENT)[0] == 0
    # the reply, fragmented by the backend, through kp_to_pod of the client's node
    reply = fragments(BE1.addr, CLIENT, udp(BE1.addr, CLIENT, BE1.port, CPORT, payload[::-1]), ident=0x77)
    back = [dp.run("kp_to_pod", f) for f in reply]
    assert all(r.retval == TC_ACT_OK for r in back)
    src, dst, l4 = reassemble([r.data_out for r in back])
    assert (src, dst) == (SVC, CLIENT) and struct.unpack("!HH", l4[:4]) == (SPORT, CPORT)
    assert ones_sum_ok(pseudo_header(addr(src), addr(dst), IPPROTO_UDP, len(l4)) + l4), "reply UDP checksum"


def test_later_fragment_to_a_service_without_backends_is_dropped_not_answered(dp: Datapath) -> None:
    """The first fragment is answered port unreachable; the later ones have nothing a sender could
    match an ICMP error to: dropped."""
    dp.add_service(SVC, SPORT, IPPROTO_UDP, [])
    first, later = fragments(CLIENT, SVC, udp(CLIENT, SVC, CPORT, SPORT, bytes(2000)))
    assert dp.run("kp_from_pod", first).retval == TC_ACT_REDIRECT
    assert dp.run("kp_from_pod", later).retval == TC_ACT_SHOT
    assert dp.stat(Stat.REJECT)[0] == 1 and dp.stat(Stat.DROP_FRAGMENT)[0] == 1
    assert dp.stat(Stat.DROP_REJECT_FAILED)[0] == 0


def test_established_flow_of_a_deleted_frontend_keeps_its_translation(dp: Datapath) -> None:
    """A Service port deleted while a pod's TCP connection lives: its later segments are still DNATed
    from the conntrack entry (as kube-proxy's conntrack does), within the service address space only;
    a new SYN is not (the address is unallocated now: dropped)."""
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.add_svcnet("10.96.0.0/16", SvcnetAction.DROP)
    assert dp.run("kp_from_pod", syn()).retval == TC_ACT_OK
    for slot in (1, 0):
        dp.svc4.delete(dp.svc_key(SVC, SPORT, IPPROTO_TCP, Scope.EXT, slot))
    ack = tcp_frame(CLIENT, SVC, CPORT, SPORT, TCP_ACK, payload=b"still here")
    out = dp.run("kp_from_pod", ack)
    assert out.retval == TC_ACT_OK
    assert (
        out.data_out.hex()
        == tcp_frame(CLIENT, BE1.addr, CPORT, BE1.port, TCP_ACK, payload=b"still here").hex()
    )
    assert dp.stat(Stat.CT_ORPHAN)[0] == 1
    assert dp.run("kp_from_pod", syn(sport=CPORT + 1)).retval == TC_ACT_SHOT
    # outside the service address space nothing is looked up: passed as it is
    other = tcp_frame(CLIENT, "10.97.0.1", CPORT, SPORT, TCP_ACK)
    assert dp.run("kp_from_pod", other).data_out == other and dp.stat(Stat.CT_ORPHAN)[0] == 1
