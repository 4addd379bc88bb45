"""The lab is dual-stack: every node, pod and the external client has an IPv6 address beside its IPv4 one.

Most of these need no IPv6 service datapath: plain IPv6 between pods, nodes and the external client
(which the programs on the veths and eth0 must pass untouched, neighbour discovery included), the pod
server's answers over IPv6, and the dual-stack manifests the lab builds, read by kproxy's own parser.
test_dual_stack_clusterip_over_ipv6 sends pod traffic through an IPv6 ClusterIP the agents program.

Plan: nodes fd00:77::1<i>, pods fd00:10:244:<i>::1<j> (n1p1 fd00:10:244:1::11), ext fd00:77::100.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kproxy.lab import Lab
from kproxy.lab import manifests as mf
from kproxy.lab.cluster import EXT_IP6, GATEWAY6, SERVICE6_CIDR, client_address
from kproxy.lab.netns import ip
from kproxy.model import parse_endpoint_slice, parse_service

Program = Callable[..., None]

pytestmark = pytest.mark.root


def test_every_host_has_both_families(lab: Lab) -> None:
    hosts = [*lab.nodes, *lab.pods, lab.ext]
    assert all(h.ip and h.ip6 for h in hosts), [(h.name, h.ip, h.ip6) for h in hosts]
    assert lab.ext.ip6 == EXT_IP6
    assert len({h.ip6 for h in hosts}) == len(hosts), "IPv6 addresses must be unique"
    for n in lab.nodes:
        assert ipaddress.ip_address(n.ip6) in ipaddress.ip_network("fd00:77::/64")
        assert ipaddress.ip_network(n.pod_cidr6).prefixlen == 64
        for p in lab.pods_on(n.name):
            assert ipaddress.ip_address(p.ip6) in ipaddress.ip_network(n.pod_cidr6), (p, n)
    for h in hosts:
        addrs = json.loads(ip(h.ns, "-j", "-6", "addr", "show", "dev", "eth0").stdout)[0]["addr_info"]
        mine = [a for a in addrs if a["local"] == h.ip6]
        assert mine, f"{h.name}: {h.ip6} is not on eth0: {addrs}"
        # Usable at once: never "tentative" (duplicate address detection is off), nor failed DAD.
        assert not any(a.get("tentative") or a.get("dadfailed") for a in addrs), (h.name, addrs)


def test_agents_got_the_ipv6_node_address(lab: Lab) -> None:
    for n in lab.nodes:
        assert f"--node-ip {n.ip},{n.ip6}" in " ".join(lab.agent_argv(n))
        assert lab.agent_proc(n.name) is not None, lab.log(f"agent-{n.name}")[-2000:]


@pytest.mark.parametrize(
    "src,dst", [("n1p1", "n1p2"), ("n1p1", "n2p1"), ("n2p2", "n1p1")], ids=["same-node", "n1-n2", "n2-n1"]
)
@pytest.mark.parametrize("port", [8080, 9090])
def test_pod_to_pod_ipv6_tcp_and_udp(lab: Lab, src: str, dst: str, port: int) -> None:
    client, server = lab.pod(src), lab.pod(dst)
    reply = lab.tcp_request(client, server.ip6, port, timeout=5)
    assert (reply["pod"], reply["ip"], reply["port"], reply["proto"]) == (dst, server.ip6, port, "tcp")
    assert client_address(reply) == client.ip6 and reply["client"].startswith(f"[{client.ip6}]:")
    reply = lab.udp_request(client, server.ip6, port, payload="hello6", timeout=5)
    assert (reply["pod"], reply["ip"], reply["proto"], reply["echo"]) == (dst, server.ip6, "udp", "hello6")
    assert client_address(reply) == client.ip6
    assert reply["reply_from"] == f"[{server.ip6}]:{port}"


def test_ipv4_answers_are_unchanged(lab: Lab) -> None:
    """An IPv4 client is still seen as a.b.c.d:port (the IPv6 socket is IPv6-only, no ::ffff: form)."""
    client, server = lab.pod("n1p1"), lab.pod("n2p1")
    reply = lab.tcp_request(client, server.ip, 8080)
    assert reply["ip"] == server.ip and reply["client"].split(":")[0] == client.ip
    reply = lab.udp_request(client, server.ip, 9090)
    assert reply["ip"] == server.ip and reply["client"].split(":")[0] == client.ip
    assert reply["reply_from"] == f"{server.ip}:9090"


def test_long_stream_over_ipv6_across_nodes(lab: Lab) -> None:
    with lab.stream(lab.pod("n1p2"), lab.pod("n2p2").ip6, 8080) as s:
        assert s.hello["pod"] == "n2p2"
        for size in (64, 1400, 9000, 60000):  # segments beyond one MTU: PMTU and GSO paths on IPv6
            s.roundtrip(size)


def test_node_to_pods_ipv6(lab: Lab) -> None:
    n1 = lab.node("n1")
    for pod in ("n1p1", "n2p1"):
        reply = lab.tcp_request(n1, lab.pod(pod).ip6, 8080)
        assert reply["pod"] == pod and client_address(reply) == n1.ip6


def test_pod_resolves_its_gateway_by_neighbour_discovery(lab: Lab) -> None:
    pod = lab.pod("n2p1")
    lab.tcp_request(pod, lab.pod("n1p1").ip6, 8080)
    neigh = json.loads(ip(pod.ns, "-j", "-6", "neigh", "show", GATEWAY6, "dev", "eth0").stdout)
    assert neigh, f"{pod.name} has no neighbour entry for {GATEWAY6}"
    states = neigh[0].get("state", [])
    assert "PERMANENT" not in states and "FAILED" not in states, neigh


@pytest.fixture
def ext_routes(lab: Lab) -> Iterator[None]:
    """Routes from the external client to the nodes' IPv6 pod CIDRs (as a router on the LAN would
    have), removed afterwards: the lab's ext has none of its own, in either family."""
    routes = [(n.pod_cidr6, n.ip6) for n in lab.nodes]
    try:
        for cidr, via in routes:
            ip(lab.ext.ns, "-6", "route", "replace", cidr, "via", via)
        yield
    finally:
        for cidr, via in routes:
            ip(lab.ext.ns, "-6", "route", "del", cidr, "via", via, check=False)


