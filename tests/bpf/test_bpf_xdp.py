"""PROG_TEST_RUN tables for kp_xdp, the XDP acceleration of traffic from outside (lib/xdp.h).

kp_xdp must do exactly what kp_from_netdev does with a packet, or leave the packet untouched to it
(XDP_PASS). For a tracked flow's packets each case sets the flow up through kp_from_netdev (its first
packet), then runs the same later packet through kp_xdp and through kp_from_netdev: the frames that
leave must be equal, byte for byte (addresses, ports, checksums, TTL, DSR option, IPIP header, MACs).
A flow's first packet (kp_xdp_new) goes through kp_xdp on one fresh datapath and through
kp_from_netdev on another: the same bytes leave and the same entries are written. What kp_xdp leaves
alone comes out unchanged, with XDP_PASS. Runs happen in the FIB namespace of test_bpf_external.py:
kpe0 is the netdev, the route to NODE2 leaves through it (XDP_TX).
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from datapath import TC_ACT_OK, TC_ACT_REDIRECT, Backend, Datapath, ct_key
from fiblab import FibLab
from frames import IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, checksum_errors, udp
from frames6 import checksum_errors6
from test_bpf_external import (
    BE_LOCAL,
    BE_REMOTE,
    CLIENT,
    CPORT,
    NODE,
    NODEPORT,
    Lab,
    add_be,
    client_syn,
    frame,
    nodeport,
    set_cfg,
    syn_seg,
)

from kproxy.abi import (
    IPPROTO_TCP,
    LBSRC4_SVC_BITS,
    Aff4Val,
    ConfigFlag,
    Ct4Val,
    Ct6Val,
    CtDir,
    CtFlag,
    CtState,
    DsrMode,
    LbSrc4Key,
    LbSrc4Val,
    Scope,
    Snat4Val,
    Snat6Val,
    Stat,
    Svc4Val,
    SvcFlag,
    XdevVal,
    ip_to_nbo,
    port_to_nbo,
)
from kproxy.bpf.libbpf import TestRun

pytestmark = pytest.mark.root

XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4


NODE3 = "192.168.2.30"  # a node behind another interface of this one (kpx0)
NODE3_MAC = bytes.fromhex("020000000030")


class XLab(Lab):
    """test_bpf_external's namespace, plus a second interface kpx0 (192.168.2.10/24) with NODE3 behind it,
    and NODE3's pods (10.244.9.0/24) routed there."""

    def setup(self) -> None:
        super().setup()
        self.ip("link", "add", "kpx0", "type", "veth", "peer", "name", "kpx1")
        self.ip("link", "set", "kpx0", "up")
        self.ip("link", "set", "kpx1", "up")
        self.ip("addr", "add", "192.168.2.10/24", "dev", "kpx0")
        self.ip("neigh", "replace", NODE3, "lladdr", NODE3_MAC.hex(":"), "dev", "kpx0", "nud", "permanent")
        self.ip("route", "add", "10.244.9.0/24", "via", NODE3, "dev", "kpx0")  # pods of NODE3
        self.kpx0 = int(json.loads(self.ip("-j", "link", "show", "kpx0"))[0]["ifindex"])


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    lab = XLab()
    try:
        yield lab
    finally:
        lab.delete()


def tc(dp: Datapath, lab: Lab, f: bytes) -> TestRun:
    return lab.run(dp, "kp_from_netdev", f)


def xdp(dp: Datapath, lab: Lab, f: bytes) -> TestRun:
    return lab.run_xdp(dp, f)


def udp_frame(payload: bytes = b"q", sport: int = CPORT) -> bytes:
    return frame(CLIENT, NODE, udp(CLIENT, NODE, sport, NODEPORT, payload), IPPROTO_UDP)


