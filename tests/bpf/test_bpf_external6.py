"""PROG_TEST_RUN tables for IPv6 traffic from outside (issue 15): SNAT of flows to backends on other
nodes (the port allocator shared with IPv4, lib/snat_fam.h), their replies and ICMPv6 errors,
packet too big for the route, replies of local backends forwarded by BPF, and DSR for IPv6 in both
modes (the destination options header, IPv6-in-IPv6) on the ingress node and the backend's node.

As tests/bpf/test_bpf_external.py: paths that BPF forwards itself call bpf_fib_lookup, so those runs
happen inside a private namespace (kpt6-<hex>) with a veth "node" interface, fixed routes and
permanent neighbours, so verdicts and MACs are exact.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections.abc import Iterator

import pytest
from datapath import TC_ACT_OK, TC_ACT_REDIRECT, Backend, Datapath, ct6_key, in6
from fiblab import FibLab
from frames import (
    ETH_HLEN,
    ETH_P_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    SYN_OPTIONS,
    TCP_ACK,
    TCP_FIN,
    TCP_SYN,
    ether,
)
from frames6 import (
    ICMP6_DEST_UNREACH,
    ICMP6_PKT_TOOBIG,
    IPPROTO_DSTOPTS,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    addr6,
    checksum_errors6,
    ext,
    icmp6,
    ipv6,
    parse6,
    tcp6,
    udp6,
)

from kproxy.abi import (
    DSR6_HDR_LEN,
    DSR6_OPT_LEN,
    DSR6_OPT_TYPE,
    ID6_BASE,
    BackendFlag,
    Be6Val,
    Config,
    CtDir,
    CtFlag,
    CtState,
    DsrMode,
    Scope,
    Snat6Key,
    Snat6Val,
    Stat,
    SvcFlag,
    bytes_to_ip6,
    nbo_to_port,
    port_to_nbo,
)
from kproxy.bpf.libbpf import BPF_F_TEST_SKB_CHECKSUM_COMPLETE, TestRun

pytestmark = pytest.mark.root

CLIENT, CPORT = "2001:db8:9::9", 40000
NODE, NODE2, NODEPORT = "fd00:a::10", "fd00:a::20", 30080
GW = "fd00:a::1"
BE_REMOTE = Backend(ID6_BASE + 1, "fd00:10:244:2::7", 8080)  # on NODE2
BE_LOCAL = Backend(ID6_BASE + 2, "fd00:10:244:1::9", 8080, BackendFlag.LOCAL)
NODE2_MAC = bytes.fromhex("020000000020")
GW_MAC = bytes.fromhex("020000000001")
IN_MAC_DST, IN_MAC_SRC = bytes.fromhex("02aaaaaaaaaa"), bytes.fromhex("02bbbbbbbbbb")


class Lab6(FibLab):
    """A namespace with kpe0 = fd00:a::10/64 (this node's LAN side), IPv6 forwarding on."""

    prefix = "kpt6"

    def setup(self) -> None:
        self.sysctl("net.ipv6.conf.all.forwarding=1")
        self.ip("-6", "addr", "add", f"{NODE}/64", "dev", "kpe0", "nodad")
        for addr, mac in ((GW, GW_MAC), (NODE2, NODE2_MAC)):
            self.ip("-6", "neigh", "replace", addr, "lladdr", mac.hex(":"), "dev", "kpe0", "nud", "permanent")
        self.ip("-6", "route", "add", "default", "via", GW, "dev", "kpe0")
        self.ip("-6", "route", "add", "fd00:10:244:2::/64", "via", NODE2, "dev", "kpe0")
        # a backend behind a narrow link: packets to it bigger than 1300 bytes do not fit (an IPv6 route
        # lookup reads a route MTU only when it is locked)
        self.ip(
            "-6", "route", "add", "fd00:10:244:5::/64", "via", NODE2, "dev", "kpe0", "mtu", "lock", "1300"
        )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab6]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    lab = Lab6()
    try:
        yield lab
    finally:
        lab.delete()


IPV6_ONLY = True  # conftest.ipv6_counts_in_kp_stats6 checks every test here
SENDS_IPV4: set[str] = set()  # tests that send IPv4 frames too


def run_in(dp: Datapath, lab: Lab6, prog: str, frame: bytes) -> TestRun:
    """Run `prog` as if the frame arrived on kpe0."""
    return lab.run(dp, prog, frame)


def setup(
    dp: Datapath,
    be: Backend = BE_REMOTE,
    proto: int = IPPROTO_TCP,
    flags: int = SvcFlag.NODEPORT,
    dsr: DsrMode = DsrMode.OFF,
) -> None:
    set_cfg(dp, dsr=dsr)
    dp.add_service6(NODE, NODEPORT, proto, [be], flags=flags)
    v = Be6Val(in6(be.addr), port_to_nbo(be.port), proto, be.flags, in6(NODE2))
    dp.be6.update(ctypes.c_uint32(be.id), v)