@pytest.mark.usefixtures("ext_routes")
@pytest.mark.parametrize("pod", ["n1p1", "n2p2"])
def test_external_host_to_pod_ipv6(lab: Lab, pod: str) -> None:
    server = lab.pod(pod)
    reply = lab.tcp_request(lab.ext, server.ip6, 8080)
    assert reply["pod"] == pod and client_address(reply) == lab.ext.ip6
    reply = lab.udp_request(lab.ext, server.ip6, 9090, payload="from-outside")
    assert reply["pod"] == pod and reply["echo"] == "from-outside" and client_address(reply) == lab.ext.ip6


def test_dual_stack_manifests_parse() -> None:
    ports = [mf.Port("http", 80, 8080, node_port=30180), mf.Port("dns", 53, 9090, "UDP")]
    eps = [("10.244.1.11", "fd00:10:244:1::11", "n1"), ("10.244.2.11", "fd00:10:244:2::11", "n2")]
    svc_raw, slice4_raw, slice6_raw = mf.dual_stack_objects(
        "web", ports, "10.96.9.1", "fd00:10:96::9:1", eps, type="NodePort"
    )
    svc = parse_service(svc_raw)
    assert svc.spec.ip_families == ["IPv4", "IPv6"]
    assert svc.spec.cluster_ips == ["10.96.9.1", "fd00:10:96::9:1"] and svc.spec.cluster_ip == "10.96.9.1"
    assert svc_raw["spec"]["ipFamilyPolicy"] == "RequireDualStack"
    assert ipaddress.ip_address("fd00:10:96::9:1") in ipaddress.ip_network(SERVICE6_CIDR)
    s4, s6 = parse_endpoint_slice(slice4_raw), parse_endpoint_slice(slice6_raw)
    assert (s4.address_type, s6.address_type) == ("IPv4", "IPv6")
    assert s4.service_name == s6.service_name == "web" and s4.key != s6.key
    assert [e.addresses for e in s4.endpoints] == [["10.244.1.11"], ["10.244.2.11"]]
    assert [e.addresses for e in s6.endpoints] == [["fd00:10:244:1::11"], ["fd00:10:244:2::11"]]
    assert [e.node_name for e in s6.endpoints] == ["n1", "n2"]
    assert [(p.name, p.port, p.protocol) for p in s6.ports] == [("http", 8080, "TCP"), ("dns", 9090, "UDP")]

    # IPv6 first, PreferDualStack; SingleStack IPv6.
    svc = parse_service(
        mf.service("v6first", ports, "10.96.9.2", cluster_ip6="fd00:10:96::9:2",
                   ip_family_policy="PreferDualStack", ip_families=["IPv6", "IPv4"])
    )  # fmt: skip
    assert svc.spec.ip_families == ["IPv6", "IPv4"]
    assert (
        svc.spec.cluster_ips == ["fd00:10:96::9:2", "10.96.9.2"] and svc.spec.cluster_ip == "fd00:10:96::9:2"
    )
    raw = mf.service("v6only", ports, None, cluster_ip6="fd00:10:96::9:3")
    assert raw["spec"]["ipFamilyPolicy"] == "SingleStack"
    svc = parse_service(raw)
    assert svc.spec.ip_families == ["IPv6"] and svc.spec.cluster_ips == ["fd00:10:96::9:3"]
    (only6,) = mf.endpoint_slices("v6only", [("fd00:10:244:1::12", "n1")], ports, families=["IPv6"])
    assert parse_endpoint_slice(only6).address_type == "IPv6"

    # The IPv4 builders are unchanged by default.
    plain = mf.service("plain", ports, "10.96.9.4")
    assert "ipFamilies" not in plain["spec"] and "ipFamilyPolicy" not in plain["spec"]
    assert plain["spec"]["clusterIPs"] == ["10.96.9.4"]
    assert mf.endpoint_slice("plain", [("10.244.1.11", "n1")], ports)["addressType"] == "IPv4"
    assert mf.endpoint_slice("plain", [], ports)["addressType"] == "IPv4"
    with pytest.raises(ValueError, match="mixes address families"):
        mf.endpoint_slice("mixed", [("10.244.1.11", "n1"), ("fd00:10:244:1::11", "n1")], ports)

    # A Node with InternalIPs of both families: the node table keeps reading its IPv4 one.
    from kproxy.store import node_address

    node = mf.node("n1", "192.168.77.11", "fd00:77::11")
    assert [a["address"] for a in node["status"]["addresses"]] == ["192.168.77.11", "fd00:77::11"]
    assert node_address(node) == ("n1", "192.168.77.11")


