"""PROG_TEST_RUN cases of IPv6 flows that need several packets: TCP states and tuple re-use, conntrack
refresh, affinity (timeouts, terminating backends), backends gone, UDP both ways, fragments, ICMPv6
errors about translated flows from every program that translates them, and counters.

The IPv4 twins are in test_bpf_datapath.py, test_bpf_tuple_reuse.py, test_bpf_srcrange.py and
test_bpf_external.py; test_bpf_ipv6.py holds the single-packet IPv6 cases. Frames are compared byte
for byte where the translation is exact, and every output frame's checksums are recomputed.
"""

from __future__ import annotations

import ctypes
import struct
import time

import pytest
from datapath import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, Backend, Datapath, ct6_key, in6
from frames import (
    ETH_HLEN,
    ETH_P_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    csum,
    ether,
    swap_macs,
)
from frames6 import (
    ICMP6_DEST_UNREACH,
    ICMP6_ECHO_REQUEST,
    ICMP6_PKT_TOOBIG,
    ICMP6_PORT_UNREACH,
    ICMP6_TIME_EXCEED,
    IPPROTO_DSTOPTS,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_ROUTING,
    checksum_errors6,
    ext,
    frag_hdr,
    fragments6,
    icmp6,
    icmp6_frame,
    ipv6,
    parse6,
    pseudo6,
    reassemble6,
    tcp6,
    tcp6_frame,
    udp6,
    udp6_frame,
)

from kproxy.abi import (
    ID6_BASE,
    Aff4Val,
    BackendFlag,
    Config,
    Ct6Key,
    Ct6Val,
    CtDir,
    CtFlag,
    CtState,
    LbSrc4Val,
    LbSrc6Key,
    Scope,
    Stat,
    SvcFlag,
    bytes_to_ip6,
)
from kproxy.bpf.libbpf import TestRun

pytestmark = pytest.mark.root

CLIENT, CPORT = "fd00:10:244:1::5", 40000
SVC, SVC2, SPORT = "fd00:96::10", "fd00:96::20", 80
BE1 = Backend(ID6_BASE + 1, "fd00:10:244:2::7", 8080)
BE2 = Backend(ID6_BASE + 2, "fd00:10:244:3::9", 9090)
BE3 = Backend(ID6_BASE + 3, "fd00:10:244:4::b", 8080)
BE4 = Backend(ID6_BASE + 4, "fd00:10:244:5::d", 8080)
SVC_ID, SVC2_ID = ID6_BASE + 1, ID6_BASE + 2
ROUTER = "fd00:10:244:2::1"
NODE6 = "fd00:a::1"
NODEPORT = 30080
LB6 = "2001:db8:1::10"
EXT_CLIENT = "2001:db8::42"
HAIRPIN6 = "100::a9fe:2a01"

SEC = 10**9
SYN_TIMEOUT, FIN_TIMEOUT, UDP_TIMEOUT = 60 * SEC, 10 * SEC, 60 * SEC


# ---- helpers ----
def fwd_key(svc: str = SVC, proto: int = IPPROTO_TCP, cport: int = CPORT, client: str = CLIENT) -> Ct6Key:
    return ct6_key(client, svc, cport, SPORT, proto, CtDir.FWD)


def reply_key(
    be: Backend = BE1, proto: int = IPPROTO_TCP, cport: int = CPORT, client: str = CLIENT
) -> Ct6Key:
    return ct6_key(be.addr, client, be.port, cport, proto, CtDir.REPLY)


def from_client(
    dst: str, dport: int, flags: int, *, src: str = CLIENT, sport: int = CPORT, **kw: object
) -> bytes:
    return tcp6_frame(src, dst, sport, dport, flags, seq=2000, ack=7001, **kw)


def from_backend(
    be: Backend,
    flags: int,
    *,
    src: str | None = None,
    sport: int | None = None,
    dst: str = CLIENT,
    **kw: object,
) -> bytes:
    return tcp6_frame(src or be.addr, dst, sport or be.port, CPORT, flags, seq=7000, ack=2001, **kw)


def ok(out: TestRun, verdict: int = TC_ACT_OK) -> bytes:
    """The output frame of a run that had `verdict`, its checksums checked."""
    assert out.retval == verdict, out.retval
    assert checksum_errors6(out.data_out) == []
    return out.data_out


def unchanged(dp: Datapath, prog: str, frame: bytes) -> None:
    out = dp.run(prog, frame)
    assert (out.retval, out.data_out.hex()) == (TC_ACT_OK, frame.hex())


def service_flow(dp: Datapath, state: CtState, svc: str = SVC, be: Backend = BE1) -> None:
    """A whole connection CLIENT:CPORT -> svc:SPORT (-> be), left in `state` in conntrack."""
    assert parse6(ok(dp.run("kp_from_pod", from_client(svc, SPORT, TCP_SYN)))).dst == be.addr
    synack = ok(dp.run("kp_to_pod", from_backend(be, TCP_SYN | TCP_ACK)))
    assert parse6(synack).src == svc
    ok(dp.run("kp_from_pod", from_client(svc, SPORT, TCP_ACK)))
    if state == CtState.CLOSING:
        ok(dp.run("kp_to_pod", from_backend(be, TCP_FIN | TCP_ACK)))
        ok(dp.run("kp_from_pod", from_client(svc, SPORT, TCP_FIN | TCP_ACK)))
    elif state == CtState.CLOSED:
        ok(dp.run("kp_from_pod", from_client(svc, SPORT, TCP_RST)))
    fwd = dp.ct6(fwd_key(svc))
    assert fwd is not None and fwd.state == state


def entry(dp: Datapath, key: Ct6Key) -> bytes:
    """The raw value of a conntrack entry that must exist."""
    val = dp.ct6(key)
    assert val is not None, key
    return bytes(val)


def expiry_within(val: Ct6Val, before: int, after: int, timeout: int) -> bool:
    return before + timeout <= val.expires_ns <= after + timeout


def socket_port(nbo: int) -> int:
    """A port as stored in a map value (network byte order in a native u16) -> its number."""
    return struct.unpack("!H", struct.pack("=H", nbo))[0]


# ---- conntrack entries and TCP states ----
def test_syn_creates_fwd_and_reply_entries(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1], svc_id=SVC_ID)
    before = time.monotonic_ns()
    out = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    after = time.monotonic_ns()
    assert out.hex() == from_client(BE1.addr, BE1.port, TCP_SYN).hex()
    fwd, rep = dp.ct6(fwd_key()), dp.ct6(reply_key())
    assert fwd is not None and rep is not None
    assert len(dp.ct6_entries()) == 2
    assert (bytes_to_ip6(fwd.nat_addr), socket_port(fwd.nat_port)) == (BE1.addr, BE1.port)
    assert (bytes_to_ip6(rep.nat_addr), socket_port(rep.nat_port)) == (SVC, SPORT)
    for v in (fwd, rep):
        assert (v.backend_id, v.svc_id, v.state, v.flags) == (BE1.id, SVC_ID, CtState.SYN_SENT, 0)
        assert bytes_to_ip6(v.snat_addr) == "::" and v.snat_port == 0 and v.tw_key == 0
        assert expiry_within(v, before, after, SYN_TIMEOUT)


def test_synack_establishes_and_later_packets_follow_their_backend(dp: Datapath) -> None:
    backends = [BE1, BE2, BE3, BE4]
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, backends)
    by_addr = {b.addr: b for b in backends}
    for sport in range(41000, 41012):
        first = parse6(ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN, sport=sport))))
        be = by_addr[first.dst]
        assert first.dport == be.port
        for flags in (TCP_ACK, TCP_ACK | TCP_PSH, TCP_ACK):
            frame = from_client(SVC, SPORT, flags, sport=sport, payload=b"GET /")
            out = ok(dp.run("kp_from_pod", frame))
            assert out.hex() == from_client(be.addr, be.port, flags, sport=sport, payload=b"GET /").hex()
    assert dp.stat(Stat.CT_NEW)[0] == 12
    assert dp.stat(Stat.DNAT)[0] == 48


