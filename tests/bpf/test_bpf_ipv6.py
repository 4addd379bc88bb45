"""PROG_TEST_RUN tables for the IPv6 datapath: the family-generic logic (lib/<topic>_fam.h) built for IPv6,
its parser (lib/parse6.h: extension headers, fragments, truncation) and ICMPv6.

Each test says what an IPv6 packet into one program must become; frames are checked byte for byte
where the translation is exact, and every checksum of every output frame is recomputed.
"""

from __future__ import annotations

import ctypes
import logging
import struct

import pytest
from datapath import (
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    Backend,
    Datapath,
    ct6_key,
    in6,
    open_datapath,
    private_bpffs,
)
from frames import (
    ETH_HLEN,
    ETH_P_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    csum,
    ether,
    ipv4,
    swap_macs,
    tcp,
)
from frames6 import (
    ICMP6_DEST_UNREACH,
    ICMP6_ECHO_REQUEST,
    ICMP6_NEIGHBOR_SOLICIT,
    ICMP6_PKT_TOOBIG,
    ICMP6_PORT_UNREACH,
    IPPROTO_DSTOPTS,
    IPPROTO_ESP,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_NONE,
    IPPROTO_ROUTING,
    checksum_errors6,
    ext,
    frag_hdr,
    icmp6,
    ipv6,
    parse6,
    pseudo6,
    tcp6,
    tcp6_frame,
    udp6,
    udp6_frame,
)

from kproxy.abi import (
    ID6_BASE,
    MAP_PROGS6,
    Config,
    ConfigFlag,
    CtDir,
    CtFlag,
    CtState,
    LbSrc4Val,
    LbSrc6Key,
    Scope,
    Stat,
    SvcFlag,
    Svcnet4Val,
    Svcnet6Key,
    SvcnetAction,
    bytes_to_ip6,
)
from kproxy.bpf.libbpf import BPF_F_TEST_SKB_CHECKSUM_COMPLETE, prog_test_run

CLIENT = "fd00:10:244:1::5"
SVC = "fd00:96::1"
SPORT = 80
CPORT = 40000
BE1 = Backend(ID6_BASE + 1, "fd00:10:244:2::7", 8080)
BE2 = Backend(ID6_BASE + 2, "fd00:10:244:3::9", 8080)
NODE6 = "fd00:a::1"
HAIRPIN6 = "100::a9fe:2a01"


IPV6_ONLY = True  # conftest.ipv6_counts_in_kp_stats6 checks every test here
SENDS_IPV4: set[str] = {  # tests that send IPv4 frames too, or frames of no family (counted with IPv4)
    "test_ipv6_packets_count_in_kp_stats6_only",
    "test_frames_of_other_ethertypes_are_ignored_by_the_ipv6_path",
}


def syn6(src: str = CLIENT, dst: str = SVC, sport: int = CPORT, dport: int = SPORT, **kw: object) -> bytes:
    return tcp6_frame(src, dst, sport, dport, TCP_SYN, **kw)


def unchanged(dp: Datapath, prog: str, frame: bytes) -> None:
    out = dp.run(prog, frame)
    assert (out.retval, out.data_out) == (TC_ACT_OK, frame)


