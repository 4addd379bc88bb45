"""XDP acceleration (--acceleration native) with real traffic: the external matrix of test_external.py
(SNAT, DSR option, DSR IPIP; externalTrafficPolicy Cluster and Local; backend on the ingress node or the
other one; NodePort, LoadBalancer IP, external IP; TCP and UDP; both families) with kp_xdp on both nodes'
netdevs, and acceleration switched on and off under running streams without a broken connection.

Each cell sends several packets of one flow (a TCP connection; three datagrams of one UDP socket), so
the packets after the first run through XDP: n1's XDP counters must move for every cell served.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_external import (
    AGENT_ARGS,
    MODES,
    PLACES,
    POLICIES,
    PROTOS,
    add_matrix_services,
    addr_of,
    counters,
    delta,
    ensure_mode,
    expectation,
    node_port,
    request,
    served_as_expected,
    set_mode,
    svc_index,
    target,
)

from kproxy.bpf.maps import KproxyMaps
from kproxy.lab import Lab
from kproxy.lab import manifests as mf
from kproxy.lab.cluster import EXT_LINK_PREFIX
from kproxy.lab.netns import in_netns, ip

pytestmark = [pytest.mark.root, pytest.mark.slow]

EXT_CLIENTS = ("nodeport-ext", "lb-ext", "externalip-ext")
FAMILIES = ("4", "6")


@pytest.fixture(scope="module")
def alab(tc_object: Path) -> Iterator[Lab]:
    # ext_link: n1's second netdev eth1, linked to ext (test_redirect_between_netdevs)
    args = [*AGENT_ARGS, "--acceleration", "native"]
    with Lab(nodes=2, pods_per_node=2, agent_args=args, ext_link=True) as lab:
        add_matrix_services(lab)
        yield lab


@pytest.fixture(scope="module", params=MODES)
def amode(request: pytest.FixtureRequest, alab: Lab) -> str:
    set_mode(alab, request.param)
    return str(request.param)


def udp_exchange(lab: Lab, addr: str, port: int, count: int = 3, timeout: float = 4.0) -> dict[str, Any]:
    """COUNT datagrams from one socket (one flow), each answered: the last answer, or {"error": ...}."""

    def do() -> dict[str, Any]:
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            got: dict[str, Any] = {}
            try:
                for i in range(count):
                    s.sendto(f"ping {i}".encode(), (addr, port))
                    data, src = s.recvfrom(65536)
                    got = dict(json.loads(data), peer=f"{src[0]}:{src[1]}")
                    if got.get("echo") != f"ping {i}":
                        return {"error": f"answer {i} was {got}"}
            except OSError as e:
                return {"error": e.strerror or str(e)}
            return got

    return in_netns(lab.ext.ns, do)


# externalIPs take the LoadBalancer IPs' path in kp_xdp (an EXT frontend of the same kind, test_external.py
# covers them with TC), and IPv6 the same code paths as IPv4's once the frontend is found: fewer cells
CELLS = [
    (family, proto, client, place, policy)
    for family in FAMILIES
    for proto in PROTOS
    for client in (EXT_CLIENTS[:2] if family == "4" else EXT_CLIENTS[:1])
    for place in PLACES
    for policy in POLICIES
]


@pytest.mark.parametrize(("family", "proto", "client", "place", "policy"), CELLS)
def test_matrix_accelerated(
    alab: Lab, amode: str, family: str, proto: str, client: str, place: str, policy: str
) -> None:
    lab = alab
    i = svc_index(policy, place)
    addr, port = target(client, i, proto, lab, family)
    want = expectation(client, policy, place, amode, lab, family)
    before = {n: counters(lab, n) for n in ("n1", "n2")}
    if proto == "TCP":
        got = request(lab, lab.ext, addr, port, proto, None, timeout=8.0 if want["ok"] else 1.0)
    else:
        got = udp_exchange(lab, addr, port, timeout=4.0 if want["ok"] else 1.0)
    after = {n: counters(lab, n) for n in ("n1", "n2")}
    d1, d2 = delta(before["n1"], after["n1"]), delta(before["n2"], after["n2"])
    where = (
        f"IPv{family} {proto} {client} -> {addr}:{port} (backend {place}, policy {policy}, mode {amode}, XDP)"
    )
    if not served_as_expected(got, want, place, f"{addr}:{port}", where, d1, d2, True):
        return
    assert d1.get("XDP_FWD", 0) + d1.get("XDP_LOCAL", 0) >= 1, f"{where}: no packet took kp_xdp: n1 {d1}"
    assert d1.get("XDP_NEW", 0) >= 1, f"{where}: kp_xdp opened no flow: n1 {d1}"
    if want["replies"] == "local":
        assert d1.get("XDP_LOCAL", 0) >= 1, f"{where}: n1 {d1}"
    if want["replies"] == "backend-node":
        assert d2.get("DSR_RX", 0) >= 1, f"{where}: n2 {d2}"


# ---- switching acceleration under running streams ----
class Stream(threading.Thread):
    """A TCP echo stream and a UDP ping flow from the external client to one NodePort, a message every
    20 ms each, until stopped: every answer must come, right, and the TCP connection must live on."""

    def __init__(self, lab: Lab, addr: str, tcp_port: int, udp_port: int) -> None:
        super().__init__(daemon=True)
        self.lab, self.addr, self.tcp_port, self.udp_port = lab, addr, tcp_port, udp_port
        self.stop = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self.pods: set[str] = set()

    def run(self) -> None:
        in_netns(self.lab.ext.ns, self._run)

    def _run(self) -> None:
        tcp = socket.create_connection((self.addr, self.tcp_port), timeout=5)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(5)
        try:
            buf = b""
            while not buf.endswith(b"\n"):
                buf += tcp.recv(4096)
            self.pods.add(json.loads(buf)["pod"])
            while not self.stop.is_set():
                msg = f"seq {self.sent}\n".encode()
                try:
                    tcp.sendall(msg)
                    echo = b""
                    while len(echo) < len(msg):
                        chunk = tcp.recv(len(msg) - len(echo))
                        if not chunk:
                            raise ConnectionError("TCP connection closed")
                        echo += chunk
                    if echo != msg:
                        self.errors.append(f"TCP echo {echo!r} for {msg!r}")
                    udp.sendto(msg, (self.addr, self.udp_port))
                    answer = json.loads(udp.recvfrom(65536)[0])
                    if answer.get("echo") != msg.decode():
                        self.errors.append(f"UDP answer {answer} for {msg!r}")
                    self.pods.add(answer["pod"])
                except (OSError, ConnectionError, ValueError) as e:
                    self.errors.append(f"message {self.sent}: {e}")
                    return
                self.sent += 1
                time.sleep(0.02)
        finally:
            tcp.close()
            udp.close()


def restart_agent(lab: Lab, node: str, acceleration: str) -> None:
    lab.agent_args = [
        a for a in lab.agent_args if a not in ("--acceleration", "native", "off", "best-effort")
    ]
    lab.agent_args += ["--acceleration", acceleration]
    lab.stop_agent(node)
    lab.start_agent(node)
    lab.wait_agent(node)


@pytest.mark.parametrize("dsr", ["snat", "opt", "ipip"])
def test_switching_acceleration_breaks_no_connection(alab: Lab, dsr: str) -> None:
    lab = alab
    set_mode(lab, dsr)
    i = svc_index("Cluster", "other")  # n1 forwards to n2p1
    stream = Stream(lab, addr_of(lab.node("n1"), "4"), node_port(i, "TCP"), node_port(i, "UDP"))
    stream.start()
    phases = []
    try:
        for acceleration in ("off", "native"):  # the lab's agents start with native
            time.sleep(0.5)
            restart_agent(lab, "n1", acceleration)
            before, sent = counters(lab, "n1"), stream.sent
            time.sleep(1.0)
            d = delta(before, counters(lab, "n1"))
            phases.append((acceleration, stream.sent - sent, d.get("XDP_FWD", 0)))
            assert stream.is_alive() and not stream.errors, (acceleration, stream.errors[:3], phases)
    finally:
        stream.stop.set()
        stream.join(10)
    assert not stream.errors, (stream.errors[:3], phases)
    assert stream.pods == {"n2p1"} and stream.sent > 100, (stream.pods, stream.sent)
    # the phase after "native" forwarded from XDP; after "off" nothing did (the program was removed)
    assert [p[2] > 0 for p in phases] == [False, True], phases


def test_status_says_which_netdevs_run_xdp(alab: Lab) -> None:
    import subprocess
    import sys

    for node in alab.nodes:
        out = subprocess.run(
            [sys.executable, "-m", "kproxy", "status", "--bpffs", node.bpffs, "-o", "json"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        n1 = node.name == "n1"  # n1 has a second netdev, eth1 (the lab's ext_link): XDP_REDIRECT between them
        devs = {"eth0": "xdp", "eth1": "xdp"} if n1 else {"eth0": "xdp"}
        redirect = ["eth0", "eth1"] if n1 else ["eth0"]
        got = json.loads(out.stdout)["acceleration"]
        assert got == {"mode": "native", "netdevs": devs, "redirect": redirect}
        text = subprocess.run(
            [sys.executable, "-m", "kproxy", "status", "--bpffs", node.bpffs], capture_output=True, text=True
        ).stdout
        want = (
            "acceleration: native, eth0 xdp, eth1 xdp; XDP_REDIRECT between eth0, eth1"
            if n1
            else "acceleration: native, eth0 xdp"
        )
        assert want in text.splitlines(), text


def test_redirect_between_netdevs(alab: Lab) -> None:
    """n1's second netdev eth1 leads to ext (the lab's ext_link): a flow from ext that enters n1 by eth1
    and leaves by eth0 for its backend on n2, and the replies the other way, cross from netdev to netdev
    in XDP (XDP_REDIRECT: both run kp_xdp natively, both are in n1's kp_xdevs_v1), first packets included.
    SNAT: with DSR the replies would go from n2 to ext directly, and n2 has no route to ext's eth1."""
    lab = alab
    ensure_mode(lab, "snat")
    name, lb, cip = "redirect", "192.168.78.200", "10.96.40.200"
    pod = lab.pod("n2p1")
    ports = [mf.Port("tcp", 80, 8080, "TCP"), mf.Port("udp", 53, 9090, "UDP")]
    lab.write_manifest(
        name,
        [
            mf.service(name, ports, cip, type="LoadBalancer", lb_ips=[lb]),
            *mf.endpoint_slices(name, [(pod.ip, pod.node)], ports),
        ],
    )
    lab.wait_programmed(lb, 80, [pod.ip], nodes=["n1"])
    lab.wait_programmed(lb, 53, [pod.ip], "UDP", nodes=["n1"])
    with KproxyMaps.open(lab.node("n1").bpffs) as m:
        xdevs = {k.value for k, _ in m.xdevs.items()}
    n1_ifindexes = in_netns(lab.node("n1").ns, lambda: {socket.if_nametoindex(d) for d in ("eth0", "eth1")})
    assert xdevs == n1_ifindexes
    ip(lab.ext.ns, "route", "add", f"{lb}/32", "via", f"{EXT_LINK_PREFIX}.1", "dev", "eth1")
    try:
        before = counters(lab, "n1")
        tcp = request(lab, lab.ext, lb, 80, "TCP", None, timeout=8.0)
        udp = udp_exchange(lab, lb, 53, count=5)
        d = delta(before, counters(lab, "n1"))
    finally:
        ip(lab.ext.ns, "route", "del", f"{lb}/32")
        lab.remove_manifest(name)
    assert tcp.get("pod") == "n2p1" and tcp.get("client", "").startswith(lab.node("n1").ip), tcp
    assert udp.get("pod") == "n2p1" and "error" not in udp, udp
    assert udp["peer"] == f"{lb}:53", udp
    # the SYN and the first datagram opened their flows in XDP; the five datagrams, the answers after
    # the first (which marks the flow SEEN_REPLY: TC's) and at least the SYN crossed in XDP
    assert d.get("XDP_NEW", 0) >= 2, d
    assert d.get("XDP_REDIRECT", 0) >= 5 + 4 + 1, d
    assert d.get("SNAT_REVNAT", 0) >= 5, d