def set_cfg(dp: Datapath, node: str = NODE, dsr: DsrMode = DsrMode.OFF, **fields: int) -> None:
    """This node's settings: the IPv4 config (DSR mode, SNAT port range, timeouts: shared by both
    families) and its IPv6 address."""
    cfg = Config()
    cfg.dsr_mode = dsr
    for name, value in fields.items():
        setattr(cfg, name, value)
    dp.cfg.update(ctypes.c_uint32(0), cfg)
    dp.set_node6(node)


def frame(
    src: str,
    dst: str,
    l4: bytes,
    proto: int = IPPROTO_TCP,
    *,
    hop_limit: int = 64,
    macs: tuple[bytes, bytes] | None = None,
    exts: list[tuple[int, bytes]] | None = None,
) -> bytes:
    dst_mac, src_mac = macs or (IN_MAC_DST, IN_MAC_SRC)
    return ether(
        ipv6(src, dst, proto, l4, hop_limit=hop_limit, exts=exts), ETH_P_IPV6, dst=dst_mac, src=src_mac
    )


def client_syn(flags: int = TCP_SYN, sport: int = CPORT, payload: bytes = b"") -> bytes:
    return frame(CLIENT, NODE, tcp6(CLIENT, NODE, sport, NODEPORT, flags, payload=payload))


def ok(out: TestRun, verdict: int) -> None:
    assert out.retval == verdict
    assert checksum_errors6(out.data_out) == []


def snat_entry(dp: Datapath, port: int, be: Backend = BE_REMOTE, proto: int = IPPROTO_TCP) -> Snat6Val | None:
    key = Snat6Key(in6(be.addr), in6(NODE), port_to_nbo(be.port), port_to_nbo(port), proto)
    raw = dp.snat6.lookup(key)
    return Snat6Val.from_buffer_copy(raw) if raw is not None else None


def test_snat_first_packet_allocates_port_and_forwards(dp: Datapath, lab: Lab6) -> None:
    setup(dp)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    port = parse6(out.data_out).sport
    assert 32768 <= port <= 65535
    expected = frame(
        NODE, BE_REMOTE.addr, tcp6(NODE, BE_REMOTE.addr, port, 8080), hop_limit=63, macs=(NODE2_MAC, lab.mac)
    )
    assert out.data_out.hex() == expected.hex()
    fwd = dp.ct6(ct6_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.flags & CtFlag.SNAT and fwd.flags & CtFlag.EXTERNAL
    assert (bytes_to_ip6(fwd.snat_addr), nbo_to_port(fwd.snat_port)) == (NODE, port)
    assert dp.ct6(ct6_key(BE_REMOTE.addr, CLIENT, 8080, CPORT, IPPROTO_TCP, CtDir.REPLY)) is None
    nat = snat_entry(dp, port)
    assert nat is not None
    assert (bytes_to_ip6(nat.client_addr), nbo_to_port(nat.client_port)) == (CLIENT, CPORT)
    assert (bytes_to_ip6(nat.front_addr), nbo_to_port(nat.front_port)) == (NODE, NODEPORT)
    assert dp.stat(Stat.SNAT)[0] == 1 and dp.stat(Stat.SNAT_NEW)[0] == 1

    out = run_in(dp, lab, "kp_from_netdev", client_syn(TCP_ACK))
    ok(out, TC_ACT_REDIRECT)
    assert parse6(out.data_out).sport == port
    reply = frame(
        BE_REMOTE.addr, NODE, tcp6(BE_REMOTE.addr, NODE, 8080, port, TCP_SYN | TCP_ACK), hop_limit=63
    )
    out = run_in(dp, lab, "kp_from_netdev", reply)
    ok(out, TC_ACT_REDIRECT)
    expected = frame(
        NODE,
        CLIENT,
        tcp6(NODE, CLIENT, NODEPORT, CPORT, TCP_SYN | TCP_ACK),
        hop_limit=62,
        macs=(GW_MAC, lab.mac),
    )
    assert out.data_out.hex() == expected.hex()
    assert dp.stat(Stat.SNAT_REVNAT)[0] == 1
    fwd = dp.ct6(ct6_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.ESTABLISHED
    nat = snat_entry(dp, port)
    assert nat is not None and nat.state == CtState.ESTABLISHED


def test_snat_udp_both_ways(dp: Datapath, lab: Lab6) -> None:
    setup(dp, proto=IPPROTO_UDP)
    q = frame(CLIENT, NODE, udp6(CLIENT, NODE, CPORT, NODEPORT, b"query"), IPPROTO_UDP)
    out = run_in(dp, lab, "kp_from_netdev", q)
    ok(out, TC_ACT_REDIRECT)
    got = parse6(out.data_out)
    assert (got.src, got.dst, got.dport) == (NODE, BE_REMOTE.addr, 8080)
    port = got.sport
    r = frame(BE_REMOTE.addr, NODE, udp6(BE_REMOTE.addr, NODE, 8080, port, b"answer"), IPPROTO_UDP)
    out = run_in(dp, lab, "kp_from_netdev", r)
    ok(out, TC_ACT_REDIRECT)
    got = parse6(out.data_out)
    assert (got.src, got.sport, got.dst, got.dport) == (NODE, NODEPORT, CLIENT, CPORT)
    assert got.l4[8:] == b"answer"


def test_no_snat_for_local_backends_and_etp_local(dp: Datapath, lab: Lab6) -> None:
    setup(dp, be=BE_LOCAL)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_OK)
    got = parse6(out.data_out)
    assert (got.src, got.dst) == (CLIENT, BE_LOCAL.addr)
    assert dp.stat(Stat.SNAT_NEW)[0] == 0


def test_no_node_address_means_plain_dnat(dp: Datapath, lab: Lab6) -> None:
    setup(dp)
    dp.set_node6("::")
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_OK)
    assert parse6(out.data_out).src == CLIENT
    assert dp.stat(Stat.SNAT_NEW)[0] == 0


