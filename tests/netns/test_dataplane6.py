"""IPv6 and dual-stack Services with real packets through the lab (issue 15): every node and pod has both
families (kproxy/lab). Pod clients through IPv6 ClusterIPs, the external client through IPv6 NodePorts,
LoadBalancer and external IPs (SNAT to a backend on the other node, the client kept for a local one
and for externalTrafficPolicy Local), REJECT with ICMPv6, affinity, hairpin, and the IPv4 half of the
same Services alongside.

Plan: nodes fd00:77::1<i>, pods fd00:10:244:<i>::1<j>, ext fd00:77::100; LoadBalancer and external
IPv6 addresses in fd00:78::/64, which ext routes to n1 (so n1 is the ingress node from outside).
"""

from __future__ import annotations

import collections
import signal

import pytest

from kproxy.abi import Stat
from kproxy.bpf.maps import KproxyMaps
from kproxy.lab import Lab
from kproxy.lab.cluster import client_address

pytestmark = pytest.mark.root

Program = object


def counter(lab: Lab, node: str, stat: Stat) -> int:
    with KproxyMaps.open(lab.node(node).bpffs) as maps:
        return maps.stat_totals().get(int(stat), (0, 0))[0]


def test_dual_stack_service_serves_both_families(lab: Lab, program_dual: Program) -> None:
    program_dual("ds6-both", "10.96.16.1", "fd00:10:96::16:1", ["n1p2", "n2p1"])  # type: ignore[operator]
    client = lab.pod("n1p1")
    for vip in ("10.96.16.1", "fd00:10:96::16:1"):
        answers = lab.tcp_requests(client, vip, 80, count=40)
        assert set(answers) == {"n1p2", "n2p1"}, (vip, collections.Counter(answers))
    reply = lab.tcp_request(client, "fd00:10:96::16:1", 80)
    assert client_address(reply) == client.ip6  # DNAT only: the backend sees the pod's own address


def test_ipv6_only_service(lab: Lab, program_dual: Program) -> None:
    program_dual(  # type: ignore[operator]
        "ds6-only", "", "fd00:10:96::16:2", ["n2p2"], wait=False,
        ip_family_policy="SingleStack", ip_families=["IPv6"],
    )  # fmt: skip
    reply = lab.tcp_request(lab.pod("n1p1"), "fd00:10:96::16:2", 80)
    assert reply["pod"] == "n2p2"


def test_ipv6_udp_through_a_cluster_ip(lab: Lab, program_dual: Program) -> None:
    program_dual(  # type: ignore[operator]
        "ds6-udp", "10.96.16.3", "fd00:10:96::16:3", ["n1p2", "n2p1"], port=53, target=8080, protocol="UDP"
    )
    got = {lab.udp_request(lab.pod("n2p2"), "fd00:10:96::16:3", 53)["pod"] for _ in range(40)}
    assert got == {"n1p2", "n2p1"}


def test_ipv6_no_backend_is_refused_with_icmpv6(lab: Lab, program_dual: Program) -> None:
    program_dual("ds6-empty", "10.96.16.4", "fd00:10:96::16:4", [])  # type: ignore[operator]
    program_dual(  # type: ignore[operator]
        "ds6-empty-udp", "10.96.16.9", "fd00:10:96::16:9", [], port=53, target=8080, protocol="UDP"
    )
    before = counter(lab, "n1", Stat.REJECT)
    with pytest.raises(ConnectionRefusedError):
        lab.tcp_request(lab.pod("n1p1"), "fd00:10:96::16:4", 80, timeout=5)
    with pytest.raises(ConnectionRefusedError):
        lab.udp_request(lab.pod("n1p1"), "fd00:10:96::16:9", 53, timeout=5)
    assert counter(lab, "n1", Stat.REJECT) >= before + 2


def test_ipv6_affinity_sticks(lab: Lab, program_dual: Program) -> None:
    program_dual(  # type: ignore[operator]
        "ds6-sticky", "10.96.16.5", "fd00:10:96::16:5", ["n1p2", "n2p1", "n2p2"], affinity_timeout=600
    )
    answers = lab.tcp_requests(lab.pod("n1p1"), "fd00:10:96::16:5", 80, count=20)
    assert len(set(answers)) == 1, collections.Counter(answers)


