"""PROG_TEST_RUN cases for re-used tuples: a client port used for a Service flow, then again for a
connection straight to the backend or through another frontend, while the old flow's conntrack
entries still live (CLOSING/CLOSED entries stay for the fin timeout).

Bench finding (`python -m bench.run --direct-after-service`: ~30 conn/s with timeouts instead of
~15,000): the backend's SYN-ACK of the direct connection matched the old flow's REPLY entry and was
rewritten to come from the ClusterIP, so the client reset it, every retry.
"""

from __future__ import annotations

import pytest
from datapath import TC_ACT_OK, TC_ACT_SHOT, Backend, Datapath, ct_key
from frames import IPPROTO_TCP, SYN_OPTIONS, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, parse, tcp_frame

from kproxy.abi import CtDir, CtState, Stat, ip_to_nbo

pytestmark = pytest.mark.root

CLIENT, CPORT = "10.244.1.5", 40000
SVC, SVC2, SPORT = "10.96.0.10", "10.96.0.20", 80
BE1 = Backend(1, "10.244.2.7", 8080)
BE2 = Backend(2, "10.244.3.9", 9090)


def fwd_key(svc: str = SVC) -> object:
    return ct_key(CLIENT, svc, CPORT, SPORT, IPPROTO_TCP, CtDir.FWD)


def reply_key(be: Backend = BE1) -> object:
    return ct_key(be.addr, CLIENT, be.port, CPORT, IPPROTO_TCP, CtDir.REPLY)


def from_client(dst: str, dport: int, flags: int) -> bytes:
    opts = SYN_OPTIONS if flags & TCP_SYN else b""
    return tcp_frame(CLIENT, dst, CPORT, dport, flags, options=opts)


def from_backend(be: Backend, flags: int, src: str | None = None, sport: int | None = None) -> bytes:
    opts = SYN_OPTIONS if flags & TCP_SYN else b""
    return tcp_frame(src or be.addr, CLIENT, sport or be.port, CPORT, flags, seq=7000, ack=2001, options=opts)


def service_flow(dp: Datapath, state: CtState, svc: str = SVC, be: Backend = BE1) -> None:
    """A whole connection client:CPORT -> svc:SPORT (-> be), left in `state` in conntrack."""
    assert parse(dp.run("kp_from_pod", from_client(svc, SPORT, TCP_SYN)).data_out).dst == be.addr
    synack = dp.run("kp_to_pod", from_backend(be, TCP_SYN | TCP_ACK))
    assert parse(synack.data_out).src == svc
    dp.run("kp_from_pod", from_client(svc, SPORT, TCP_ACK))
    if state == CtState.CLOSING:
        dp.run("kp_to_pod", from_backend(be, TCP_FIN | TCP_ACK))
        dp.run("kp_from_pod", from_client(svc, SPORT, TCP_FIN | TCP_ACK))
    elif state == CtState.CLOSED:
        dp.run("kp_from_pod", from_client(svc, SPORT, TCP_RST))
    fwd = dp.ct(fwd_key(svc))
    assert fwd is not None and fwd.state == state


@pytest.mark.parametrize("state", [CtState.CLOSING, CtState.CLOSED], ids=["closing", "closed"])
@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod"])
def test_syn_ack_on_a_closed_flow_is_not_translated(dp: Datapath, prog: str, state: CtState) -> None:
    """The direct SYN was not seen here (kp_ct_direct_syn did not run): the backend's SYN-ACK to the
    re-used client port passes as it is, the old flow is deleted, later packets pass too."""
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, state)
    synack = from_backend(BE1, TCP_SYN | TCP_ACK)
    out = dp.run(prog, synack)
    assert (out.retval, out.data_out.hex()) == (TC_ACT_OK, synack.hex())
    assert dp.stat(Stat.CT_STALE_REPLY)[0] == 1
    assert dp.ct(reply_key()) is None and dp.ct(fwd_key()) is None
    ack = from_backend(BE1, TCP_ACK)
    out = dp.run(prog, ack)
    assert (out.retval, out.data_out.hex()) == (TC_ACT_OK, ack.hex())


def test_retransmitted_syn_ack_of_an_open_flow_is_translated(dp: Datapath) -> None:
    """A backend repeats its SYN-ACK when the client's ACK got lost or a full accept queue dropped it:
    same connection, ESTABLISHED in conntrack, must still come from the frontend."""
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, CtState.ESTABLISHED)
    for _ in range(2):
        out = dp.run("kp_to_pod", from_backend(BE1, TCP_SYN | TCP_ACK))
        assert out.data_out.hex() == from_backend(BE1, TCP_SYN | TCP_ACK, src=SVC, sport=SPORT).hex()
    assert dp.stat(Stat.CT_STALE_REPLY)[0] == 0
    assert dp.ct(reply_key()) is not None


@pytest.mark.parametrize("state", [CtState.CLOSING, CtState.CLOSED], ids=["closing", "closed"])
def test_direct_syn_takes_the_tuple_over(dp: Datapath, state: CtState) -> None:
    """The client's SYN straight to the backend, from the port of a finished Service flow, removes
    that flow: the backend's answer then needs no special case."""
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, state)
    direct = from_client(BE1.addr, BE1.port, TCP_SYN)
    out = dp.run("kp_from_pod", direct)
    assert (out.retval, out.data_out.hex()) == (TC_ACT_OK, direct.hex())
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 1
    assert dp.ct_entries() == {}
    synack = from_backend(BE1, TCP_SYN | TCP_ACK)
    assert dp.run("kp_to_pod", synack).data_out.hex() == synack.hex()
    assert dp.stat(Stat.CT_STALE_REPLY)[0] == 0


