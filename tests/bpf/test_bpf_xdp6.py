"""PROG_TEST_RUN tables for kp_xdp's IPv6 half (lib/xdp.h kp_xdp6, kp_xdp_new6), as test_bpf_xdp.py's
for IPv4: a flow's first packet opens it through kp_xdp as through kp_from_netdev; a flow set up through
kp_from_netdev, its later packets through kp_xdp and through kp_from_netdev give the same bytes
(addresses, ports, checksums, hop limit, DSR's destination options header, the IPv6-in-IPv6 header,
MACs), and what kp_xdp leaves alone comes out unchanged with XDP_PASS. Runs happen in
test_bpf_external6.py's FIB namespace."""

# ruff: noqa: F811  (`lab` is the imported fixture, taken as a parameter by name)
from __future__ import annotations

import ctypes
import json
import time
from collections.abc import Iterator
from functools import partial

import pytest
import test_bpf_xdp as xdp4
from datapath import TC_ACT_REDIRECT, Backend, Datapath, ct6_key, in6
from frames import IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN
from frames6 import IPPROTO_DSTOPTS, ext, tcp6, udp6
from test_bpf_external6 import (
    BE_LOCAL,
    BE_REMOTE,
    CLIENT,
    CPORT,
    NODE,
    NODEPORT,
    Lab6,
    client_syn,
    frame,
    lab,  # noqa: F401  (the fixture: test_bpf_external6's FIB namespace, the tests' `lab` parameter)
    setup,
)

from kproxy.abi import ID6_BASE, Be6Val, CtDir, CtState, DsrMode, Stat, XdevVal, port_to_nbo
from kproxy.bpf.libbpf import TestRun

pytestmark = pytest.mark.root

IPV6_ONLY = True  # conftest.ipv6_counts_in_kp_stats6: nothing of these counts in kp_stats_v1
XDP_PASS, XDP_TX, XDP_REDIRECT = 2, 3, 4


def tc(dp: Datapath, lab: Lab6, f: bytes) -> TestRun:
    return lab.run(dp, "kp_from_netdev", f)


def udp_frame(payload: bytes = b"q", sport: int = CPORT) -> bytes:
    return frame(CLIENT, NODE, udp6(CLIENT, NODE, sport, NODEPORT, payload), IPPROTO_UDP)


# test_bpf_xdp.py's checks, in the IPv6 counters
same_as_tc = partial(xdp4.same_as_tc, family=6)
untouched = partial(xdp4.untouched, family=6)
opened_as_tc = partial(xdp4.opened_as_tc, family=6)


DSR = [DsrMode.OFF, DsrMode.OPT, DsrMode.IPIP]


@pytest.mark.parametrize("dsr", DSR, ids=["snat", "dsr-opt", "dsr-ip6ip6"])
def test_tcp_segments_of_a_tracked_flow(dp: Datapath, lab: Lab6, dsr: DsrMode) -> None:
    setup(dp, dsr=dsr)
    assert tc(dp, lab, client_syn()).retval == TC_ACT_REDIRECT
    stat = {DsrMode.OFF: Stat.SNAT, DsrMode.OPT: Stat.DSR_FWD, DsrMode.IPIP: Stat.DSR_IPIP_TX}[dsr]
    same_as_tc(dp, lab, client_syn(TCP_ACK | TCP_PSH, payload=b"GET / HTTP/1.1\r\n"), stat)
    assert dp.stat(Stat.FROM_XDP, family=6)[0] == 1


@pytest.mark.parametrize("dsr", DSR, ids=["snat", "dsr-opt", "dsr-ip6ip6"])
def test_udp_datagrams_of_a_tracked_flow(dp: Datapath, lab: Lab6, dsr: DsrMode) -> None:
    setup(dp, proto=IPPROTO_UDP, dsr=dsr)
    tc(dp, lab, udp_frame())
    stat = {DsrMode.OFF: Stat.SNAT, DsrMode.OPT: Stat.DSR_OPT_TX, DsrMode.IPIP: Stat.DSR_IPIP_TX}[dsr]
    same_as_tc(dp, lab, udp_frame(b"a longer datagram, " * 20), stat)
    same_as_tc(dp, lab, udp_frame(b""), stat)