def test_empty_ipv6_slot_passes_untouched_and_counts(dp: Datapath) -> None:
    """The entry points reach their IPv6 halves through kp_progs6_v1; with a slot empty the packet passes
    untranslated, counted as pass_no_prog (IPv6's counters)."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    progs6 = dp.obj.map(MAP_PROGS6)
    progs6.delete(ctypes.c_uint32(0))  # KP_PROG6_FROM_POD
    try:
        unchanged(dp, "kp_from_pod", syn6())
    finally:
        progs6.update(ctypes.c_uint32(0), ctypes.c_uint32(dp.obj.program("kp_from_pod6").fd))
    assert dp.stat(Stat.PASS_NO_PROG, family=6)[0] == 1 and dp.stat(Stat.FROM_POD, family=6)[0] == 1
    assert parse6(dp.run("kp_from_pod", syn6()).data_out).dst == BE1.addr
    assert dp.stat(Stat.PASS_NO_PROG, family=6)[0] == 1


# ---- DNAT and reverse NAT ----
@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_pod_to_cluster_ip_is_dnated_and_tracked(dp: Datapath, proto: int) -> None:
    dp.add_service6(SVC, SPORT, proto, [BE1])
    frame = syn6() if proto == IPPROTO_TCP else udp6_frame(CLIENT, SVC, CPORT, SPORT)
    out = dp.run("kp_from_pod", frame)
    assert out.retval == TC_ACT_OK
    got = parse6(out.data_out)
    assert (got.src, got.sport, got.dst, got.dport) == (CLIENT, CPORT, BE1.addr, BE1.port)
    assert checksum_errors6(out.data_out) == []
    fwd = dp.ct6(ct6_key(CLIENT, SVC, CPORT, SPORT, proto, CtDir.FWD))
    rep = dp.ct6(ct6_key(BE1.addr, CLIENT, BE1.port, CPORT, proto, CtDir.REPLY))
    assert fwd is not None and rep is not None
    assert (bytes_to_ip6(fwd.nat_addr), fwd.backend_id) == (BE1.addr, BE1.id)
    assert fwd.svc_id == ID6_BASE + 1
    assert bytes_to_ip6(rep.nat_addr) == SVC
    assert fwd.state == (CtState.SYN_SENT if proto == IPPROTO_TCP else CtState.UDP)
    assert dp.stat(Stat.DNAT)[0] == 1 and dp.stat(Stat.CT_NEW)[0] == 1


@pytest.mark.parametrize("prog", ["kp_to_pod", "kp_from_pod"])
def test_reply_gets_the_frontend_back(dp: Datapath, prog: str) -> None:
    """kp_to_pod: a remote backend's reply reaching the client's node; kp_from_pod: a local backend's."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.run("kp_from_pod", syn6())
    reply = tcp6_frame(BE1.addr, CLIENT, BE1.port, CPORT, TCP_SYN | TCP_ACK, seq=77, ack=1001)
    out = dp.run(prog, reply)
    assert out.retval == TC_ACT_OK
    assert out.data_out == tcp6_frame(SVC, CLIENT, SPORT, CPORT, TCP_SYN | TCP_ACK, seq=77, ack=1001)
    fwd = dp.ct6(ct6_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.ESTABLISHED and fwd.flags & CtFlag.SEEN_REPLY
    assert dp.stat(Stat.REVNAT)[0] == 1


def test_forward_packets_follow_the_flow(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1, BE2])
    first = parse6(dp.run("kp_from_pod", syn6()).data_out)
    for _ in range(20):
        out = dp.run("kp_from_pod", tcp6_frame(CLIENT, SVC, CPORT, SPORT, TCP_ACK, payload=b"x" * 30))
        assert parse6(out.data_out).dst == first.dst
        assert checksum_errors6(out.data_out) == []
    assert dp.stat(Stat.CT_NEW)[0] == 1


def test_new_flows_spread_over_backends(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1, BE2])
    seen = {
        parse6(dp.run("kp_from_pod", udp6_frame(CLIENT, SVC, 20000 + i, SPORT)).data_out).dst
        for i in range(64)
    }
    assert seen == {BE1.addr, BE2.addr}


def test_affinity_keeps_the_client_on_its_backend(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1, BE2], flags=SvcFlag.AFFINITY, affinity_timeout=60)
    first = parse6(dp.run("kp_from_pod", syn6(sport=30000)).data_out).dst
    for i in range(1, 30):
        assert parse6(dp.run("kp_from_pod", syn6(sport=30000 + i)).data_out).dst == first
    aff = dp.aff6(CLIENT, ID6_BASE + 1)
    assert aff is not None and aff.backend_id in (BE1.id, BE2.id)
    assert dp.stat(Stat.AFFINITY_HIT)[0] == 29


