"""PROG_TEST_RUN table for loadBalancerSourceRanges (bpfsrc/lib/srcrange.h, kp_lbsrc4_v1).

A frontend flagged SRC_RANGES admits a new flow only from a source its service port's ranges (an LPM
trie keyed by svc_id and prefix) contain; others are dropped and counted KP_DROP_SRC_RANGE.
Established flows are not checked again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from datapath import TC_ACT_OK, TC_ACT_SHOT, Backend, Datapath
from frames import IPPROTO_TCP, IPPROTO_UDP, SYN_OPTIONS, TCP_ACK, TCP_SYN, parse, tcp_frame, udp_frame

from kproxy import abi
from kproxy.abi import Scope, Stat, SvcFlag, ip_to_nbo

pytestmark = pytest.mark.root

LB_IP, PORT = "198.51.100.20", 443
NODE, NODEPORT = "192.168.1.10", 30443
CLUSTER_IP = "10.96.0.10"
ALLOWED = "203.0.113.9"  # in 203.0.113.0/24
OTHER = "192.0.2.77"  # in no range
POD = "10.244.1.5"
BE = Backend(1, "10.244.2.7", 8443)
SVC_ID = 7
LB_FLAGS = SvcFlag.LOADBALANCER | SvcFlag.SRC_RANGES


def add_range(dp: Datapath, svc_id: int, cidr: str) -> None:
    net = ipaddress.IPv4Network(cidr)
    key = abi.LbSrc4Key(abi.LBSRC4_SVC_BITS + net.prefixlen, svc_id, ip_to_nbo(str(net.network_address)))
    dp.obj.map(abi.MAP_LBSRC4).update(key, abi.LbSrc4Val())


@pytest.fixture
def sdp(dp: Datapath) -> Iterator[Datapath]:
    m = dp.obj.map(abi.MAP_LBSRC4)
    for k in list(m.iter_keys()):
        m.delete(k)
    yield dp
    for k in list(m.iter_keys()):
        m.delete(k)


def syn(src: str, dst: str = LB_IP, dport: int = PORT, sport: int = 40000) -> bytes:
    return tcp_frame(src, dst, sport, dport, TCP_SYN, options=SYN_OPTIONS)


def lb(dp: Datapath, *, flags: int = LB_FLAGS, ranges: tuple[str, ...] = ("203.0.113.0/24",)) -> None:
    for r in ranges:
        add_range(dp, SVC_ID, r)
    dp.add_service(LB_IP, PORT, IPPROTO_TCP, [BE], flags=flags, svc_id=SVC_ID)


def lb_udp(dp: Datapath) -> None:
    add_range(dp, SVC_ID, "203.0.113.0/24")
    dp.add_service(LB_IP, PORT, IPPROTO_UDP, [BE], flags=LB_FLAGS, svc_id=SVC_ID)


def lb_and_others(dp: Datapath) -> None:
    """The same service port's ClusterIP and NodePort: never restricted (kube-proxy's KUBE-FW is LB only)."""
    lb(dp)
    dp.add_service(CLUSTER_IP, PORT, IPPROTO_TCP, [BE], svc_id=SVC_ID)
    dp.add_service(NODE, NODEPORT, IPPROTO_TCP, [BE], svc_id=SVC_ID, flags=SvcFlag.NODEPORT)


def lb_two_scopes(dp: Datapath) -> None:
    """externalTrafficPolicy Local: pods use the INT entry, which carries the flag too."""
    add_range(dp, SVC_ID, "203.0.113.0/24")
    flags = LB_FLAGS | SvcFlag.TWO_SCOPES | SvcFlag.ETP_LOCAL
    dp.add_service(LB_IP, PORT, IPPROTO_TCP, [BE], flags=flags, svc_id=SVC_ID, scope=Scope.INT)
    dp.add_service(LB_IP, PORT, IPPROTO_TCP, [BE], flags=flags, svc_id=SVC_ID, scope=Scope.EXT)


def lb_ranges_of_another_port(dp: Datapath) -> None:
    add_range(dp, SVC_ID + 1, "0.0.0.0/0")  # another service port allows everyone; not this one
    dp.add_service(LB_IP, PORT, IPPROTO_TCP, [BE], flags=LB_FLAGS, svc_id=SVC_ID)


@dataclass
class Case:
    what: str
    setup: Callable[[Datapath], None]
    prog: str
    frame: bytes
    dnat: bool  # True: DNATed to BE and passed; False: dropped
    counters: dict[Stat, int] = field(default_factory=dict)


DROP = {Stat.DROP_SRC_RANGE: 1, Stat.DNAT: 0, Stat.CT_NEW: 0}
PASS = {Stat.DROP_SRC_RANGE: 0, Stat.DNAT: 1, Stat.CT_NEW: 1}

NETDEV, POD_IF = "kp_from_netdev", "kp_from_pod"


def ranged(*ranges: str, flags: int = LB_FLAGS) -> Callable[[Datapath], None]:
    return lambda dp: lb(dp, flags=flags, ranges=ranges)


CASES = [
    Case("allowed source from outside", lb, NETDEV, syn(ALLOWED), True, PASS),
    Case("other source from outside", lb, NETDEV, syn(OTHER), False, DROP),
    Case("allowed /32", ranged("192.0.2.77/32"), NETDEV, syn(OTHER), True, PASS),
    Case("neighbour of a /32", ranged("192.0.2.77/32"), NETDEV, syn("192.0.2.78"), False, DROP),
    Case("0.0.0.0/0 allows all", ranged("0.0.0.0/0"), NETDEV, syn(OTHER), True, PASS),
    Case("several ranges", ranged("10.0.0.0/8", "192.0.2.0/25"), NETDEV, syn(OTHER), True, PASS),
    Case("flag set, no ranges: all dropped", ranged(), NETDEV, syn(ALLOWED), False, DROP),
    Case("ranges without the flag: not checked", ranged("10.0.0.0/8", flags=SvcFlag.LOADBALANCER), NETDEV,
         syn(OTHER), True, PASS),
    Case("ranges of another svc id ignored", lb_ranges_of_another_port, NETDEV, syn(ALLOWED), False, DROP),
    Case("pod source not in ranges (no exemption)", lb, POD_IF, syn(POD), False, DROP),
    Case("pod source, INT scope of ETP Local", lb_two_scopes, POD_IF, syn(POD), False, DROP),
    Case("allowed source, INT scope of ETP Local", lb_two_scopes, POD_IF, syn(ALLOWED), True, PASS),
    Case("UDP other source", lb_udp, NETDEV, udp_frame(OTHER, LB_IP, 5353, PORT), False, DROP),
    Case("UDP allowed source", lb_udp, NETDEV, udp_frame(ALLOWED, LB_IP, 5353, PORT), True, PASS),
    Case("NodePort of the port unaffected", lb_and_others, NETDEV, syn(OTHER, NODE, NODEPORT), True, PASS),
    Case("ClusterIP of the port unaffected", lb_and_others, POD_IF, syn(POD, CLUSTER_IP), True, PASS),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_source_ranges(sdp: Datapath, case: Case) -> None:
    case.setup(sdp)
    out = sdp.run(case.prog, case.frame)
    if case.dnat:
        assert out.retval == TC_ACT_OK
        p = parse(out.data_out)
        assert (p.dst, p.dport) == (BE.addr, BE.port)
    else:
        assert out.retval == TC_ACT_SHOT
        assert not sdp.ct_entries(), "a refused flow must leave no conntrack entry"
    for stat, n in case.counters.items():
        assert sdp.stat(stat)[0] == n, stat.name


def test_no_backends_rejects_everyone_before_the_range_check(sdp: Datapath) -> None:
    # kube-proxy uses the firewall chain only when the service has endpoints; else REJECT for all
    add_range(sdp, SVC_ID, "203.0.113.0/24")
    sdp.add_service(LB_IP, PORT, IPPROTO_TCP, [], flags=LB_FLAGS, svc_id=SVC_ID)
    out = sdp.run("kp_from_netdev", syn(OTHER))
    assert out.retval != TC_ACT_SHOT and sdp.stat(Stat.REJECT)[0] == 1
    assert sdp.stat(Stat.DROP_SRC_RANGE)[0] == 0


def test_established_flow_survives_the_range_being_removed(sdp: Datapath) -> None:
    lb(sdp)
    assert sdp.run("kp_from_netdev", syn(ALLOWED)).retval == TC_ACT_OK
    m = sdp.obj.map(abi.MAP_LBSRC4)
    for k in list(m.iter_keys()):
        m.delete(k)
    ack = tcp_frame(ALLOWED, LB_IP, 40000, PORT, TCP_ACK, payload=b"GET /")
    out = sdp.run("kp_from_netdev", ack)
    assert out.retval == TC_ACT_OK and parse(out.data_out).dst == BE.addr
    assert sdp.stat(Stat.DROP_SRC_RANGE)[0] == 0
    # a new connection from the same client is checked again and refused
    assert sdp.run("kp_from_netdev", syn(ALLOWED, sport=40001)).retval == TC_ACT_SHOT
    assert sdp.stat(Stat.DROP_SRC_RANGE)[0] == 1


def test_synced_ranges_drive_the_datapath(sdp: Datapath) -> None:
    """Keys as kproxy.sync.lbsrc packs them, written through the kernel map: the LPM trie matches them."""
    from kproxy.sync.lbsrc import parse_ranges, range_key

    m = sdp.obj.map(abi.MAP_LBSRC4)
    for r in parse_ranges(["203.0.113.128/25", "192.0.2.77/32"]):
        m.update(range_key(SVC_ID, r), bytes(4))
    sdp.add_service(LB_IP, PORT, IPPROTO_TCP, [BE], flags=LB_FLAGS, svc_id=SVC_ID)
    verdicts = {
        src: sdp.run("kp_from_netdev", syn(src)).retval
        for src in ("203.0.113.200", "203.0.113.9", "192.0.2.77", "192.0.2.76")
    }
    ok, shot = TC_ACT_OK, TC_ACT_SHOT
    assert verdicts == {"203.0.113.200": ok, "203.0.113.9": shot, "192.0.2.77": ok, "192.0.2.76": shot}
