"""PROG_TEST_RUN tables for SCTP Services (issue 17): DNAT and reverse NAT with the CRC32c updated
incrementally (lib/sctp.h), a zero checksum (CHECKSUM_PARTIAL) left zero, conntrack states and
timeouts, REJECT, ICMP errors quoting SCTP, and NodePort SNAT from outside, for IPv4 and IPv6.

Every expected frame is built independently with a full CRC32c (kproxy.lab.sctp); the programs never
read the packet past the SCTP common header, so a valid checksum on the output proves the update.
"""

from __future__ import annotations

import ctypes
import struct
import time

import pytest
import test_bpf_external as ext
import test_bpf_external6 as ext6
from datapath import TC_ACT_OK, TC_ACT_REDIRECT, Backend, Datapath, ct6_key, ct_key
from frames import IPPROTO_ICMP, checksum_errors, ether, icmp, ipv4, parse, swap_macs
from frames6 import ETH_P_IPV6, ICMP6_PKT_TOOBIG, IPPROTO_ICMPV6, checksum_errors6, icmp6, ipv6, parse6
from test_bpf_external import (
    BE_REMOTE,
    GW_MAC,
    NODE,
    NODE2_MAC,
    NODEPORT,
    Lab,
    nodeport,
    ok,
    run_in,
    set_cfg,
    snat_entry,
)

from kproxy.abi import (
    ID6_BASE,
    IPPROTO_SCTP,
    MAP_SCTP,
    Config,
    CtDir,
    CtFlag,
    CtState,
    Stat,
    SvcFlag,
)
from kproxy.bpf.libbpf import BPF_F_TEST_SKB_CHECKSUM_COMPLETE
from kproxy.lab import sctp

pytestmark = pytest.mark.root
lab = ext.lab  # the netns fixtures bpf_fib_lookup needs (module scope)
lab6 = ext6.lab
EXT_CLIENT = ext.CLIENT
ext_frame = ext.frame

CLIENT, CPORT = "10.244.1.5", 40000
SVC, SPORT = "10.96.0.10", 80
BE = Backend(2, "10.244.3.9", 9090)  # targetPort 9090 != port 80
ROUTER = "10.244.2.1"
CLIENT6, SVC6 = "fd00:10:244:1::5", "fd00:96::1"
BE6 = Backend(ID6_BASE + 2, "fd00:10:244:3::9", 9090)
SEC = 10**9


def sctp_frame(src: str, dst: str, sport: int, dport: int, chunks: bytes, *, vtag: int = 0,
               checksum: bool = True) -> bytes:  # fmt: skip
    return ether(ipv4(src, dst, IPPROTO_SCTP, sctp.packet(sport, dport, vtag, chunks, checksum)))


def sctp6_frame(src: str, dst: str, sport: int, dport: int, chunks: bytes, *, vtag: int = 0,
                checksum: bool = True) -> bytes:  # fmt: skip
    return ether(ipv6(src, dst, IPPROTO_SCTP, sctp.packet(sport, dport, vtag, chunks, checksum)), ETH_P_IPV6)