def test_the_ipv4_maps_do_not_serve_ipv6(dp: Datapath) -> None:
    """A v6 frontend lives in kp_svc6 only; an IPv4 service of the same port does not catch it."""
    dp.add_service("10.96.0.1", SPORT, IPPROTO_TCP, [Backend(1, "10.244.2.7", 8080)])
    unchanged(dp, "kp_from_pod", syn6())
    assert dp.stat(Stat.FROM_POD)[0] == 1


def test_ipv6_packets_count_in_kp_stats6_only(dp: Datapath) -> None:
    """kproxy stats and the metrics by family: an IPv6 flow's counters are kp_stats6_v1's, an IPv4
    flow's kp_stats_v1's."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    assert dp.run("kp_from_pod", syn6()).retval == TC_ACT_OK
    for stat in (Stat.FROM_POD, Stat.DNAT, Stat.CT_NEW):
        assert (dp.stat(stat, family=6)[0], dp.stat(stat, family=4)[0]) == (1, 0), stat
    dp.add_service("10.96.0.10", 80, IPPROTO_TCP, [Backend(7, "10.244.2.7", 8080)])
    syn4 = ether(ipv4("10.244.1.5", "10.96.0.10", IPPROTO_TCP, tcp("10.244.1.5", "10.96.0.10", 40000, 80)))
    assert dp.run("kp_from_pod", syn4).retval == TC_ACT_OK
    assert (dp.stat(Stat.DNAT, family=6)[0], dp.stat(Stat.DNAT, family=4)[0]) == (1, 1)


# ---- REJECT: ICMPv6 port unreachable ----
@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_no_backend_is_rejected_with_icmp6_port_unreachable(dp: Datapath, proto: int) -> None:
    dp.add_service6(SVC, SPORT, proto, [])
    frame = syn6() if proto == IPPROTO_TCP else udp6_frame(CLIENT, SVC, CPORT, SPORT, b"x" * 300)
    out = dp.run("kp_from_pod", frame)
    assert out.retval == TC_ACT_REDIRECT
    got = parse6(out.data_out)
    assert got.proto == IPPROTO_ICMPV6
    assert (got.src, got.dst) == (SVC, CLIENT)
    assert (got.icmp_type, got.icmp_code) == (ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH)
    assert checksum_errors6(out.data_out) == []
    quote = got.l4[8:]
    l4 = 20 if proto == IPPROTO_TCP else 8
    assert quote == frame[ETH_HLEN : ETH_HLEN + 40 + l4]
    assert out.data_out[:12] == swap_macs(frame)[:12]
    assert dp.stat(Stat.REJECT)[0] == 1


def test_no_local_backend_drops(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [], flags=SvcFlag.ITP_LOCAL | SvcFlag.NO_LOCAL_DROP)
    assert dp.run("kp_from_pod", syn6()).retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_NO_LOCAL_BACKEND)[0] == 1


# ---- the service address space (kp_svcnet6_v1): kube-proxy's cluster-ips-check ----
SVC_CIDR6 = "fd00:96::/108"


def service_space6(dp: Datapath) -> None:
    """A TCP service SVC:SPORT, its ClusterIP as a REJECT entry, the service CIDR as DROP."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.add_svcnet6(SVC_CIDR6, SvcnetAction.DROP)
    dp.add_svcnet6(f"{SVC}/128", SvcnetAction.REJECT)