def test_fin_closes_and_new_syn_reopens(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    ok(dp.run("kp_to_pod", from_backend(BE1, TCP_SYN | TCP_ACK)))
    before = time.monotonic_ns()
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_FIN | TCP_ACK)))
    after = time.monotonic_ns()
    for k in (fwd_key(), reply_key()):
        v = dp.ct6(k)
        assert v is not None and v.state == CtState.CLOSING and expiry_within(v, before, after, FIN_TIMEOUT)
    # the backend's reset: closed, still translated (the client must see it from the frontend)
    out = ok(dp.run("kp_to_pod", from_backend(BE1, TCP_RST)))
    assert out.hex() == from_backend(BE1, TCP_RST, src=SVC, sport=SPORT).hex()
    fwd = dp.ct6(fwd_key())
    assert fwd is not None and fwd.state == CtState.CLOSED
    assert dp.stat(Stat.CT_REOPEN)[0] == 0
    # the client re-uses its port: a new connection on the same tuple
    out = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    assert out.hex() == from_client(BE1.addr, BE1.port, TCP_SYN).hex()
    fwd = dp.ct6(fwd_key())
    assert fwd is not None and fwd.state == CtState.SYN_SENT and not fwd.flags & CtFlag.SEEN_REPLY
    assert dp.stat(Stat.CT_REOPEN)[0] == 1 and dp.stat(Stat.CT_NEW)[0] == 1


@pytest.mark.parametrize("side", ["client", "backend"])
def test_rst_closes_the_flow(dp: Datapath, side: str) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, CtState.ESTABLISHED)
    before = time.monotonic_ns()
    if side == "client":
        out = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_RST | TCP_ACK)))
        assert out.hex() == from_client(BE1.addr, BE1.port, TCP_RST | TCP_ACK).hex()
    else:
        out = ok(dp.run("kp_to_pod", from_backend(BE1, TCP_RST)))
        assert out.hex() == from_backend(BE1, TCP_RST, src=SVC, sport=SPORT).hex()
    after = time.monotonic_ns()
    for k in (fwd_key(), reply_key()):
        v = dp.ct6(k)
        assert v is not None and v.state == CtState.CLOSED and expiry_within(v, before, after, FIN_TIMEOUT)
    # a FIN after the reset keeps it closed
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_FIN | TCP_ACK)))
    fwd = dp.ct6(fwd_key())
    assert fwd is not None and fwd.state == CtState.CLOSED