def data_chunk(n: int) -> bytes:
    """A DATA chunk (type 0) of n payload bytes: TSN, stream, sequence, PPID, then the bytes."""
    return sctp.chunk(0, struct.pack("!IHHI", 7, 0, 0, 0) + bytes(range(256)) * (n // 256) + bytes(n % 256),
                      flags=3)  # fmt: skip


def sctp_of(frame: bytes) -> bytes:
    """The SCTP packet of an IPv4 or IPv6 frame, to the IP header's length (no Ethernet padding)."""
    p = parse(frame)
    return p.l4 if p.proto == IPPROTO_SCTP else parse6(frame).l4


def assert_sctp(frame: bytes, src: str, dst: str, sport: int, dport: int) -> None:
    pkt = sctp_of(frame)
    six = ":" in src
    got = parse6(frame) if six else parse(frame)
    assert (got.src, got.dst) == (src, dst)
    assert struct.unpack("!HH", pkt[:4]) == (sport, dport)
    assert sctp.crc_valid(pkt), f"CRC32c {sctp.checksum_field(pkt):#x} invalid"
    if not six:
        assert checksum_errors(frame) == []


def init(sport: int = CPORT, dport: int = SPORT, **kw: object) -> bytes:
    return sctp_frame(CLIENT, SVC, sport, dport, sctp.init_chunk(), **kw)  # type: ignore[arg-type]


# ---- IPv4 ClusterIP ----
def test_init_is_dnated_to_the_target_port_with_a_valid_crc(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [BE])
    before = time.monotonic_ns()
    out = dp.run("kp_from_pod", init())
    after = time.monotonic_ns()
    assert out.retval == TC_ACT_OK
    assert out.data_out.hex() == sctp_frame(CLIENT, BE.addr, CPORT, BE.port, sctp.init_chunk()).hex()
    assert_sctp(out.data_out, CLIENT, BE.addr, CPORT, BE.port)
    fwd = dp.ct(ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_SCTP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.SYN_SENT
    # nf_conntrack_proto_sctp's COOKIE_WAIT: 3 s until the peer answers
    assert before + 3 * SEC <= fwd.expires_ns <= after + 3 * SEC
    assert dp.ct(ct_key(BE.addr, CLIENT, BE.port, CPORT, IPPROTO_SCTP, CtDir.REPLY)) is not None
    assert dp.stat(Stat.DNAT)[0] == 1


@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod"])
def test_init_ack_is_reverse_translated_and_establishes(dp: Datapath, prog: str) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [BE])
    dp.run("kp_from_pod", init())
    reply = sctp_frame(BE.addr, CLIENT, BE.port, CPORT, sctp.init_ack_chunk(), vtag=0x11223344)
    before = time.monotonic_ns()
    out = dp.run(prog, reply)
    after = time.monotonic_ns()
    assert out.retval == TC_ACT_OK
    expected = sctp_frame(SVC, CLIENT, SPORT, CPORT, sctp.init_ack_chunk(), vtag=0x11223344)
    assert out.data_out.hex() == expected.hex()
    assert_sctp(out.data_out, SVC, CLIENT, SPORT, CPORT)
    fwd = dp.ct(ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_SCTP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.ESTABLISHED and fwd.flags & CtFlag.SEEN_REPLY
    assert before + 210 * SEC <= fwd.expires_ns <= after + 210 * SEC
    assert dp.stat(Stat.REVNAT)[0] == 1


@pytest.mark.parametrize("size", [0, 1, 255, 1000, 1400])
def test_crc_stays_valid_for_every_length(dp: Datapath, size: int) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [BE])
    out = dp.run("kp_from_pod", sctp_frame(CLIENT, SVC, CPORT, SPORT, data_chunk(size), vtag=0x5A5A5A5A))
    assert out.retval == TC_ACT_OK
    assert_sctp(out.data_out, CLIENT, BE.addr, CPORT, BE.port)


def test_ethernet_padding_is_not_part_of_the_crc(dp: Datapath) -> None:
    # a COOKIE ACK packet is 16 bytes: its frame (50 bytes) is padded to Ethernet's 60 on the wire
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [BE])
    frame = sctp_frame(CLIENT, SVC, CPORT, SPORT, sctp.chunk(sctp.COOKIE_ACK), vtag=9)
    out = dp.run("kp_from_pod", frame + bytes(60 - len(frame)))
    assert out.retval == TC_ACT_OK
    assert_sctp(out.data_out, CLIENT, BE.addr, CPORT, BE.port)


def test_zero_checksum_stays_zero(dp: Datapath) -> None:
    # CHECKSUM_PARTIAL: a local stack's SCTP carries 0, filled in later over the rewritten packet
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [BE])
    out = dp.run("kp_from_pod", init(checksum=False))
    assert out.retval == TC_ACT_OK
    pkt = sctp_of(out.data_out)
    assert struct.unpack("!HH", pkt[:4]) == (CPORT, BE.port) and sctp.checksum_field(pkt) == 0
    assert out.data_out.hex() == sctp_frame(CLIENT, BE.addr, CPORT, BE.port, sctp.init_chunk(),
                                            checksum=False).hex()  # fmt: skip


