"""Real traffic through the lab: Services load balanced by the BPF programs the agents attached.

Pods: n1p1 10.244.1.11, n1p2 10.244.1.12 (node n1), n2p1 10.244.2.11, n2p2 10.244.2.12 (node n2).
Each test programs its own Service with its own cluster IP, so tests do not depend on each other.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from kproxy.lab import Lab

Program = Callable[..., None]

pytestmark = pytest.mark.root


def test_clusterip_backend_on_same_node(lab: Lab, program: Program) -> None:
    program("same-node", "10.96.1.1", ["n1p2"])
    reply = lab.tcp_request(lab.pod("n1p1"), "10.96.1.1", 80)
    assert reply["pod"] == "n1p2"


def test_clusterip_backend_on_other_node(lab: Lab, program: Program) -> None:
    program("other-node", "10.96.1.2", ["n2p1"])
    reply = lab.tcp_request(lab.pod("n1p1"), "10.96.1.2", 80)
    assert reply["pod"] == "n2p1"


@pytest.mark.parametrize("backend", ["n1p2", "n2p1"])
def test_backend_sees_the_client_pod_address(lab: Lab, program: Program, backend: str) -> None:
    program(f"client-addr-{backend}", f"10.96.1.{3 if backend == 'n1p2' else 4}", [backend])
    client = lab.pod("n1p1")
    reply = lab.tcp_request(client, f"10.96.1.{3 if backend == 'n1p2' else 4}", 80)
    assert reply["client"].split(":")[0] == client.ip


def test_spread_over_three_backends(lab: Lab, program: Program) -> None:
    program("spread", "10.96.1.5", ["n1p2", "n2p1", "n2p2"])
    answers = lab.tcp_requests(lab.pod("n1p1"), "10.96.1.5", 80, count=300)
    counts = collections.Counter(answers)
    assert set(counts) == {"n1p2", "n2p1", "n2p2"}, counts
    assert all(n >= 60 for n in counts.values()), f"each backend should get >= 20% of 300: {counts}"


def test_udp_request_response(lab: Lab, program: Program) -> None:
    program("udp", "10.96.1.6", ["n1p2", "n2p1"], port=53, target=9090, protocol="UDP")
    for _ in range(5):
        reply = lab.udp_request(lab.pod("n1p1"), "10.96.1.6", 53, payload="hello")
        assert reply["pod"] in ("n1p2", "n2p1")
        assert reply["echo"] == "hello"
        # A connected UDP socket only accepts datagrams from the service address: reverse NAT worked.
        assert reply["reply_from"] == "10.96.1.6:53"


def test_affinity_sticks_then_rebalances(lab: Lab, program: Program) -> None:
    timeout = 2
    program("sticky", "10.96.1.7", ["n1p2", "n2p1", "n2p2"], affinity_timeout=timeout)
    client = lab.pod("n1p1")
    first = lab.tcp_requests(client, "10.96.1.7", 80, count=30)
    assert len(set(first)) == 1, (
        f"affinity should keep one backend within its timeout: {collections.Counter(first)}"
    )
    # After the timeout a new connection is balanced again; with 3 backends, six rounds that all land
    # on the same backend by chance happen with probability (1/3)^6.
    seen = {first[0]}
    for _ in range(6):
        time.sleep(timeout + 0.3)
        seen.add(lab.tcp_request(client, "10.96.1.7", 80)["pod"])
        if len(seen) > 1:
            break
    assert len(seen) > 1, f"affinity never expired: always {seen}"


def test_removed_backend_gets_no_new_connections(lab: Lab, program: Program) -> None:
    program("shrink", "10.96.1.8", ["n1p2", "n2p1", "n2p2"])
    client = lab.pod("n1p1")
    assert set(lab.tcp_requests(client, "10.96.1.8", 80, count=60)) == {"n1p2", "n2p1", "n2p2"}
    program("shrink", "10.96.1.8", ["n1p2", "n2p2"], wait=False)
    # Once the client's node has programmed the change (however long a busy machine takes), not one
    # new connection may reach the removed backend.
    lab.wait_programmed("10.96.1.8", 80, [lab.pod("n1p2").ip, lab.pod("n2p2").ip], nodes=["n1"])
    after = collections.Counter(lab.tcp_requests(client, "10.96.1.8", 80, count=60))
    assert "n2p1" not in after, f"removed backend n2p1 still got connections after programming: {after}"
    assert set(after) == {"n1p2", "n2p2"}


def test_established_stream_survives_backend_changes(lab: Lab, program: Program) -> None:
    program("churn", "10.96.1.9", ["n2p1"])
    client = lab.pod("n1p1")
    with lab.stream(client, "10.96.1.9", 80) as s:
        assert s.hello["pod"] == "n2p1"
        s.roundtrip()
        for backends in (["n2p1", "n1p2"], ["n2p1", "n1p2", "n2p2"], ["n2p1", "n2p2"], ["n2p1"]):
            program("churn", "10.96.1.9", backends)
            s.roundtrip()
            # New connections follow the new set while the old one keeps its backend.
            assert lab.tcp_request(client, "10.96.1.9", 80)["pod"] in backends


def test_nodeport_loadbalancer_externalip_from_outside(lab: Lab, program: Program) -> None:
    n1 = lab.node("n1")
    program(
        "outside", "10.96.1.10", ["n1p1"], node_port=30100, type="LoadBalancer",
        lb_ips=["192.168.78.50"], external_ips=["192.168.78.60"],
    )  # fmt: skip
    for addr, port in ((n1.ip, 30100), ("192.168.78.50", 80), ("192.168.78.60", 80)):
        lab.wait_programmed(addr, port, [lab.pod("n1p1").ip], nodes=["n1"])
        reply = lab.tcp_request(lab.ext, addr, port)
        assert reply["pod"] == "n1p1", (addr, port)
        # The backend is local to the ingress node: no SNAT, it sees the client.
        assert reply["client"].split(":")[0] == lab.ext.ip


def test_clusterip_routed_to_the_node_is_served_as_kube_proxy_does(lab: Lab, program: Program) -> None:
    """A ClusterIP routed to a node from outside (BGP, a static route) is served, as kube-proxy serves it
    (--no-external-cluster-ip turns that off: tests/bpf); the endpoint on that node sees the client."""
    program("inside-only", "10.96.1.11", ["n1p1"])
    from kproxy.lab.netns import ip

    ip(lab.ext.ns, "route", "add", "10.96.1.11/32", "via", lab.node("n1").ip)
    try:
        reply = lab.tcp_request(lab.ext, "10.96.1.11", 80)
        assert reply["pod"] == "n1p1" and reply["client"].split(":")[0] == lab.ext.ip
    finally:
        ip(lab.ext.ns, "route", "del", "10.96.1.11/32")


def test_no_backend_tcp_is_refused_at_once(lab: Lab, program: Program) -> None:
    program("empty-tcp", "10.96.1.12", [])
    before = rejects(lab, "n1")
    with pytest.raises(ConnectionRefusedError):
        # A silent drop would end in TimeoutError instead.
        lab.tcp_request(lab.pod("n1p1"), "10.96.1.12", 80, timeout=5)
    assert rejects(lab, "n1") > before, "the refusal did not come from kp_from_pod"


def test_no_backend_udp_gets_port_unreachable(lab: Lab, program: Program) -> None:
    program("empty-udp", "10.96.1.13", [], port=53, target=9090, protocol="UDP")
    before = rejects(lab, "n1")
    with pytest.raises(ConnectionRefusedError):
        lab.udp_request(lab.pod("n1p1"), "10.96.1.13", 53, timeout=5)
    assert rejects(lab, "n1") > before, "the refusal did not come from kp_from_pod"


def rejects(lab: Lab, node: str) -> int:
    from kproxy.abi import Stat
    from kproxy.bpf.maps import KproxyMaps

    with KproxyMaps.open(lab.node(node).bpffs) as maps:
        return maps.stat_totals().get(int(Stat.REJECT), (0, 0))[0]


class Pinger(threading.Thread):
    """Round trips on a stream as fast as they go until stopped; remembers the first error."""

    def __init__(self, stream: object) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.count = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.stream.roundtrip()  # type: ignore[attr-defined]
            except BaseException as e:
                self.error = e
                return
            self.count += 1
            time.sleep(0.005)

    def finish(self) -> int:
        self.stop.set()
        self.join(10)
        if self.error is not None:
            raise AssertionError(f"stream broke after {self.count} round trips: {self.error!r}")
        return self.count


def test_agent_kill9_and_restart_keeps_streams(lab: Lab, program: Program) -> None:
    program("restart", "10.96.1.14", ["n2p1", "n1p2"])
    client = lab.pod("n1p1")
    with lab.stream(client, "10.96.1.14", 80) as s:
        pinger = Pinger(s)
        pinger.start()
        before = pinger.count
        lab.stop_agent("n1", signal.SIGKILL)
        lab.stop_agent("n2", signal.SIGKILL)
        # The programs keep running without their agents: new connections work too.
        assert lab.tcp_request(client, "10.96.1.14", 80)["pod"] in ("n2p1", "n1p2")
        lab.start_agent("n1")
        lab.start_agent("n2")
        lab.wait_agent("n1")
        lab.wait_agent("n2")
        assert lab.tcp_request(client, "10.96.1.14", 80)["pod"] in ("n2p1", "n1p2")
        time.sleep(0.2)
        assert pinger.finish() > before


def test_program_upgrade_keeps_streams(lab: Lab, program: Program, tc_object: object) -> None:
    program("upgrade", "10.96.1.15", ["n2p1"])
    client = lab.pod("n1p1")
    with lab.stream(client, "10.96.1.15", 80) as s:
        pinger = Pinger(s)
        pinger.start()
        for node in lab.nodes:
            changed = lab.upgrade_programs(node.name)
            assert changed, f"no attachments found on {node.name}"
            assert all(new != old for _, old, new in changed), changed
        time.sleep(0.2)
        pinger.finish()
        s.roundtrip()
    assert lab.tcp_request(client, "10.96.1.15", 80)["pod"] == "n2p1"


def test_pod_created_after_agent_start_gets_programs(lab: Lab, program: Program) -> None:
    program("late-pod", "10.96.1.16", ["n2p1"])
    pod = lab.add_pod("n1")
    node = lab.node("n1")
    from kproxy.bpf.loader import DIRECTIONS, Loader

    # Both directions: the reply of the first connection needs kp_to_pod, attached after kp_from_pod.
    # The deadline only bounds a failure (a busy machine may make the agent take seconds).
    pins = [Loader(node.bpffs).link_pin(pod.host_if, d) for d in DIRECTIONS]
    deadline = time.monotonic() + 30
    while not all(os.path.exists(p) for p in pins) and time.monotonic() < deadline:
        time.sleep(0.02)
    missing = [p for p in pins if not os.path.exists(p)]
    assert not missing, f"agent did not attach {missing}:\n{lab.log('agent-n1')[-2000:]}"
    reply = lab.tcp_request(pod, "10.96.1.16", 80)
    assert reply["pod"] == "n2p1"
    assert reply["client"].split(":")[0] == pod.ip


def test_closed_pod_port_is_refused(lab: Lab) -> None:
    # What the refusal tests rely on: plain pod-to-pod traffic (no service) passes the programs untouched.
    with pytest.raises(ConnectionRefusedError):
        lab.tcp_request(lab.pod("n1p1"), lab.pod("n2p1").ip, 1, timeout=5)
