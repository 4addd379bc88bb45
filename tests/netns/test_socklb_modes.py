"""Socket LB options in the lab: localhost NodePorts (--localhost-nodeports) and the host-namespace-only
mode (--socket-lb-host-netns-only) that service meshes need.

One node with socket LB on its own child cgroup (Lab(socket_lb=True), never a cgroup root). Node
clients run in the node's namespace inside that cgroup. The mesh test runs, in a pod's namespace and in
the same cgroup (so the socket programs apply to it as they would to every pod process of a real node),
an application and a "sidecar": an iptables nat OUTPUT REDIRECT of the pod's outbound TCP (not the
sidecar's own, marked as Istio marks it) to a listener that reads SO_ORIGINAL_DST and forwards there.
iptables runs only inside the lab's pod namespace.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_socklb_agent import TCP_CLIENT, UDP_CLIENT

from kproxy.lab import Lab
from kproxy.lab.cluster import Host

pytestmark = pytest.mark.root

CLUSTER_IP = "10.96.8.1"
NODE_PORT = 30081
UDP_CLUSTER_IP = "10.96.8.2"
UDP_NODE_PORT = 30053

# The application connects to ADDR:PORT; the pod's nat OUTPUT sends it to the sidecar on 15001, which
# reads SO_ORIGINAL_DST and forwards to it from a socket marked 1337 (which the REDIRECT skips).
MESH = """
import json, socket, struct, subprocess, sys, threading
addr, port = sys.argv[1], int(sys.argv[2])
SO_ORIGINAL_DST, MARK = 80, 1337
rule = ["OUTPUT", "-p", "tcp", "!", "-d", "127.0.0.0/8", "-m", "mark", "!", "--mark", str(MARK),
        "-j", "REDIRECT", "--to-ports", "15001"]
subprocess.run(["iptables", "-t", "nat", "-A", *rule], check=True)
seen = {}
try:
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", 15001))
    lst.listen(8)

    def sidecar():
        c, _ = lst.accept()
        raw = c.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        dport, dip = struct.unpack("!2xH4s8x", raw)
        seen["original_dst"] = "%s:%d" % (socket.inet_ntoa(dip), dport)
        up = socket.socket()
        up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        up.settimeout(3)
        try:
            up.connect((socket.inet_ntoa(dip), dport))
            buf = b""
            while not buf.endswith(b"\\n"):
                buf += up.recv(4096)
            seen["upstream_peer"] = "%s:%d" % up.getpeername()[:2]
        except OSError as e:
            buf = (json.dumps({"error": e.strerror or str(e)}) + "\\n").encode()
        c.sendall(buf)
        c.close()

    t = threading.Thread(target=sidecar, daemon=True)
    t.start()
    app = socket.socket()
    app.settimeout(5)
    app.connect((addr, port))
    buf = b""
    while not buf.endswith(b"\\n"):
        buf += app.recv(4096)
    t.join(5)
    seen["reply"] = json.loads(buf)
    seen["app_peer"] = "%s:%d" % app.getpeername()[:2]
finally:
    subprocess.run(["iptables", "-t", "nat", "-D", *rule], check=True)
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def lab(tc_object: Path) -> Iterator[Lab]:
    with Lab(nodes=1, pods_per_node=2, socket_lb=True) as lb:
        yield lb


@pytest.fixture(scope="module")
def services(lab: Lab) -> None:
    from kproxy.lab import manifests as mf

    tcp = mf.Port(name="p", port=80, target=8080, protocol="TCP", node_port=NODE_PORT)
    udp = mf.Port(name="p", port=53, target=9090, protocol="UDP", node_port=UDP_NODE_PORT)
    wanted = (("lh-tcp", CLUSTER_IP, tcp, ["n1p1"]), ("lh-udp", UDP_CLUSTER_IP, udp, ["n1p2"]))
    for name, ip, port, pods in wanted:
        pod_objs = [lab.pod(p) for p in pods]
        lab.write_manifest(
            name,
            [
                mf.service(name, [port], ip, type="NodePort"),
                mf.endpoint_slice(name, [(po.ip, po.node) for po in pod_objs], [port]),
            ],
        )
        lab.wait_programmed(ip, port.port, [po.ip for po in pod_objs], port.protocol)