@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_from_netdev"])
def test_unknown_port_of_a_cluster_ip_is_rejected_and_unallocated_addresses_dropped(
    dp: Datapath, prog: str
) -> None:
    service_space6(dp)
    for frame in (
        syn6(dport=SPORT + 1),
        udp6_frame(CLIENT, SVC, CPORT, SPORT, b"q"),  # a protocol the Service does not have
        ether(
            ipv6(CLIENT, SVC, IPPROTO_ICMPV6, icmp6(CLIENT, SVC, ICMP6_ECHO_REQUEST, 0, 1, b"ping")),
            ETH_P_IPV6,
        ),
    ):
        out = dp.run(prog, frame)
        assert out.retval == TC_ACT_REDIRECT, frame.hex()
        got = parse6(out.data_out)
        assert (got.src, got.dst, got.icmp_type, got.icmp_code) == (
            SVC, CLIENT, ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH,
        )  # fmt: skip
        assert checksum_errors6(out.data_out) == []
    assert dp.stat(Stat.SVCNET_REJECT)[0] == 3
    # an address of the service CIDR nothing is allocated at: dropped
    for frame in (syn6(dst="fd00:96::99"), udp6_frame(CLIENT, "fd00:96::99", CPORT, 53, b"q")):
        assert dp.run(prog, frame).retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_SVCNET)[0] == 2
    # outside the service CIDR, and packets that open no flow: passed as they are
    unchanged(dp, prog, syn6(dst="fd00:97::1"))
    # an entry outside the span (whose upper 64 bits are fd00:96::'s) is never looked up
    dp.svcnet6.update(Svcnet6Key(128, in6("fd00:96:0:1::1")), Svcnet4Val(SvcnetAction.REJECT))
    unchanged(dp, prog, syn6(dst="fd00:96:0:1::1"))
    unchanged(dp, prog, tcp6_frame(CLIENT, "fd00:96::99", CPORT, 80, TCP_ACK))
    # the Service's own port is served
    assert parse6(dp.run(prog, syn6()).data_out).dst == BE1.addr


def test_cluster_ip_of_another_proxy_passes(dp: Datapath) -> None:
    dp.add_svcnet6(SVC_CIDR6, SvcnetAction.DROP)
    dp.add_svcnet6("fd00:96::7/128", SvcnetAction.PASS)
    unchanged(dp, "kp_from_pod", syn6(dst="fd00:96::7"))
    assert dp.run("kp_from_pod", syn6(dst="fd00:96::8")).retval == TC_ACT_SHOT


def test_cluster_ip_from_outside_closed_drops_unknown_ports_too(dp: Datapath) -> None:
    """With ClusterIPs closed to the outside (--no-external-cluster-ip), an unknown port of one is
    dropped from a netdev, not answered; from a pod it is still rejected."""
    service_space6(dp)
    dp.cfg.update(ctypes.c_uint32(0), Config(flags=ConfigFlag.NO_EXTERNAL_CLUSTER_IP))
    assert dp.run("kp_from_netdev", syn6(dport=SPORT + 1)).retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_CLUSTER_IP_EXTERNAL)[0] == 1
    assert dp.run("kp_from_pod", syn6(dport=SPORT + 1)).retval == TC_ACT_REDIRECT