@pytest.mark.parametrize("chunk", [sctp.ABORT, sctp.SHUTDOWN_COMPLETE, sctp.SHUTDOWN])
def test_close_chunks_shorten_the_entry(dp: Datapath, chunk: int) -> None:
    cfg = Config()
    cfg.ct_sctp_close_timeout, cfg.ct_sctp_timeout = 4, 100
    dp.cfg.update(ctypes.c_uint32(0), cfg)
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [BE])
    dp.run("kp_from_pod", init())
    dp.run("kp_from_pod", sctp_frame(BE.addr, CLIENT, BE.port, CPORT, sctp.init_ack_chunk(), vtag=1))
    fwd = dp.ct(ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_SCTP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.ESTABLISHED
    assert fwd.expires_ns - time.monotonic_ns() > 50 * SEC  # the configured 100 s, not the default 210 s
    out = dp.run("kp_from_pod", sctp_frame(CLIENT, SVC, CPORT, SPORT, sctp.chunk(chunk), vtag=2))
    assert_sctp(out.data_out, CLIENT, BE.addr, CPORT, BE.port)
    fwd = dp.ct(ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_SCTP, CtDir.FWD))
    want = CtState.CLOSING if chunk == sctp.SHUTDOWN else CtState.CLOSED
    assert fwd is not None and fwd.state == want
    assert fwd.expires_ns - time.monotonic_ns() <= 4 * SEC


def test_data_without_conntrack_opens_a_flow_as_tcp_does(dp: Datapath) -> None:
    # as TCP's non-SYN: a packet of an association the node never saw start is balanced (an agent restart
    # keeps conntrack, so this is an association whose entry expired); it waits for a reply in SYN_SENT
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [BE])
    out = dp.run("kp_from_pod", sctp_frame(CLIENT, SVC, CPORT, SPORT, data_chunk(10), vtag=77))
    assert_sctp(out.data_out, CLIENT, BE.addr, CPORT, BE.port)
    fwd = dp.ct(ct_key(CLIENT, SVC, CPORT, SPORT, IPPROTO_SCTP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.SYN_SENT


def test_tcp_and_sctp_on_the_same_port_are_apart(dp: Datapath) -> None:
    other = Backend(3, "10.244.4.11", 7070)
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [BE])
    dp.add_service(SVC, SPORT, 6, [other], svc_id=2)
    out = dp.run("kp_from_pod", init())
    assert_sctp(out.data_out, CLIENT, BE.addr, CPORT, BE.port)


def icmp_reject(frame: bytes, quote_l4: int) -> bytes:
    p = parse(frame)
    reply = ipv4(p.dst, p.src, IPPROTO_ICMP, icmp(3, 3, 0, p.l3 + p.l4[:quote_l4]), ident=0, flags_frag=0)
    return swap_macs(frame[:14]) + reply


def test_no_endpoints_is_rejected_with_port_unreachable(dp: Datapath) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [])
    frame = init()
    out = dp.run("kp_from_pod", frame)
    assert out.retval == TC_ACT_REDIRECT
    # the quote: IP header and the SCTP common header (ports, verification tag, checksum)
    assert out.data_out.hex() == icmp_reject(frame, 12).hex()
    assert checksum_errors(out.data_out) == []
    assert dp.stat(Stat.REJECT)[0] == 1


@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod"])
def test_icmp_error_quoting_sctp_is_reverse_translated(dp: Datapath, prog: str) -> None:
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [BE])
    client_init = init()
    seen = parse(dp.run("kp_from_pod", client_init).data_out)

    def frag_needed(inner: bytes) -> bytes:
        return ether(ipv4(ROUTER, CLIENT, IPPROTO_ICMP, icmp(3, 4, 1400, inner)), dst=bytes(6))

    out = dp.run(prog, frag_needed(seen.l3 + seen.l4[:12]))
    assert out.retval == TC_ACT_OK
    orig = parse(client_init)
    # the quoted CRC stays as the backend-side packet had it: no receiver checks a quote's checksum
    want = orig.l3 + orig.l4[:8] + seen.l4[8:12]
    assert out.data_out.hex() == frag_needed(want).hex()
    assert checksum_errors(out.data_out) == []
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 1


def test_fragment_passes_untouched(dp: Datapath) -> None:
    # the CRC covers the whole packet, which no fragment holds: SCTP fragments are not translated
    dp.add_service(SVC, SPORT, IPPROTO_SCTP, [BE])
    pkt = sctp.packet(CPORT, SPORT, 1, data_chunk(64))
    frame = ether(ipv4(CLIENT, SVC, IPPROTO_SCTP, pkt[:40], flags_frag=0x2000))
    out = dp.run("kp_from_pod", frame)
    assert out.retval == TC_ACT_OK and out.data_out == frame


