"""PROG_TEST_RUN tables for traffic from outside and across nodes (issue 4): SNAT, DSR (IPv4 option
and IPIP), hairpin, pods reaching NodePorts, MTU handling and ICMP errors of translated flows.

Paths that BPF forwards itself call bpf_fib_lookup, which uses the routing table of the calling
thread's network namespace: those runs happen inside a private namespace (kpt-<hex>) holding a
veth "node" interface with fixed routes and permanent neighbours, so verdicts and MACs are exact.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections.abc import Iterator

import pytest
from datapath import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, Backend, Datapath, ct_key
from fiblab import FibLab
from frames import (
    IP_DF,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    SYN_OPTIONS,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    checksum_errors,
    ether,
    icmp,
    ipv4,
    parse,
    swap_macs,
    tcp,
    udp,
)

from kproxy.abi import (
    BackendFlag,
    Be4Val,
    Config,
    CtDir,
    CtFlag,
    CtState,
    DsrMode,
    Scope,
    Snat4Key,
    Snat4Val,
    Stat,
    SvcFlag,
    ip_to_nbo,
    nbo_to_ip,
    nbo_to_port,
    port_to_nbo,
)
from kproxy.bpf.libbpf import TestRun

pytestmark = pytest.mark.root

CLIENT, CPORT = "203.0.113.9", 40000
NODE, NODE2, NODEPORT = "192.168.1.10", "192.168.1.20", 30080
GW = "192.168.1.1"
LB_IP = "198.51.100.20"
POD, POD_PORT = "10.244.1.5", 41000  # a pod on this node
SVC, SPORT = "10.96.0.10", 80
BE_REMOTE = Backend(1, "10.244.2.7", 8080)  # on NODE2
BE_LOCAL = Backend(2, "10.244.1.9", 8080, BackendFlag.LOCAL)
NODE2_MAC = bytes.fromhex("020000000020")
GW_MAC = bytes.fromhex("020000000001")
POD_MAC = bytes.fromhex("020000000105")
IN_MAC_DST, IN_MAC_SRC = bytes.fromhex("02aaaaaaaaaa"), bytes.fromhex("02bbbbbbbbbb")
HAIRPIN = "169.254.42.1"
IPPROTO_IPIP = 4


class Lab(FibLab):
    """A namespace with kpe0 = 192.168.1.10/24 (this node's LAN side), forwarding on."""

    def setup(self) -> None:
        self.ip("addr", "add", f"{NODE}/24", "dev", "kpe0")
        self.ip("neigh", "replace", GW, "lladdr", GW_MAC.hex(":"), "dev", "kpe0", "nud", "permanent")
        self.ip("neigh", "replace", NODE2, "lladdr", NODE2_MAC.hex(":"), "dev", "kpe0", "nud", "permanent")
        self.ip("route", "add", "default", "via", GW)
        self.ip("route", "add", "10.244.2.0/24", "via", NODE2)
        self.ip("route", "add", "10.244.3.0/24", "via", "192.168.1.30")  # no neighbour: NO_NEIGH
        self.ip("route", "add", "10.244.1.0/24", "dev", "kpe0")
        self.ip("neigh", "replace", POD, "lladdr", POD_MAC.hex(":"), "dev", "kpe0", "nud", "permanent")
        self.sysctl("net.ipv4.conf.all.forwarding=1")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    lab = Lab()
    try:
        yield lab
    finally:
        lab.delete()


def run_in(dp: Datapath, lab: Lab, prog: str, frame: bytes) -> TestRun:
    """Run `prog` as if the frame arrived on kpe0."""
    return lab.run(dp, prog, frame)


def set_cfg(dp: Datapath, node: str = NODE, dsr: DsrMode = DsrMode.OFF, **fields: int) -> None:
    cfg = Config()
    cfg.node_addr = ip_to_nbo(node)
    cfg.dsr_mode = dsr
    for k, v in fields.items():
        setattr(cfg, k, v)
    dp.cfg.update(ctypes.c_uint32(0), cfg)


def add_be(dp: Datapath, be: Backend, proto: int, node: str = NODE2) -> None:
    v = Be4Val(ip_to_nbo(be.addr), port_to_nbo(be.port), proto, be.flags, ip_to_nbo(node))
    dp.be4.update(ctypes.c_uint32(be.id), v)


def nodeport(dp: Datapath, be: Backend, proto: int = IPPROTO_TCP, flags: int = SvcFlag.NODEPORT) -> None:
    dp.add_service(NODE, NODEPORT, proto, [be], flags=flags)
    add_be(dp, be, proto)


def frame(
    src: str,
    dst: str,
    l4: bytes,
    proto: int = IPPROTO_TCP,
    *,
    ttl: int = 64,
    options: bytes = b"",
    macs: tuple[bytes, bytes] = (IN_MAC_DST, IN_MAC_SRC),
    flags_frag: int = IP_DF,
) -> bytes:
    return ether(
        ipv4(src, dst, proto, l4, ttl=ttl, options=options, flags_frag=flags_frag), dst=macs[0], src=macs[1]
    )


def syn_seg(src: str, dst: str, sport: int, dport: int, flags: int = TCP_SYN, payload: bytes = b"") -> bytes:
    opts = SYN_OPTIONS if flags & TCP_SYN else b""
    return tcp(src, dst, sport, dport, flags, options=opts, payload=payload)


def dsr_opt(addr: str, port: int) -> bytes:
    return struct.pack("!BBH4s", 0x9A, 8, port, bytes(map(int, addr.split("."))))


def client_syn(flags: int = TCP_SYN, sport: int = CPORT) -> bytes:
    return frame(CLIENT, NODE, syn_seg(CLIENT, NODE, sport, NODEPORT, flags))


def ok(out: TestRun, verdict: int) -> None:
    assert out.retval == verdict
    assert checksum_errors(out.data_out) == []


# ---- SNAT ----
def test_snat_first_packet_allocates_port_and_forwards(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    port = parse(out.data_out).sport
    assert 32768 <= port <= 65535
    expected = frame(
        NODE, BE_REMOTE.addr, syn_seg(NODE, BE_REMOTE.addr, port, 8080), ttl=63, macs=(NODE2_MAC, lab.mac)
    )
    assert out.data_out.hex() == expected.hex()
    fwd = dp.ct(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.flags & CtFlag.SNAT and fwd.flags & CtFlag.EXTERNAL
    assert (nbo_to_ip(fwd.snat_addr), nbo_to_port(fwd.snat_port)) == (NODE, port)
    # The reply side lives in the NAT map, not in a REPLY conntrack entry.
    assert dp.ct(ct_key(BE_REMOTE.addr, CLIENT, 8080, CPORT, IPPROTO_TCP, CtDir.REPLY)) is None
    nat = snat_entry(dp, port)
    assert nat is not None
    assert (nbo_to_ip(nat.client_addr), nbo_to_port(nat.client_port)) == (CLIENT, CPORT)
    assert (nbo_to_ip(nat.front_addr), nbo_to_port(nat.front_port)) == (NODE, NODEPORT)
    assert nat.expires_ns == fwd.expires_ns
    assert dp.stat(Stat.SNAT)[0] == 1 and dp.stat(Stat.SNAT_NEW)[0] == 1

    # Later packets reuse the port; the reply is translated back and sent to the client.
    out = run_in(dp, lab, "kp_from_netdev", client_syn(TCP_ACK))
    ok(out, TC_ACT_REDIRECT)
    assert parse(out.data_out).sport == port
    reply = frame(BE_REMOTE.addr, NODE, syn_seg(BE_REMOTE.addr, NODE, 8080, port, TCP_SYN | TCP_ACK), ttl=63)
    out = run_in(dp, lab, "kp_from_netdev", reply)
    ok(out, TC_ACT_REDIRECT)
    expected = frame(
        NODE,
        CLIENT,
        syn_seg(NODE, CLIENT, NODEPORT, CPORT, TCP_SYN | TCP_ACK),
        ttl=62,
        macs=(GW_MAC, lab.mac),
    )
    assert out.data_out.hex() == expected.hex()
    assert dp.stat(Stat.SNAT_REVNAT)[0] == 1 and dp.stat(Stat.SNAT_NEW)[0] == 1
    fwd = dp.ct(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.state == CtState.ESTABLISHED
    nat = snat_entry(dp, port)
    assert nat is not None and nat.state == CtState.ESTABLISHED


def snat_entry(dp: Datapath, port: int, be: Backend = BE_REMOTE, proto: int = IPPROTO_TCP) -> Snat4Val | None:
    raw = dp.snat4.lookup(snat_key(port, be, proto))
    return Snat4Val.from_buffer_copy(raw) if raw is not None else None


def snat_key(port: int, be: Backend = BE_REMOTE, proto: int = IPPROTO_TCP) -> Snat4Key:
    k = Snat4Key()
    k.saddr, k.daddr = ip_to_nbo(be.addr), ip_to_nbo(NODE)
    k.sport, k.dport, k.proto = port_to_nbo(be.port), port_to_nbo(port), proto
    return k


def test_snat_udp_both_ways(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    q = frame(CLIENT, NODE, udp(CLIENT, NODE, CPORT, NODEPORT, b"query"), IPPROTO_UDP)
    out = run_in(dp, lab, "kp_from_netdev", q)
    ok(out, TC_ACT_REDIRECT)
    port = parse(out.data_out).sport
    assert (
        out.data_out.hex()
        == frame(
            NODE,
            BE_REMOTE.addr,
            udp(NODE, BE_REMOTE.addr, port, 8080, b"query"),
            IPPROTO_UDP,
            ttl=63,
            macs=(NODE2_MAC, lab.mac),
        ).hex()
    )
    a = frame(BE_REMOTE.addr, NODE, udp(BE_REMOTE.addr, NODE, 8080, port, b"answer"), IPPROTO_UDP)
    out = run_in(dp, lab, "kp_from_netdev", a)
    ok(out, TC_ACT_REDIRECT)
    assert (
        out.data_out.hex()
        == frame(
            NODE,
            CLIENT,
            udp(NODE, CLIENT, NODEPORT, CPORT, b"answer"),
            IPPROTO_UDP,
            ttl=63,
            macs=(GW_MAC, lab.mac),
        ).hex()
    )


def test_snat_port_range_exhausted_is_counted(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp, snat_port_min=40000, snat_port_max=40000)
    nodeport(dp, BE_REMOTE)
    taken = Snat4Val(time.monotonic_ns() + 60 * 10**9, ip_to_nbo("203.0.113.99"), ip_to_nbo(NODE), 1, 2, 1, 8)
    dp.snat4.update(snat_key(40000), taken)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    assert out.retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_SNAT_NO_PORT)[0] == 1
    assert dp.stat(Stat.SNAT_RETRY)[0] == 32
    assert dp.ct(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD)) is None
    # The other flow's entry is untouched.
    kept = snat_entry(dp, 40000)
    assert kept is not None and bytes(kept) == bytes(taken)


def test_snat_takes_over_a_dead_entry(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp, snat_port_min=40000, snat_port_max=40000)
    nodeport(dp, BE_REMOTE)
    dead = Snat4Val(time.monotonic_ns() - 10**9, ip_to_nbo("203.0.113.99"), ip_to_nbo(NODE), 1, 2, 1, 8)
    dp.snat4.update(snat_key(40000), dead)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    assert parse(out.data_out).sport == 40000
    nat = snat_entry(dp, 40000)
    assert nat is not None and nbo_to_ip(nat.client_addr) == CLIENT


TW_HOLD_NS = 60 * 10**9  # KP_SNAT_TW_HOLD_NS: the backend's TIME_WAIT


def foreign(expires_ns: int, state: int) -> Snat4Val:
    """A kp_snat4_v1 value of another client's flow."""
    return Snat4Val(expires_ns, ip_to_nbo("203.0.113.99"), ip_to_nbo(NODE), 1, 2, state, CtFlag.SNAT)


@pytest.mark.parametrize("close", [TCP_ACK | TCP_FIN, TCP_RST], ids=["fin", "rst"])
def test_snat_reopened_tuple_keeps_its_port(dp: Datapath, lab: Lab, close: int) -> None:
    """Bench finding (snat collapse, ~50 conn/s): Linux clients draw their TCP timestamp offset per
    4-tuple, so the backend's TIME_WAIT accepts a new SYN on node:port only when it comes from the same
    client tuple. A client re-using its source port keeps its SNAT port (the old flow's entry is
    overwritten, not doubled). The RST case is what a client sends after the backend answered a SYN
    on a TIME_WAIT tuple with a bare ACK: its 1-s retry must keep the port, not draw another one."""
    set_cfg(dp, snat_port_min=40000, snat_port_max=40001)
    nodeport(dp, BE_REMOTE)
    first = parse(run_in(dp, lab, "kp_from_netdev", client_syn()).data_out).sport
    ok(run_in(dp, lab, "kp_from_netdev", client_syn(close)), TC_ACT_REDIRECT)
    fwd = dp.ct(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.state in (CtState.CLOSING, CtState.CLOSED)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())  # same tuple, a new connection
    ok(out, TC_ACT_REDIRECT)
    assert dp.stat(Stat.CT_REOPEN)[0] == 1
    assert parse(out.data_out).sport == first
    live = [p for p in (40000, 40001) if snat_entry(dp, p) is not None]
    assert live == [first], live
    nat = snat_entry(dp, first)
    assert nat is not None and nat.state == CtState.SYN_SENT and dp.stat(Stat.SNAT_RETRY)[0] == 0


def test_snat_closed_flow_leaves_a_tombstone(dp: Datapath, lab: Lab) -> None:
    """A closed flow's entry reserves its port for the backend's TIME_WAIT beyond the flow."""
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    port = parse(run_in(dp, lab, "kp_from_netdev", client_syn()).data_out).sport
    ok(run_in(dp, lab, "kp_from_netdev", client_syn(TCP_ACK | TCP_FIN)), TC_ACT_REDIRECT)
    fwd = dp.ct(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    nat = snat_entry(dp, port)
    assert fwd is not None and nat is not None and fwd.state == CtState.CLOSING
    assert nat.expires_ns == fwd.expires_ns + TW_HOLD_NS


def test_snat_cooling_port_goes_to_another_client_last(dp: Datapath, lab: Lab) -> None:
    """Two ports: one cooling (its flow closed 1 s ago), one free. Whatever the cursor says, a new
    client gets the free one; the cooling one stays reserved."""
    lo = 40000
    set_cfg(dp, snat_port_min=lo, snat_port_max=lo + 1)
    nodeport(dp, BE_REMOTE)
    now = time.monotonic_ns()
    for cooling in (lo, lo + 1):
        dp.snat4.delete(snat_key(lo))
        dp.snat4.delete(snat_key(lo + 1))
        tomb = foreign(now - 10**9 + TW_HOLD_NS, CtState.CLOSING)
        dp.snat4.update(snat_key(cooling), tomb)
        for sport in (CPORT + 10 + cooling - lo, CPORT + 20 + cooling - lo):
            out = run_in(dp, lab, "kp_from_netdev", client_syn(sport=sport))
            ok(out, TC_ACT_REDIRECT)
            free = lo + 1 if cooling == lo else lo
            assert parse(out.data_out).sport == free
            kept = snat_entry(dp, cooling)
            assert kept is not None and bytes(kept) == bytes(tomb)
            dp.snat4.delete(snat_key(free))


def test_snat_unknown_tombstones_take_the_oldest(dp: Datapath, lab: Lab) -> None:
    """Tombstones without a TIME_WAIT key (written by an older program, or a flow the client never
    finished) and no better candidate: the one whose flow ended longest ago is taken over (the client
    may need one SYN retry there), not a drop; a live flow's port never."""
    lo = 40000
    set_cfg(dp, snat_port_min=lo, snat_port_max=lo + 2)
    nodeport(dp, BE_REMOTE)
    now = time.monotonic_ns()
    dp.snat4.update(snat_key(lo), foreign(now - 5 * 10**9 + TW_HOLD_NS, CtState.CLOSING))
    dp.snat4.update(snat_key(lo + 1), foreign(now - 30 * 10**9 + TW_HOLD_NS, CtState.CLOSING))
    live = foreign(now + 3600 * 10**9, CtState.ESTABLISHED)
    dp.snat4.update(snat_key(lo + 2), live)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    assert parse(out.data_out).sport == lo + 1
    nat = snat_entry(dp, lo + 1)
    assert nat is not None and nbo_to_ip(nat.client_addr) == CLIENT
    kept = snat_entry(dp, lo + 2)
    assert kept is not None and bytes(kept) == bytes(live)
    assert dp.stat(Stat.DROP_SNAT_NO_PORT)[0] == 0


# ---- SNAT ports and the backend's TIME_WAIT (issue 10) ----
TS_SYN = 0x5000_0000  # the SYN's TSval in the cases below
SEQ_SYN = 0x7000_0000  # and its initial sequence number


def ts_option(tsval: int, tsecr: int = 0) -> bytes:
    return bytes([1, 1, 8, 10]) + struct.pack("!II", tsval, tsecr)


def syn_with(tsval: int | None, seq: int, sport: int = CPORT) -> bytes:
    """A client SYN as Linux sends it (MSS, SACK-permitted, timestamp, window scale), or without a
    timestamp option when tsval is None."""
    if tsval is None:
        opts = bytes.fromhex("020405b4040201030307")
        opts += b"\0" * (-len(opts) % 4)
    else:
        opts = bytes.fromhex("020405b40402080a") + struct.pack("!II", tsval, 0) + bytes.fromhex("01030307")
    return frame(CLIENT, NODE, tcp(CLIENT, NODE, sport, NODEPORT, TCP_SYN, seq=seq, options=opts))


def tombstone(key: int, ts: bool, state: int = CtState.CLOSING, ended_s: float = 1.0) -> Snat4Val:
    """Another client's closed flow on a port, ended `ended_s` ago, whose FIN left tw_key."""
    v = foreign(time.monotonic_ns() - int(ended_s * 10**9) + TW_HOLD_NS, state)
    v.tw_key = key
    v.flags |= CtFlag.TW_TS if ts else 0
    return v


@pytest.mark.parametrize(
    ("kind", "tsval", "seq", "taken"),
    [
        # The old flow used timestamps: PAWS decides. The key stands for TSvals up to 0x3000ffff.
        ("ts", TS_SYN, 1, True),
        ("ts", 0x3000_FFFF, SEQ_SYN, False),  # equal to the old last TSval's range: PAWS or not beyond
        ("ts", 0x2FFF_0000, SEQ_SYN, False),  # below: PAWS rejects it
        ("ts", 0x3001_0000, SEQ_SYN, True),  # the first value the key admits
        ("ts", 0xAFFF_FFFF, SEQ_SYN, True),  # at most 0x7FFF_0000 above the old value: in Linux's 2^31
        ("ts", 0xB000_0000, SEQ_SYN, False),  # could be 2^31 and more above the old value: PAWS rejects
        ("ts", 0x3000_0000 + 0x8001_0000, SEQ_SYN, False),  # more than 2^31 above is below (modular)
        # No timestamp: the backend skips PAWS and runs the sequence test against a value not recorded.
        # Unknown, so taken only as the last resort (here the only port): such clients are not starved.
        ("ts", None, 0x7FFF_FFFF, True),
        # The old flow had no timestamps: the sequence number must be beyond its FIN.
        ("seq", None, 0x3001_0000, True),
        ("seq", None, 0x2000_0000, False),
        ("seq", None, 0xB000_0000, False),
        ("seq", TS_SYN, 0x3001_0000, True),
        ("seq", TS_SYN, 0x3000_8000, False),
    ],
)
@pytest.mark.parametrize("prog", ["kp_from_netdev", "kp_xdp"])
def test_snat_tombstone_goes_only_to_a_syn_its_time_wait_accepts(
    dp: Datapath, lab: Lab, kind: str, tsval: int | None, seq: int, taken: bool, prog: str
) -> None:
    """Issue 10: a port the backend holds in TIME_WAIT for another client tuple may carry a new SYN only
    if the backend will take it as a new connection (Linux tcp_timewait_state_process: a TSval above the
    last one seen there when both use timestamps, else a sequence number beyond the old connection's
    end). Otherwise the backend answers the SYN with a bare ACK (PAWS) and the client needs a 1-s retry.
    One port in the range, holding a tombstone whose key stands for 0x3000xxxx. kp_xdp opens such a flow
    by the same rules, the SYN's fields read from the frame (XDP_TX, XDP_DROP)."""
    set_cfg(dp, snat_port_min=40000, snat_port_max=40000)
    nodeport(dp, BE_REMOTE)
    tomb = tombstone(0x3001, ts=kind == "ts")
    dp.snat4.update(snat_key(40000), tomb)
    xdp = prog == "kp_xdp"
    out = lab.run_xdp(dp, syn_with(tsval, seq)) if xdp else run_in(dp, lab, prog, syn_with(tsval, seq))
    if taken:
        ok(out, 3 if xdp else TC_ACT_REDIRECT)  # XDP_TX
        assert parse(out.data_out).sport == 40000
        nat = snat_entry(dp, 40000)
        assert nat is not None and nbo_to_ip(nat.client_addr) == CLIENT and nat.tw_key == 0
        assert nat.state == CtState.SYN_SENT
    else:
        assert out.retval == (1 if xdp else TC_ACT_SHOT)  # XDP_DROP
        assert dp.stat(Stat.DROP_SNAT_NO_PORT)[0] == 1
        kept = snat_entry(dp, 40000)
        assert kept is not None and bytes(kept) == bytes(tomb)


def test_snat_reset_flow_leaves_no_time_wait(dp: Datapath, lab: Lab) -> None:
    """A flow that ended by a reset (CLOSED, no FIN recorded): the backend keeps nothing in TIME_WAIT, so
    its port goes to the next client at once, before an older tombstone of unknown TIME_WAIT."""
    lo = 40000
    set_cfg(dp, snat_port_min=lo, snat_port_max=lo + 1)
    nodeport(dp, BE_REMOTE)
    unknown = tombstone(0, ts=False, state=CtState.CLOSING, ended_s=50)
    dp.snat4.update(snat_key(lo), unknown)
    dp.snat4.update(snat_key(lo + 1), tombstone(0, ts=False, state=CtState.CLOSED, ended_s=1))
    out = run_in(dp, lab, "kp_from_netdev", syn_with(TS_SYN, SEQ_SYN))
    ok(out, TC_ACT_REDIRECT)
    assert parse(out.data_out).sport == lo + 1
    kept = snat_entry(dp, lo)
    assert kept is not None and bytes(kept) == bytes(unknown)


def test_snat_syn_without_timestamps_prefers_a_tombstone_it_passes(dp: Datapath, lab: Lab) -> None:
    """A SYN without timestamps against a timestamp key is a last resort only: a tombstone keyed by a
    sequence number the SYN is beyond goes first, whatever the order of the candidates."""
    lo = 40000
    set_cfg(dp, snat_port_min=lo, snat_port_max=lo + 1)
    nodeport(dp, BE_REMOTE)
    for ts_port in (lo, lo + 1):
        seq_port = lo + 1 if ts_port == lo else lo
        dp.snat4.update(snat_key(ts_port), tombstone(0x3001, ts=True, ended_s=50))
        passed = tombstone(0x3001, ts=False, ended_s=1)
        dp.snat4.update(snat_key(seq_port), passed)
        out = run_in(dp, lab, "kp_from_netdev", syn_with(None, 0x4000_0000))
        ok(out, TC_ACT_REDIRECT)
        assert parse(out.data_out).sport == seq_port
        dp.ct4.delete(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))


def test_snat_keyed_tombstone_is_never_taken_by_a_syn_it_refuses(dp: Datapath, lab: Lab) -> None:
    """The fallback to the oldest tombstone is for tombstones of unknown TIME_WAIT only: with every
    candidate keyed against this SYN, the SYN is dropped (counted) and its retransmission draws again;
    the backend never sees a SYN it would answer with PAWS."""
    lo = 40000
    set_cfg(dp, snat_port_min=lo, snat_port_max=lo + 1)
    nodeport(dp, BE_REMOTE)
    for port in (lo, lo + 1):
        dp.snat4.update(snat_key(port), tombstone(0x6001, ts=True, ended_s=40))
    assert run_in(dp, lab, "kp_from_netdev", syn_with(TS_SYN, SEQ_SYN)).retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_SNAT_NO_PORT)[0] == 1
    assert dp.stat(Stat.SNAT_RETRY)[0] == 32


@pytest.mark.parametrize("with_ts", [True, False], ids=["timestamps", "no-timestamps"])
def test_snat_client_fin_records_the_time_wait_key(dp: Datapath, lab: Lab, with_ts: bool) -> None:
    """The client's FIN of a SNATed flow records what the backend's TIME_WAIT will hold against a later
    SYN: its TSval, or the sequence number after the FIN (data and FIN counted), rounded up to the next
    64 Ki. In the conntrack FWD entry and in the SNAT entry the allocator reads. A later FIN with a
    higher TSval (a retransmission of a FIN lost after this node: the backend keeps that one) raises
    it; a lower one never lowers it."""
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    syn = syn_with(0x1234_5678 if with_ts else None, 10)
    port = parse(run_in(dp, lab, "kp_from_netdev", syn).data_out).sport
    tsval, seq, data = 0x1235_0000, 0x2000_FFF0, b"x" * 0x20

    def fin(tsval: int) -> bytes:
        opts = ts_option(tsval, 77) if with_ts else b""
        flags = TCP_FIN | TCP_ACK
        seg = tcp(CLIENT, NODE, CPORT, NODEPORT, flags, seq=seq, ack=5, options=opts, payload=data)
        return frame(CLIENT, NODE, seg)

    ok(run_in(dp, lab, "kp_from_netdev", fin(tsval)), TC_ACT_REDIRECT)
    # TSval 0x1235_0000 -> key 0x1236; the sequence after the FIN, 0x2000_FFF0 + 0x20 + 1 = 0x2001_0011,
    # -> key 0x2002
    want_key, want_ts = (0x1236, CtFlag.TW_TS) if with_ts else (0x2002, 0)
    fwd = dp.ct(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    nat = snat_entry(dp, port)
    assert fwd is not None and nat is not None
    assert (fwd.tw_key, fwd.flags & CtFlag.TW_TS, fwd.state) == (want_key, want_ts, CtState.CLOSING)
    assert (nat.tw_key, nat.flags & CtFlag.TW_TS) == (want_key, want_ts)
    raised = 0x1266 if with_ts else want_key  # the same sequence number without timestamps
    ok(run_in(dp, lab, "kp_from_netdev", fin(tsval + 0x30_0000)), TC_ACT_REDIRECT)
    nat = snat_entry(dp, port)
    assert nat is not None and nat.tw_key == raised
    ok(run_in(dp, lab, "kp_from_netdev", fin(tsval)), TC_ACT_REDIRECT)
    nat = snat_entry(dp, port)
    assert nat is not None and nat.tw_key == raised
    want_key = raised
    # The backend's replies keep the key (they rewrite the entries from the FWD side).
    reply = frame(BE_REMOTE.addr, NODE, tcp(BE_REMOTE.addr, NODE, 8080, port, TCP_ACK), ttl=63)
    ok(run_in(dp, lab, "kp_from_netdev", reply), TC_ACT_REDIRECT)
    nat = snat_entry(dp, port)
    assert nat is not None and nat.tw_key == want_key and nat.flags & CtFlag.SEEN_REPLY


def test_snat_malformed_fin_records_nothing(dp: Datapath, lab: Lab) -> None:
    """A FIN whose data offset points past the segment is dropped by the backend: it records no key."""
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    port = parse(run_in(dp, lab, "kp_from_netdev", syn_with(TS_SYN, 10)).data_out).sport
    seg = bytearray(tcp(CLIENT, NODE, CPORT, NODEPORT, TCP_FIN | TCP_ACK, seq=0x4000_0000, ack=5))
    seg[12] = 0xF0 | (seg[12] & 0x0F)  # 60-byte header in a 20-byte segment
    run_in(dp, lab, "kp_from_netdev", frame(CLIENT, NODE, bytes(seg)))
    nat = snat_entry(dp, port)
    assert nat is not None and nat.tw_key == 0 and not nat.flags & CtFlag.TW_TS


def test_snat_fin_key_ignores_ethernet_padding(dp: Datapath, lab: Lab) -> None:
    """A bare FIN in a minimum-size Ethernet frame carries padding after the IPv4 packet: the end
    sequence comes from the IPv4 total length, not the frame length. Sequence 0x4000_FFFE: the FIN
    ends at 0x4000_FFFF (key 0x4001); the 6 padding bytes counted as data would cross into 0x4001_xxxx."""
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    port = parse(run_in(dp, lab, "kp_from_netdev", syn_with(None, 10)).data_out).sport
    seg = tcp(CLIENT, NODE, CPORT, NODEPORT, TCP_FIN | TCP_ACK, seq=0x4000_FFFE, ack=5)
    padded = frame(CLIENT, NODE, seg) + b"\xee" * 6  # 54 bytes + 6 of padding = 60
    assert run_in(dp, lab, "kp_from_netdev", padded).retval == TC_ACT_REDIRECT
    nat = snat_entry(dp, port)
    assert nat is not None and nat.tw_key == 0x4001


def test_snat_closing_flow_port_is_not_taken(dp: Datapath, lab: Lab) -> None:
    """A flow still within its fin timeout (FIN seen, final ACKs may still come) keeps its port."""
    set_cfg(dp, snat_port_min=40000, snat_port_max=40000)
    nodeport(dp, BE_REMOTE)
    closing = foreign(time.monotonic_ns() + 5 * 10**9 + TW_HOLD_NS, CtState.CLOSING)
    dp.snat4.update(snat_key(40000), closing)
    assert run_in(dp, lab, "kp_from_netdev", client_syn()).retval == TC_ACT_SHOT
    assert dp.stat(Stat.DROP_SNAT_NO_PORT)[0] == 1
    kept = snat_entry(dp, 40000)
    assert kept is not None and bytes(kept) == bytes(closing)


def test_snat_own_tombstone_is_taken_at_once(dp: Datapath, lab: Lab) -> None:
    """The same client tuple coming back after its conntrack entry expired may have its old port
    while it cools: its timestamps continue there."""
    set_cfg(dp, snat_port_min=40000, snat_port_max=40000)
    nodeport(dp, BE_REMOTE)
    mine = Snat4Val(time.monotonic_ns() - 10**9 + TW_HOLD_NS, ip_to_nbo(CLIENT), ip_to_nbo(NODE),
                    port_to_nbo(CPORT), port_to_nbo(NODEPORT), CtState.CLOSED, CtFlag.SNAT)  # fmt: skip
    dp.snat4.update(snat_key(40000), mine)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    nat = snat_entry(dp, 40000)
    assert nat is not None and nat.state == CtState.SYN_SENT


def test_snat_ports_rotate_through_the_range(dp: Datapath, lab: Lab) -> None:
    """Bench finding (issue 4, snat row: 1-s SYN retries and timeouts): random picks re-used ports whose
    previous connection the backend still held in TIME_WAIT. One client's tuples now map to distinct
    home ports (its port plus an offset): `span` consecutive client ports get every port of the range
    exactly once, without a single retry, and the same client port maps to the same port again."""
    lo, span = 40000, 16
    set_cfg(dp, snat_port_min=lo, snat_port_max=lo + span - 1)
    nodeport(dp, BE_REMOTE)
    ports = []
    for i in range(span):
        out = run_in(dp, lab, "kp_from_netdev", client_syn(sport=CPORT + i))
        ok(out, TC_ACT_REDIRECT)
        ports.append(parse(out.data_out).sport)
        # The flow ends at once: its port is free again (a random allocator would pick it again soon).
        dp.snat4.delete(snat_key(ports[-1]))
    assert sorted(ports) == list(range(lo, lo + span)), ports
    assert dp.stat(Stat.SNAT_RETRY)[0] == 0
    # Consecutive: each port is the one after the previous (modulo the range).
    assert all((b - a) % span == 1 for a, b in zip(ports, ports[1:], strict=False)), ports
    out = run_in(dp, lab, "kp_from_netdev", client_syn(sport=CPORT + span))
    assert parse(out.data_out).sport == ports[0]


def test_snat_home_port_taken_falls_back_to_the_cursor(dp: Datapath, lab: Lab) -> None:
    """A client tuple's home port (its first candidate) held by another client's live flow: the
    cursor finds a free port; live flows' ports are never touched."""
    lo, span = 40000, 4
    set_cfg(dp, snat_port_min=lo, snat_port_max=lo + span - 1)
    nodeport(dp, BE_REMOTE)
    home = parse(run_in(dp, lab, "kp_from_netdev", client_syn(sport=CPORT)).data_out).sport
    dp.snat4.delete(snat_key(home))
    dp.ct4.delete(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    taken = foreign(time.monotonic_ns() + 60 * 10**9, CtState.ESTABLISHED)
    others = [lo + (home - lo + k) % span for k in (1, 2)]
    for port in (home, *others):
        dp.snat4.update(snat_key(port), taken)
    out = run_in(dp, lab, "kp_from_netdev", client_syn(sport=CPORT))
    ok(out, TC_ACT_REDIRECT)
    assert parse(out.data_out).sport == lo + (home - lo + 3) % span
    for port in (home, *others):
        kept = snat_entry(dp, port)
        assert kept is not None and bytes(kept) == bytes(taken)
    assert dp.stat(Stat.SNAT_RETRY)[0] >= 1


@pytest.mark.parametrize("flags", [0, SvcFlag.ETP_LOCAL], ids=["local-backend", "etp-local"])
def test_no_snat_for_local_backends_and_etp_local(dp: Datapath, lab: Lab, flags: int) -> None:
    set_cfg(dp)
    be = BE_LOCAL if not flags else BE_REMOTE
    nodeport(dp, be, flags=SvcFlag.NODEPORT | flags)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_OK)
    assert out.data_out.hex() == frame(CLIENT, be.addr, syn_seg(CLIENT, be.addr, CPORT, 8080)).hex()
    assert dp.stat(Stat.SNAT)[0] == 0 and len(list(dp.snat4.iter_keys())) == 0


def test_local_backend_reply_to_outside_is_forwarded_by_bpf(dp: Datapath, lab: Lab) -> None:
    """The restored source is the node's own address: the kernel would drop it as a martian."""
    set_cfg(dp)
    nodeport(dp, BE_LOCAL)
    run_in(dp, lab, "kp_from_netdev", client_syn())
    reply = frame(BE_LOCAL.addr, CLIENT, syn_seg(BE_LOCAL.addr, CLIENT, 8080, CPORT, TCP_SYN | TCP_ACK))
    out = run_in(dp, lab, "kp_from_pod", reply)
    ok(out, TC_ACT_REDIRECT)
    assert (
        out.data_out.hex()
        == frame(
            NODE,
            CLIENT,
            syn_seg(NODE, CLIENT, NODEPORT, CPORT, TCP_SYN | TCP_ACK),
            ttl=63,
            macs=(GW_MAC, lab.mac),
        ).hex()
    )


def test_snat_icmp_errors_reach_the_client_translated(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    sent = parse(run_in(dp, lab, "kp_from_netdev", client_syn()).data_out)
    port = sent.sport
    # A router between the nodes: frag needed about node:port -> backend.
    err = frame(NODE2, NODE, icmp(3, 4, 1400, sent.l3 + sent.l4[:8]), IPPROTO_ICMP)
    out = run_in(dp, lab, "kp_from_netdev", err)
    ok(out, TC_ACT_REDIRECT)
    got = parse(out.data_out)
    assert (got.src, got.dst) == (NODE2, CLIENT)
    inner = got.l4[8:]
    assert inner[12:20] == bytes(map(int, CLIENT.split("."))) + bytes(map(int, NODE.split(".")))
    assert struct.unpack("!HH", inner[20:24]) == (CPORT, NODEPORT)
    assert dp.stat(Stat.ICMP_SNAT)[0] == 1
    # The backend itself: the message must come from the frontend.
    err = frame(BE_REMOTE.addr, NODE, icmp(3, 3, 0, sent.l3 + sent.l4[:8]), IPPROTO_ICMP)
    out = run_in(dp, lab, "kp_from_netdev", err)
    ok(out, TC_ACT_REDIRECT)
    assert (parse(out.data_out).src, parse(out.data_out).dst) == (NODE, CLIENT)
    assert port == sent.sport


def test_icmp_error_of_a_local_pod_about_a_flow_snated_to_it_reaches_the_client(
    dp: Datapath, lab: Lab
) -> None:
    """An endpoint without nodeName that is a pod of the ingress node gets SNATed traffic; its ICMP
    errors about that flow come back on its own veth (kp_from_pod), not the netdev."""
    set_cfg(dp)
    unnamed = Backend(3, BE_LOCAL.addr, 8080)  # not flagged local, no node address: SNAT
    nodeport(dp, unnamed)
    sent = parse(run_in(dp, lab, "kp_from_netdev", client_syn()).data_out)
    assert (sent.src, sent.dst) == (NODE, unnamed.addr)
    err = frame(unnamed.addr, NODE, icmp(3, 3, 0, sent.l3 + sent.l4[:8]), IPPROTO_ICMP)
    out = run_in(dp, lab, "kp_from_pod", err)
    ok(out, TC_ACT_REDIRECT)
    got = parse(out.data_out)
    assert (got.src, got.dst) == (NODE, CLIENT)  # from the frontend the client talked to
    inner = got.l4[8:]
    assert inner[12:20] == bytes(map(int, CLIENT.split("."))) + bytes(map(int, NODE.split(".")))
    assert struct.unpack("!HH", inner[20:24]) == (CPORT, NODEPORT)
    assert dp.stat(Stat.ICMP_SNAT)[0] == 1


# ---- DSR ----
def test_dsr_opt_ingress_and_backend_node(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp, dsr=DsrMode.OPT)
    nodeport(dp, BE_REMOTE)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    seg = syn_seg(CLIENT, BE_REMOTE.addr, CPORT, 8080)
    sent = frame(
        CLIENT, BE_REMOTE.addr, seg, ttl=63, options=dsr_opt(NODE, NODEPORT), macs=(NODE2_MAC, lab.mac)
    )
    assert out.data_out.hex() == sent.hex()
    fwd = dp.ct(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.flags & CtFlag.DSR_OPT and not fwd.flags & CtFlag.SNAT
    assert dp.stat(Stat.DSR_OPT_TX)[0] == 1
    # Later packets: no option.
    out = run_in(dp, lab, "kp_from_netdev", client_syn(TCP_ACK))
    ok(out, TC_ACT_REDIRECT)
    assert parse(out.data_out).ihl == 20 and dp.stat(Stat.DSR_FWD)[0] == 1

    # The backend's node (same maps, now configured as NODE2): strips the option, tracks the flow.
    dp.reset()
    set_cfg(dp, node=NODE2, dsr=DsrMode.OPT)
    out = run_in(dp, lab, "kp_from_netdev", sent)
    ok(out, TC_ACT_OK)
    assert out.data_out.hex() == frame(CLIENT, BE_REMOTE.addr, seg, ttl=63, macs=(NODE2_MAC, lab.mac)).hex()
    rep = dp.ct(ct_key(BE_REMOTE.addr, CLIENT, 8080, CPORT, IPPROTO_TCP, CtDir.REPLY))
    assert rep is not None and rep.flags & CtFlag.DSR_OPT
    assert (nbo_to_ip(rep.nat_addr), nbo_to_port(rep.nat_port)) == (NODE, NODEPORT)
    assert dp.stat(Stat.DSR_RX)[0] == 1
    # The backend's reply leaves with the service address, straight to the client.
    synack = frame(BE_REMOTE.addr, CLIENT, syn_seg(BE_REMOTE.addr, CLIENT, 8080, CPORT, TCP_SYN | TCP_ACK))
    out = run_in(dp, lab, "kp_from_pod", synack)
    ok(out, TC_ACT_REDIRECT)
    assert (
        out.data_out.hex()
        == frame(
            NODE,
            CLIENT,
            syn_seg(NODE, CLIENT, NODEPORT, CPORT, TCP_SYN | TCP_ACK),
            ttl=63,
            macs=(GW_MAC, lab.mac),
        ).hex()
    )


def test_dsr_backend_node_icmp_error_leaves_translated(dp: Datapath, lab: Lab) -> None:
    """Bug found with real traffic: the backend node's own stack answers a DSR packet too big for the
    pod's veth with frag needed quoting client -> backend; kp_to_netdev must make the quote
    client -> frontend, or the client's socket never finds it (no PMTU discovery through DSR)."""
    set_cfg(dp, node=NODE2, dsr=DsrMode.OPT)
    seg = udp(CLIENT, BE_REMOTE.addr, CPORT, 8080, b"x" * 32)
    sent = frame(CLIENT, BE_REMOTE.addr, seg, IPPROTO_UDP, options=dsr_opt(NODE, NODEPORT))
    ok(run_in(dp, lab, "kp_from_netdev", sent), TC_ACT_OK)
    delivered = parse(frame(CLIENT, BE_REMOTE.addr, seg, IPPROTO_UDP))
    err = frame(NODE2, CLIENT, icmp(3, 4, 1400, delivered.l3 + delivered.l4[:8]), IPPROTO_ICMP)
    out = run_in(dp, lab, "kp_to_netdev", err)
    ok(out, TC_ACT_OK)
    got = parse(out.data_out)
    assert (got.src, got.dst) == (NODE2, CLIENT)  # from the node that found the packet too big
    inner = got.l4[8:]
    assert inner[12:20] == bytes(map(int, CLIENT.split("."))) + bytes(map(int, NODE.split(".")))
    assert struct.unpack("!HH", inner[20:24]) == (CPORT, NODEPORT)
    assert dp.stat(Stat.ICMP_REVNAT)[0] == 1
    # Not about a tracked flow: unchanged.
    other = parse(frame(CLIENT, "10.244.2.99", udp(CLIENT, "10.244.2.99", CPORT, 9, b"y"), IPPROTO_UDP))
    err = frame(NODE2, CLIENT, icmp(3, 4, 1400, other.l3 + other.l4[:8]), IPPROTO_ICMP)
    out = run_in(dp, lab, "kp_to_netdev", err)
    ok(out, TC_ACT_OK)
    assert out.data_out.hex() == err.hex()


def test_dsr_opt_udp_every_datagram(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp, dsr=DsrMode.OPT)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    for _ in range(2):
        q = frame(CLIENT, NODE, udp(CLIENT, NODE, CPORT, NODEPORT, b"q"), IPPROTO_UDP)
        out = run_in(dp, lab, "kp_from_netdev", q)
        ok(out, TC_ACT_REDIRECT)
        assert (
            out.data_out.hex()
            == frame(
                CLIENT,
                BE_REMOTE.addr,
                udp(CLIENT, BE_REMOTE.addr, CPORT, 8080, b"q"),
                IPPROTO_UDP,
                ttl=63,
                options=dsr_opt(NODE, NODEPORT),
                macs=(NODE2_MAC, lab.mac),
            ).hex()
        )
    assert dp.stat(Stat.DSR_OPT_TX)[0] == 2


def ipip(outer_src: str, outer_dst: str, inner: bytes, macs: tuple[bytes, bytes]) -> bytes:
    inner_ip = inner[14:]
    return ether(
        ipv4(outer_src, outer_dst, IPPROTO_IPIP, inner_ip, ident=0, ttl=64), dst=macs[0], src=macs[1]
    )


def test_dsr_ipip_ingress_and_backend_node(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp, dsr=DsrMode.IPIP)
    nodeport(dp, BE_REMOTE)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    seg = syn_seg(CLIENT, BE_REMOTE.addr, CPORT, 8080)
    inner = frame(CLIENT, BE_REMOTE.addr, seg, ttl=63, options=dsr_opt(NODE, NODEPORT))
    sent = ipip(NODE, NODE2, inner, (NODE2_MAC, lab.mac))
    assert out.data_out.hex() == sent.hex()
    fwd = dp.ct(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.flags & CtFlag.DSR_IPIP and nbo_to_ip(fwd.snat_addr) == NODE2
    out = run_in(dp, lab, "kp_from_netdev", client_syn(TCP_ACK))
    ok(out, TC_ACT_REDIRECT)
    assert parse(out.data_out).proto == IPPROTO_IPIP and len(out.data_out) == len(client_syn(TCP_ACK)) + 20
    assert dp.stat(Stat.DSR_IPIP_TX)[0] == 2

    dp.reset()
    set_cfg(dp, node=NODE2, dsr=DsrMode.IPIP)
    out = run_in(dp, lab, "kp_from_netdev", sent)
    ok(out, TC_ACT_OK)
    assert out.data_out.hex() == frame(CLIENT, BE_REMOTE.addr, seg, ttl=63, macs=(NODE2_MAC, lab.mac)).hex()
    rep = dp.ct(ct_key(BE_REMOTE.addr, CLIENT, 8080, CPORT, IPPROTO_TCP, CtDir.REPLY))
    assert rep is not None and rep.flags & CtFlag.DSR_IPIP
    # SYN-ACK: service address as source, MSS lowered to fit the client's segments in IPIP.
    synack = frame(BE_REMOTE.addr, CLIENT, syn_seg(BE_REMOTE.addr, CLIENT, 8080, CPORT, TCP_SYN | TCP_ACK))
    out = run_in(dp, lab, "kp_from_pod", synack)
    ok(out, TC_ACT_REDIRECT)
    clamped = SYN_OPTIONS[:2] + struct.pack("!H", 1440) + SYN_OPTIONS[4:]
    want = tcp(NODE, CLIENT, NODEPORT, CPORT, TCP_SYN | TCP_ACK, options=clamped)
    assert out.data_out.hex() == frame(NODE, CLIENT, want, ttl=63, macs=(GW_MAC, lab.mac)).hex()
    assert dp.stat(Stat.MSS_CLAMP)[0] == 1
    # IPIP to another node is not ours.
    other = ipip(NODE, "192.168.1.77", inner, (NODE2_MAC, lab.mac))
    out = run_in(dp, lab, "kp_from_netdev", other)
    assert (out.retval, out.data_out) == (TC_ACT_OK, other)


def test_tunnels_to_the_node_that_are_not_dsr_are_left_alone(dp: Datapath, lab: Lab) -> None:
    """Only DSR's own IPIP is decapsulated (its inner packet carries DSR's option, or belongs to a flow
    received through the tunnel): another tunnel to the node's address (its own ipip device, another
    load balancer's, a forged one with any inner source) reaches the kernel as it came."""
    set_cfg(dp, node=NODE2, dsr=DsrMode.IPIP)
    inner = [
        frame(CLIENT, BE_REMOTE.addr, icmp(8, 0, 0, b"ping"), IPPROTO_ICMP),
        frame(CLIENT, BE_REMOTE.addr, udp(CLIENT, BE_REMOTE.addr, CPORT, 8080, b"q"), IPPROTO_UDP),
        frame(CLIENT, BE_REMOTE.addr, syn_seg(CLIENT, BE_REMOTE.addr, CPORT, 8080, TCP_ACK)),
        frame(CLIENT, BE_REMOTE.addr, syn_seg(CLIENT, BE_REMOTE.addr, CPORT, 8080), options=b"\x94\x04\0\0"),
    ]
    for f in inner:
        for src in (NODE, "203.0.113.9"):
            tunneled = ipip(src, NODE2, f, (NODE2_MAC, lab.mac))
            out = run_in(dp, lab, "kp_from_netdev", tunneled)
            assert (out.retval, out.data_out) == (TC_ACT_OK, tunneled)
    assert dp.stat(Stat.DSR_RX)[0] == 0


def test_dsr_option_in_fragments_is_taken(dp: Datapath, lab: Lab) -> None:
    """The DSR option has the copied flag (0x80): a router that fragments a DSR datagram without DF
    puts it in every fragment, and the backend's node takes the flow from the first."""
    set_cfg(dp, node=NODE2, dsr=DsrMode.OPT)
    seg = udp(CLIENT, BE_REMOTE.addr, CPORT, 8080, b"x" * 64)
    first = frame(
        CLIENT, BE_REMOTE.addr, seg[:40], IPPROTO_UDP, options=dsr_opt(NODE, NODEPORT), flags_frag=0x2000
    )
    out = run_in(dp, lab, "kp_from_netdev", first)
    ok_ret = out.retval == TC_ACT_OK and parse(out.data_out).ihl == 20
    assert ok_ret, out
    rep = dp.ct(ct_key(BE_REMOTE.addr, CLIENT, 8080, CPORT, IPPROTO_UDP, CtDir.REPLY))
    assert rep is not None and rep.flags & CtFlag.DSR_OPT and dp.stat(Stat.DSR_RX)[0] == 1


def test_dsr_ipip_host_network_backend_synack_is_clamped(dp: Datapath, lab: Lab) -> None:
    """A hostNetwork endpoint (its address is its node's) behind a DSR IPIP NodePort answers from the
    node's own stack, through kp_to_netdev: its SYN-ACK leaves with the frontend as source and the
    MSS lowered, as a pod backend's does, or the client's full-size segments do not fit the tunnel."""
    be = Backend(3, NODE2, 8080)
    set_cfg(dp, dsr=DsrMode.IPIP)
    nodeport(dp, be)
    out = run_in(dp, lab, "kp_from_netdev", client_syn())
    ok(out, TC_ACT_REDIRECT)
    dp.reset()
    set_cfg(dp, node=NODE2, dsr=DsrMode.IPIP)
    out = run_in(dp, lab, "kp_from_netdev", out.data_out)
    ok(out, TC_ACT_OK)
    synack = frame(NODE2, CLIENT, syn_seg(NODE2, CLIENT, 8080, CPORT, TCP_SYN | TCP_ACK))
    out = run_in(dp, lab, "kp_to_netdev", synack)
    ok(out, TC_ACT_OK)
    clamped = SYN_OPTIONS[:2] + struct.pack("!H", 1440) + SYN_OPTIONS[4:]
    want = tcp(NODE, CLIENT, NODEPORT, CPORT, TCP_SYN | TCP_ACK, options=clamped)
    assert out.data_out.hex() == frame(NODE, CLIENT, want).hex()
    assert dp.stat(Stat.MSS_CLAMP)[0] == 1


@pytest.mark.parametrize("df", [True, False], ids=["df", "no-df"])
def test_dsr_too_big_for_the_lan(dp: Datapath, lab: Lab, df: bool) -> None:
    set_cfg(dp, dsr=DsrMode.IPIP)
    nodeport(dp, BE_REMOTE, IPPROTO_UDP)
    payload = b"x" * (1500 - 20 - 8 - 10)  # fits the LAN, not with 8 + 20 more bytes
    q = frame(
        CLIENT, NODE, udp(CLIENT, NODE, CPORT, NODEPORT, payload), IPPROTO_UDP, flags_frag=IP_DF if df else 0
    )
    out = run_in(dp, lab, "kp_from_netdev", q)
    if not df:
        assert out.retval == TC_ACT_SHOT and dp.stat(Stat.DROP_DSR_TOO_BIG)[0] == 1
        return
    ok(out, TC_ACT_REDIRECT)
    p = parse(q)
    want = ipv4(NODE, CLIENT, IPPROTO_ICMP, icmp(3, 4, 1500 - 28, p.l3 + p.l4[:8]), ident=0, flags_frag=0)
    assert out.data_out.hex() == (swap_macs(q[:14]) + want).hex()
    assert dp.stat(Stat.FRAG_NEEDED)[0] == 1


def test_dsr_toggle_keeps_existing_flows(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    first = parse(run_in(dp, lab, "kp_from_netdev", client_syn()).data_out)
    assert first.src == NODE
    set_cfg(dp, dsr=DsrMode.OPT)
    later = parse(run_in(dp, lab, "kp_from_netdev", client_syn(TCP_ACK)).data_out)
    assert (later.src, later.sport) == (NODE, first.sport)  # still SNAT
    new = parse(run_in(dp, lab, "kp_from_netdev", client_syn(sport=CPORT + 1)).data_out)
    assert new.src == CLIENT and new.ihl == 28  # DSR with the option
    set_cfg(dp)
    still = parse(run_in(dp, lab, "kp_from_netdev", client_syn(TCP_ACK, sport=CPORT + 1)).data_out)
    assert still.src == CLIENT  # the DSR flow stays DSR


@pytest.mark.parametrize("dsr", [DsrMode.OFF, DsrMode.OPT, DsrMode.IPIP])
def test_deleted_nodeport_keeps_its_established_connections(dp: Datapath, lab: Lab, dsr: DsrMode) -> None:
    """A NodePort deleted while a client's TCP connection lives: kube-proxy's conntrack keeps translating
    it; kproxy does from the flow's entry (SNAT or DSR, even with the backend's entry gone), but only
    while the agent says a frontend was deleted recently (kp_config.orphan_until_ns): other times a
    packet that matches no frontend pays no conntrack lookup. A new SYN is not served."""
    set_cfg(dp, dsr=dsr)
    nodeport(dp, BE_REMOTE)
    first = parse(run_in(dp, lab, "kp_from_netdev", client_syn()).data_out)
    for slot in (1, 0):
        dp.svc4.delete(dp.svc_key(NODE, NODEPORT, IPPROTO_TCP, Scope.EXT, slot))
    dp.be4.delete(ctypes.c_uint32(BE_REMOTE.id))
    ack = client_syn(TCP_ACK)
    out = run_in(dp, lab, "kp_from_netdev", ack)
    assert (out.retval, out.data_out) == (TC_ACT_OK, ack)  # no deletion announced: not looked up
    set_cfg(dp, dsr=dsr, orphan_until_ns=time.monotonic_ns() + 60 * 10**9)
    out = run_in(dp, lab, "kp_from_netdev", ack)
    ok(out, TC_ACT_REDIRECT)
    later = parse(out.data_out)
    assert (later.src, later.sport, later.proto) == (first.src, first.sport, first.proto)
    assert (later.dst, later.dport) == (first.dst, first.dport)
    assert dp.stat(Stat.CT_ORPHAN)[0] == 1
    new = client_syn(sport=CPORT + 1)
    out = run_in(dp, lab, "kp_from_netdev", new)
    assert (out.retval, out.data_out) == (TC_ACT_OK, new)  # to the node's stack, which refuses it
    assert dp.ct(ct_key(CLIENT, NODE, CPORT + 1, NODEPORT, IPPROTO_TCP, CtDir.FWD)) is None
    set_cfg(dp, dsr=dsr, orphan_until_ns=time.monotonic_ns() - 1)
    out = run_in(dp, lab, "kp_from_netdev", ack)
    assert (out.retval, out.data_out) == (TC_ACT_OK, ack) and dp.stat(Stat.CT_ORPHAN)[0] == 1


# ---- pods ----
def test_hairpin(dp: Datapath) -> None:
    me = Backend(9, POD, 8080, BackendFlag.LOCAL)
    dp.add_service(SVC, SPORT, IPPROTO_TCP, [me])
    out = dp.run("kp_from_pod", frame(POD, SVC, syn_seg(POD, SVC, POD_PORT, SPORT)))
    ok(out, TC_ACT_REDIRECT)
    sent = frame(HAIRPIN, POD, syn_seg(HAIRPIN, POD, POD_PORT, 8080), macs=(IN_MAC_SRC, IN_MAC_DST))
    assert out.data_out.hex() == sent.hex()
    reply = frame(POD, HAIRPIN, syn_seg(POD, HAIRPIN, 8080, POD_PORT, TCP_SYN | TCP_ACK))
    out = dp.run("kp_from_pod", reply)
    ok(out, TC_ACT_REDIRECT)
    back = frame(
        SVC, POD, syn_seg(SVC, POD, SPORT, POD_PORT, TCP_SYN | TCP_ACK), macs=(IN_MAC_SRC, IN_MAC_DST)
    )
    assert out.data_out.hex() == back.hex()
    fwd = dp.ct(ct_key(POD, SVC, POD_PORT, SPORT, IPPROTO_TCP, CtDir.FWD))
    assert fwd is not None and fwd.flags & CtFlag.HAIRPIN and fwd.state == CtState.ESTABLISHED
    assert dp.stat(Stat.HAIRPIN)[0] == 2


def test_pod_to_own_nodeport_local_backend(dp: Datapath, lab: Lab) -> None:
    set_cfg(dp)
    nodeport(dp, BE_LOCAL)
    out = run_in(dp, lab, "kp_from_pod", frame(POD, NODE, syn_seg(POD, NODE, POD_PORT, NODEPORT)))
    ok(out, TC_ACT_OK)
    assert parse(out.data_out).dst == BE_LOCAL.addr and parse(out.data_out).src == POD
    reply = frame(BE_LOCAL.addr, POD, syn_seg(BE_LOCAL.addr, POD, 8080, POD_PORT, TCP_SYN | TCP_ACK))
    out = run_in(dp, lab, "kp_from_pod", reply)
    ok(out, TC_ACT_REDIRECT)  # source = node address: forwarded by BPF, not the kernel
    assert (
        out.data_out.hex()
        == frame(
            NODE,
            POD,
            syn_seg(NODE, POD, NODEPORT, POD_PORT, TCP_SYN | TCP_ACK),
            ttl=63,
            macs=(POD_MAC, lab.mac),
        ).hex()
    )


@pytest.mark.parametrize(
    "dst,port,flags", [(NODE, NODEPORT, SvcFlag.NODEPORT), (LB_IP, 80, SvcFlag.LOADBALANCER)]
)
def test_pod_to_nodeport_or_lb_remote_backend_is_plain_dnat(
    dp: Datapath, lab: Lab, dst: str, port: int, flags: int
) -> None:
    set_cfg(dp, dsr=DsrMode.OPT)
    dp.add_service(dst, port, IPPROTO_TCP, [BE_REMOTE], flags=flags)
    add_be(dp, BE_REMOTE, IPPROTO_TCP)
    out = run_in(dp, lab, "kp_from_pod", frame(POD, dst, syn_seg(POD, dst, POD_PORT, port)))
    ok(out, TC_ACT_OK)
    assert (
        out.data_out.hex() == frame(POD, BE_REMOTE.addr, syn_seg(POD, BE_REMOTE.addr, POD_PORT, 8080)).hex()
    )
    assert dp.stat(Stat.SNAT)[0] == 0 and dp.stat(Stat.DSR_OPT_TX)[0] == 0


# ---- SNAT ports of flows closed by both ends (issue 13) ----
def closed_flow(dp: Datapath, lab: Lab, backend_first: bool, sport: int = CPORT) -> tuple[int, list[int]]:
    """A whole SNATed connection from CLIENT:sport with timestamps (SYN TSval 0x1234_0000, FIN TSval
    0x1235_0000: key 0x1236), closed by FINs from both ends; returns its port and the FWD state after
    each FIN."""
    port = parse(run_in(dp, lab, "kp_from_netdev", syn_with(0x1234_0000, 10, sport)).data_out).sport

    def from_backend(flags: int) -> bytes:
        return frame(
            BE_REMOTE.addr, NODE, tcp(BE_REMOTE.addr, NODE, 8080, port, flags, seq=900, ack=11), ttl=63
        )

    def from_client(flags: int) -> bytes:
        seg = tcp(CLIENT, NODE, sport, NODEPORT, flags, seq=11, ack=901, options=ts_option(0x1235_0000, 5))
        return frame(CLIENT, NODE, seg)

    ok(run_in(dp, lab, "kp_from_netdev", from_backend(TCP_SYN | TCP_ACK)), TC_ACT_REDIRECT)
    ok(run_in(dp, lab, "kp_from_netdev", from_client(TCP_ACK)), TC_ACT_REDIRECT)
    fins = [from_backend(TCP_FIN | TCP_ACK), from_client(TCP_FIN | TCP_ACK)]
    states = []
    for f in fins if backend_first else fins[::-1]:
        ok(run_in(dp, lab, "kp_from_netdev", f), TC_ACT_REDIRECT)
        fwd = dp.ct(ct_key(CLIENT, NODE, sport, NODEPORT, IPPROTO_TCP, CtDir.FWD))
        assert fwd is not None
        states.append(fwd.state)
    return port, states


@pytest.mark.parametrize("backend_first", [True, False], ids=["backend-first", "client-first"])
def test_snat_fins_of_both_ends_close_the_flow(dp: Datapath, lab: Lab, backend_first: bool) -> None:
    """A SNATed flow is CLOSED (nf_conntrack: TIME_WAIT) once both ends sent their FIN, whichever
    first; with one FIN (half-closed: the other end may still send) it stays CLOSING, however often
    that FIN is retransmitted. The SNAT entry follows, with the client FIN's key."""
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    port, states = closed_flow(dp, lab, backend_first)
    assert states == [CtState.CLOSING, CtState.CLOSED]
    nat = snat_entry(dp, port)
    assert nat is not None and (nat.state, nat.tw_key, nat.flags & CtFlag.TW_TS) == (
        CtState.CLOSED, 0x1236, CtFlag.TW_TS,
    )  # fmt: skip


@pytest.mark.parametrize("side", ["client", "backend"])
def test_snat_repeated_fin_of_one_end_keeps_the_flow_closing(dp: Datapath, lab: Lab, side: str) -> None:
    set_cfg(dp)
    nodeport(dp, BE_REMOTE)
    port = parse(run_in(dp, lab, "kp_from_netdev", syn_with(0x1234_0000, 10)).data_out).sport
    if side == "client":
        seg = tcp(
            CLIENT, NODE, CPORT, NODEPORT, TCP_FIN | TCP_ACK, seq=11, ack=901, options=ts_option(0x1235_0000)
        )
        fin = frame(CLIENT, NODE, seg)
    else:
        fin = frame(BE_REMOTE.addr, NODE, tcp(BE_REMOTE.addr, NODE, 8080, port, TCP_FIN | TCP_ACK), ttl=63)
    for _ in range(3):
        ok(run_in(dp, lab, "kp_from_netdev", fin), TC_ACT_REDIRECT)
        fwd = dp.ct(ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD))
        assert fwd is not None and fwd.state == CtState.CLOSING


@pytest.mark.parametrize(
    ("tsval", "taken"),
    [(0x1236_0000, True), (0x1235_0001, False)],
    ids=["beyond-the-key", "refused-by-time-wait"],  # in the old FIN's 64 Ki range: PAWS, or not beyond
)
def test_snat_port_of_a_flow_closed_both_ways_goes_to_another_client_at_once(
    dp: Datapath, lab: Lab, tsval: int, taken: bool
) -> None:
    """Issue 13 (SNAT at a third of no NAT, with 1-s retries): a closed flow's port stayed with it for the
    fin timeout (10 s) before another client tuple could have it, even when the backend's TIME_WAIT would
    take the new SYN, which capped one backend at (port range) / 10 s new connections/s. nf_nat evicts a
    TIME_WAIT conntrack entry whose tuple a new connection needs (nf_nat_used_tuple_harder); so does
    this, for a SYN the TIME_WAIT accepts: the old flow's FWD entry goes, and a late FIN of the old
    client can no longer write itself back into the port's entry. One port in the range."""
    set_cfg(dp, snat_port_min=40000, snat_port_max=40000)
    nodeport(dp, BE_REMOTE)
    port, _ = closed_flow(dp, lab, backend_first=True)
    assert port == 40000
    old_fwd = ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD)
    out = run_in(dp, lab, "kp_from_netdev", syn_with(tsval, SEQ_SYN, sport=CPORT + 1))
    if not taken:
        assert out.retval == TC_ACT_SHOT and dp.stat(Stat.DROP_SNAT_NO_PORT)[0] == 1
        nat = snat_entry(dp, 40000)
        assert nat is not None and nbo_to_port(nat.client_port) == CPORT and nat.state == CtState.CLOSED
        assert dp.ct(old_fwd) is not None
        return
    ok(out, TC_ACT_REDIRECT)
    assert parse(out.data_out).sport == 40000
    assert dp.stat(Stat.DROP_SNAT_NO_PORT)[0] == 0 and dp.stat(Stat.CT_TAKEOVER)[0] == 1
    nat = snat_entry(dp, 40000)
    assert nat is not None and nbo_to_port(nat.client_port) == CPORT + 1 and nat.state == CtState.SYN_SENT
    assert dp.ct(old_fwd) is None
    # A late FIN of the old connection (a higher TSval: it would raise the old key) finds no flow; the
    # port stays the new flow's, and its replies go to the new client.
    seg = tcp(
        CLIENT, NODE, CPORT, NODEPORT, TCP_FIN | TCP_ACK, seq=11, ack=901, options=ts_option(0x1240_0000)
    )
    run_in(dp, lab, "kp_from_netdev", frame(CLIENT, NODE, seg))
    nat = snat_entry(dp, 40000)
    assert nat is not None and nbo_to_port(nat.client_port) == CPORT + 1
    synack = frame(BE_REMOTE.addr, NODE, tcp(BE_REMOTE.addr, NODE, 8080, 40000, TCP_SYN | TCP_ACK), ttl=63)
    out = run_in(dp, lab, "kp_from_netdev", synack)
    ok(out, TC_ACT_REDIRECT)
    assert parse(out.data_out).dport == CPORT + 1


def test_snat_closed_flow_of_another_backend_keeps_its_new_flow(dp: Datapath, lab: Lab) -> None:
    """Taking a closed flow's port deletes that flow's FWD entry only while it still is that flow's: the
    client may have re-opened the same tuple toward another backend meanwhile, a live flow."""
    set_cfg(dp, snat_port_min=40000, snat_port_max=40000)
    nodeport(dp, BE_REMOTE)
    closed_flow(dp, lab, backend_first=True)
    fk = ct_key(CLIENT, NODE, CPORT, NODEPORT, IPPROTO_TCP, CtDir.FWD)
    other = dp.ct(fk)
    assert other is not None
    other.nat_addr, other.state = ip_to_nbo("10.244.3.3"), CtState.ESTABLISHED  # its new flow elsewhere
    dp.ct4.update(fk, other)
    ok(run_in(dp, lab, "kp_from_netdev", syn_with(0x1236_0000, SEQ_SYN, sport=CPORT + 1)), TC_ACT_REDIRECT)
    kept = dp.ct(fk)
    assert kept is not None and bytes(kept) == bytes(other)
    assert dp.stat(Stat.CT_TAKEOVER)[0] == 0