def test_lab_nodes_manifest_is_dual_stack(lab: Lab) -> None:
    import yaml

    nodes = list(yaml.safe_load_all((lab.manifests_dir / "nodes.yaml").read_text()))
    by_name = {n["metadata"]["name"]: [a["address"] for a in n["status"]["addresses"]] for n in nodes}
    assert by_name == {n.name: [n.ip, n.ip6] for n in lab.nodes}


def test_dual_stack_service_ipv4_side_is_served(lab: Lab, program_dual: Program) -> None:
    """A dual-stack Service's IPv4 half works whatever the agent does with its IPv6 half."""
    program_dual("ds-v4", "10.96.15.1", "fd00:10:96::15:1", ["n1p2", "n2p1"], wait6=False)
    answers = lab.tcp_requests(lab.pod("n1p1"), "10.96.15.1", 80, count=40)
    assert set(answers) == {"n1p2", "n2p1"}, collections.Counter(answers)


def test_dual_stack_clusterip_over_ipv6(lab: Lab, program_dual: Program) -> None:
    """IPv6 ClusterIP through the datapath: both backends answer, and the client sees its own address."""
    program_dual("ds-v6", "10.96.15.2", "fd00:10:96::15:2", ["n1p2", "n2p1"])
    client = lab.pod("n1p1")
    answers = lab.tcp_requests(client, "fd00:10:96::15:2", 80, count=40)
    assert set(answers) == {"n1p2", "n2p1"}, collections.Counter(answers)
    reply = lab.tcp_request(client, "fd00:10:96::15:2", 80)
    assert client_address(reply) == client.ip6