def test_ack_on_a_closing_flow_does_not_reopen_it(dp: Datapath) -> None:
    """Only a SYN without ACK re-uses a tuple: the last ACKs of a closing connection are translated."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, CtState.CLOSING)
    out = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK)))
    assert out.hex() == from_client(BE1.addr, BE1.port, TCP_ACK).hex()
    assert dp.stat(Stat.CT_REOPEN)[0] == 0
    fwd = dp.ct6(fwd_key())
    assert fwd is not None and fwd.state == CtState.CLOSING


def test_reopened_flow_drops_the_old_backends_reply(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, CtState.CLOSING)
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE2])  # slot 1 now names BE2
    assert parse6(ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))).dst == BE2.addr
    assert dp.stat(Stat.CT_REOPEN)[0] == 1
    assert dp.ct6(reply_key(BE1)) is None and dp.ct6(reply_key(BE2)) is not None
    late = from_backend(BE1, TCP_FIN | TCP_ACK)
    unchanged(dp, "kp_to_pod", late)
    fwd = dp.ct6(fwd_key())
    assert fwd is not None and fwd.backend_id == BE2.id
    ack = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK)))
    assert ack.hex() == from_client(BE2.addr, BE2.port, TCP_ACK).hex()


# ---- re-used tuples (test_bpf_tuple_reuse.py's IPv6 twin) ----
@pytest.mark.parametrize("state", [CtState.CLOSING, CtState.CLOSED], ids=["closing", "closed"])
@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod"])
def test_syn_ack_on_a_closed_flow_is_not_translated(dp: Datapath, prog: str, state: CtState) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, state)
    unchanged(dp, prog, from_backend(BE1, TCP_SYN | TCP_ACK))
    assert dp.stat(Stat.CT_STALE_REPLY)[0] == 1
    assert dp.ct6(reply_key()) is None and dp.ct6(fwd_key()) is None
    unchanged(dp, prog, from_backend(BE1, TCP_ACK))


def test_retransmitted_syn_ack_of_an_open_flow_is_translated(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, CtState.ESTABLISHED)
    for _ in range(2):
        out = ok(dp.run("kp_to_pod", from_backend(BE1, TCP_SYN | TCP_ACK)))
        assert out.hex() == from_backend(BE1, TCP_SYN | TCP_ACK, src=SVC, sport=SPORT).hex()
    assert dp.stat(Stat.CT_STALE_REPLY)[0] == 0
    assert dp.ct6(reply_key()) is not None


@pytest.mark.parametrize("state", [CtState.CLOSING, CtState.CLOSED], ids=["closing", "closed"])
def test_direct_syn_takes_the_tuple_over(dp: Datapath, state: CtState) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, state)
    unchanged(dp, "kp_from_pod", from_client(BE1.addr, BE1.port, TCP_SYN))
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 1
    assert dp.ct6_entries() == {}
    unchanged(dp, "kp_to_pod", from_backend(BE1, TCP_SYN | TCP_ACK))
    assert dp.stat(Stat.CT_STALE_REPLY)[0] == 0


def test_direct_syn_from_outside_takes_an_external_flows_tuple_over(dp: Datapath) -> None:
    """kp_from_netdev6: a client outside closes its LoadBalancer connection, then reaches the backend pod
    straight (routable pod addresses) from the same port."""
    dp.add_service6(LB6, SPORT, IPPROTO_TCP, [BE1], flags=SvcFlag.LOADBALANCER)
    syn = from_client(LB6, SPORT, TCP_SYN, src=EXT_CLIENT)
    assert parse6(ok(dp.run("kp_from_netdev", syn))).dst == BE1.addr
    fwd = dp.ct6(fwd_key(LB6, client=EXT_CLIENT))
    assert fwd is not None and fwd.flags & CtFlag.EXTERNAL and not fwd.flags & CtFlag.SNAT
    ok(dp.run("kp_from_netdev", from_client(LB6, SPORT, TCP_RST, src=EXT_CLIENT)))
    unchanged(dp, "kp_from_netdev", from_client(BE1.addr, BE1.port, TCP_SYN, src=EXT_CLIENT))
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 1
    assert dp.ct6_entries() == {}


@pytest.mark.parametrize("state", [CtState.SYN_SENT, CtState.ESTABLISHED], ids=["syn-sent", "established"])
def test_direct_syn_leaves_a_live_flow(dp: Datapath, state: CtState) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    if state == CtState.SYN_SENT:
        ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    else:
        service_flow(dp, state)
    unchanged(dp, "kp_from_pod", from_client(BE1.addr, BE1.port, TCP_SYN))
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 0
    assert dp.ct6(fwd_key()) is not None and dp.ct6(reply_key()) is not None


def test_new_flow_through_another_frontend_takes_the_reply_over(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1], svc_id=SVC_ID)
    dp.add_service6(SVC2, SPORT, IPPROTO_TCP, [BE1], svc_id=SVC2_ID)
    service_flow(dp, CtState.CLOSING)
    assert parse6(ok(dp.run("kp_from_pod", from_client(SVC2, SPORT, TCP_SYN)))).dst == BE1.addr
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 1
    assert dp.ct6(fwd_key(SVC)) is None
    rep = dp.ct6(reply_key())
    assert rep is not None and rep.svc_id == SVC2_ID and rep.state == CtState.SYN_SENT
    assert bytes_to_ip6(rep.nat_addr) == SVC2
    out = ok(dp.run("kp_to_pod", from_backend(BE1, TCP_SYN | TCP_ACK)))
    assert out.hex() == from_backend(BE1, TCP_SYN | TCP_ACK, src=SVC2, sport=SPORT).hex()


def test_new_flow_never_takes_an_established_flows_reply(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1], svc_id=SVC_ID)
    dp.add_service6(SVC2, SPORT, IPPROTO_TCP, [BE1, BE2], svc_id=SVC2_ID)
    service_flow(dp, CtState.ESTABLISHED)
    stream_fwd, stream_reply = entry(dp, fwd_key(SVC)), entry(dp, reply_key())
    held = 0
    for _ in range(20):  # four draws of BE1 in a row are dropped; the SYN is retransmitted
        out = dp.run("kp_from_pod", from_client(SVC2, SPORT, TCP_SYN))
        if out.retval == TC_ACT_SHOT:
            held += 1
            continue
        assert parse6(ok(out)).dst == BE2.addr
        break
    else:
        pytest.fail("the new flow never got the backend with a free reply tuple")
    assert dp.stat(Stat.DROP_TUPLE_HELD)[0] == held
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 0
    assert entry(dp, fwd_key(SVC)) == stream_fwd and entry(dp, reply_key()) == stream_reply
    new = dp.ct6(fwd_key(SVC2))
    assert new is not None and bytes_to_ip6(new.nat_addr) == BE2.addr
    # the stream goes on through its own frontend
    sent = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK)))
    assert parse6(sent).dst == BE1.addr and dp.stat(Stat.CT_REOPEN)[0] == 0
    back = ok(dp.run("kp_to_pod", from_backend(BE1, TCP_ACK)))
    assert parse6(back).src == SVC


def test_new_flow_with_only_a_held_backend_is_dropped(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1], svc_id=SVC_ID)
    dp.add_service6(SVC2, SPORT, IPPROTO_TCP, [BE1], svc_id=SVC2_ID)
    service_flow(dp, CtState.ESTABLISHED)
    stream_fwd, stream_reply = entry(dp, fwd_key(SVC)), entry(dp, reply_key())
    out = dp.run("kp_from_pod", from_client(SVC2, SPORT, TCP_SYN))
    assert out.retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_TUPLE_HELD)[0] == 1 and dp.stat(Stat.CT_TAKEOVER)[0] == 0
    assert dp.ct6(fwd_key(SVC2)) is None
    assert entry(dp, fwd_key(SVC)) == stream_fwd and entry(dp, reply_key()) == stream_reply


def test_udp_flow_takes_a_udp_reply_tuple_over(dp: Datapath) -> None:
    """Only an ESTABLISHED TCP flow holds its REPLY tuple; a UDP flow through another frontend takes it."""
    dp.add_service6(SVC, 53, IPPROTO_UDP, [BE1], svc_id=SVC_ID)
    dp.add_service6(SVC2, 53, IPPROTO_UDP, [BE1], svc_id=SVC2_ID)
    ok(dp.run("kp_from_pod", udp6_frame(CLIENT, SVC, CPORT, 53)))
    ok(dp.run("kp_to_pod", udp6_frame(BE1.addr, CLIENT, BE1.port, CPORT)))
    out = ok(dp.run("kp_from_pod", udp6_frame(CLIENT, SVC2, CPORT, 53)))
    assert out.hex() == udp6_frame(CLIENT, BE1.addr, CPORT, BE1.port).hex()
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 1
    assert dp.ct6(ct6_key(CLIENT, SVC, CPORT, 53, IPPROTO_UDP, CtDir.FWD)) is None
    out = ok(dp.run("kp_to_pod", udp6_frame(BE1.addr, CLIENT, BE1.port, CPORT, b"answer")))
    assert out.hex() == udp6_frame(SVC2, CLIENT, 53, CPORT, b"answer").hex()


# ---- refresh, expiry, backends that went away ----
def test_ct_is_not_rewritten_per_packet(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    key = fwd_key()
    val = dp.ct6(key)
    assert val is not None
    far = time.monotonic_ns() + 10**15
    val.expires_ns = far
    dp.put_ct6(key, val)
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK)))
    kept = dp.ct6(key)
    assert kept is not None and kept.expires_ns == far
    # close to expiry: the next packet pushes both entries a full syn timeout ahead
    val.expires_ns = time.monotonic_ns() + SEC
    dp.put_ct6(key, val)
    before = time.monotonic_ns()
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK)))
    for k in (key, reply_key()):
        refreshed = dp.ct6(k)
        assert refreshed is not None and refreshed.expires_ns >= before + SYN_TIMEOUT


def test_reply_refresh_is_not_per_packet_either(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, CtState.ESTABLISHED)
    key = fwd_key()
    val = dp.ct6(key)
    assert val is not None
    far = time.monotonic_ns() + 10**15
    val.expires_ns = far
    dp.put_ct6(key, val)
    ok(dp.run("kp_to_pod", from_backend(BE1, TCP_ACK)))
    kept = dp.ct6(key)
    assert kept is not None and kept.expires_ns == far


def test_expired_entry_is_ignored(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.add_backends6([BE2], IPPROTO_TCP)
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    key = fwd_key()
    stale = dp.ct6(key)
    assert stale is not None
    stale.backend_id, stale.nat_addr, stale.nat_port = BE2.id, in6(BE2.addr), socket_port(BE2.port)
    stale.expires_ns = time.monotonic_ns() - SEC
    dp.put_ct6(key, stale)
    assert parse6(ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))).dst == BE1.addr
    assert dp.stat(Stat.CT_NEW)[0] == 2


def test_expired_reply_entry_is_not_translated(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    rep = dp.ct6(reply_key())
    assert rep is not None
    rep.expires_ns = time.monotonic_ns() - SEC
    dp.put_ct6(reply_key(), rep)
    unchanged(dp, "kp_to_pod", from_backend(BE1, TCP_SYN | TCP_ACK))
    assert dp.stat(Stat.REVNAT)[0] == 0


def test_vanished_backend_reselects(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    assert parse6(ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))).dst == BE1.addr
    dp.be6.delete(ctypes.c_uint32(BE1.id))
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE2])
    out = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK)))
    assert out.hex() == from_client(BE2.addr, BE2.port, TCP_ACK).hex()
    assert dp.stat(Stat.CT_REOPEN)[0] == 1
    fwd = dp.ct6(fwd_key())
    assert fwd is not None and fwd.backend_id == BE2.id
    assert dp.ct6(reply_key(BE1)) is None


def test_backend_missing_from_be6_drops(dp: Datapath) -> None:
    """A slot naming a backend id kp_be6_v1 does not have (the agent never writes that order; a
    half-applied batch could): dropped and counted, nothing tracked."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.be6.delete(ctypes.c_uint32(BE1.id))
    out = dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN))
    assert out.retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_BACKEND_MISSING)[0] == 1
    assert dp.ct6_entries() == {} and dp.stat(Stat.DNAT)[0] == 0


def test_slot_missing_drops(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])
    dp.svc6.delete(dp.svc6_key(SVC, SPORT, IPPROTO_UDP, Scope.EXT, 1))  # slot 0 still counts one backend
    out = dp.run("kp_from_pod", udp6_frame(CLIENT, SVC, CPORT, SPORT))
    assert out.retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_BACKEND_MISSING)[0] == 1


