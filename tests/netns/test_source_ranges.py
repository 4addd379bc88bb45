"""loadBalancerSourceRanges with real traffic: the external client `ext` reaches a LoadBalancer IP
only while the Service's ranges contain it; NodePorts of the same Service and other Services stay
open, and a connection made while it was allowed keeps working after the ranges change.

Lab: one node n1 with pods n1p1 (the backend) and n1p2, and `ext`, whose route for the LoadBalancer
IPs (192.168.78.0/24) goes to n1 (kproxy.lab).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy import abi
from kproxy.bpf.maps import KproxyMaps
from kproxy.lab import Lab
from kproxy.lab import manifests as mf

pytestmark = pytest.mark.root

CLUSTER_IP, LB_IP, NODE_PORT = "10.96.50.1", "192.168.78.40", 31500
OPEN_CLUSTER_IP, OPEN_LB_IP = "10.96.50.2", "192.168.78.41"
PORTS = [mf.Port("http", 80, 8080, "TCP", NODE_PORT)]


def write_service(lab: Lab, name: str, cluster_ip: str, lb_ip: str, ranges: list[str] | None) -> None:
    ports = PORTS if ranges is not None else [mf.Port("http", 80, 8080, "TCP", NODE_PORT + 1)]
    svc: dict[str, Any] = mf.service(name, ports, cluster_ip, type="LoadBalancer", lb_ips=[lb_ip])
    if ranges is not None:
        svc["spec"]["loadBalancerSourceRanges"] = ranges
    pod = lab.pod("n1p1")
    lab.write_manifest(name, [svc, mf.endpoint_slice(name, [(pod.ip, pod.node)], ports)])


def programmed_ranges(lab: Lab) -> list[str]:
    """The ranges n1's kp_lbsrc4 holds for the LoadBalancer frontend's service port."""
    with KproxyMaps.open(lab.node("n1").bpffs) as m:
        key = abi.Svc4Key(abi.ip_to_nbo(LB_IP), abi.port_to_nbo(80), 0, abi.IPPROTO_TCP, abi.Scope.EXT)
        s0 = m.svc4.get(key)
        if s0 is None or not s0.flags & abi.SvcFlag.SRC_RANGES:
            return []
        return sorted(
            f"{abi.nbo_to_ip(k.addr)}/{k.prefixlen - abi.LBSRC4_SVC_BITS}"
            for k, _ in m.lbsrc4.items()
            if k.svc_id == s0.svc_id
        )


def wait_ranges(lab: Lab, want: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (have := programmed_ranges(lab)) != sorted(want):
        if time.monotonic() > deadline:
            raise AssertionError(f"n1 source ranges {have}, expected {sorted(want)}")
        time.sleep(0.05)


def drops(lab: Lab) -> int:
    with KproxyMaps.open(lab.node("n1").bpffs) as m:
        return (m.stat_totals().get(int(abi.Stat.DROP_SRC_RANGE)) or (0, 0))[0]


@pytest.fixture(scope="module")
def slab(tc_object: Path) -> Iterator[Lab]:
    with Lab(nodes=1, pods_per_node=2) as lab:
        write_service(lab, "sr", CLUSTER_IP, LB_IP, [f"{lab.ext.ip}/32"])
        write_service(lab, "open", OPEN_CLUSTER_IP, OPEN_LB_IP, None)
        pod = lab.pod("n1p1").ip
        for addr in (LB_IP, OPEN_LB_IP):
            lab.wait_programmed(addr, 80, [pod])
        wait_ranges(lab, [f"{lab.ext.ip}/32"])
        yield lab


def refused(lab: Lab, addr: str, port: int) -> bool:
    try:
        lab.tcp_request(lab.ext, addr, port, timeout=1.0)
    except OSError:
        return True
    return False


def test_allowed_client_reaches_the_lb_ip(slab: Lab) -> None:
    before = drops(slab)
    got = slab.tcp_request(slab.ext, LB_IP, 80)
    assert got["pod"] == "n1p1" and got["client"].split(":")[0] == slab.ext.ip
    assert drops(slab) == before


def test_pods_are_not_exempt(slab: Lab) -> None:
    # kube-proxy's KUBE-FW chain sees pod traffic to the LB IP too: not in the ranges, dropped
    before = drops(slab)
    try:
        slab.tcp_request(slab.pod("n1p2"), LB_IP, 80, timeout=1.0)
    except OSError:
        pass
    else:
        raise AssertionError("a pod outside loadBalancerSourceRanges reached the LoadBalancer IP")
    assert drops(slab) > before
    # its ClusterIP is not restricted
    assert slab.tcp_request(slab.pod("n1p2"), CLUSTER_IP, 80)["pod"] == "n1p1"


def test_ranges_changed_to_exclude_the_client(slab: Lab) -> None:
    with slab.stream(slab.ext, LB_IP, 80) as established:
        established.roundtrip()
        write_service(slab, "sr", CLUSTER_IP, LB_IP, ["10.0.0.0/8"])
        wait_ranges(slab, ["10.0.0.0/8"])
        before = drops(slab)
        assert refused(slab, LB_IP, 80), "new connection from outside the ranges must fail"
        assert drops(slab) > before, "the drop must be counted as DROP_SRC_RANGE"
        # the connection made while allowed goes on (only new flows are checked)
        established.roundtrip()
    # other Services, and this Service's NodePort, are not restricted (kube-proxy: LB IPs only)
    assert slab.tcp_request(slab.ext, OPEN_LB_IP, 80)["pod"] == "n1p1"
    assert slab.tcp_request(slab.ext, slab.node("n1").ip, NODE_PORT)["pod"] == "n1p1"
    # allowed again: new connections work
    write_service(slab, "sr", CLUSTER_IP, LB_IP, ["10.0.0.0/8", f"{slab.ext.ip}/32"])
    wait_ranges(slab, ["10.0.0.0/8", f"{slab.ext.ip}/32"])
    assert slab.tcp_request(slab.ext, LB_IP, 80)["pod"] == "n1p1"


def test_ranges_removed_opens_the_lb_ip(slab: Lab) -> None:
    write_service(slab, "sr", CLUSTER_IP, LB_IP, [])
    wait_ranges(slab, [])
    with KproxyMaps.open(slab.node("n1").bpffs) as m:
        assert len(m.lbsrc4) == 0, "ranges of a Service without them must be deleted"
    assert slab.tcp_request(slab.pod("n1p2"), LB_IP, 80)["pod"] == "n1p1"