def test_established_flow_of_a_deleted_cluster_ip_port_keeps_its_translation(dp: Datapath) -> None:
    """A Service port deleted while a pod's TCP connection lives: its later segments are still DNATed
    from the conntrack entry, within the service address space only; a new SYN is not (dropped)."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.add_svcnet6(SVC_CIDR6, SvcnetAction.DROP)
    assert dp.run("kp_from_pod", syn6()).retval == TC_ACT_OK
    for slot in (1, 0):
        dp.svc6.delete(dp.svc6_key(SVC, SPORT, IPPROTO_TCP, Scope.EXT, slot))
    ack = tcp6_frame(CLIENT, SVC, CPORT, SPORT, TCP_ACK, payload=b"still here")
    out = dp.run("kp_from_pod", ack)
    assert out.retval == TC_ACT_OK
    assert (
        out.data_out.hex()
        == tcp6_frame(CLIENT, BE1.addr, CPORT, BE1.port, TCP_ACK, payload=b"still here").hex()
    )
    assert checksum_errors6(out.data_out) == [] and dp.stat(Stat.CT_ORPHAN)[0] == 1
    assert dp.run("kp_from_pod", syn6(sport=CPORT + 1)).retval == TC_ACT_SHOT
    other = tcp6_frame(CLIENT, "fd00:97::1", CPORT, SPORT, TCP_ACK)
    unchanged(dp, "kp_from_pod", other)
    assert dp.stat(Stat.CT_ORPHAN)[0] == 1


# ---- the parser: extension headers, truncation, what is never touched ----
EXT_CHAINS = {
    "hop-by-hop": [ext(IPPROTO_HOPOPTS)],
    "destination options 24 bytes": [ext(IPPROTO_DSTOPTS, 2)],
    "routing (segments left 0)": [ext(IPPROTO_ROUTING, 2)],
    "hop-by-hop, routing, destination options": [
        ext(IPPROTO_HOPOPTS),
        ext(IPPROTO_ROUTING, 2),
        ext(IPPROTO_DSTOPTS, 1),
    ],
}


@pytest.mark.parametrize("chain", EXT_CHAINS, ids=list(EXT_CHAINS))
@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_extension_headers_are_skipped(dp: Datapath, chain: str, proto: int) -> None:
    dp.add_service6(SVC, SPORT, proto, [BE1])
    exts = EXT_CHAINS[chain]
    if proto == IPPROTO_TCP:
        frame = ether(ipv6(CLIENT, SVC, proto, tcp6(CLIENT, SVC, CPORT, SPORT), exts=exts), ETH_P_IPV6)
        want = ether(
            ipv6(CLIENT, BE1.addr, proto, tcp6(CLIENT, BE1.addr, CPORT, BE1.port), exts=exts), ETH_P_IPV6
        )
    else:
        frame = ether(ipv6(CLIENT, SVC, proto, udp6(CLIENT, SVC, CPORT, SPORT), exts=exts), ETH_P_IPV6)
        want = ether(
            ipv6(CLIENT, BE1.addr, proto, udp6(CLIENT, BE1.addr, CPORT, BE1.port), exts=exts), ETH_P_IPV6
        )
    out = dp.run("kp_from_pod", frame)
    assert (out.retval, out.data_out.hex()) == (TC_ACT_OK, want.hex())


def test_seven_extension_headers_pass_untouched(dp: Datapath) -> None:
    """More headers than the parser walks (KP_IP6_EXT_MAX): not followed, passed."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    exts = [ext(IPPROTO_DSTOPTS) for _ in range(7)]
    unchanged(
        dp,
        "kp_from_pod",
        ether(ipv6(CLIENT, SVC, IPPROTO_TCP, tcp6(CLIENT, SVC, CPORT, SPORT), exts=exts), ETH_P_IPV6),
    )


@pytest.mark.parametrize("nexthdr", [IPPROTO_ESP, IPPROTO_NONE, 132])
def test_upper_layers_not_ours_pass(dp: Datapath, nexthdr: int) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    unchanged(dp, "kp_from_pod", ether(ipv6(CLIENT, SVC, nexthdr, b"\0" * 40), ETH_P_IPV6))


@pytest.mark.parametrize("icmp_type", [ICMP6_NEIGHBOR_SOLICIT, 133, 134, 136, 137, ICMP6_ECHO_REQUEST])
@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod", "kp_from_netdev", "kp_to_netdev"])
def test_neighbour_discovery_and_echo_are_never_touched(dp: Datapath, prog: str, icmp_type: int) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    msg = icmp6(CLIENT, SVC, icmp_type, 0, 0, bytes(16) + b"\x01\x01" + b"\x02" * 6)
    unchanged(dp, prog, ether(ipv6(CLIENT, SVC, IPPROTO_ICMPV6, msg, hop_limit=255), ETH_P_IPV6))