def test_flow_to_a_terminating_backend_goes_on(dp: Datapath) -> None:
    """A backend turned terminating (it left the slots, its kp_be6 entry stays, flagged) keeps its
    established connections."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, CtState.ESTABLISHED)
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE2])
    dp.add_backends6([Backend(BE1.id, BE1.addr, BE1.port, BackendFlag.TERMINATING)], IPPROTO_TCP)
    out = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK, payload=b"more")))
    assert out.hex() == from_client(BE1.addr, BE1.port, TCP_ACK, payload=b"more").hex()
    assert dp.stat(Stat.CT_REOPEN)[0] == 0


# ---- affinity ----
def test_affinity_sticks_and_existing_flows_do_not_touch_it(dp: Datapath) -> None:
    backends = [BE1, BE2, BE3, BE4]
    dp.add_service6(
        SVC, SPORT, IPPROTO_TCP, backends, flags=SvcFlag.AFFINITY, svc_id=SVC_ID, affinity_timeout=100
    )
    first = parse6(ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN, sport=42000)))).dst
    aff = dp.aff6(CLIENT, SVC_ID)
    assert aff is not None
    for sport in range(42001, 42011):
        assert parse6(ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN, sport=sport)))).dst == first
    assert dp.stat(Stat.AFFINITY_HIT)[0] == 10
    before = dp.aff6(CLIENT, SVC_ID)
    assert before is not None and before.last_used_ns >= aff.last_used_ns
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK, sport=42001)))
    after = dp.aff6(CLIENT, SVC_ID)
    assert after is not None and after.last_used_ns == before.last_used_ns
    # another client has its own entry
    other = "fd00:10:244:1::6"
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN, src=other)))
    assert dp.aff6(other, SVC_ID) is not None


def test_affinity_expired_is_not_used(dp: Datapath) -> None:
    dp.add_service6(
        SVC, SPORT, IPPROTO_TCP, [BE1], flags=SvcFlag.AFFINITY, svc_id=SVC_ID, affinity_timeout=100
    )
    dp.add_backends6([BE2], IPPROTO_TCP)
    dp.put_aff6(CLIENT, SVC_ID, Aff4Val(time.monotonic_ns() - 101 * SEC, BE2.id, 0))
    assert parse6(ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))).dst == BE1.addr
    assert dp.stat(Stat.AFFINITY_HIT)[0] == 0
    aff = dp.aff6(CLIENT, SVC_ID)
    assert aff is not None and aff.backend_id == BE1.id


def test_affinity_within_its_timeout_is_used(dp: Datapath) -> None:
    dp.add_service6(
        SVC, SPORT, IPPROTO_TCP, [BE1], flags=SvcFlag.AFFINITY, svc_id=SVC_ID, affinity_timeout=100
    )
    dp.add_backends6([BE2], IPPROTO_TCP)  # no longer in the slots, still a backend
    dp.put_aff6(CLIENT, SVC_ID, Aff4Val(time.monotonic_ns() - 99 * SEC, BE2.id, 0))
    out = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    assert out.hex() == from_client(BE2.addr, BE2.port, TCP_SYN).hex()
    assert dp.stat(Stat.AFFINITY_HIT)[0] == 1


def test_affinity_skips_a_terminating_backend(dp: Datapath) -> None:
    """The client's affinity names a backend now terminating: a new connection goes to a serving one and
    the affinity moves there (kube-proxy: terminating endpoints take no new sessions)."""
    dp.add_service6(
        SVC, SPORT, IPPROTO_TCP, [BE1], flags=SvcFlag.AFFINITY, svc_id=SVC_ID, affinity_timeout=100
    )
    dp.add_backends6([Backend(BE2.id, BE2.addr, BE2.port, BackendFlag.TERMINATING)], IPPROTO_TCP)
    dp.put_aff6(CLIENT, SVC_ID, Aff4Val(time.monotonic_ns(), BE2.id, 0))
    out = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    assert out.hex() == from_client(BE1.addr, BE1.port, TCP_SYN).hex()
    assert dp.stat(Stat.AFFINITY_HIT)[0] == 0
    aff = dp.aff6(CLIENT, SVC_ID)
    assert aff is not None and aff.backend_id == BE1.id


def test_affinity_naming_a_missing_backend_is_not_used(dp: Datapath) -> None:
    dp.add_service6(
        SVC, SPORT, IPPROTO_TCP, [BE1], flags=SvcFlag.AFFINITY, svc_id=SVC_ID, affinity_timeout=100
    )
    dp.put_aff6(CLIENT, SVC_ID, Aff4Val(time.monotonic_ns(), BE2.id, 0))
    assert parse6(ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))).dst == BE1.addr
    assert dp.aff6(CLIENT, SVC_ID).backend_id == BE1.id  # type: ignore[union-attr]


def test_affinity_of_a_udp_service(dp: Datapath) -> None:
    dp.add_service6(
        SVC, 53, IPPROTO_UDP, [BE1, BE2], flags=SvcFlag.AFFINITY, svc_id=SVC_ID, affinity_timeout=30
    )
    first = parse6(ok(dp.run("kp_from_pod", udp6_frame(CLIENT, SVC, 20000, 53)))).dst
    for sport in range(20001, 20020):
        assert parse6(ok(dp.run("kp_from_pod", udp6_frame(CLIENT, SVC, sport, 53)))).dst == first
    assert dp.stat(Stat.AFFINITY_HIT)[0] == 19


# ---- UDP ----
def test_udp_both_ways(dp: Datapath) -> None:
    dp.add_service6(SVC, 53, IPPROTO_UDP, [BE2])
    before = time.monotonic_ns()
    out = ok(dp.run("kp_from_pod", udp6_frame(CLIENT, SVC, CPORT, 53, b"query")))
    after = time.monotonic_ns()
    assert out.hex() == udp6_frame(CLIENT, BE2.addr, CPORT, BE2.port, b"query").hex()
    fwd = dp.ct6(ct6_key(CLIENT, SVC, CPORT, 53, IPPROTO_UDP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.UDP and not fwd.flags & CtFlag.SEEN_REPLY
    assert expiry_within(fwd, before, after, UDP_TIMEOUT)
    for prog in ("kp_to_pod", "kp_from_pod"):
        out = ok(dp.run(prog, udp6_frame(BE2.addr, CLIENT, BE2.port, CPORT, b"answer")))
        assert out.hex() == udp6_frame(SVC, CLIENT, 53, CPORT, b"answer").hex()
    for key in (
        ct6_key(CLIENT, SVC, CPORT, 53, IPPROTO_UDP, CtDir.FWD),
        ct6_key(BE2.addr, CLIENT, BE2.port, CPORT, IPPROTO_UDP, CtDir.REPLY),
    ):
        v = dp.ct6(key)
        assert v is not None and v.state == CtState.UDP and v.flags & CtFlag.SEEN_REPLY
    assert dp.stat(Stat.REVNAT)[0] == 2


def payload_summing_to_zero(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A 4-byte UDP payload whose datagram src:sport -> dst:dport has a computed checksum of 0 (sent as
    0xffff, RFC 8200 8.1)."""
    base = csum(pseudo6(src, dst, IPPROTO_UDP, 12) + struct.pack("!HHHH", sport, dport, 12, 0) + b"\0\0\0\0")
    # base = ~S; adding the word w = ~S makes the sum 0xffff: the checksum ~0xffff = 0
    return struct.pack("!H", base) + b"\0\0"


@pytest.mark.parametrize("side", ["output", "input"])
def test_udp_checksum_that_computes_to_zero(dp: Datapath, side: str) -> None:
    """A UDP checksum computing to 0 is sent as 0xffff (0 means none, invalid in IPv6): the translated
    datagram whose checksum becomes 0 leaves with 0xffff; one arriving with 0xffff is translated right."""
    dp.add_service6(SVC, 53, IPPROTO_UDP, [BE2])
    if side == "output":
        payload = payload_summing_to_zero(CLIENT, BE2.addr, CPORT, BE2.port)
    else:
        payload = payload_summing_to_zero(CLIENT, SVC, CPORT, 53)
    frame = udp6_frame(CLIENT, SVC, CPORT, 53, payload)
    want = udp6_frame(CLIENT, BE2.addr, CPORT, BE2.port, payload)
    check_of = {"output": want, "input": frame}[side]
    assert parse6(check_of).l4[6:8] == b"\xff\xff"
    out = ok(dp.run("kp_from_pod", frame))
    assert out.hex() == want.hex()
    # and the reply whose translated checksum is 0
    reply_payload = payload_summing_to_zero(SVC, CLIENT, 53, CPORT)
    out = ok(dp.run("kp_to_pod", udp6_frame(BE2.addr, CLIENT, BE2.port, CPORT, reply_payload)))
    assert out.hex() == udp6_frame(SVC, CLIENT, 53, CPORT, reply_payload).hex()
    assert parse6(out).l4[6:8] == b"\xff\xff"