def test_snat_reopened_tuple_keeps_its_port(dp: Datapath, lab: Lab6) -> None:
    setup(dp)
    port = parse6(run_in(dp, lab, "kp_from_netdev", client_syn()).data_out).sport
    run_in(dp, lab, "kp_from_netdev", client_syn(TCP_FIN | TCP_ACK))
    again = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(again, TC_ACT_REDIRECT)
    assert parse6(again.data_out).sport == port
    assert dp.stat(Stat.CT_REOPEN)[0] == 1


def test_snat_two_clients_get_two_ports(dp: Datapath, lab: Lab6) -> None:
    setup(dp)
    a = parse6(run_in(dp, lab, "kp_from_netdev", client_syn(sport=1111)).data_out).sport
    other = frame("2001:db8:9::77", NODE, tcp6("2001:db8:9::77", NODE, 1111, NODEPORT))
    b = parse6(run_in(dp, lab, "kp_from_netdev", other).data_out).sport
    assert a != b
    assert snat_entry(dp, a) is not None and snat_entry(dp, b) is not None


def test_snat_icmp6_errors_reach_the_client_translated(dp: Datapath, lab: Lab6) -> None:
    setup(dp)
    fwd = run_in(dp, lab, "kp_from_netdev", client_syn()).data_out
    quote = fwd[ETH_HLEN : ETH_HLEN + 60]
    router = "fd00:a::99"
    err = frame(router, NODE, icmp6(router, NODE, ICMP6_DEST_UNREACH, 1, 0, quote), IPPROTO_ICMPV6)
    out = run_in(dp, lab, "kp_from_netdev", err)
    ok(out, TC_ACT_REDIRECT)
    got = parse6(out.data_out)
    assert (got.src, got.dst, got.icmp_type) == (router, CLIENT, ICMP6_DEST_UNREACH)
    inner = got.l4[8:]
    orig = client_syn()[ETH_HLEN:]
    assert inner[8:40] == orig[8:40]  # the quote is client -> frontend again
    assert inner[40:44] == orig[40:44]
    assert dp.stat(Stat.ICMP_SNAT)[0] == 1
    # an error the backend itself sends comes from the frontend
    err = frame(
        BE_REMOTE.addr, NODE, icmp6(BE_REMOTE.addr, NODE, ICMP6_DEST_UNREACH, 4, 0, quote), IPPROTO_ICMPV6
    )
    out = run_in(dp, lab, "kp_from_netdev", err)
    ok(out, TC_ACT_REDIRECT)
    assert parse6(out.data_out).src == NODE


def test_packet_too_big_for_the_route_is_answered(dp: Datapath, lab: Lab6) -> None:
    narrow = Backend(ID6_BASE + 5, "fd00:10:244:5::7", 8080)
    setup(dp, be=narrow)
    run_in(dp, lab, "kp_from_netdev", client_syn())
    big = client_syn(TCP_ACK, payload=b"x" * 1300)
    out = run_in(dp, lab, "kp_from_netdev", big)
    ok(out, TC_ACT_REDIRECT)
    got = parse6(out.data_out)
    assert (got.src, got.dst, got.icmp_type) == (NODE, CLIENT, ICMP6_PKT_TOOBIG)
    (mtu,) = struct.unpack("!I", got.l4[4:8])
    assert mtu == 1300
    assert got.l4[8:48] == big[ETH_HLEN : ETH_HLEN + 40]
    assert dp.stat(Stat.FRAG_NEEDED)[0] == 1