def same_as_tc(
    dp: Datapath, lab: FibLab, f: bytes, stat: Stat, xdp_verdict: int = XDP_TX, family: int | None = None
) -> TestRun:
    """kp_xdp sends F as kp_from_netdev does (same bytes), counted under STAT and XDP_FWD / XDP_LOCAL (in
    FAMILY's counters; test_bpf_xdp6.py passes 6)."""
    before = dp.stat(stat, family)[0], dp.stat(Stat.XDP_FWD, family)[0], dp.stat(Stat.XDP_LOCAL, family)[0]
    x = lab.run_xdp(dp, f)
    assert x.retval == xdp_verdict, x.retval
    assert dp.stat(stat, family)[0] == before[0] + 1
    if xdp_verdict == XDP_PASS:
        assert dp.stat(Stat.XDP_LOCAL, family)[0] == before[2] + 1
    else:
        assert dp.stat(Stat.XDP_FWD, family)[0] == before[1] + 1
    t = lab.run(dp, "kp_from_netdev", f)
    assert t.retval == (TC_ACT_OK if xdp_verdict == XDP_PASS else TC_ACT_REDIRECT)
    assert x.data_out.hex() == t.data_out.hex()
    assert (checksum_errors6 if family == 6 else checksum_errors)(x.data_out) == []
    return x


def untouched(dp: Datapath, lab: FibLab, f: bytes, family: int | None = None) -> None:
    before = dp.stat(Stat.XDP_FWD, family)[0] + dp.stat(Stat.XDP_LOCAL, family)[0]
    x = lab.run_xdp(dp, f)
    assert (x.retval, x.data_out.hex()) == (XDP_PASS, f.hex())
    assert dp.stat(Stat.XDP_FWD, family)[0] + dp.stat(Stat.XDP_LOCAL, family)[0] == before


# ---- forwarded from XDP, as kp_from_netdev forwards them ----
@pytest.mark.parametrize("dsr", [DsrMode.OFF, DsrMode.OPT, DsrMode.IPIP], ids=["snat", "dsr-opt", "dsr-ipip"])
def test_tcp_segments_of_a_tracked_flow(dp: Datapath, lab: Lab, dsr: DsrMode) -> None:
    set_cfg(dp, dsr=dsr)
    nodeport(dp, BE_REMOTE)
    assert tc(dp, lab, client_syn()).retval == TC_ACT_REDIRECT
    stat = {DsrMode.OFF: Stat.SNAT, DsrMode.OPT: Stat.DSR_FWD, DsrMode.IPIP: Stat.DSR_IPIP_TX}[dsr]
    seg = frame(
        CLIENT, NODE, syn_seg(CLIENT, NODE, CPORT, NODEPORT, TCP_ACK | TCP_PSH, b"GET / HTTP/1.1\r\n")
    )
    same_as_tc(dp, lab, seg, stat)
    assert dp.stat(Stat.FROM_XDP)[0] == 1


@pytest.mark.parametrize("dsr", [DsrMode.OFF, DsrMode.OPT, DsrMode.IPIP], ids=["snat", "dsr-opt", "dsr-ipip"])
def test_udp_datagrams_of_a_tracked_flow(dp: Datapath, lab: Lab, dsr: DsrMode) -> None:
    """UDP carries DSR's option on every datagram: kp_xdp inserts it (and the IPIP header) too."""
    set_cfg(dp, dsr=dsr)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    stat = {DsrMode.OFF: Stat.SNAT, DsrMode.OPT: Stat.DSR_OPT_TX, DsrMode.IPIP: Stat.DSR_IPIP_TX}[dsr]
    same_as_tc(dp, lab, udp_frame(b"a longer datagram, " * 20), stat)
    same_as_tc(dp, lab, udp_frame(b""), stat)