def test_ipv6_pod_balanced_to_itself_is_hairpinned(lab: Lab, program_dual: Program) -> None:
    program_dual("ds6-self", "10.96.16.6", "fd00:10:96::16:6", ["n1p1"])  # type: ignore[operator]
    reply = lab.tcp_request(lab.pod("n1p1"), "fd00:10:96::16:6", 80)
    assert reply["pod"] == "n1p1"
    assert client_address(reply) == "100::a9fe:2a01"  # the IPv6 hairpin source


@pytest.mark.parametrize("policy", ["Cluster", "Local"])
def test_ipv6_from_outside(lab: Lab, program_dual: Program, policy: str) -> None:
    """NodePort on n1's IPv6 address, an IPv6 LoadBalancer IP and an IPv6 external IP from the external
    client, backends on n1 (n1p2) and n2 (n2p1). Cluster: both serve; n2p1 sees n1's address (SNAT), n1p2
    the client. Local: only n1p2, which sees the client."""
    n1 = lab.node("n1")
    suffix = "7" if policy == "Cluster" else "8"
    lb6, ext6 = f"fd00:78::16:{suffix}0", f"fd00:78::16:{suffix}1"
    node_port = 30160 + int(suffix)
    program_dual(  # type: ignore[operator]
        f"ds6-out-{policy.lower()}", f"10.96.16.{suffix}", f"fd00:10:96::16:{suffix}", ["n1p2", "n2p1"],
        node_port=node_port, type="LoadBalancer", lb_ips=[lb6], external_ips=[ext6],
        external_traffic_policy=policy,
    )  # fmt: skip
    want = {"n1p2", "n2p1"} if policy == "Cluster" else {"n1p2"}
    snat_before = counter(lab, "n1", Stat.SNAT_NEW)
    for addr, port in ((n1.ip6, node_port), (lb6, 80), (ext6, 80)):
        backends = [lab.pod(p).ip6 for p in sorted(want)]
        lab.wait_programmed(addr, port, backends, nodes=["n1"])
        seen: dict[str, set[str]] = collections.defaultdict(set)
        for _ in range(30):
            reply = lab.tcp_request(lab.ext, addr, port, timeout=5)
            seen[reply["pod"]].add(client_address(reply))
        assert set(seen) == want, (addr, dict(seen))
        assert seen["n1p2"] == {lab.ext.ip6}, (addr, dict(seen))
        if policy == "Cluster":
            assert seen["n2p1"] == {n1.ip6}, (addr, dict(seen))
    if policy == "Cluster":
        assert counter(lab, "n1", Stat.SNAT_NEW) > snat_before


def test_ipv6_keeps_working_while_no_agent_runs(lab: Lab, program_dual: Program) -> None:
    """The attached programs reach their IPv6 halves through the pinned kp_progs6_v1: the kernel would
    empty an unpinned program array when the agent's object closes, and every IPv6 packet would then
    pass untranslated until an agent ran again. An established IPv6 stream and new connections both
    work with both agents killed, and after they come back."""
    program_dual("ds6-noagent", "10.96.16.10", "fd00:10:96::16:10", ["n2p1", "n1p2"])  # type: ignore[operator]
    client = lab.pod("n1p1")
    with lab.stream(client, "fd00:10:96::16:10", 80) as s:
        s.roundtrip()
        lab.stop_agent("n1", signal.SIGKILL)
        lab.stop_agent("n2", signal.SIGKILL)
        try:
            s.roundtrip()
            assert lab.tcp_request(client, "fd00:10:96::16:10", 80)["pod"] in ("n2p1", "n1p2")
        finally:
            lab.start_agent("n1")
            lab.start_agent("n2")
            lab.wait_agent("n1")
            lab.wait_agent("n2")
        s.roundtrip()
        assert lab.tcp_request(client, "fd00:10:96::16:10", 80)["pod"] in ("n2p1", "n1p2")


def test_ipv6_program_upgrade_keeps_streams(lab: Lab, program_dual: Program) -> None:
    """The upgrade's object re-uses the pinned kp_progs6_v1 and points it at its own IPv6 programs,
    then the links move to its entry points: an IPv6 stream goes on, and new connections work."""
    program_dual("ds6-upgrade", "10.96.16.11", "fd00:10:96::16:11", ["n2p1"])  # type: ignore[operator]
    client = lab.pod("n1p1")
    with lab.stream(client, "fd00:10:96::16:11", 80) as s:
        s.roundtrip()
        for node in lab.nodes:
            changed = lab.upgrade_programs(node.name)
            assert changed and all(new != old for _, old, new in changed), changed
            s.roundtrip()
    assert lab.tcp_request(client, "fd00:10:96::16:11", 80)["pod"] == "n2p1"
