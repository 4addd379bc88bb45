"""Real traffic: a client port used for a Service connection, then at once for a connection straight
to the same backend (the old flow's conntrack entries are still CLOSING for the fin timeout).

Bench finding (`python -m bench.run --direct-after-service`): the backend's SYN-ACK of the direct
connection matched the old flow's REPLY entry, came back from the ClusterIP, was reset by the client,
and the direct connection never opened (~30 conn/s with timeouts instead of ~15,000).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable

import pytest

from kproxy.lab import Lab
from kproxy.lab.cluster import Host

pytestmark = pytest.mark.root

Program = Callable[..., None]
FIRST_PORT = 45000
ROUNDS = 5


def request_from(lab: Lab, host: Host, addr: str, port: int, sport: int) -> dict[str, str]:
    """One connection from HOST bound to source port SPORT; the client closes first, so the
    backend keeps no TIME_WAIT for the tuple (the client does, which SO_REUSEADDR lets us bind over).
    It returns only once the backend closed its side too: a busy pod server still holding the tuple
    (CLOSE_WAIT) would answer the next SYN on it with a challenge ACK and cost a 1-s retry. The timeout
    leaves room for one such retry on a busy machine; the bug this guards made every retry fail."""

    def do() -> dict[str, str]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", sport))
            s.settimeout(5.0)
            s.connect((addr, port))
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):  # until the backend's FIN
                pass
            return dict(json.loads(buf))

    return lab.in_ns(host, do)


@pytest.mark.parametrize("backend", ["n1p2", "n2p1"], ids=["local-backend", "remote-backend"])
def test_direct_connection_after_service_on_the_same_port(lab: Lab, program: Program, backend: str) -> None:
    vip = "10.96.7.1" if backend == "n1p2" else "10.96.7.2"
    program(f"reuse-{backend}", vip, [backend])
    client, be = lab.pod("n1p1"), lab.pod(backend)
    for i in range(ROUNDS):
        sport = FIRST_PORT + (0 if backend == "n1p2" else 100) + i
        via_service = request_from(lab, client, vip, 80, sport)
        assert via_service["pod"] == backend
        try:
            direct = request_from(lab, client, be.ip, 8080, sport)
        except TimeoutError as e:
            raise AssertionError(
                f"direct connection {client.ip}:{sport} -> {be.ip}:8080 right after a Service connection "
                f"from the same port did not open: the old flow's REPLY entry rewrote the SYN-ACK"
            ) from e
        assert direct["pod"] == backend
        assert direct["client"] == f"{client.ip}:{sport}"


def test_external_client_direct_to_pod_after_nodeport(lab: Lab, program: Program) -> None:
    """The same from outside: NodePort on n1 to its local pod, then the client straight to the pod
    (the SYN arrives on n1's netdev, kp_from_netdev)."""
    n1, pod = lab.node("n1"), lab.pod("n1p2")
    program("reuse-ext", "10.96.7.3", ["n1p2"], node_port=30703, type="NodePort")
    lab.wait_programmed(n1.ip, 30703, [pod.ip], nodes=["n1"])
    route = ["ip", "-n", lab.ext.ns, "route", "replace", n1.pod_cidr, "via", n1.ip]
    subprocess.run(route, check=True)
    try:
        for i in range(ROUNDS):
            sport = FIRST_PORT + 200 + i
            assert request_from(lab, lab.ext, n1.ip, 30703, sport)["pod"] == "n1p2"
            try:
                direct = request_from(lab, lab.ext, pod.ip, 8080, sport)
            except TimeoutError as e:
                raise AssertionError(f"direct connection from {lab.ext.ip}:{sport} to {pod.ip} failed") from e
            assert direct["client"] == f"{lab.ext.ip}:{sport}"
    finally:
        subprocess.run(["ip", "-n", lab.ext.ns, "route", "del", n1.pod_cidr, "via", n1.ip], check=False)