def test_lab_down_leaves_nothing(tc_object: object) -> None:
    """Also when the body fails: the prefix's namespaces, bpffs mount and state directory all go."""
    seen: list[Lab] = []
    with pytest.raises(RuntimeError, match="boom"), Lab(nodes=2, pods_per_node=1, start_agents=False) as lb:
        seen.append(lb)
        prefix, state_dir = lb.prefix, lb.dir
        assert lb.tcp_request(lb.pod("n1p1"), lb.pod("n2p1").ip6, 8080)["pod"] == "n2p1"
        raise RuntimeError("boom")
    assert seen[0].st is None
    left = (
        [ns for ns in os.listdir("/run/netns") if ns.startswith(prefix)]
        if os.path.isdir("/run/netns")
        else []
    )
    assert not left, f"namespaces left behind: {left}"
    assert not state_dir.exists(), f"state directory left behind: {state_dir}"


def test_frontend_backends_reads_the_ipv6_maps(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """frontend_backends/wait_programmed on an IPv6 frontend decode kp_svc6_v1 and kp_be6_v1 (here the
    in-memory twins of the pinned maps, so no IPv6 datapath is needed)."""
    import contextlib
    import ctypes
    import socket

    from kproxy import abi
    from kproxy.bpf import mapapi
    from kproxy.bpf.maps import KproxyMaps
    from kproxy.lab.cluster import LabState, Node

    mem = mapapi.MemoryMapSet()
    vip, backends = "fd00:10:96::7:1", ["fd00:10:244:1::11", "fd00:10:244:2::11"]

    def key(slot: int, scope: int = int(abi.Scope.EXT), addr: str = vip) -> Any:
        k = abi.Svc6Key(port=socket.htons(80), slot=slot, proto=6, scope=scope)
        k.addr[:] = list(socket.inet_pton(socket.AF_INET6, addr))
        return k

    entries = [(key(0), abi.Svc6Val(svc_id=7, count=2))]
    entries += [(key(0, int(abi.Scope.INT)), abi.Svc6Val(svc_id=7, count=1))]  # another scope: ignored
    for slot, be_addr in enumerate(backends, start=1):
        entries.append((key(slot), abi.Svc6Val(backend_id=abi.ID6_BASE + slot, svc_id=7)))
        be = abi.Be6Val(port=socket.htons(8080), proto=6)
        be.addr[:] = list(socket.inet_pton(socket.AF_INET6, be_addr))
        mem.be6.put_many([(ctypes.c_uint32(abi.ID6_BASE + slot), be)])
    mem.svc6.put_many(entries)
    monkeypatch.setattr(KproxyMaps, "open", classmethod(lambda cls, d: contextlib.nullcontext(mem)))
    lab = Lab()
    lab.st = LabState(prefix="kplfake", dir=str(tmp_path))
    lab.st.nodes.append(Node(name="n1", ns="kplfake-n1", ip="192.168.77.11", ip6="fd00:77::11", bpffs="/x"))
    assert lab.frontend_backends("n1", vip, 80) == set(backends)
    assert lab.frontend_backends("n1", "fd00:10:96:0::7:1", 80) == set(backends)  # any spelling
    assert lab.frontend_backends("n1", vip, 80, "UDP") is None
    assert lab.frontend_backends("n1", "fd00:10:96::7:2", 80) is None
    lab.wait_programmed("FD00:10:96::7:1", 80, ["fd00:10:244:1:0::11", backends[1]], timeout=1)
    lab.st = None  # nothing was brought up: nothing to tear down
