"""PROG_TEST_RUN tables for IPv6 traffic from outside (issue 15): SNAT of flows to backends on other
nodes (the port allocator shared with IPv4, lib/snat_fam.h), their replies and ICMPv6 errors,
packet too big for the route, and replies of local backends forwarded by BPF.

As tests/bpf/test_bpf_external.py: paths that BPF forwards itself call bpf_fib_lookup, so those runs
happen inside a private namespace (kpt6-<hex>) with a veth "node" interface, fixed routes and
permanent neighbours, so verdicts and MACs are exact.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator

import pytest
from datapath import TC_ACT_OK, TC_ACT_REDIRECT, Backend, Datapath, ct6_key, in6
from fiblab import FibLab
from frames import ETH_HLEN, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_SYN, ether
from frames6 import (
    ICMP6_DEST_UNREACH,
    ICMP6_PKT_TOOBIG,
    IPPROTO_ICMPV6,
    checksum_errors6,
    icmp6,
    ipv6,
    parse6,
    tcp6,
    udp6,
)

from kproxy.abi import (
    ID6_BASE,
    BackendFlag,
    Be6Val,
    Config,
    CtDir,
    CtFlag,
    CtState,
    Snat6Key,
    Snat6Val,
    Stat,
    SvcFlag,
    bytes_to_ip6,
    nbo_to_port,
    port_to_nbo,
)
from kproxy.bpf.libbpf import TestRun

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


def run_in(dp: Datapath, lab: Lab6, prog: str, frame: bytes) -> TestRun:
    """Run `prog` as if the frame arrived on kpe0."""
    return lab.run(dp, prog, frame)


def setup(
    dp: Datapath, be: Backend = BE_REMOTE, proto: int = IPPROTO_TCP, flags: int = SvcFlag.NODEPORT
) -> None:
    dp.cfg.update(ctypes.c_uint32(0), Config())  # the SNAT port range comes from the IPv4 config
    dp.set_node6(NODE)
    dp.add_service6(NODE, NODEPORT, proto, [be], flags=flags)
    v = Be6Val(in6(be.addr), port_to_nbo(be.port), proto, be.flags, in6(NODE2))
    dp.be6.update(ctypes.c_uint32(be.id), v)


def frame(
    src: str,
    dst: str,
    l4: bytes,
    proto: int = IPPROTO_TCP,
    *,
    hop_limit: int = 64,
    macs: tuple[bytes, bytes] | None = None,
) -> bytes:
    dst_mac, src_mac = macs or (IN_MAC_DST, IN_MAC_SRC)
    return ether(ipv6(src, dst, proto, l4, hop_limit=hop_limit), ETH_P_IPV6, dst=dst_mac, src=src_mac)


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