@pytest.mark.parametrize("dsr", DSR, ids=["snat", "dsr-opt", "dsr-ip6ip6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_first_packet_opens_the_flow_as_tc_would(dp: Datapath, lab: Lab6, dsr: DsrMode, proto: str) -> None:
    p = IPPROTO_TCP if proto == "tcp" else IPPROTO_UDP
    stat = {DsrMode.OFF: Stat.SNAT, DsrMode.OPT: Stat.DSR_OPT_TX, DsrMode.IPIP: Stat.DSR_IPIP_TX}[dsr]
    f = client_syn() if proto == "tcp" else udp_frame()
    opened_as_tc(dp, lab, lambda: setup(dp, proto=p, dsr=dsr), f, stat)


def test_first_packet_to_a_local_backend(dp: Datapath, lab: Lab6) -> None:
    opened_as_tc(dp, lab, lambda: setup(dp, be=BE_LOCAL), client_syn(), Stat.DNAT, XDP_PASS)


def test_local_backend_is_dnated_and_handed_to_the_stack(dp: Datapath, lab: Lab6) -> None:
    setup(dp, be=BE_LOCAL, proto=IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    same_as_tc(dp, lab, udp_frame(b"second"), Stat.DNAT, XDP_PASS)


def test_snat_replies_go_back_to_the_client(dp: Datapath, lab: Lab6) -> None:
    setup(dp)
    out = tc(dp, lab, client_syn())
    port = int.from_bytes(out.data_out[14 + 40 : 14 + 42], "big")
    synack = frame(
        BE_REMOTE.addr, NODE, tcp6(BE_REMOTE.addr, NODE, 8080, port, TCP_SYN | TCP_ACK), hop_limit=63
    )
    untouched(dp, lab, synack)
    tc(dp, lab, synack)
    data = frame(
        BE_REMOTE.addr, NODE, tcp6(BE_REMOTE.addr, NODE, 8080, port, TCP_ACK, payload=b"200 OK"), hop_limit=63
    )
    same_as_tc(dp, lab, data, Stat.SNAT_REVNAT)


def test_refresh_and_flow_changes(dp: Datapath, lab: Lab6) -> None:
    setup(dp, proto=IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    key = ct6_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_UDP, CtDir.FWD)
    v = dp.ct6(key)
    assert v is not None and v.state == CtState.UDP
    v.expires_ns = time.monotonic_ns() + 10**9
    dp.put_ct6(key, v)
    assert lab.run_xdp(dp, udp_frame(b"x")).retval == XDP_TX
    after = dp.ct6(key)
    assert after is not None and after.expires_ns > time.monotonic_ns() + 50 * 10**9
    # TCP: FIN and SYN are kp_from_netdev's
    setup(dp)
    tc(dp, lab, client_syn())
    untouched(dp, lab, client_syn(TCP_FIN | TCP_ACK))
    untouched(dp, lab, client_syn(TCP_SYN))


def test_extension_headers_and_hop_limit_are_left_to_tc(dp: Datapath, lab: Lab6) -> None:
    setup(dp, proto=IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    seg = udp6(CLIENT, NODE, CPORT, NODEPORT, b"q")
    untouched(dp, lab, frame(CLIENT, NODE, seg, IPPROTO_UDP, exts=[ext(IPPROTO_DSTOPTS)]))
    untouched(dp, lab, frame(CLIENT, NODE, seg, IPPROTO_UDP, hop_limit=1))
    f = bytearray(udp_frame(b"payload"))
    untouched(dp, lab, bytes(f[:-3]))  # truncated: the payload length says more


def test_zero_udp_checksum_is_left_to_tc(dp: Datapath, lab: Lab6) -> None:
    """A tunnel's zero-checksum IPv6 datagram (udp6zerocsumtx): kp_from_netdev6 keeps it zero; kp_xdp
    would have to compute one to rewrite it, so it leaves it alone."""
    setup(dp, proto=IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    f = bytearray(udp_frame(b"zero"))
    f[14 + 40 + 6 : 14 + 40 + 8] = b"\0\0"
    untouched(dp, lab, bytes(f))
    assert tc(dp, lab, bytes(f)).data_out[14 + 40 + 6 : 14 + 40 + 8] == b"\0\0"


@pytest.mark.parametrize("dsr", DSR, ids=["snat", "dsr-opt", "dsr-ip6ip6"])
def test_traffic_class_and_flow_label_are_kept(dp: Datapath, lab: Lab6, dsr: DsrMode) -> None:
    """The header's first word (traffic class, flow label) as kp_from_netdev6 keeps it, in the outer
    header of the tunnel too."""
    setup(dp, proto=IPPROTO_UDP, dsr=dsr)
    tc(dp, lab, udp_frame())
    f = bytearray(udp_frame(b"labelled"))
    f[14:18] = ((6 << 28) | (0x2E << 20) | 0xBEEF5).to_bytes(4, "big")
    stat = {DsrMode.OFF: Stat.SNAT, DsrMode.OPT: Stat.DSR_OPT_TX, DsrMode.IPIP: Stat.DSR_IPIP_TX}[dsr]
    same_as_tc(dp, lab, bytes(f), stat)


def test_only_what_tc_would_follow_is_followed(dp: Datapath, lab: Lab6) -> None:
    setup(dp, proto=IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    same_as_tc(dp, lab, udp_frame(), Stat.SNAT)
    be = dp.be6.lookup(ctypes.c_uint32(BE_REMOTE.id))
    dp.be6.delete(ctypes.c_uint32(BE_REMOTE.id))
    untouched(dp, lab, udp_frame())
    dp.be6.update(ctypes.c_uint32(BE_REMOTE.id), be)
    # a backend's reply to a flow that saw none yet: kp_from_netdev6 marks it SEEN_REPLY
    setup(dp)
    out = tc(dp, lab, client_syn())
    port = int.from_bytes(out.data_out[14 + 40 : 14 + 42], "big")
    untouched(
        dp, lab, frame(BE_REMOTE.addr, NODE, tcp6(BE_REMOTE.addr, NODE, 8080, port, TCP_ACK), hop_limit=63)
    )


NODE3, NODE3_MAC = "fd00:b::30", bytes.fromhex("020000000030")  # a node behind this one's second netdev
FAR = Backend(ID6_BASE + 9, "fd00:10:244:9::9", 8080)  # a pod of NODE3


class XLab6(Lab6):
    """Lab6 plus a second netdev kpx0 (fd00:b::10/64) with NODE3 behind it and NODE3's pods routed there."""

    prefix = "kpx6"

    def setup(self) -> None:
        super().setup()
        self.ip("link", "add", "kpx0", "type", "veth", "peer", "name", "kpx1")
        self.ip("link", "set", "kpx0", "up")
        self.ip("link", "set", "kpx1", "up")
        self.ip("-6", "addr", "add", "fd00:b::10/64", "dev", "kpx0", "nodad")
        self.ip(
            "-6", "neigh", "replace", NODE3, "lladdr", NODE3_MAC.hex(":"), "dev", "kpx0", "nud", "permanent"
        )
        self.ip("-6", "route", "add", "fd00:10:244:9::/64", "via", NODE3, "dev", "kpx0")
        self.kpx0 = int(json.loads(self.ip("-j", "link", "show", "kpx0"))[0]["ifindex"])


@pytest.fixture(scope="module")
def xlab6() -> Iterator[XLab6]:
    lab = XLab6()
    try:
        yield lab
    finally:
        lab.delete()


@pytest.mark.parametrize("dsr", DSR, ids=["snat", "dsr-opt", "dsr-ip6ip6"])
def test_redirect_to_another_accelerated_netdev(dp: Datapath, xlab6: XLab6, dsr: DsrMode) -> None:
    """As test_bpf_xdp.py's: the route leaves by kpx0, both netdevs are in kp_xdevs_v1: XDP_REDIRECT with
    the bytes TC sends, first packet and later ones, counted in the IPv6 counters."""
    stat = {DsrMode.OFF: Stat.SNAT, DsrMode.OPT: Stat.DSR_OPT_TX, DsrMode.IPIP: Stat.DSR_IPIP_TX}[dsr]

    def set_up() -> None:
        setup(dp, be=FAR, proto=IPPROTO_UDP, dsr=dsr)
        dp.be6.update(
            ctypes.c_uint32(FAR.id), Be6Val(in6(FAR.addr), port_to_nbo(FAR.port), IPPROTO_UDP, 0, in6(NODE3))
        )
        for ifindex in (xlab6.ifindex, xlab6.kpx0):
            dp.xdevs.update(ctypes.c_uint32(ifindex), XdevVal(0))

    x = opened_as_tc(dp, xlab6, set_up, udp_frame(), stat, XDP_REDIRECT)
    assert x.data_out[:6] == NODE3_MAC
    same_as_tc(dp, xlab6, udp_frame(b"later"), stat, XDP_REDIRECT)
    assert dp.stat(Stat.XDP_REDIRECT, family=6)[0] == 2