@pytest.mark.parametrize("state", [CtState.SYN_SENT, CtState.ESTABLISHED], ids=["syn-sent", "established"])
def test_direct_syn_leaves_a_live_flow(dp: Datapath, state: CtState) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    if state == CtState.SYN_SENT:
        dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN))
    else:
        service_flow(dp, state)
    dp.run("kp_from_pod", from_client(BE1.addr, BE1.port, TCP_SYN))
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 0
    assert dp.ct(fwd_key()) is not None and dp.ct(reply_key()) is not None


def test_new_flow_through_another_frontend_takes_the_reply_over(dp: Datapath) -> None:
    """Two Services share a backend; the client re-uses its port for the second after the first
    closed. Both flows have the same REPLY key: the new one owns it, the old FWD entry goes (else its
    next refresh writes the old frontend back into the REPLY entry)."""
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1], svc_id=1)
    dp.add_service(SVC2, SPORT, IPPROTO_TCP, [BE1], svc_id=2)
    service_flow(dp, CtState.CLOSING)
    out = dp.run("kp_from_pod", from_client(SVC2, SPORT, TCP_SYN))
    assert parse(out.data_out).dst == BE1.addr
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 1
    assert dp.ct(fwd_key(SVC)) is None
    rep = dp.ct(reply_key())
    assert rep is not None and rep.svc_id == 2 and rep.state == CtState.SYN_SENT
    out = dp.run("kp_to_pod", from_backend(BE1, TCP_SYN | TCP_ACK))
    assert parse(out.data_out).src == SVC2


def test_new_flow_never_takes_an_established_flows_reply(dp: Datapath) -> None:
    """Linux connect() re-uses a local port for another destination: a probe from the port of a live
    stream to another Service balanced to the stream's backend (soak: "stream-n1p4-0 to n1p1 broke:
    ConnectionResetError"). Taking the REPLY entry over deleted the stream's FWD entry, and the backend's
    challenge ACK to the probe's SYN, answered by the probe socket's RST, reset the stream on the
    backend. The established flow keeps its entries; the new flow gets a backend whose tuple is free."""
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1], svc_id=1)
    dp.add_service(SVC2, SPORT, IPPROTO_TCP, [BE1, BE2], svc_id=2)
    service_flow(dp, CtState.ESTABLISHED)
    stream_fwd, stream_reply = bytes(dp.ct(fwd_key(SVC))), bytes(dp.ct(reply_key()))
    for _ in range(20):  # a draw of BE1 four times in a row is dropped; the SYN is retransmitted
        out = dp.run("kp_from_pod", from_client(SVC2, SPORT, TCP_SYN))
        if out.data_out and parse(out.data_out).dst == BE2.addr:
            break
    else:
        pytest.fail("the new flow never got the backend with a free reply tuple")
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 0
    assert bytes(dp.ct(fwd_key(SVC))) == stream_fwd and bytes(dp.ct(reply_key())) == stream_reply
    assert dp.ct(fwd_key(SVC2)).nat_addr == ip_to_nbo(BE2.addr)
    # the stream goes on through its own frontend
    out = dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK))
    assert parse(out.data_out).dst == BE1.addr and dp.stat(Stat.CT_REOPEN)[0] == 0
    out = dp.run("kp_to_pod", from_backend(BE1, TCP_ACK))
    assert parse(out.data_out).src == SVC


def test_new_flow_with_only_a_held_backend_is_dropped(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1], svc_id=1)
    dp.add_service(SVC2, SPORT, IPPROTO_TCP, [BE1], svc_id=2)
    service_flow(dp, CtState.ESTABLISHED)
    stream_fwd, stream_reply = bytes(dp.ct(fwd_key(SVC))), bytes(dp.ct(reply_key()))
    out = dp.run("kp_from_pod", from_client(SVC2, SPORT, TCP_SYN))
    assert out.retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_TUPLE_HELD)[0] == 1 and dp.stat(Stat.CT_TAKEOVER)[0] == 0
    assert dp.ct(fwd_key(SVC2)) is None
    assert bytes(dp.ct(fwd_key(SVC))) == stream_fwd and bytes(dp.ct(reply_key())) == stream_reply


def test_reopened_flow_drops_the_old_backends_reply(dp: Datapath) -> None:
    """The client re-opens its tuple to the Service and gets another backend: the old backend's
    REPLY entry goes at once. A late FIN of the old backend then passes untranslated instead of
    writing the old backend back into the FWD entry of the new flow."""
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE1])
    service_flow(dp, CtState.CLOSING)
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [BE2])  # slot 1 now names BE2
    assert parse(dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_SYN)).data_out).dst == BE2.addr
    assert dp.stat(Stat.CT_REOPEN)[0] == 1
    assert dp.ct(reply_key(BE1)) is None and dp.ct(reply_key(BE2)) is not None
    late = from_backend(BE1, TCP_FIN | TCP_ACK)
    assert dp.run("kp_to_pod", late).data_out.hex() == late.hex()
    fwd = dp.ct(fwd_key())
    assert fwd is not None and fwd.backend_id == BE2.id
    ack = dp.run("kp_from_pod", from_client(SVC, SPORT, TCP_ACK))
    assert parse(ack.data_out).dst == BE2.addr