def test_timeouts_come_from_config(dp: Datapath) -> None:
    cfg = Config()
    cfg.ct_syn_timeout, cfg.ct_udp_timeout, cfg.ct_tcp_timeout, cfg.ct_fin_timeout = 5, 7, 11, 3
    dp.cfg.update(ctypes.c_uint32(0), cfg)
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE2], svc_id=SVC2_ID)
    before = time.monotonic_ns()
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    ok(dp.run("kp_from_pod", udp6_frame(CLIENT, SVC, CPORT, SPORT)))
    after = time.monotonic_ns()
    tcp_val = dp.ct6(fwd_key())
    udp_val = dp.ct6(fwd_key(proto=IPPROTO_UDP))
    assert tcp_val is not None and expiry_within(tcp_val, before, after, 5 * SEC)
    assert udp_val is not None and expiry_within(udp_val, before, after, 7 * SEC)
    before = time.monotonic_ns()
    ok(dp.run("kp_to_pod", from_backend(BE1, TCP_SYN | TCP_ACK)))
    after = time.monotonic_ns()
    tcp_val = dp.ct6(fwd_key())
    assert tcp_val is not None and tcp_val.state == CtState.ESTABLISHED
    assert expiry_within(tcp_val, before, after, 11 * SEC)
    before = time.monotonic_ns()
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_FIN | TCP_ACK)))
    after = time.monotonic_ns()
    tcp_val = dp.ct6(fwd_key())
    assert tcp_val is not None and expiry_within(tcp_val, before, after, 3 * SEC)


# ---- hairpin, external flows, host-network backends ----
def test_hairpin_with_a_configured_address_both_ways(dp: Datapath) -> None:
    hairpin = "fd00:ffff::1"
    dp.set_node6(NODE6, hairpin)
    me = Backend(ID6_BASE + 9, CLIENT, 8080, BackendFlag.LOCAL)
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [me])
    syn = from_client(SVC, SPORT, TCP_SYN)
    out = ok(dp.run("kp_from_pod", syn), TC_ACT_REDIRECT)
    sent = tcp6_frame(hairpin, CLIENT, CPORT, 8080, TCP_SYN, seq=2000, ack=7001)
    assert out.hex() == swap_macs(sent).hex()
    reply = tcp6_frame(CLIENT, hairpin, 8080, CPORT, TCP_SYN | TCP_ACK, seq=7000, ack=2001)
    out = ok(dp.run("kp_from_pod", reply), TC_ACT_REDIRECT)
    back = tcp6_frame(SVC, CLIENT, SPORT, CPORT, TCP_SYN | TCP_ACK, seq=7000, ack=2001)
    assert out.hex() == swap_macs(back).hex()
    fwd = dp.ct6(fwd_key())
    assert fwd is not None and fwd.flags & CtFlag.HAIRPIN and fwd.state == CtState.ESTABLISHED
    assert bytes_to_ip6(fwd.snat_addr) == hairpin
    rep = dp.ct6(ct6_key(CLIENT, hairpin, 8080, CPORT, IPPROTO_TCP, CtDir.REPLY))
    assert rep is not None and bytes_to_ip6(rep.snat_addr) == CLIENT
    assert dp.stat(Stat.HAIRPIN)[0] == 2
    # and the next segment of the client follows
    out = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK)), TC_ACT_REDIRECT)
    assert parse6(out).src == hairpin


def test_hairpin_default_address_flow_closes(dp: Datapath) -> None:
    me = Backend(ID6_BASE + 9, CLIENT, 8080, BackendFlag.LOCAL)
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [me])
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)), TC_ACT_REDIRECT)
    ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_RST)), TC_ACT_REDIRECT)
    fwd = dp.ct6(fwd_key())
    assert fwd is not None and fwd.state == CtState.CLOSED and bytes_to_ip6(fwd.snat_addr) == HAIRPIN6


def test_nodeport_to_a_host_network_backend_reply_leaves_from_the_frontend(dp: Datapath) -> None:
    """A hostNetwork endpoint answers from the node's address through kp_to_netdev: the NodePort is
    restored as the source."""
    dp.set_node6(NODE6)
    host = Backend(ID6_BASE + 7, NODE6, 8080, BackendFlag.LOCAL)
    dp.add_service6(NODE6, NODEPORT, IPPROTO_TCP, [host], flags=SvcFlag.NODEPORT)
    syn = tcp6_frame(EXT_CLIENT, NODE6, 5555, NODEPORT, TCP_SYN)
    out = ok(dp.run("kp_from_netdev", syn))
    assert out.hex() == tcp6_frame(EXT_CLIENT, NODE6, 5555, 8080, TCP_SYN).hex()
    reply = tcp6_frame(NODE6, EXT_CLIENT, 8080, 5555, TCP_SYN | TCP_ACK, seq=9, ack=1001)
    out = ok(dp.run("kp_to_netdev", reply))
    assert (
        out.hex() == tcp6_frame(NODE6, EXT_CLIENT, NODEPORT, 5555, TCP_SYN | TCP_ACK, seq=9, ack=1001).hex()
    )
    fwd = dp.ct6(ct6_key(EXT_CLIENT, NODE6, 5555, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.ESTABLISHED
    assert fwd.flags & CtFlag.EXTERNAL and fwd.flags & CtFlag.LOCAL_BE
    assert dp.stat(Stat.REVNAT)[0] == 1 and dp.stat(Stat.TO_NETDEV)[0] == 1


def test_to_netdev_translates_only_the_nodes_own_replies(dp: Datapath) -> None:
    """Forwarded pod traffic pays no conntrack lookup in kp_to_netdev: without a node address, or from
    a pod address, a reply passes as it is."""
    dp.add_service6(LB6, SPORT, IPPROTO_TCP, [BE1], flags=SvcFlag.LOADBALANCER)
    ok(dp.run("kp_from_netdev", from_client(LB6, SPORT, TCP_SYN, src=EXT_CLIENT)))
    unchanged(dp, "kp_to_netdev", from_backend(BE1, TCP_SYN | TCP_ACK, dst=EXT_CLIENT))
    assert dp.stat(Stat.REVNAT)[0] == 0


def test_external_flow_to_a_local_backend_reply_is_translated(dp: Datapath) -> None:
    """The reply of a local backend to an outside client through kp_from_pod: the frontend restored (the
    FIB lookup that would forward it finds no route in PROG_TEST_RUN, so the kernel routes it)."""
    local = Backend(ID6_BASE + 8, "fd00:10:244:1::9", 8080, BackendFlag.LOCAL)
    dp.add_service6(LB6, SPORT, IPPROTO_TCP, [local], flags=SvcFlag.LOADBALANCER | SvcFlag.ETP_LOCAL)
    ok(dp.run("kp_from_netdev", from_client(LB6, SPORT, TCP_SYN, src=EXT_CLIENT)))
    reply = from_backend(local, TCP_SYN | TCP_ACK, dst=EXT_CLIENT)
    out = dp.run("kp_from_pod", reply)
    assert out.retval in (TC_ACT_OK, TC_ACT_REDIRECT)
    got = parse6(out.data_out)
    assert (got.src, got.sport, got.dst, got.dport) == (LB6, SPORT, EXT_CLIENT, CPORT)
    assert checksum_errors6(out.data_out) == []
    fwd = dp.ct6(fwd_key(LB6, client=EXT_CLIENT))
    assert fwd is not None and fwd.state == CtState.ESTABLISHED and fwd.flags & CtFlag.SEEN_REPLY


def test_etp_local_without_local_backend_drops_from_outside(dp: Datapath) -> None:
    flags = SvcFlag.LOADBALANCER | SvcFlag.ETP_LOCAL | SvcFlag.TWO_SCOPES
    dp.add_service6(LB6, SPORT, IPPROTO_TCP, [BE1], flags=flags, scope=Scope.INT)
    dp.add_service6(LB6, SPORT, IPPROTO_TCP, [], flags=flags | SvcFlag.NO_LOCAL_DROP)
    assert dp.run("kp_from_netdev", from_client(LB6, SPORT, TCP_SYN, src=EXT_CLIENT)).retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_NO_LOCAL_BACKEND)[0] == 1
    # pods still reach every backend through the INT entry
    assert parse6(ok(dp.run("kp_from_pod", from_client(LB6, SPORT, TCP_SYN)))).dst == BE1.addr


def test_source_ranges_check_new_flows_only(dp: Datapath) -> None:
    allowed, other = "2001:db8:aa::1", "2001:db8:bb::1"
    dp.add_service6(
        LB6, SPORT, IPPROTO_TCP, [BE1], flags=SvcFlag.LOADBALANCER | SvcFlag.SRC_RANGES, svc_id=SVC_ID
    )
    dp.lbsrc6.update(LbSrc6Key(32 + 48, SVC_ID, in6("2001:db8:aa::")), LbSrc4Val(0))
    ok(dp.run("kp_from_netdev", from_client(LB6, SPORT, TCP_SYN, src=allowed)))
    for k in list(dp.lbsrc6.iter_keys()):
        dp.lbsrc6.delete(k)
    out = ok(dp.run("kp_from_netdev", from_client(LB6, SPORT, TCP_ACK, src=allowed, payload=b"GET /")))
    assert out.hex() == from_client(BE1.addr, BE1.port, TCP_ACK, src=allowed, payload=b"GET /").hex()
    assert dp.stat(Stat.DROP_SRC_RANGE)[0] == 0
    assert dp.run(
        "kp_from_netdev", from_client(LB6, SPORT, TCP_SYN, src=allowed, sport=CPORT + 1)
    ).retval == (TC_ACT_SHOT)
    assert dp.run("kp_from_netdev", from_client(LB6, SPORT, TCP_SYN, src=other)).retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_SRC_RANGE)[0] == 2