def test_truncated_frames_pass_untouched(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])
    frames = [
        syn6(),
        syn6(exts=[ext(IPPROTO_HOPOPTS), ext(IPPROTO_DSTOPTS, 1)]),
        udp6_frame(CLIENT, SVC, CPORT, SPORT),
    ]
    for frame in frames:
        p = parse6(frame)
        # PROG_TEST_RUN (6.18) refuses IPv6 frames shorter than the fixed header (EINVAL)
        for cut in range(ETH_HLEN + 40, ETH_HLEN + p.l4_off + (20 if p.proto == IPPROTO_TCP else 8)):
            short = frame[:cut]
            out = dp.run("kp_from_pod", short)
            assert (out.retval, out.data_out) == (TC_ACT_OK, short), cut
    assert dp.stat(Stat.DNAT)[0] == 0


def test_payload_length_longer_than_the_frame_passes(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    seg = tcp6(CLIENT, SVC, CPORT, SPORT)
    unchanged(
        dp, "kp_from_pod", ether(ipv6(CLIENT, SVC, IPPROTO_TCP, seg, payload_len=len(seg) + 8), ETH_P_IPV6)
    )


# ---- fragments ----
def test_fragments_follow_their_first_fragment(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])
    body = udp6(CLIENT, SVC, CPORT, SPORT, b"y" * 100)
    first = ether(ipv6(CLIENT, SVC, IPPROTO_UDP, body[:56], exts=[frag_hdr(0, True, 7)]), ETH_P_IPV6)
    later = ether(ipv6(CLIENT, SVC, IPPROTO_UDP, body[56:], exts=[frag_hdr(7, False, 7)]), ETH_P_IPV6)
    out1 = dp.run("kp_from_pod", first)
    assert out1.retval == TC_ACT_OK
    got1 = parse6(out1.data_out)
    assert (got1.dst, got1.dport) == (BE1.addr, BE1.port)
    out2 = dp.run("kp_from_pod", later)
    assert out2.retval == TC_ACT_OK
    assert parse6(out2.data_out).dst == BE1.addr
    # the later fragment's payload (no L4 header) is untouched; the first carries the checksum of all
    assert out2.data_out[-44:] == later[-44:]
    whole = got1.l4 + parse6(out2.data_out).l4
    assert csum(pseudo6(CLIENT, BE1.addr, IPPROTO_UDP, len(whole)) + whole) == 0
    assert dp.stat(Stat.FRAG_FIRST)[0] == 1 and dp.stat(Stat.FRAG_LATER)[0] == 1


def test_a_later_fragment_before_its_first_passes(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])
    later = ether(ipv6(CLIENT, SVC, IPPROTO_UDP, b"z" * 40, exts=[frag_hdr(7, False, 9)]), ETH_P_IPV6)
    unchanged(dp, "kp_from_pod", later)
    assert dp.stat(Stat.PASS_FRAGMENT)[0] == 1


# ---- ICMPv6 errors about translated flows ----
def _too_big(src: str, quote: bytes, mtu: int = 1280) -> bytes:
    return ether(
        ipv6(src, CLIENT, IPPROTO_ICMPV6, icmp6(src, CLIENT, ICMP6_PKT_TOOBIG, 0, mtu, quote)), ETH_P_IPV6
    )


@pytest.mark.parametrize("prog", ["kp_to_pod", "kp_from_pod", "kp_to_netdev"])
def test_packet_too_big_is_reverse_translated(dp: Datapath, prog: str) -> None:
    router = "fd00:a::fe"
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    client_syn = syn6()
    dnated = dp.run("kp_from_pod", client_syn).data_out
    quote = dnated[ETH_HLEN : ETH_HLEN + 40 + 20]
    out = dp.run(prog, _too_big(router, quote))
    assert out.retval == TC_ACT_OK
    got = parse6(out.data_out)
    assert (got.src, got.dst, got.icmp_type) == (router, CLIENT, ICMP6_PKT_TOOBIG)
    assert checksum_errors6(out.data_out) == []
    inner = got.l4[8:]
    orig = client_syn[ETH_HLEN:]
    assert inner[:40] == orig[:40]  # the quoted IPv6 header: client -> frontend again
    assert inner[40:44] == orig[40:44]  # ports
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 1