def test_local_backend_reply_to_outside_is_forwarded_by_bpf(dp: Datapath, lab: Lab6) -> None:
    setup(dp, be=BE_LOCAL)
    run_in(dp, lab, "kp_from_netdev", client_syn())
    reply = frame(BE_LOCAL.addr, CLIENT, tcp6(BE_LOCAL.addr, CLIENT, 8080, CPORT, TCP_SYN | TCP_ACK))
    out = run_in(dp, lab, "kp_from_pod", reply)
    ok(out, TC_ACT_REDIRECT)
    expected = frame(
        NODE,
        CLIENT,
        tcp6(NODE, CLIENT, NODEPORT, CPORT, TCP_SYN | TCP_ACK),
        hop_limit=63,
        macs=(GW_MAC, lab.mac),
    )
    assert out.data_out.hex() == expected.hex()


def test_pod_reply_to_the_node_address_of_a_flow_snated_to_it(dp: Datapath, lab: Lab6) -> None:
    """An EndpointSlice without nodeName names a pod of this node: the flow is SNATed to it, and its
    reply to the node's address leaves the pod's veth (kp_from_pod6 -> kp_snat_revnat6)."""
    me = Backend(ID6_BASE + 7, "fd00:10:244:2::8", 8080)
    setup(dp, be=me)
    port = parse6(run_in(dp, lab, "kp_from_netdev", client_syn()).data_out).sport
    reply = frame(me.addr, NODE, tcp6(me.addr, NODE, 8080, port, TCP_SYN | TCP_ACK))
    out = run_in(dp, lab, "kp_from_pod", reply)
    ok(out, TC_ACT_REDIRECT)
    got = parse6(out.data_out)
    assert (got.src, got.sport, got.dst, got.dport) == (NODE, NODEPORT, CLIENT, CPORT)