# ---- IPv6 ----
def test_ipv6_init_and_init_ack(dp: Datapath) -> None:
    dp.add_service6(SVC6, SPORT, IPPROTO_SCTP, [BE6])
    out = dp.run("kp_from_pod", sctp6_frame(CLIENT6, SVC6, CPORT, SPORT, sctp.init_chunk()))
    assert out.retval == TC_ACT_OK
    assert out.data_out.hex() == sctp6_frame(CLIENT6, BE6.addr, CPORT, BE6.port, sctp.init_chunk()).hex()
    assert_sctp(out.data_out, CLIENT6, BE6.addr, CPORT, BE6.port)
    fwd = dp.ct6(ct6_key(CLIENT6, SVC6, CPORT, SPORT, IPPROTO_SCTP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.SYN_SENT
    out = dp.run("kp_to_pod", sctp6_frame(BE6.addr, CLIENT6, BE6.port, CPORT, sctp.init_ack_chunk(), vtag=5))
    assert out.retval == TC_ACT_OK
    assert out.data_out.hex() == sctp6_frame(SVC6, CLIENT6, SPORT, CPORT, sctp.init_ack_chunk(), vtag=5).hex()
    fwd = dp.ct6(ct6_key(CLIENT6, SVC6, CPORT, SPORT, IPPROTO_SCTP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.ESTABLISHED


@pytest.mark.parametrize("size", [0, 777, 1400])
def test_ipv6_crc_and_zero_checksum(dp: Datapath, size: int) -> None:
    dp.add_service6(SVC6, SPORT, IPPROTO_SCTP, [BE6])
    out = dp.run("kp_from_pod", sctp6_frame(CLIENT6, SVC6, CPORT, SPORT, data_chunk(size), vtag=3))
    assert_sctp(out.data_out, CLIENT6, BE6.addr, CPORT, BE6.port)
    out = dp.run("kp_from_pod", sctp6_frame(CLIENT6, SVC6, CPORT + 1, SPORT, data_chunk(size), vtag=3,
                                            checksum=False))  # fmt: skip
    assert sctp.checksum_field(sctp_of(out.data_out)) == 0 and parse6(out.data_out).dst == BE6.addr


@pytest.mark.parametrize("prog", ["kp_from_pod", "kp_to_pod"])
def test_ipv6_packet_too_big_quoting_sctp_is_reverse_translated(dp: Datapath, prog: str) -> None:
    router = "fd00:a::fe"
    dp.add_service6(SVC6, SPORT, IPPROTO_SCTP, [BE6])
    client_init = sctp6_frame(CLIENT6, SVC6, CPORT, SPORT, sctp.init_chunk())
    quote = dp.run("kp_from_pod", client_init).data_out[14 : 14 + 40 + 12]
    msg = icmp6(router, CLIENT6, ICMP6_PKT_TOOBIG, 0, 1280, quote)
    out = dp.run(prog, ether(ipv6(router, CLIENT6, IPPROTO_ICMPV6, msg), ETH_P_IPV6))
    assert out.retval == TC_ACT_OK
    assert checksum_errors6(out.data_out) == []
    inner, orig = parse6(out.data_out).l4[8:], client_init[14:]
    assert inner[:40] == orig[:40] and inner[40:44] == orig[40:44]  # client -> frontend again
    assert dp.stat(Stat.ICMP_REVNAT, family=6)[0] == 1


def test_ipv6_no_endpoints_is_rejected(dp: Datapath) -> None:
    dp.add_service6(SVC6, SPORT, IPPROTO_SCTP, [])
    out = dp.run("kp_from_pod", sctp6_frame(CLIENT6, SVC6, CPORT, SPORT, sctp.init_chunk()))
    assert out.retval == TC_ACT_REDIRECT
    p = parse6(out.data_out)
    assert (p.proto, p.icmp_type, p.icmp_code, p.src, p.dst) == (58, 1, 4, SVC6, CLIENT6)
    assert dp.stat(Stat.REJECT, family=6)[0] == 1


# ---- NodePort from outside: SNAT to a backend on another node ----
def test_nodeport_snat_rewrites_ports_with_a_valid_crc(dp: Datapath, lab: Lab) -> None:  # noqa: F811
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_SCTP, flags=SvcFlag.NODEPORT)
    chunks = sctp.init_chunk()
    first = ext_frame(EXT_CLIENT, NODE, sctp.packet(40000, NODEPORT, 0, chunks), IPPROTO_SCTP)
    out = run_in(dp, lab, "kp_from_netdev", first)
    ok(out, TC_ACT_REDIRECT)
    port = struct.unpack("!H", sctp_of(out.data_out)[:2])[0]
    assert 32768 <= port <= 65535
    expected = ext_frame(NODE, BE_REMOTE.addr, sctp.packet(port, BE_REMOTE.port, 0, chunks), IPPROTO_SCTP,
                         ttl=63, macs=(NODE2_MAC, lab.mac))  # fmt: skip
    assert out.data_out.hex() == expected.hex()
    assert_sctp(out.data_out, NODE, BE_REMOTE.addr, port, BE_REMOTE.port)
    nat = snat_entry(dp, port, proto=IPPROTO_SCTP)
    assert nat is not None
    # the backend's INIT ACK goes back to the client from the NodePort
    ack = sctp.init_ack_chunk()
    reply = ext_frame(BE_REMOTE.addr, NODE, sctp.packet(BE_REMOTE.port, port, 0x11223344, ack), IPPROTO_SCTP)
    out = run_in(dp, lab, "kp_from_netdev", reply)
    ok(out, TC_ACT_REDIRECT)
    expected = ext_frame(NODE, EXT_CLIENT, sctp.packet(NODEPORT, 40000, 0x11223344, ack), IPPROTO_SCTP,
                         ttl=63, macs=(GW_MAC, lab.mac))  # fmt: skip
    assert out.data_out.hex() == expected.hex()
    assert dp.stat(Stat.SNAT_REVNAT)[0] == 1
    fwd = dp.ct(ct_key(EXT_CLIENT, NODE, 40000, NODEPORT, IPPROTO_SCTP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.ESTABLISHED and fwd.flags & CtFlag.SNAT


def test_empty_sctp_slot_passes_untouched_and_counts(dp: Datapath, lab: Lab) -> None:  # noqa: F811
    """kp_from_netdev's IPv4 SCTP program is reached through kp_sctp_v1; with its slot empty (an object
    that did not fill it, an array emptied under the attached programs) the packet passes untranslated,
    counted as pass_no_prog so that SCTP NodePorts failing shows somewhere."""
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_SCTP, flags=SvcFlag.NODEPORT)
    first = ext_frame(EXT_CLIENT, NODE, sctp.packet(40000, NODEPORT, 0, sctp.init_chunk()), IPPROTO_SCTP)
    progs = dp.obj.map(MAP_SCTP)
    progs.delete(ctypes.c_uint32(0))
    try:
        out = run_in(dp, lab, "kp_from_netdev", first)
    finally:
        progs.update(ctypes.c_uint32(0), ctypes.c_uint32(dp.obj.program("kp_netdev_sctp4").fd))
    assert (out.retval, out.data_out.hex()) == (TC_ACT_OK, first.hex())
    assert dp.stat(Stat.PASS_NO_PROG)[0] == 1 and dp.stat(Stat.FROM_NETDEV)[0] == 1
    assert dp.ct_entries() == {}
    ok(run_in(dp, lab, "kp_from_netdev", first), TC_ACT_REDIRECT)  # the slot back: translated
    assert dp.stat(Stat.PASS_NO_PROG)[0] == 1


def test_fragment_from_a_netdev_is_counted_as_passed(dp: Datapath, lab: Lab) -> None:  # noqa: F811
    # as kp_from_pod counts it, and as kp_from_netdev counts other protocols' fragments
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_SCTP, flags=SvcFlag.NODEPORT)
    pkt = sctp.packet(40000, NODEPORT, 1, data_chunk(64))
    frame = ext_frame(EXT_CLIENT, NODE, pkt[:40], IPPROTO_SCTP, flags_frag=0x2000)
    out = run_in(dp, lab, "kp_from_netdev", frame)
    assert (out.retval, out.data_out.hex()) == (TC_ACT_OK, frame.hex())
    assert dp.stat(Stat.PASS_FRAGMENT)[0] == 1


# ---- XDP acceleration leaves SCTP to TC ----
@pytest.mark.parametrize("prog", ["kp_xdp", "kp_xdp_new"])
def test_xdp_passes_sctp_untouched(dp: Datapath, lab: Lab, prog: str) -> None:  # noqa: F811
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_SCTP, flags=SvcFlag.NODEPORT)
    init_frame = ext_frame(EXT_CLIENT, NODE, sctp.packet(40000, NODEPORT, 0, sctp.init_chunk()), IPPROTO_SCTP)
    x = lab.run_xdp(dp, init_frame, prog=prog)
    assert (x.retval, x.data_out.hex()) == (2, init_frame.hex())  # XDP_PASS, as it came
    ok(run_in(dp, lab, "kp_from_netdev", init_frame), TC_ACT_REDIRECT)  # TC opens the flow
    data = ext_frame(EXT_CLIENT, NODE, sctp.packet(40000, NODEPORT, 5, data_chunk(100)), IPPROTO_SCTP)
    x = lab.run_xdp(dp, data, prog=prog)
    assert (x.retval, x.data_out.hex()) == (2, data.hex())
    assert dp.stat(Stat.XDP_FWD)[0] == 0 and dp.stat(Stat.XDP_LOCAL)[0] == 0


def test_ipv6_nodeport_snat_rewrites_ports_with_a_valid_crc(dp: Datapath, lab6: ext6.Lab6) -> None:
    ext6.setup(dp, proto=IPPROTO_SCTP)
    client, node, be = ext6.CLIENT, ext6.NODE, ext6.BE_REMOTE
    chunks = sctp.init_chunk()
    first = ext6.frame(client, node, sctp.packet(40000, ext6.NODEPORT, 0, chunks), IPPROTO_SCTP)
    out = ext6.run_in(dp, lab6, "kp_from_netdev", first)
    assert out.retval == TC_ACT_REDIRECT
    port = struct.unpack("!H", sctp_of(out.data_out)[:2])[0]
    expected = ext6.frame(node, be.addr, sctp.packet(port, be.port, 0, chunks), IPPROTO_SCTP, hop_limit=63,
                          macs=(ext6.NODE2_MAC, lab6.mac))  # fmt: skip
    assert out.data_out.hex() == expected.hex()
    assert_sctp(out.data_out, node, be.addr, port, be.port)
    ack = sctp.init_ack_chunk()
    reply = ext6.frame(be.addr, node, sctp.packet(be.port, port, 0x11223344, ack), IPPROTO_SCTP)
    out = ext6.run_in(dp, lab6, "kp_from_netdev", reply)
    assert out.retval == TC_ACT_REDIRECT
    expected = ext6.frame(node, client, sctp.packet(ext6.NODEPORT, 40000, 0x11223344, ack), IPPROTO_SCTP,
                          hop_limit=63, macs=(ext6.GW_MAC, lab6.mac))  # fmt: skip
    assert out.data_out.hex() == expected.hex()
    assert dp.stat(Stat.SNAT_REVNAT, family=6)[0] == 1


# ---- CHECKSUM_COMPLETE (a NIC's skb): skb->csum must follow every byte kproxy rewrites ----
@pytest.mark.parametrize("local", [False, True], ids=["remote-backend", "local-backend"])
def test_checksum_complete_skb_stays_valid(dp: Datapath, lab: Lab, lab6: ext6.Lab6, local: bool) -> None:  # noqa: F811
    """PROG_TEST_RUN checks skb->csum after the program: the port rewrites change the CRC (and IPv6's
    addresses no checksum of theirs), which nothing compensates in a ones-complement sum."""
    set_cfg(dp)
    be = ext.BE_LOCAL if local else BE_REMOTE
    nodeport(dp, be, IPPROTO_SCTP, flags=SvcFlag.NODEPORT)
    f = ext_frame(EXT_CLIENT, NODE, sctp.packet(40000, NODEPORT, 0, data_chunk(50)), IPPROTO_SCTP)
    out = lab.run(dp, "kp_from_netdev", f, flags=BPF_F_TEST_SKB_CHECKSUM_COMPLETE)
    assert out.retval == (TC_ACT_OK if local else TC_ACT_REDIRECT)
    assert sctp.crc_valid(sctp_of(out.data_out))
    dp.reset()
    be6 = ext6.BE_LOCAL if local else ext6.BE_REMOTE
    ext6.setup(dp, be=be6, proto=IPPROTO_SCTP)
    f6 = ext6.frame(
        ext6.CLIENT, ext6.NODE, sctp.packet(40000, ext6.NODEPORT, 0, data_chunk(50)), IPPROTO_SCTP
    )
    out = lab6.run(dp, "kp_from_netdev", f6, flags=BPF_F_TEST_SKB_CHECKSUM_COMPLETE)
    assert out.retval == (TC_ACT_OK if local else TC_ACT_REDIRECT)
    assert sctp.crc_valid(sctp_of(out.data_out)) and parse6(out.data_out).dst == be6.addr