def test_source_ranges_do_not_apply_without_backends(dp: Datapath) -> None:
    """kube-proxy uses the firewall chain only when the service has endpoints; else REJECT for all."""
    dp.add_service6(
        LB6, SPORT, IPPROTO_TCP, [], flags=SvcFlag.LOADBALANCER | SvcFlag.SRC_RANGES, svc_id=SVC_ID
    )
    dp.lbsrc6.update(LbSrc6Key(32 + 48, SVC_ID, in6("2001:db8:aa::")), LbSrc4Val(0))
    out = dp.run("kp_from_netdev", from_client(LB6, SPORT, TCP_SYN, src="2001:db8:bb::1"))
    assert out.retval == TC_ACT_REDIRECT and dp.stat(Stat.REJECT)[0] == 1
    assert dp.stat(Stat.DROP_SRC_RANGE)[0] == 0


# ---- REJECT with extension headers ----
@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_reject_quotes_the_extension_headers(dp: Datapath, proto: int) -> None:
    exts = [ext(IPPROTO_HOPOPTS), ext(IPPROTO_DSTOPTS, 1)]
    dp.add_service6(SVC, SPORT, proto, [])
    if proto == IPPROTO_TCP:
        upper, l4_len = tcp6(CLIENT, SVC, CPORT, SPORT), 20
    else:
        upper, l4_len = udp6(CLIENT, SVC, CPORT, SPORT, b"z" * 200), 8
    frame = ether(ipv6(CLIENT, SVC, proto, upper, exts=exts), ETH_P_IPV6)
    out = ok(dp.run("kp_from_pod", frame), TC_ACT_REDIRECT)
    quote = frame[ETH_HLEN : ETH_HLEN + 40 + 8 + 16 + l4_len]
    want = (
        swap_macs(frame)[:12]
        + icmp6_frame(SVC, CLIENT, ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH, 0, quote)[12:]
    )
    assert parse6(out).hop_limit == 64
    assert out.hex() == want.hex()