def test_icmp6_from_the_backend_gets_the_frontend_source(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE2])
    dnated = dp.run("kp_from_pod", udp6_frame(CLIENT, SVC, CPORT, SPORT, b"q")).data_out
    quote = dnated[ETH_HLEN:]
    frame = ether(
        ipv6(BE2.addr, CLIENT, IPPROTO_ICMPV6, icmp6(BE2.addr, CLIENT, ICMP6_DEST_UNREACH, 4, 0, quote)),
        ETH_P_IPV6,
    )
    out = dp.run("kp_from_pod", frame)
    assert out.retval == TC_ACT_OK
    got = parse6(out.data_out)
    assert got.src == SVC
    assert checksum_errors6(out.data_out) == []


def test_icmp6_error_about_unknown_flow_passes(dp: Datapath) -> None:
    quote = syn6(dst=BE1.addr, dport=BE1.port)[ETH_HLEN : ETH_HLEN + 60]
    unchanged(dp, "kp_to_pod", _too_big("fd00:a::fe", quote))


# ---- hairpin, NodePort ----
def test_pod_balanced_to_itself_is_hairpinned(dp: Datapath) -> None:
    me = Backend(ID6_BASE + 3, CLIENT, 8080)
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [me])
    out = dp.run("kp_from_pod", syn6())
    assert out.retval == TC_ACT_REDIRECT
    got = parse6(out.data_out)
    assert (got.src, got.sport, got.dst, got.dport) == (HAIRPIN6, CPORT, CLIENT, 8080)
    assert checksum_errors6(out.data_out) == []
    reply = tcp6_frame(CLIENT, HAIRPIN6, 8080, CPORT, TCP_SYN | TCP_ACK)
    back = dp.run("kp_from_pod", reply)
    assert back.retval == TC_ACT_REDIRECT
    got = parse6(back.data_out)
    assert (got.src, got.sport, got.dst, got.dport) == (SVC, SPORT, CLIENT, CPORT)
    assert checksum_errors6(back.data_out) == []