def run(lab: Lab, host: Host, script: str, addr: str, port: int, in_cgroup: bool = True) -> dict[str, Any]:
    cgroup = lab.node("n1").cgroup if in_cgroup else None
    proc = lab.run_in(host, [sys.executable, "-c", script, addr, str(port)], cgroup=cgroup)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def status(lab: Lab) -> dict[str, Any]:
    """`kproxy status`'s socket LB part (read from the pinned kp_cfg_v1 and links)."""
    r = subprocess.run(
        [sys.executable, "-m", "kproxy", "status", "--bpffs", lab.node("n1").bpffs, "-o", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    slb: dict[str, Any] = json.loads(r.stdout)["socket_lb"]
    return slb


def restart(lab: Lab, *args: str) -> None:
    lab.stop_agent("n1")
    lab.agent_args = list(args)
    lab.start_agent("n1")
    lab.wait_agent("n1")


def node_checks(lab: Lab) -> None:
    """A node process in the cgroup: localhost NodePorts (TCP and UDP) and a ClusterIP; never ::1."""
    node = lab.node("n1")
    r = run(lab, node, TCP_CLIENT, "127.0.0.1", NODE_PORT)
    assert r.get("reply", {}).get("pod") == "n1p1" and r["peer"] == f"127.0.0.1:{NODE_PORT}", r
    r = run(lab, node, UDP_CLIENT, "127.0.0.1", UDP_NODE_PORT)
    assert r["reply"]["pod"] == "n1p2" and r["src"] == f"127.0.0.1:{UDP_NODE_PORT}", r
    r = run(lab, node, TCP_CLIENT, CLUSTER_IP, 80)
    assert r.get("reply", {}).get("pod") == "n1p1" and r["peer"] == f"{CLUSTER_IP}:80", r
    assert "error" in run(lab, node, TCP_CLIENT, "::1", NODE_PORT)  # IPv6 loopback: never


def test_localhost_nodeports_reach_the_backend(lab: Lab, services: None) -> None:
    node_checks(lab)
    slb = status(lab)
    assert not slb["host_netns_only"] and slb["localhost_nodeports"], slb
    # outside the socket-LB cgroup nothing translates loopback (TC never sees it)
    assert "error" in run(lab, lab.node("n1"), TCP_CLIENT, "127.0.0.1", NODE_PORT, in_cgroup=False)
    # a pod's loopback is its own, in the cgroup too (kube-proxy's rules are the node's only)
    assert "error" in run(lab, lab.pod("n1p2"), TCP_CLIENT, "127.0.0.1", NODE_PORT)
    assert run(lab, lab.pod("n1p2"), TCP_CLIENT, CLUSTER_IP, 80).get("reply", {}).get("pod") == "n1p1"


def test_full_mode_rewrites_before_the_sidecar_sees_it(lab: Lab, services: None) -> None:
    """What the host-namespace-only mode is for: with socket LB on pod sockets, connect() already names
    the backend when the pod's nat OUTPUT redirects it, so the sidecar's SO_ORIGINAL_DST is the backend."""
    r = run(lab, lab.pod("n1p2"), MESH, CLUSTER_IP, 80)
    assert r["original_dst"] == f"{lab.pod('n1p1').ip}:8080", r
    assert r["reply"]["pod"] == "n1p1", r
    assert r["app_peer"] == f"{CLUSTER_IP}:80", r  # getpeername() still shows the Service


def test_host_netns_only_mode_leaves_pods_to_tc(lab: Lab, services: None) -> None:
    restart(lab, "--socket-lb-host-netns-only")
    assert "socket LB for this network namespace only" in lab.log("agent-n1")
    r = run(lab, lab.pod("n1p2"), MESH, CLUSTER_IP, 80)
    assert r["original_dst"] == f"{CLUSTER_IP}:80", r  # the sidecar sees the Service
    assert r["reply"]["pod"] == "n1p1", r  # forwarded to the ClusterIP, TC's from-pod DNAT balanced it
    assert r["upstream_peer"] == f"{CLUSTER_IP}:80", r
    assert r["app_peer"] == f"{CLUSTER_IP}:80", r
    # node processes keep socket LB, localhost NodePorts included
    node_checks(lab)
    slb = status(lab)
    assert slb["host_netns_only"] and slb["localhost_nodeports"] and len(slb["attached"]) == 8, slb


def test_localhost_nodeports_off(lab: Lab, services: None) -> None:
    restart(lab, "--no-localhost-nodeports")
    node = lab.node("n1")
    assert "error" in run(lab, node, TCP_CLIENT, "127.0.0.1", NODE_PORT)
    assert not status(lab)["localhost_nodeports"]
    r = run(lab, node, TCP_CLIENT, CLUSTER_IP, 80)
    assert r.get("reply", {}).get("pod") == "n1p1", r