def test_reject_quote_is_capped(dp: Datapath) -> None:
    """Extension headers longer than the quote room (KP_ICMP6_QUOTE_MAX 124 bytes): the quote is cut,
    the message still valid."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [])
    exts = [ext(IPPROTO_DSTOPTS, 9)]  # 80 bytes
    frame = ether(ipv6(CLIENT, SVC, IPPROTO_TCP, tcp6(CLIENT, SVC, CPORT, SPORT), exts=exts), ETH_P_IPV6)
    out = ok(dp.run("kp_from_pod", frame), TC_ACT_REDIRECT)
    got = parse6(out)
    assert (got.icmp_type, got.icmp_code) == (ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH)
    assert got.l4[8:] == frame[ETH_HLEN : ETH_HLEN + 124]


def test_later_fragment_to_a_service_without_backends_is_dropped_not_answered(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [])
    first, later = fragments6(CLIENT, SVC, IPPROTO_UDP, udp6(CLIENT, SVC, CPORT, SPORT, bytes(2000)))
    assert dp.run("kp_from_pod", first).retval == TC_ACT_REDIRECT
    assert dp.run("kp_from_pod", later).retval == TC_ACT_SHOT
    assert dp.stat(Stat.REJECT)[0] == 1 and dp.stat(Stat.DROP_FRAGMENT)[0] == 1
    assert dp.stat(Stat.DROP_REJECT_FAILED)[0] == 0


# ---- fragments ----
def _send_all(dp: Datapath, prog: str, frames: list[bytes]) -> list[bytes]:
    out = []
    for f in frames:
        r = dp.run(prog, f)
        assert r.retval == TC_ACT_OK
        out.append(r.data_out)
    return out


def _l4_ok(src: str, dst: str, proto: int, l4: bytes) -> bool:
    return csum(pseudo6(src, dst, proto, len(l4)) + l4) == 0


def test_udp_datagram_of_8k_fragments_to_a_clusterip_and_its_reply(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])
    payload = bytes(range(256)) * 32
    request = fragments6(CLIENT, SVC, IPPROTO_UDP, udp6(CLIENT, SVC, CPORT, SPORT, payload))
    assert len(request) == 7
    src, dst, l4 = reassemble6(_send_all(dp, "kp_from_pod", request))
    assert (src, dst) == (CLIENT, BE1.addr)
    assert struct.unpack("!HH", l4[:4]) == (CPORT, BE1.port) and l4[8:] == payload
    assert _l4_ok(src, dst, IPPROTO_UDP, l4), "UDP checksum over the reassembled datagram"
    assert dp.stat(Stat.FRAG_FIRST)[0] == 1 and dp.stat(Stat.FRAG_LATER)[0] == 6
    assert dp.stat(Stat.PASS_FRAGMENT)[0] == 0
    reply = fragments6(
        BE1.addr, CLIENT, IPPROTO_UDP, udp6(BE1.addr, CLIENT, BE1.port, CPORT, payload[::-1]), ident=7
    )
    src, dst, l4 = reassemble6(_send_all(dp, "kp_to_pod", reply))
    assert (src, dst) == (SVC, CLIENT) and struct.unpack("!HH", l4[:4]) == (SPORT, CPORT)
    assert _l4_ok(src, dst, IPPROTO_UDP, l4), "reply UDP checksum"


def test_fragments_behind_a_hop_by_hop_header(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])
    upper = udp6(CLIENT, SVC, CPORT, SPORT, b"w" * 3000)
    frames = fragments6(CLIENT, SVC, IPPROTO_UDP, upper, unfragmentable=[ext(IPPROTO_HOPOPTS)])
    src, dst, l4 = reassemble6(_send_all(dp, "kp_from_pod", frames))
    assert (src, dst) == (CLIENT, BE1.addr) and _l4_ok(src, dst, IPPROTO_UDP, l4)
    assert dp.stat(Stat.FRAG_LATER)[0] == len(frames) - 1


def test_fragments_with_destination_options_in_the_fragmentable_part(dp: Datapath) -> None:
    """Linux's ip6_fragment keeps a destination options header that is not followed by a routing header
    in the fragmentable part (ip6_find_1stfragopt): only the first fragment carries it, and every later
    fragment's fragment header names it as next header while its bytes are payload. The later fragments
    must follow the first all the same."""
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])
    upper = udp6(CLIENT, SVC, CPORT, SPORT, b"y" * 3000)
    frames = fragments6(CLIENT, SVC, IPPROTO_UDP, upper, fragmentable=[ext(IPPROTO_DSTOPTS)])
    out = _send_all(dp, "kp_from_pod", frames)
    assert parse6(out[0]).dst == BE1.addr
    later_dsts = [parse6(f).dst for f in out[1:]]
    assert later_dsts == [BE1.addr] * (len(frames) - 1), (
        f"later fragments left to {later_dsts}; FRAG_LATER {dp.stat(Stat.FRAG_LATER)[0]}, "
        f"PASS_FRAGMENT {dp.stat(Stat.PASS_FRAGMENT)[0]}"
    )
    _, _, body = reassemble6(out)
    l4 = body[8:]  # after the destination options header
    assert _l4_ok(CLIENT, BE1.addr, IPPROTO_UDP, l4)


def test_tcp_first_fragment_and_its_later_fragment(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    upper = tcp6(CLIENT, SVC, CPORT, SPORT, TCP_ACK, payload=b"p" * 2000)
    frames = fragments6(CLIENT, SVC, IPPROTO_TCP, upper)
    assert dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)).retval == TC_ACT_OK
    src, dst, l4 = reassemble6(_send_all(dp, "kp_from_pod", frames))
    assert (src, dst) == (CLIENT, BE1.addr) and struct.unpack("!HH", l4[:4]) == (CPORT, BE1.port)
    assert _l4_ok(src, dst, IPPROTO_TCP, l4)
    assert dp.stat(Stat.CT_NEW)[0] == 1


# ---- ICMPv6 errors about translated flows ----
ICMP_ERRORS = {
    "no route": (ICMP6_DEST_UNREACH, 0, 0),
    "admin prohibited": (ICMP6_DEST_UNREACH, 1, 0),
    "address unreachable": (ICMP6_DEST_UNREACH, 3, 0),
    "port unreachable": (ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH, 0),
    "packet too big": (ICMP6_PKT_TOOBIG, 0, 1280),
    "hop limit exceeded": (ICMP6_TIME_EXCEED, 0, 0),
    "reassembly time exceeded": (ICMP6_TIME_EXCEED, 1, 0),
    "parameter problem": (4, 0, 6),
}


def restored_quote(quote: bytes, l4_off: int, front: str, front_port: int) -> bytes:
    """The quote of a client -> backend packet made about client -> frontend: the quoted destination
    address and port replaced, the quoted L4 checksum left as it was (stale, as for IPv4)."""
    b = bytearray(quote)
    b[24:40] = in6_bytes(front)
    if len(b) >= l4_off + 4:
        struct.pack_into("!H", b, l4_off + 2, front_port)
    return bytes(b)


def in6_bytes(text: str) -> bytes:
    return bytes(in6(text))


@pytest.mark.parametrize("what", ICMP_ERRORS, ids=list(ICMP_ERRORS))
@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod", "kp_to_netdev"])
def test_icmp6_error_from_a_router_is_reverse_translated(dp: Datapath, prog: str, what: str) -> None:
    itype, code, rest = ICMP_ERRORS[what]
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dnated = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    quote = dnated[ETH_HLEN : ETH_HLEN + 40 + 20]
    out = ok(dp.run(prog, icmp6_frame(ROUTER, CLIENT, itype, code, rest, quote)))
    want = icmp6_frame(ROUTER, CLIENT, itype, code, rest, restored_quote(quote, 40, SVC, SPORT))
    assert out.hex() == want.hex()
    assert want[ETH_HLEN:][40 + 8 : 40 + 8 + 40] == from_client(SVC, SPORT, TCP_SYN)[ETH_HLEN : ETH_HLEN + 40]
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 1


@pytest.mark.parametrize("what", ["port unreachable", "admin prohibited", "packet too big"])
def test_icmp6_error_from_the_backend_itself_comes_from_the_frontend(dp: Datapath, what: str) -> None:
    itype, code, rest = ICMP_ERRORS[what]
    dp.add_service6(SVC, 53, IPPROTO_UDP, [BE2])
    dnated = ok(dp.run("kp_from_pod", udp6_frame(CLIENT, SVC, CPORT, 53, b"query")))
    quote = dnated[ETH_HLEN:]
    for prog in ("kp_from_pod", "kp_to_pod"):
        out = ok(dp.run(prog, icmp6_frame(BE2.addr, CLIENT, itype, code, rest, quote)))
        want = icmp6_frame(SVC, CLIENT, itype, code, rest, restored_quote(quote, 40, SVC, 53))
        assert out.hex() == want.hex()
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 2


QUOTED_EXTS = {
    "hop-by-hop": [ext(IPPROTO_HOPOPTS)],
    "routing + destination options": [ext(IPPROTO_ROUTING, 2), ext(IPPROTO_DSTOPTS, 1)],
    "first fragment": [frag_hdr(0, True, 0x99)],
    "hop-by-hop + destination options + first fragment": [
        ext(IPPROTO_HOPOPTS),
        ext(IPPROTO_DSTOPTS),
        frag_hdr(0, True, 0x98),
    ],
}


@pytest.mark.parametrize("chain", QUOTED_EXTS, ids=list(QUOTED_EXTS))
@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod", "kp_to_netdev"])
def test_icmp6_error_quoting_extension_headers(dp: Datapath, prog: str, chain: str) -> None:
    exts = QUOTED_EXTS[chain]
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])
    frame = ether(
        ipv6(CLIENT, SVC, IPPROTO_UDP, udp6(CLIENT, SVC, CPORT, SPORT, b"data"), exts=exts), ETH_P_IPV6
    )
    dnated = ok(dp.run("kp_from_pod", frame))
    quote = dnated[ETH_HLEN:]
    l4_off = parse6(dnated).l4_off
    assert parse6(dnated).dst == BE1.addr
    out = ok(dp.run(prog, icmp6_frame(ROUTER, CLIENT, ICMP6_TIME_EXCEED, 0, 0, quote)))
    want = icmp6_frame(ROUTER, CLIENT, ICMP6_TIME_EXCEED, 0, 0, restored_quote(quote, l4_off, SVC, SPORT))
    assert out.hex() == want.hex()
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 1


def test_icmp6_error_with_a_minimal_quote(dp: Datapath) -> None:
    """The quote carries only the ports (4 bytes of L4): still enough to find and translate the flow."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dnated = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    quote = dnated[ETH_HLEN : ETH_HLEN + 44]
    out = ok(dp.run("kp_to_pod", icmp6_frame(ROUTER, CLIENT, ICMP6_TIME_EXCEED, 0, 0, quote)))
    assert (
        out.hex()
        == icmp6_frame(ROUTER, CLIENT, ICMP6_TIME_EXCEED, 0, 0, restored_quote(quote, 40, SVC, SPORT)).hex()
    )


@pytest.mark.parametrize("cut", [0, 20, 39, 40, 43, 40 + 4])
def test_icmp6_error_with_a_quote_cut_short_passes(dp: Datapath, cut: int) -> None:
    """A quote cut before the ports (or inside a quoted extension header) is no flow of ours."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    exts = [ext(IPPROTO_DSTOPTS, 1)] if cut == 44 else None
    frame = ether(ipv6(CLIENT, SVC, IPPROTO_TCP, tcp6(CLIENT, SVC, CPORT, SPORT), exts=exts), ETH_P_IPV6)
    dnated = ok(dp.run("kp_from_pod", frame))
    quote = dnated[ETH_HLEN : ETH_HLEN + cut]
    unchanged(dp, "kp_to_pod", icmp6_frame(ROUTER, CLIENT, ICMP6_TIME_EXCEED, 0, 0, quote))
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 0


@pytest.mark.parametrize("icmp_type", [0, 5, 100, 127, ICMP6_ECHO_REQUEST, 129, 138, 255])
def test_icmp6_messages_that_are_no_errors_of_ours_pass(dp: Datapath, icmp_type: int) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dnated = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    quote = dnated[ETH_HLEN : ETH_HLEN + 60]
    for prog in ("kp_from_pod", "kp_to_pod", "kp_to_netdev"):
        unchanged(dp, prog, icmp6_frame(ROUTER, CLIENT, icmp_type, 0, 0, quote))
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 0


def test_icmp6_error_from_netdev_is_not_translated(dp: Datapath) -> None:
    """As for IPv4: kp_from_netdev translates ICMP errors only about SNATed flows (none for IPv6 yet)."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dnated = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    unchanged(dp, "kp_from_netdev", icmp6_frame(ROUTER, CLIENT, ICMP6_PKT_TOOBIG, 0, 1280, dnated[ETH_HLEN:]))