# ---- DSR ----
def dsr6(addr: str, port: int) -> tuple[int, bytes]:
    """DSR's destination options header for frontend addr:port (its next-header byte set by ipv6())."""
    body = (
        bytes([0, DSR6_HDR_LEN // 8 - 1, DSR6_OPT_TYPE, DSR6_OPT_LEN])
        + addr6(addr)
        + struct.pack("!HH", port, 0)
    )
    assert len(body) == DSR6_HDR_LEN
    return IPPROTO_DSTOPTS, body


def ip6ip6(outer_src: str, outer_dst: str, inner: bytes, macs: tuple[bytes, bytes]) -> bytes:
    return ether(ipv6(outer_src, outer_dst, 41, inner[ETH_HLEN:]), ETH_P_IPV6, dst=macs[0], src=macs[1])


def mss_of(frame6: bytes) -> int:
    opts = parse6(frame6).l4[20:]
    assert opts[0] == 2, opts.hex()
    return int(struct.unpack("!H", opts[2:4])[0])


def synack_from(be: Backend) -> bytes:
    return frame(be.addr, CLIENT, tcp6(be.addr, CLIENT, 8080, CPORT, TCP_SYN | TCP_ACK, options=SYN_OPTIONS))


def test_dsr_opt_ingress_and_backend_node(dp: Datapath, lab: Lab6) -> None:
    setup(dp, dsr=DsrMode.OPT)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    seg = tcp6(CLIENT, BE_REMOTE.addr, CPORT, 8080)
    sent = frame(
        CLIENT, BE_REMOTE.addr, seg, hop_limit=63, exts=[dsr6(NODE, NODEPORT)], macs=(NODE2_MAC, lab.mac)
    )
    assert out.data_out.hex() == sent.hex()
    fwd = dp.ct6(ct6_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.flags & CtFlag.DSR_OPT and not fwd.flags & CtFlag.SNAT
    assert dp.stat(Stat.DSR_OPT_TX)[0] == 1 and dp.stat(Stat.SNAT_NEW)[0] == 0
    # later packets: no option
    out = run_in(dp, lab, "kp_from_netdev", client_syn(TCP_ACK))
    ok(out, TC_ACT_REDIRECT)
    assert parse6(out.data_out).l4_off == 40 and dp.stat(Stat.DSR_FWD)[0] == 1

    # the backend's node (the same maps, configured as NODE2): strips the option, tracks the flow
    dp.reset()
    set_cfg(dp, node=NODE2, dsr=DsrMode.OPT)
    out = run_in(dp, lab, "kp_from_netdev", sent)
    ok(out, TC_ACT_OK)
    assert (
        out.data_out.hex()
        == frame(CLIENT, BE_REMOTE.addr, seg, hop_limit=63, macs=(NODE2_MAC, lab.mac)).hex()
    )
    rep = dp.ct6(ct6_key(BE_REMOTE.addr, CLIENT, 8080, CPORT, IPPROTO_TCP, CtDir.REPLY))
    assert rep is not None and rep.flags & CtFlag.DSR_OPT and rep.flags & CtFlag.EXTERNAL
    assert (bytes_to_ip6(rep.nat_addr), nbo_to_port(rep.nat_port)) == (NODE, NODEPORT)
    assert dp.stat(Stat.DSR_RX)[0] == 1
    # the backend's reply leaves with the frontend as its source, straight to the client, MSS untouched
    out = run_in(dp, lab, "kp_from_pod", synack_from(BE_REMOTE))
    ok(out, TC_ACT_REDIRECT)
    want = tcp6(NODE, CLIENT, NODEPORT, CPORT, TCP_SYN | TCP_ACK, options=SYN_OPTIONS)
    assert out.data_out.hex() == frame(NODE, CLIENT, want, hop_limit=63, macs=(GW_MAC, lab.mac)).hex()
    assert dp.stat(Stat.MSS_CLAMP)[0] == 0


def test_dsr_opt_udp_every_datagram(dp: Datapath, lab: Lab6) -> None:
    setup(dp, proto=IPPROTO_UDP, dsr=DsrMode.OPT)
    for _ in range(2):
        q = frame(CLIENT, NODE, udp6(CLIENT, NODE, CPORT, NODEPORT, b"q"), IPPROTO_UDP)
        out = run_in(dp, lab, "kp_from_netdev", q)
        ok(out, TC_ACT_REDIRECT)
        want = frame(
            CLIENT,
            BE_REMOTE.addr,
            udp6(CLIENT, BE_REMOTE.addr, CPORT, 8080, b"q"),
            IPPROTO_UDP,
            hop_limit=63,
            exts=[dsr6(NODE, NODEPORT)],
            macs=(NODE2_MAC, lab.mac),
        )
        assert out.data_out.hex() == want.hex()
    assert dp.stat(Stat.DSR_OPT_TX)[0] == 2
    # on the backend's node, every datagram's option is stripped; the second only touches the flow
    dp.reset()
    set_cfg(dp, node=NODE2, dsr=DsrMode.OPT)
    for _ in range(2):
        out = run_in(dp, lab, "kp_from_netdev", want)
        ok(out, TC_ACT_OK)
        assert parse6(out.data_out).l4_off == 40
    assert dp.stat(Stat.DSR_RX)[0] == 2 and len(dp.ct6_entries()) == 2


def test_dsr_ipip_ingress_and_backend_node(dp: Datapath, lab: Lab6) -> None:
    setup(dp, dsr=DsrMode.IPIP)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    seg = tcp6(CLIENT, BE_REMOTE.addr, CPORT, 8080)
    inner = frame(CLIENT, BE_REMOTE.addr, seg, hop_limit=63, exts=[dsr6(NODE, NODEPORT)])
    sent = ip6ip6(NODE, NODE2, inner, (NODE2_MAC, lab.mac))
    assert out.data_out.hex() == sent.hex()
    fwd = dp.ct6(ct6_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.flags & CtFlag.DSR_IPIP and bytes_to_ip6(fwd.snat_addr) == NODE2
    ack = client_syn(TCP_ACK)
    out = run_in(dp, lab, "kp_from_netdev", ack)
    ok(out, TC_ACT_REDIRECT)
    got = parse6(out.data_out)
    assert (got.proto, got.src, got.dst) == (41, NODE, NODE2) and len(out.data_out) == len(ack) + 40
    assert dp.stat(Stat.DSR_IPIP_TX)[0] == 2

    dp.reset()
    set_cfg(dp, node=NODE2, dsr=DsrMode.IPIP)
    out = run_in(dp, lab, "kp_from_netdev", sent)
    ok(out, TC_ACT_OK)
    assert (
        out.data_out.hex()
        == frame(CLIENT, BE_REMOTE.addr, seg, hop_limit=63, macs=(NODE2_MAC, lab.mac)).hex()
    )
    rep = dp.ct6(ct6_key(BE_REMOTE.addr, CLIENT, 8080, CPORT, IPPROTO_TCP, CtDir.REPLY))
    assert rep is not None and rep.flags & CtFlag.DSR_IPIP
    # SYN-ACK: the frontend as source, the MSS lowered so the client's segments fit the LAN in 6-in-6
    out = run_in(dp, lab, "kp_from_pod", synack_from(BE_REMOTE))
    ok(out, TC_ACT_REDIRECT)
    clamped = SYN_OPTIONS[:2] + struct.pack("!H", 1500 - 40 - 40 - 20) + SYN_OPTIONS[4:]
    want = tcp6(NODE, CLIENT, NODEPORT, CPORT, TCP_SYN | TCP_ACK, options=clamped)
    assert out.data_out.hex() == frame(NODE, CLIENT, want, hop_limit=63, macs=(GW_MAC, lab.mac)).hex()
    assert dp.stat(Stat.MSS_CLAMP)[0] == 1 and mss_of(out.data_out) == 1400
    # a later packet of the tunnel (no option inside) reaches the backend as it is
    out = run_in(
        dp,
        lab,
        "kp_from_netdev",
        ip6ip6(NODE, NODE2, frame(CLIENT, BE_REMOTE.addr, seg), (NODE2_MAC, lab.mac)),
    )
    ok(out, TC_ACT_OK)
    assert parse6(out.data_out).proto == IPPROTO_TCP and parse6(out.data_out).dst == BE_REMOTE.addr
    # a tunnel to another node's address is not ours
    other = ip6ip6(NODE, "fd00:a::77", inner, (NODE2_MAC, lab.mac))
    out = run_in(dp, lab, "kp_from_netdev", other)
    assert (out.retval, out.data_out) == (TC_ACT_OK, other)


def test_dsr_ipip_host_network_backend_synack_is_clamped(dp: Datapath, lab: Lab6) -> None:
    """A hostNetwork endpoint (its address is its node's) answers through kp_to_netdev6."""
    be = Backend(ID6_BASE + 3, NODE2, 8080)
    setup(dp, be=be, dsr=DsrMode.IPIP)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    dp.reset()
    set_cfg(dp, node=NODE2, dsr=DsrMode.IPIP)
    ok(run_in(dp, lab, "kp_from_netdev", out.data_out), TC_ACT_OK)
    out = run_in(dp, lab, "kp_to_netdev", synack_from(be))
    ok(out, TC_ACT_OK)
    got = parse6(out.data_out)
    assert (got.src, got.sport, got.dst, got.dport) == (NODE, NODEPORT, CLIENT, CPORT)
    assert mss_of(out.data_out) == 1400 and dp.stat(Stat.MSS_CLAMP)[0] == 1


@pytest.mark.parametrize(("mode", "extra"), [(DsrMode.OPT, 24), (DsrMode.IPIP, 64)], ids=["opt", "ipip"])
def test_dsr_too_big_for_the_lan_is_answered(dp: Datapath, lab: Lab6, mode: DsrMode, extra: int) -> None:
    """A datagram that fits the LAN but not with DSR's bytes: packet too big, the MTU less those bytes
    (IPv6 routers never fragment; the client's stack lowers its path MTU and sends again)."""
    setup(dp, proto=IPPROTO_UDP, dsr=mode)
    payload = b"x" * (1500 - 40 - 8 - 10)
    q = frame(CLIENT, NODE, udp6(CLIENT, NODE, CPORT, NODEPORT, payload), IPPROTO_UDP)
    out = run_in(dp, lab, "kp_from_netdev", q)
    ok(out, TC_ACT_REDIRECT)
    got = parse6(out.data_out)
    assert (got.src, got.dst, got.icmp_type) == (NODE, CLIENT, ICMP6_PKT_TOOBIG)
    assert struct.unpack("!I", got.l4[4:8])[0] == 1500 - extra
    assert dp.stat(Stat.FRAG_NEEDED)[0] == 1 and dp.stat(Stat.DSR_OPT_TX)[0] == 0
    # one that fits with them goes through
    small = frame(
        CLIENT, NODE, udp6(CLIENT, NODE, CPORT, NODEPORT, b"x" * (1500 - 40 - 8 - extra)), IPPROTO_UDP
    )
    out = run_in(dp, lab, "kp_from_netdev", small)
    ok(out, TC_ACT_REDIRECT)
    assert len(out.data_out) == ETH_HLEN + 1500


def test_dsr_backend_node_icmp_error_leaves_translated(dp: Datapath, lab: Lab6) -> None:
    """The backend node's own stack answers a DSR packet it cannot deliver with an ICMPv6 error quoting
    client -> backend; kp_to_netdev6 makes the quote client -> frontend, from the frontend's flow."""
    set_cfg(dp, node=NODE2, dsr=DsrMode.OPT)
    seg = udp6(CLIENT, BE_REMOTE.addr, CPORT, 8080, b"x" * 32)
    sent = frame(CLIENT, BE_REMOTE.addr, seg, IPPROTO_UDP, exts=[dsr6(NODE, NODEPORT)])
    ok(run_in(dp, lab, "kp_from_netdev", sent), TC_ACT_OK)
    delivered = frame(CLIENT, BE_REMOTE.addr, seg, IPPROTO_UDP)[ETH_HLEN:]
    err = frame(NODE2, CLIENT, icmp6(NODE2, CLIENT, ICMP6_PKT_TOOBIG, 0, 1280, delivered), IPPROTO_ICMPV6)
    out = run_in(dp, lab, "kp_to_netdev", err)
    ok(out, TC_ACT_OK)
    got = parse6(out.data_out)
    assert (got.src, got.dst, got.icmp_type) == (NODE2, CLIENT, ICMP6_PKT_TOOBIG)
    inner = got.l4[8:]
    assert inner[8:40] == addr6(CLIENT) + addr6(NODE)
    assert struct.unpack("!HH", inner[40:44]) == (CPORT, NODEPORT)


def test_dsr_flow_opened_with_extension_headers_is_snated(dp: Datapath, lab: Lab6) -> None:
    """DSR's header goes right after the fixed one; a flow whose first packet has extension headers
    (a hop-by-hop header must stay first) is SNATed instead, which needs no room."""
    setup(dp, dsr=DsrMode.OPT)
    for kind in (IPPROTO_HOPOPTS, IPPROTO_DSTOPTS):
        sport = CPORT + kind + 1
        syn = frame(CLIENT, NODE, tcp6(CLIENT, NODE, sport, NODEPORT), exts=[ext(kind)])
        out = run_in(dp, lab, "kp_from_netdev", syn)
        ok(out, TC_ACT_REDIRECT)
        assert parse6(out.data_out).src == NODE, kind
    assert dp.stat(Stat.SNAT_NEW)[0] == 2 and dp.stat(Stat.DSR_OPT_TX)[0] == 0


def test_dsr_option_is_not_taken_from_a_foreign_header(dp: Datapath, lab: Lab6) -> None:
    """A destination options header that is not DSR's (another type, or not first) is left alone."""
    set_cfg(dp, node=NODE2, dsr=DsrMode.OPT)
    seg = tcp6(CLIENT, BE_REMOTE.addr, CPORT, 8080)
    other_type = (IPPROTO_DSTOPTS, dsr6(NODE, NODEPORT)[1][:2] + b"\x1c" + dsr6(NODE, NODEPORT)[1][3:])
    for exts in ([other_type], [ext(IPPROTO_HOPOPTS), dsr6(NODE, NODEPORT)]):
        f = frame(CLIENT, BE_REMOTE.addr, seg, exts=exts)
        out = run_in(dp, lab, "kp_from_netdev", f)
        assert (out.retval, out.data_out) == (TC_ACT_OK, f)
    assert dp.stat(Stat.DSR_RX)[0] == 0 and not dp.ct6_entries()


@pytest.mark.parametrize("dsr", [DsrMode.OFF, DsrMode.OPT, DsrMode.IPIP])
def test_deleted_nodeport_keeps_its_established_connections(dp: Datapath, lab: Lab6, dsr: DsrMode) -> None:
    """As IPv4's: a NodePort deleted while a connection lives keeps translating it from its flow entry
    while the agent announces a recent deletion (kp_config.orphan_until_ns); a new SYN is not served."""
    setup(dp, dsr=dsr)
    first = parse6(run_in(dp, lab, "kp_from_netdev", client_syn()).data_out)
    for slot in (1, 0):
        dp.svc6.delete(dp.svc6_key(NODE, NODEPORT, IPPROTO_TCP, Scope.EXT, slot))
    dp.be6.delete(ctypes.c_uint32(BE_REMOTE.id))
    ack = client_syn(TCP_ACK)
    out = run_in(dp, lab, "kp_from_netdev", ack)
    assert (out.retval, out.data_out) == (TC_ACT_OK, ack)  # no deletion announced: not looked up
    set_cfg(dp, dsr=dsr, orphan_until_ns=time.monotonic_ns() + 60 * 10**9)
    out = run_in(dp, lab, "kp_from_netdev", ack)
    ok(out, TC_ACT_REDIRECT)
    later = parse6(out.data_out)
    assert (later.src, later.sport, later.proto, later.dst) == (
        first.src,
        first.sport,
        first.proto,
        first.dst,
    )
    assert dp.stat(Stat.CT_ORPHAN)[0] == 1
    new = client_syn(sport=CPORT + 1)
    out = run_in(dp, lab, "kp_from_netdev", new)
    assert (out.retval, out.data_out) == (TC_ACT_OK, new)
    assert dp.ct6(ct6_key(CLIENT, NODE, CPORT + 1, NODEPORT, IPPROTO_TCP, CtDir.FWD)) is None


@pytest.mark.parametrize("mode", [DsrMode.OPT, DsrMode.IPIP], ids=["opt", "ipip"])
def test_dsr_keeps_a_checksum_complete_skb_valid(dp: Datapath, lab: Lab6, mode: DsrMode) -> None:
    """A NIC hands the stack CHECKSUM_COMPLETE skbs: adding and removing DSR's header rewrites the
    payload length and next header, which no IPv6 header checksum carries, so skb->csum must follow
    (else the kernel reports a hardware checksum failure on local delivery; PROG_TEST_RUN checks it)."""
    setup(dp, proto=IPPROTO_UDP, dsr=mode)
    q = frame(CLIENT, NODE, udp6(CLIENT, NODE, CPORT, NODEPORT, b"query"), IPPROTO_UDP)
    out = lab.run(dp, "kp_from_netdev", q, flags=BPF_F_TEST_SKB_CHECKSUM_COMPLETE)
    ok(out, TC_ACT_REDIRECT)
    sent = out.data_out
    dp.reset()
    set_cfg(dp, node=NODE2, dsr=mode)
    out = lab.run(dp, "kp_from_netdev", sent, flags=BPF_F_TEST_SKB_CHECKSUM_COMPLETE)
    ok(out, TC_ACT_OK)
    got = parse6(out.data_out)
    assert (got.src, got.dst, got.l4_off, got.l4[8:]) == (CLIENT, BE_REMOTE.addr, 40, b"query")
    assert dp.stat(Stat.DSR_RX)[0] == 1


def test_tunnels_to_the_node_that_are_not_dsr_are_left_alone(dp: Datapath, lab: Lab6) -> None:
    """Only DSR's own IPv6-in-IPv6 is decapsulated (its inner packet carries DSR's header, or belongs to
    a flow received through the tunnel). Another tunnel to the node's address (its own ip6tnl, another
    load balancer's, a forged one with any inner source) reaches the kernel as it came."""
    set_cfg(dp, node=NODE2, dsr=DsrMode.IPIP)
    mac = (NODE2_MAC, lab.mac)
    inner = [
        frame(CLIENT, BE_REMOTE.addr, icmp6(CLIENT, BE_REMOTE.addr, 128, 0, 0, b"ping"), IPPROTO_ICMPV6),
        frame(CLIENT, BE_REMOTE.addr, udp6(CLIENT, BE_REMOTE.addr, CPORT, 8080)),
        frame(CLIENT, BE_REMOTE.addr, tcp6(CLIENT, BE_REMOTE.addr, CPORT, 8080, TCP_ACK)),
        # a destination options header that is not DSR's
        frame(CLIENT, BE_REMOTE.addr, tcp6(CLIENT, BE_REMOTE.addr, CPORT, 8080), exts=[ext(IPPROTO_DSTOPTS)]),
    ]
    for f in inner:
        for src in (NODE, "2001:db8:66::1"):
            tunneled = ip6ip6(src, NODE2, f, mac)
            out = run_in(dp, lab, "kp_from_netdev", tunneled)
            assert (out.retval, out.data_out) == (TC_ACT_OK, tunneled)
    assert dp.stat(Stat.DSR_RX)[0] == 0 and not dp.ct6_entries()


def test_lan_too_narrow_for_dsr_and_ipv6s_minimum_mtu_is_snated(dp: Datapath, lab: Lab6) -> None:
    """Packet too big below 1280 bytes makes no client lower its path MTU: with a LAN MTU that cannot
    carry 1280 bytes and DSR's, new IPv6 flows are SNATed (IPIP needs 1344, the option 1304)."""
    setup(dp, dsr=DsrMode.IPIP)
    set_cfg(dp, dsr=DsrMode.IPIP, lan_mtu=1343)
    assert parse6(run_in(dp, lab, "kp_from_netdev", client_syn()).data_out).src == NODE
    set_cfg(dp, dsr=DsrMode.IPIP, lan_mtu=1344)
    out = run_in(dp, lab, "kp_from_netdev", client_syn(sport=CPORT + 1))
    assert parse6(out.data_out).proto == 41
    set_cfg(dp, dsr=DsrMode.OPT, lan_mtu=1303)
    assert parse6(run_in(dp, lab, "kp_from_netdev", client_syn(sport=CPORT + 2)).data_out).src == NODE
    set_cfg(dp, dsr=DsrMode.OPT, lan_mtu=1304)
    out = run_in(dp, lab, "kp_from_netdev", client_syn(sport=CPORT + 3))
    assert parse6(out.data_out).src == CLIENT and dp.stat(Stat.DSR_OPT_TX)[0] == 1