def test_udp_without_checksum(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    f = frame(CLIENT, NODE, udp(CLIENT, NODE, CPORT, NODEPORT, b"no sum", checksum=False), IPPROTO_UDP)
    tc(dp, lab, f)
    x = same_as_tc(dp, lab, f, Stat.SNAT)
    assert x.data_out[14 + 20 + 6 : 14 + 20 + 8] == b"\0\0"  # still none


def test_local_backend_is_dnated_and_handed_to_the_stack(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_LOCAL, IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    x = same_as_tc(dp, lab, udp_frame(b"second"), Stat.DNAT, XDP_PASS)
    # what kp_from_netdev then sees: no frontend any more, passed unchanged
    t = tc(dp, lab, x.data_out)
    assert (t.retval, t.data_out.hex()) == (TC_ACT_OK, x.data_out.hex())


def test_snat_replies_go_back_to_the_client(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    out = tc(dp, lab, client_syn())
    port = int.from_bytes(out.data_out[34:36], "big")
    synack = frame(BE_REMOTE.addr, NODE, syn_seg(BE_REMOTE.addr, NODE, 8080, port, TCP_SYN | TCP_ACK), ttl=63)
    untouched(dp, lab, synack)  # makes the flow ESTABLISHED: kp_from_netdev's
    tc(dp, lab, synack)
    data = frame(BE_REMOTE.addr, NODE, syn_seg(BE_REMOTE.addr, NODE, 8080, port, TCP_ACK, b"200 OK"), ttl=63)
    same_as_tc(dp, lab, data, Stat.SNAT_REVNAT)


def test_udp_reply_after_the_first_one(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    out = tc(dp, lab, udp_frame())
    port = int.from_bytes(out.data_out[34:36], "big")
    answer = frame(
        BE_REMOTE.addr, NODE, udp(BE_REMOTE.addr, NODE, 8080, port, b"answer"), IPPROTO_UDP, ttl=63
    )
    untouched(dp, lab, answer)  # the first reply marks the flow SEEN_REPLY: kp_from_netdev's
    tc(dp, lab, answer)
    same_as_tc(dp, lab, answer, Stat.SNAT_REVNAT)


# ---- a flow's first packet (kp_xdp_new) ----
def flow_state(dp: Datapath, family: int | None = None) -> dict[str, dict[bytes, bytes]]:
    """Conntrack, SNAT and affinity entries, their times zeroed: what opening a flow wrote."""
    v6 = family == 6
    ct_type, snat_type = (Ct6Val, Snat6Val) if v6 else (Ct4Val, Snat4Val)
    state: dict[str, dict[bytes, bytes]] = {"ct": {}, "snat": {}, "aff": {}}
    for k in (dp.ct6_map if v6 else dp.ct4).iter_keys():
        v = ct_type.from_buffer_copy((dp.ct6_map if v6 else dp.ct4).lookup(k) or b"")
        v.expires_ns = 0
        state["ct"][bytes(k)] = bytes(v)
    snat = dp.snat6 if v6 else dp.snat4
    for k in snat.iter_keys():
        sv = snat_type.from_buffer_copy(snat.lookup(k) or b"")
        sv.expires_ns = 0
        state["snat"][bytes(k)] = bytes(sv)
    aff = dp.aff6_map if v6 else dp.aff4
    for k in aff.iter_keys():
        av = Aff4Val.from_buffer_copy(aff.lookup(k) or b"")
        av.last_used_ns = 0
        state["aff"][bytes(k)] = bytes(av)
    return state


def opened_as_tc(
    dp: Datapath,
    lab: FibLab,
    setup: Callable[[], None],
    f: bytes,
    stat: Stat,
    xdp_verdict: int = XDP_TX,
    family: int | None = None,
) -> TestRun:
    """F, a flow's first packet, opens it through kp_xdp as through kp_from_netdev, each on a datapath
    SETUP made: the same bytes leave, the same entries are written (times aside), counted as a new flow
    (CT_NEW, XDP_NEW), under STAT and XDP_FWD / XDP_LOCAL. Then kp_from_netdev follows XDP's entry: the
    same packet again (a retransmitted SYN, the next datagram) leaves as XDP sent it, with no new flow."""
    setup()
    t = lab.run(dp, "kp_from_netdev", f)
    assert t.retval == (TC_ACT_OK if xdp_verdict == XDP_PASS else TC_ACT_REDIRECT), t.retval
    want = flow_state(dp, family)
    dp.reset()
    setup()
    x = lab.run_xdp(dp, f)
    assert x.retval == xdp_verdict, x.retval
    assert x.data_out.hex() == t.data_out.hex()
    assert (checksum_errors6 if family == 6 else checksum_errors)(x.data_out) == []
    assert flow_state(dp, family) == want
    done = Stat.XDP_LOCAL if xdp_verdict == XDP_PASS else Stat.XDP_FWD
    for s in (Stat.CT_NEW, Stat.XDP_NEW, stat, done):
        assert dp.stat(s, family)[0] == 1, s.name
    again = lab.run(dp, "kp_from_netdev", f)
    assert again.data_out.hex() == x.data_out.hex()
    assert dp.stat(Stat.CT_NEW, family)[0] == 1
    return x


MODES = [DsrMode.OFF, DsrMode.OPT, DsrMode.IPIP]
MODE_IDS = ["snat", "dsr-opt", "dsr-ipip"]


@pytest.mark.parametrize("dsr", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_first_packet_opens_the_flow_as_tc_would(dp: Datapath, lab: Lab, dsr: DsrMode, proto: str) -> None:
    """A SYN or a flow's first datagram: backend, SNAT port (by the same TIME_WAIT rules: the SYN's
    timestamp read from the frame), DSR option or IPIP header, conntrack entries, all as
    kp_from_netdev would make them."""
    p = IPPROTO_TCP if proto == "tcp" else IPPROTO_UDP

    def setup() -> None:
        set_cfg(dp, dsr=dsr)
        nodeport(dp, BE_REMOTE, p)

    stat = {DsrMode.OFF: Stat.SNAT, DsrMode.OPT: Stat.DSR_OPT_TX, DsrMode.IPIP: Stat.DSR_IPIP_TX}[dsr]
    opened_as_tc(dp, lab, setup, client_syn() if proto == "tcp" else udp_frame(), stat)


@pytest.mark.parametrize("flags", [TCP_SYN | TCP_FIN, TCP_SYN | TCP_RST, TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN])
def test_only_a_syn_opens_a_tcp_flow(dp: Datapath, lab: Lab, flags: int) -> None:
    """Another segment with no flow (a SYN with FIN or RST, a SYN-ACK, a stray ACK or FIN) opens none in
    XDP: kp_from_netdev decides (an orphan's ACK, a reset, a drop). kp_xdp_new checks it too."""
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    untouched(dp, lab, client_syn(flags))
    x = lab.run_xdp(dp, client_syn(flags), prog="kp_xdp_new")
    assert (x.retval, x.data_out.hex()) == (XDP_PASS, client_syn(flags).hex())
    assert dp.ct_entries() == {} and dp.stat(Stat.XDP_NEW)[0] == 0


def test_an_ecn_syn_opens_its_flow(dp: Datapath, lab: Lab) -> None:
    """ECE and CWR on a SYN (RFC 3168 negotiation) do not keep kp_xdp from opening the flow; in DSR
    option mode the SYN carries the option."""

    def setup() -> None:
        set_cfg(dp, dsr=DsrMode.OPT)
        nodeport(dp, BE_REMOTE)

    x = opened_as_tc(dp, lab, setup, client_syn(TCP_SYN | 0x40 | 0x80), Stat.DSR_OPT_TX)
    assert x.data_out[14] == 0x47  # IPv4 header of 28 bytes: the DSR option is in


def test_first_packet_to_a_local_backend(dp: Datapath, lab: Lab) -> None:
    """DNATed in XDP and handed to the stack, its flow tracked (the replies are translated back)."""

    def setup() -> None:
        set_cfg(dp)
        nodeport(dp, BE_LOCAL)

    x = opened_as_tc(dp, lab, setup, client_syn(), Stat.DNAT, XDP_PASS)
    t = tc(dp, lab, x.data_out)  # what kp_from_netdev sees next: no frontend, passed unchanged
    assert (t.retval, t.data_out.hex()) == (TC_ACT_OK, x.data_out.hex())


def test_the_pick_is_kept(dp: Datapath, lab: Lab) -> None:
    """Among many backends, the one kp_xdp picked is the flow's: kp_from_netdev follows its entry for the
    SYN's retransmissions and kp_xdp for the rest, without a second pick."""
    set_cfg(dp)
    bes = [Backend(20 + i, f"10.244.2.{20 + i}", 8080) for i in range(8)]
    dp.add_service(NODE, NODEPORT, IPPROTO_TCP, bes, flags=SvcFlag.NODEPORT)
    for b in bes:
        add_be(dp, b, IPPROTO_TCP)
    picked = set()
    for i in range(6):
        syn = client_syn(sport=CPORT + i)
        x = xdp(dp, lab, syn)
        assert x.retval == XDP_TX
        for _ in range(3):
            assert tc(dp, lab, syn).data_out.hex() == x.data_out.hex()
        seg = frame(CLIENT, NODE, syn_seg(CLIENT, NODE, CPORT + i, NODEPORT, TCP_ACK, b"data"))
        assert xdp(dp, lab, seg).data_out[30:34] == x.data_out[30:34]  # the same backend address
        picked.add(x.data_out[30:34])
    assert dp.stat(Stat.CT_NEW)[0] == dp.stat(Stat.XDP_NEW)[0] == 6
    assert len(picked) > 1  # the draws spread over the backends


def test_first_packet_left_to_tc_when_kp_xdp_cannot_send_it(dp: Datapath, lab: Lab) -> None:
    """No neighbour for the backend's node yet: the flow is tracked (the pick made), the packet goes to
    the stack untouched, and kp_from_netdev sends it as the entry says (bpf_redirect_neigh)."""
    far = Backend(7, "10.244.3.7", 8080)
    set_cfg(dp)
    nodeport(dp, far, IPPROTO_UDP)
    add_be(dp, far, IPPROTO_UDP, node="192.168.1.30")
    x = xdp(dp, lab, udp_frame())
    assert (x.retval, x.data_out.hex()) == (XDP_PASS, udp_frame().hex())
    assert dp.stat(Stat.XDP_NEW)[0] == 1 and dp.stat(Stat.XDP_FWD)[0] == 0
    assert tc(dp, lab, udp_frame()).retval == TC_ACT_REDIRECT
    assert dp.stat(Stat.CT_NEW)[0] == 1


def test_first_packets_tc_answers_are_left_to_it(dp: Datapath, lab: Lab) -> None:
    """No backends (kp_from_netdev rejects), no frontend, a ClusterIP closed to the outside, the
    program slot empty (an agent mid-upgrade): untouched, nothing written."""
    set_cfg(dp)
    dp.svc4.update(
        dp.svc_key(NODE, NODEPORT, IPPROTO_UDP, Scope.EXT, 0), Svc4Val(0, 1, 0, SvcFlag.NODEPORT, 0)
    )
    untouched(dp, lab, udp_frame())
    dp.add_service("10.96.0.10", 80, IPPROTO_UDP, [BE_REMOTE], svc_id=2)
    set_cfg(dp, flags=ConfigFlag.NO_EXTERNAL_CLUSTER_IP)
    untouched(dp, lab, frame(CLIENT, "10.96.0.10", udp(CLIENT, "10.96.0.10", CPORT, 80, b"q"), IPPROTO_UDP))
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    dp.xnew.delete(ctypes.c_uint32(0))
    try:
        untouched(dp, lab, udp_frame())
    finally:
        dp.xnew.update(ctypes.c_uint32(0), ctypes.c_uint32(dp.obj.program("kp_xdp_new").fd))
    assert dp.ct_entries() == {} and dp.stat(Stat.XDP_NEW)[0] == 0
    assert xdp(dp, lab, udp_frame()).retval == XDP_TX


def test_source_ranges_drop_in_xdp(dp: Datapath, lab: Lab) -> None:
    """loadBalancerSourceRanges: a client outside them is dropped before any skb, counted as TC would."""
    set_cfg(dp)
    dp.add_service(NODE, NODEPORT, IPPROTO_UDP, [BE_REMOTE], flags=SvcFlag.NODEPORT | SvcFlag.SRC_RANGES)
    add_be(dp, BE_REMOTE, IPPROTO_UDP)
    assert xdp(dp, lab, udp_frame()).retval == XDP_DROP
    assert dp.stat(Stat.DROP_SRC_RANGE)[0] == 1 and dp.ct_entries() == {}
    dp.lbsrc4.update(LbSrc4Key(LBSRC4_SVC_BITS + 32, 1, ip_to_nbo(CLIENT)), LbSrc4Val())
    assert xdp(dp, lab, udp_frame()).retval == XDP_TX


# ---- left to kp_from_netdev ----
def test_flow_changes_are_left_to_tc(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    tc(dp, lab, client_syn())
    for flags in (TCP_FIN | TCP_ACK, TCP_RST, TCP_SYN):
        untouched(dp, lab, client_syn(flags))
    # a closing flow: its later segments too (kp_from_netdev keeps its TIME_WAIT bookkeeping)
    tc(dp, lab, client_syn(TCP_FIN | TCP_ACK))
    untouched(dp, lab, client_syn(TCP_ACK))


def test_entry_due_a_refresh_is_refreshed_as_tc_would(dp: Datapath, lab: Lab) -> None:
    """A packet due a refresh stays on the fast path (no packet of the flow takes the slower one and
    arrives after later ones): kp_xdp rewrites the entry as kp_from_netdev would, state unchanged."""
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    key = ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_UDP, CtDir.FWD)
    v = dp.ct(key)
    assert v is not None and v.state == CtState.UDP
    v.expires_ns = time.monotonic_ns() + 10**9  # 1 s left of its 60
    dp.put_ct(key, v)
    x = xdp(dp, lab, udp_frame(b"x"))
    assert x.retval == XDP_TX
    after = dp.ct(key)
    assert after is not None and after.state == CtState.UDP and after.flags == v.flags
    assert after.expires_ns > time.monotonic_ns() + 50 * 10**9  # the UDP timeout again
    assert x.data_out.hex() == tc(dp, lab, udp_frame(b"x")).data_out.hex()


def test_only_what_tc_would_follow_is_followed(dp: Datapath, lab: Lab) -> None:
    """kp_from_netdev checks the frontend and the backend before it follows an entry; so does kp_xdp, and
    leaves the packet to it otherwise (it re-balances, rejects or drops as it must)."""
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    same_as_tc(dp, lab, udp_frame(), Stat.SNAT)
    svc0 = dp.svc_key(NODE, NODEPORT, IPPROTO_UDP, Scope.EXT, 0)
    slot0 = dp.svc4.lookup(svc0)
    be = dp.be4.lookup(ctypes.c_uint32(BE_REMOTE.id))
    # the backend gone from kp_be4 (its Service let it go)
    dp.be4.delete(ctypes.c_uint32(BE_REMOTE.id))
    untouched(dp, lab, udp_frame())
    dp.be4.update(ctypes.c_uint32(BE_REMOTE.id), be)
    # the frontend without backends
    dp.svc4.update(svc0, Svc4Val(0, 1, 0, SvcFlag.NODEPORT, 0))
    untouched(dp, lab, udp_frame())
    # the frontend deleted
    dp.svc4.delete(svc0)
    untouched(dp, lab, udp_frame())
    dp.svc4.update(svc0, slot0)
    same_as_tc(dp, lab, udp_frame(), Stat.SNAT)


def test_a_dsr_backend_nodes_flow_is_not_forwarded(dp: Datapath, lab: Lab) -> None:
    """A backend node's entry of a DSR flow (kp_dsr_rx: LOCAL_BE, keyed client -> frontend) is not a flow
    to forward: if the client's packets reach this node directly, kp_from_netdev re-balances them."""
    set_cfg(dp, dsr=DsrMode.OPT)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    key = ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_UDP, CtDir.FWD)
    dp.put_ct(key, Ct4Val(time.monotonic_ns() + 60 * 10**9, 0, 0, ip_to_nbo(BE_LOCAL.addr), port_to_nbo(8080),
                          CtState.UDP, CtFlag.DSR_OPT | CtFlag.EXTERNAL | CtFlag.LOCAL_BE))  # fmt: skip
    untouched(dp, lab, udp_frame())


def test_another_egress_device_is_left_to_tc(dp: Datapath, lab: XLab) -> None:
    """XDP sends frames out another device only when both devices are in kp_xdevs_v1 (the agent's list of
    netdevs running kp_xdp whose drivers redirect and take redirected frames): a device that takes no XDP
    frames (a bridge, a VLAN, a tunnel, a NIC without an XDP program) would drop a redirected one, and a
    driver that cannot redirect drops the frame it was told to. TC redirects it as an skb."""
    set_cfg(dp, dsr=DsrMode.IPIP)
    far = Backend(9, "10.244.9.9", 8080)
    nodeport(dp, far, IPPROTO_UDP)
    add_be(dp, far, IPPROTO_UDP, node=NODE3)
    assert tc(dp, lab, udp_frame()).retval == TC_ACT_REDIRECT
    untouched(dp, lab, udp_frame())
    dp.xdevs.update(ctypes.c_uint32(lab.kpx0), XdevVal(0))  # the egress device listed, not the ingress one
    untouched(dp, lab, udp_frame())
    dp.xdevs.delete(ctypes.c_uint32(lab.kpx0))
    dp.xdevs.update(ctypes.c_uint32(lab.ifindex), XdevVal(0))  # the ingress device listed, not the egress
    untouched(dp, lab, udp_frame())
    assert tc(dp, lab, udp_frame()).retval == TC_ACT_REDIRECT


@pytest.mark.parametrize("dsr", MODES, ids=MODE_IDS)
def test_redirect_to_another_accelerated_netdev(dp: Datapath, lab: XLab, dsr: DsrMode) -> None:
    """The route to the backend's node leaves by kpx0, where kp_xdp runs natively (in kp_xdevs_v1): the
    packet leaves there in XDP (XDP_REDIRECT), its bytes those TC sends, first packet and later ones."""
    far = Backend(9, "10.244.9.9", 8080)
    stat = {DsrMode.OFF: Stat.SNAT, DsrMode.OPT: Stat.DSR_OPT_TX, DsrMode.IPIP: Stat.DSR_IPIP_TX}[dsr]

    def setup() -> None:
        set_cfg(dp, dsr=dsr)
        nodeport(dp, far, IPPROTO_UDP)
        add_be(dp, far, IPPROTO_UDP, node=NODE3)
        for ifindex in (lab.ifindex, lab.kpx0):
            dp.xdevs.update(ctypes.c_uint32(ifindex), XdevVal(0))

    x = opened_as_tc(dp, lab, setup, udp_frame(), stat, XDP_REDIRECT)
    assert x.data_out[:6] == NODE3_MAC
    same_as_tc(dp, lab, udp_frame(b"later"), stat, XDP_REDIRECT)
    assert dp.stat(Stat.XDP_REDIRECT)[0] == 2  # the first packet and the later one (TC's runs aside)


def test_a_reply_before_the_flow_saw_one_is_left_to_tc(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    out = tc(dp, lab, client_syn())
    port = int.from_bytes(out.data_out[34:36], "big")
    # an ACK from the backend with no SYN-ACK seen: the flow is SYN_SENT, without SEEN_REPLY
    ack = frame(BE_REMOTE.addr, NODE, syn_seg(BE_REMOTE.addr, NODE, 8080, port, TCP_ACK), ttl=63)
    untouched(dp, lab, ack)


@pytest.mark.parametrize("bad", ["truncated", "version-6-in-ipv4", "short-total-length"])
def test_malformed_frames_are_left_to_the_stack(dp: Datapath, lab: Lab, bad: str) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    f = bytearray(udp_frame(b"payload"))
    if bad == "truncated":
        f = f[:-3]
    elif bad == "version-6-in-ipv4":
        f[14] = 0x65
    else:
        f[16:18] = (20).to_bytes(2, "big")
    untouched(dp, lab, bytes(f))


@pytest.mark.parametrize(
    "case",
    ["not-a-service", "ip-options", "fragment", "ttl-1", "ipv6", "arp", "icmp", "no-neighbour", "pod-flow"],
)
def test_anything_else_passes_untouched(dp: Datapath, lab: Lab, case: str) -> None:
    from frames import ETH_P_IPV6, ether, icmp

    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    seg = udp(CLIENT, NODE, CPORT, NODEPORT, b"q")
    f = {
        "not-a-service": frame(CLIENT, NODE, udp(CLIENT, NODE, CPORT, 9999, b"q"), IPPROTO_UDP),
        "ip-options": frame(CLIENT, NODE, seg, IPPROTO_UDP, options=b"\x01\x01\x01\x00"),
        "fragment": frame(CLIENT, NODE, seg, IPPROTO_UDP, flags_frag=0x2000),
        "ttl-1": frame(CLIENT, NODE, seg, IPPROTO_UDP, ttl=1),
        "ipv6": ether(bytes(60), ETH_P_IPV6),
        "arp": ether(bytes(28), 0x0806),
        "icmp": frame(CLIENT, NODE, icmp(8, 0, 1), 1),
        "no-neighbour": b"",
        "pod-flow": b"",
    }[case]
    if case == "no-neighbour":
        # the backend's node has no neighbour entry yet: kp_from_netdev resolves it (bpf_redirect_neigh)
        far = Backend(7, "10.244.3.7", 8080)
        dp.reset()
        set_cfg(dp)
        nodeport(dp, far, IPPROTO_UDP)
        add_be(dp, far, IPPROTO_UDP, node="192.168.1.30")
        tc(dp, lab, udp_frame())
        f = udp_frame()
    if case == "pod-flow":
        # a pod's flow to a ClusterIP has no EXTERNAL flag: never kp_xdp's (and never on a netdev)
        dp.add_service("10.96.0.10", 80, IPPROTO_UDP, [BE_REMOTE], svc_id=2)
        lab.run(
            dp,
            "kp_from_pod",
            frame("10.244.1.5", "10.96.0.10", udp("10.244.1.5", "10.96.0.10", 41000, 80, b"p"), IPPROTO_UDP),
        )
        f = frame("10.244.1.5", "10.96.0.10", udp("10.244.1.5", "10.96.0.10", 41000, 80, b"p"), IPPROTO_UDP)
    assert f
    untouched(dp, lab, f)


def test_following_a_flow_writes_no_state(dp: Datapath, lab: Lab) -> None:
    """Conntrack and SNAT stay exactly as kp_from_netdev left them: toggling acceleration moves nothing."""
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    tc(dp, lab, udp_frame())
    ct_before, snat_before = dp.ct_entries(), {bytes(k): v for k, v in dp.snat4.lookup_batch()}
    for i in range(20):
        xdp(dp, lab, udp_frame(bytes([i])))
    assert {k: bytes(v) for k, v in dp.ct_entries().items()} == {k: bytes(v) for k, v in ct_before.items()}
    assert {bytes(k): v for k, v in dp.snat4.lookup_batch()} == snat_before
    assert dp.stat(Stat.XDP_FWD)[0] == 20


def test_every_xdp_call_chain_fits_older_kernels_stack(tc_object: Path) -> None:
    """The verifier adds the frames of a call chain, each rounded up to 32 bytes before kernel 6.9 (16
    after): kp_xdp (with kp_xdp4), kp_xdp6 and the first packets' kp_xdp_new and kp_xdp_new6 (programs of
    their own, by tail call) must fit 512 bytes rounded the old way, or the whole object fails to load on
    such a node even with acceleration off."""
    import re

    from kproxy.bpf import libbpf as lb

    libbpf = lb.lib()
    libbpf.bpf_program__set_log_level.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    libbpf.bpf_program__set_log_buf.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    with lb.BpfObject.open(tc_object) as obj:
        bufs = {}
        for name in ("kp_xdp", "kp_xdp6", "kp_xdp_new", "kp_xdp_new6"):
            prog = libbpf.bpf_object__find_program_by_name(obj.ptr, name.encode())
            bufs[name] = ctypes.create_string_buffer(1 << 20)
            libbpf.bpf_program__set_log_level(prog, 4)  # statistics: "stack depth A+B+..."
            libbpf.bpf_program__set_log_buf(prog, bufs[name], len(bufs[name]))
        obj.load()
        for name, buf in bufs.items():
            m = re.search(r"stack depth ([0-9+]+)", buf.value.decode())
            assert m, f"{name}: no stack depth in the verifier's statistics"
            frames = [int(f) for f in m.group(1).split("+")]
            rounded = sum((max(f, 1) + 31) // 32 * 32 for f in frames)
            assert rounded <= 512, f"{name}: frames {frames} take {rounded} bytes rounded to 32"