def test_icmp6_error_about_a_hairpin_flow(dp: Datapath) -> None:
    """An error quoting the hairpinned packet (hairpin address -> the pod itself) is found by the flow's
    REPLY entry; its quoted destination becomes the frontend."""
    me = Backend(ID6_BASE + 9, CLIENT, 8080, BackendFlag.LOCAL)
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [me])
    sent = ok(dp.run("kp_from_pod", udp6_frame(CLIENT, SVC, CPORT, SPORT, b"x")), TC_ACT_REDIRECT)
    quote = sent[ETH_HLEN:]
    out = ok(dp.run("kp_from_pod", icmp6_frame(CLIENT, HAIRPIN6, ICMP6_DEST_UNREACH, 4, 0, quote)))
    assert parse6(out).l4[8 + 24 : 8 + 40] == in6_bytes(SVC)
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 1


def test_icmp6_error_about_an_expired_flow_passes(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dnated = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    rep = dp.ct6(reply_key())
    assert rep is not None
    rep.expires_ns = time.monotonic_ns() - SEC
    dp.put_ct6(reply_key(), rep)
    unchanged(
        dp,
        "kp_to_pod",
        icmp6_frame(ROUTER, CLIENT, ICMP6_TIME_EXCEED, 0, 0, dnated[ETH_HLEN : ETH_HLEN + 60]),
    )


def test_fragmented_icmp6_error_passes(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    dnated = ok(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)))
    msg = icmp6(ROUTER, CLIENT, ICMP6_TIME_EXCEED, 0, 0, dnated[ETH_HLEN:])
    frame = ether(ipv6(ROUTER, CLIENT, IPPROTO_ICMPV6, msg, exts=[frag_hdr(0, True, 5)]), ETH_P_IPV6)
    unchanged(dp, "kp_to_pod", frame)
    assert dp.stat(Stat.PASS_FRAGMENT)[0] == 1


# ---- counters ----
def test_counters_count_ipv6_packets_and_bytes(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    frames = [
        from_client(SVC, SPORT, TCP_SYN),
        from_client(SVC, SPORT, TCP_ACK, payload=b"x" * 100),
        from_client("fd00:96::99", SPORT, TCP_SYN),
    ]
    for f in frames:
        dp.run("kp_from_pod", f)
    assert dp.stat(Stat.FROM_POD) == (3, sum(len(f) for f in frames))
    assert dp.stat(Stat.DNAT) == (2, len(frames[0]) + len(frames[1]))
    assert dp.stat(Stat.CT_NEW) == (1, len(frames[0]))
    replies = [from_backend(BE1, TCP_SYN | TCP_ACK), from_backend(BE1, TCP_ACK, payload=b"y" * 50)]
    for f in replies:
        dp.run("kp_to_pod", f)
    assert dp.stat(Stat.TO_POD) == (2, sum(len(f) for f in replies))
    assert dp.stat(Stat.REVNAT) == (2, sum(len(f) for f in replies))
    nd = ether(
        ipv6(CLIENT, SVC, IPPROTO_ICMPV6, icmp6(CLIENT, SVC, 135, 0, 0, bytes(16)), hop_limit=255), ETH_P_IPV6
    )
    dp.run("kp_from_netdev", nd)
    dp.run("kp_to_netdev", nd)
    dp.run("kp_to_netdev", frames[0])
    assert dp.stat(Stat.FROM_NETDEV) == (1, len(nd))
    assert dp.stat(Stat.TO_NETDEV) == (2, len(nd) + len(frames[0]))
    # nothing counted twice: the IPv6 path does not run the IPv4 one as well
    assert dp.stat(Stat.FROM_POD)[0] == 3 and dp.stat(Stat.TO_POD)[0] == 2


def test_reject_and_drops_count_bytes(dp: Datapath) -> None:
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [])
    dp.add_service6(SVC2, SPORT, IPPROTO_UDP, [], flags=SvcFlag.NO_LOCAL_DROP, svc_id=SVC2_ID)
    rejected = udp6_frame(CLIENT, SVC, CPORT, SPORT, b"a" * 33)
    dropped = udp6_frame(CLIENT, SVC2, CPORT, SPORT, b"b" * 77)
    dp.run("kp_from_pod", rejected)
    dp.run("kp_from_pod", dropped)
    assert dp.stat(Stat.REJECT) == (1, len(rejected))
    assert dp.stat(Stat.DROP_NO_LOCAL_BACKEND) == (1, len(dropped))


# ---- the extension-header limit ----
@pytest.mark.parametrize("count", [5, 6])
def test_up_to_six_extension_headers_are_followed(dp: Datapath, count: int) -> None:
    """KP_IP6_EXT_MAX (6) headers are walked; test_bpf_ipv6.py pins that a seventh makes the packet pass."""
    dp.add_service6(SVC, SPORT, IPPROTO_TCP, [BE1])
    exts = [ext(IPPROTO_HOPOPTS)] + [ext(IPPROTO_DSTOPTS) for _ in range(count - 1)]
    frame = ether(ipv6(CLIENT, SVC, IPPROTO_TCP, tcp6(CLIENT, SVC, CPORT, SPORT), exts=exts), ETH_P_IPV6)
    want = ether(
        ipv6(CLIENT, BE1.addr, IPPROTO_TCP, tcp6(CLIENT, BE1.addr, CPORT, BE1.port), exts=exts), ETH_P_IPV6
    )
    out = ok(dp.run("kp_from_pod", frame))
    assert out.hex() == want.hex(), f"{count} extension headers: not translated"


def test_atomic_fragment_is_a_whole_datagram(dp: Datapath) -> None:
    """A fragment header with offset 0 and no more fragments (RFC 6946): translated as the datagram it is."""
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])
    exts = [frag_hdr(0, False, 0x77)]
    frame = ether(ipv6(CLIENT, SVC, IPPROTO_UDP, udp6(CLIENT, SVC, CPORT, SPORT), exts=exts), ETH_P_IPV6)
    want = ether(
        ipv6(CLIENT, BE1.addr, IPPROTO_UDP, udp6(CLIENT, BE1.addr, CPORT, BE1.port), exts=exts), ETH_P_IPV6
    )
    assert ok(dp.run("kp_from_pod", frame)).hex() == want.hex()
    assert dp.stat(Stat.FRAG_FIRST)[0] == 0 and dp.stat(Stat.PASS_FRAGMENT)[0] == 0


def test_icmp6_error_quoting_a_later_fragment_passes(dp: Datapath) -> None:
    """A router's error about a later fragment quotes data, not ports (Linux's icmpv6_notify ignores it:
    ipv6_skip_exthdr stops at such a fragment header). Data that happens to read as the flow's ports
    must not be rewritten as if it were a UDP header."""
    dp.add_service6(SVC, SPORT, IPPROTO_UDP, [BE1])
    payload = bytes(1232 - 8) + struct.pack("!HH", CPORT, BE1.port) + b"z" * 2000  # starts fragment 2
    frames = fragments6(CLIENT, SVC, IPPROTO_UDP, udp6(CLIENT, SVC, CPORT, SPORT, payload))
    out = _send_all(dp, "kp_from_pod", frames)
    second = out[1]
    assert parse6(second).dst == BE1.addr
    assert second[ETH_HLEN + 48 : ETH_HLEN + 52] == struct.pack("!HH", CPORT, BE1.port)
    quote = second[ETH_HLEN : ETH_HLEN + 48 + 64]
    unchanged(dp, "kp_to_pod", icmp6_frame(ROUTER, CLIENT, ICMP6_TIME_EXCEED, 0, 0, quote))
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 0