def test_nodeport_from_outside_to_a_local_backend(dp: Datapath) -> None:
    ext_client = "2001:db8::42"
    local = Backend(ID6_BASE + 4, "fd00:10:244:1::9", 8080, flags=1)
    dp.set_node6(NODE6)
    dp.add_service6(NODE6, 30080, IPPROTO_TCP, [local], flags=SvcFlag.NODEPORT)
    out = dp.run("kp_from_netdev", tcp6_frame(ext_client, NODE6, 5555, 30080))
    assert out.retval == TC_ACT_OK
    got = parse6(out.data_out)
    assert (got.src, got.dst, got.dport) == (ext_client, local.addr, 8080)
    fwd = dp.ct6(ct6_key(ext_client, NODE6, 5555, 30080, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.flags & CtFlag.EXTERNAL and fwd.flags & CtFlag.LOCAL_BE


def test_cluster_ip_from_outside_can_be_closed(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.cfg.update(ctypes.c_uint32(0), Config(flags=ConfigFlag.NO_EXTERNAL_CLUSTER_IP))
    assert dp.run("kp_from_netdev", syn6(src="2001:db8::42")).retval == TC_ACT_SHOT


def test_source_ranges_restrict_new_flows(dp: Datapath) -> None:
    lb = "2001:db8:1::10"
    dp.add_service6(lb, SPORT, IPPROTO_TCP, [BE1], flags=SvcFlag.LOADBALANCER | SvcFlag.SRC_RANGES)
    dp.lbsrc6.update(LbSrc6Key(32 + 64, ID6_BASE + 1, in6("2001:db8:aa::")), LbSrc4Val(0))
    assert dp.run("kp_from_netdev", syn6(src="2001:db8:aa::1", dst=lb)).retval == TC_ACT_OK
    assert dp.run("kp_from_netdev", syn6(src="2001:db8:bb::1", dst=lb)).retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_SRC_RANGE)[0] == 1


def test_scopes_two_entries(dp: Datapath) -> None:
    """externalTrafficPolicy Local: pods use the INT entry (all backends), outside the EXT one."""
    local = Backend(ID6_BASE + 5, "fd00:10:244:1::9", 8080, flags=1)
    lb = "2001:db8:1::10"
    dp.add_service6(lb, SPORT, IPPROTO_TCP, [BE1], scope=Scope.INT)
    dp.add_service6(
        lb, SPORT, IPPROTO_TCP, [local], flags=SvcFlag.LOADBALANCER | SvcFlag.ETP_LOCAL | SvcFlag.TWO_SCOPES
    )
    assert parse6(dp.run("kp_from_pod", syn6(dst=lb)).data_out).dst == BE1.addr
    assert parse6(dp.run("kp_from_netdev", syn6(src="2001:db8::9", dst=lb)).data_out).dst == local.addr


def test_frames_of_other_ethertypes_are_ignored_by_the_ipv6_path(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    frame = syn6()
    bogus = frame[:12] + struct.pack("!H", 0x88B5) + frame[14:]
    unchanged(dp, "kp_from_pod", bogus)


def test_the_object_loads_without_libbpf_warnings(
    tc_object: object, caplog: pytest.LogCaptureFixture
) -> None:
    """The IPv6 program array (kp_progs6) carries no BTF key or value type: the kernel takes none for a
    program array, and libbpf would warn on every agent start, then retry without."""
    with caplog.at_level(logging.WARNING, logger="kproxy.libbpf"), private_bpffs() as bpffs:
        obj, dp = open_datapath(bpffs)
        try:
            dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
            out = dp.run("kp_from_pod", syn6())
            assert parse6(out.data_out).dst == BE1.addr  # libbpf filled kp_progs6: kp_from_pod6 ran
        finally:
            obj.close()
    assert [r.getMessage() for r in caplog.records if r.name == "kproxy.libbpf"] == []


def test_rewrites_keep_a_checksum_complete_skb_valid(dp: Datapath) -> None:
    """A CHECKSUM_COMPLETE skb (what a NIC hands the stack on a netdev) stays valid through every IPv6
    rewrite: kp_nat6 and the ICMPv6 address changes pass BPF_F_IPV6, else the kernel would adjust
    skb->csum for a pseudo-header change as for IPv4 (PROG_TEST_RUN checks skb->csum: EBADMSG)."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])

    def run(prog: str, frame: bytes) -> bytes:
        out = prog_test_run(dp.progs[prog], frame, flags=BPF_F_TEST_SKB_CHECKSUM_COMPLETE)
        assert checksum_errors6(out.data_out) == []
        return out.data_out

    dnated = run("kp_from_pod", syn6())
    assert parse6(dnated).dst == BE1.addr
    assert parse6(run("kp_from_pod", udp6_frame(CLIENT, SVC, CPORT + 1, SPORT))).dst == BE1.addr
    reply = tcp6_frame(BE1.addr, CLIENT, BE1.port, CPORT, TCP_SYN | TCP_ACK)
    assert parse6(run("kp_to_pod", reply)).src == SVC
    quote = dnated[ETH_HLEN : ETH_HLEN + 60]
    msg = icmp6(BE1.addr, CLIENT, ICMP6_DEST_UNREACH, 4, 0, quote)
    err = ether(ipv6(BE1.addr, CLIENT, IPPROTO_ICMPV6, msg), ETH_P_IPV6)
    assert parse6(run("kp_to_pod", err)).src == SVC
