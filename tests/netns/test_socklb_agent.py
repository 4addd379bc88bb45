"""The agent with --socket-lb-cgroup: node processes in that cgroup reach ClusterIPs, others do not.

A one-node lab whose agent attaches the socket programs to a fresh child cgroup of
/sys/fs/cgroup/unified (never the root; removed after the module, once the lab is down). Clients run
in the node's network namespace, inside or outside that cgroup. The lab is dual-stack: IPv6 ClusterIPs,
and IPv4 ones named ::ffff:a.b.c.d by a dual-stack AF_INET6 socket, go through the *6 hooks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxy.bpf.socklb import HOOKS, default_object_path
from kproxy.lab import Lab

pytestmark = pytest.mark.root


# An address with a colon is dialled from an AF_INET6 socket with IPV6_V6ONLY off (dual-stack).
TCP_CLIENT = """
import json, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
if ":" in addr:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.settimeout(3)
try:
    s.connect((addr, port))
except OSError as e:
    print(json.dumps({"error": e.strerror or str(e)}))
    raise SystemExit(0)
buf = b""
while not buf.endswith(b"\\n"):
    buf += s.recv(4096)
print(json.dumps({"reply": json.loads(buf), "peer": "%s:%d" % s.getpeername()[:2]}))
"""

UDP_CLIENT = """
import json, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
if ":" in addr:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.settimeout(3)
s.sendto(b"hello", (addr, port))
data, src = s.recvfrom(65536)
print(json.dumps({"reply": json.loads(data), "src": "%s:%d" % src[:2]}))
"""


@pytest.fixture(scope="module")
def cgroup(module_child_cgroup: Path) -> Path:
    return module_child_cgroup


@pytest.fixture(scope="module")
def lab(tc_object: Path, module_child_cgroup: Path) -> Iterator[Lab]:
    """This module's lab: one node, two pods, the agent balancing the sockets of CGROUP."""
    if not os.path.exists(default_object_path()):
        pytest.fail(f"{default_object_path()} is missing: run `make bpf`")
    with Lab(nodes=1, pods_per_node=2, agent_args=["--socket-lb-cgroup", str(module_child_cgroup)]) as lb:
        yield lb


def client(lab: Lab, script: str, addr: str, port: int, cgroup: Path | None) -> dict[str, Any]:
    proc = lab.run_in(lab.node("n1"), [sys.executable, "-c", script, addr, str(port)], cgroup=cgroup)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_agent_pins_the_cgroup_links(lab: Lab, cgroup: Path) -> None:
    links = Path(lab.node("n1").bpffs) / "links"
    assert {f"cgroup:{h}" for h in HOOKS} <= set(os.listdir(links))
    assert "socket load balancing on cgroup" in lab.log("agent-n1")


def test_node_process_in_the_cgroup_reaches_a_clusterip(lab: Lab, program: Any, cgroup: Path) -> None:
    program("slb-tcp", "10.96.5.1", ["n1p1", "n1p2"])
    seen = set()
    for _ in range(6):
        r = client(lab, TCP_CLIENT, "10.96.5.1", 80, cgroup)
        assert "error" not in r, r
        assert r["peer"] == "10.96.5.1:80"  # getpeername shows the service, not the backend
        seen.add(r["reply"]["pod"])
    assert seen <= {"n1p1", "n1p2"} and seen


def test_udp_reply_comes_from_the_service_address(lab: Lab, program: Any, cgroup: Path) -> None:
    program("slb-udp", "10.96.5.2", ["n1p2"], port=53, target=9090, protocol="UDP")
    r = client(lab, UDP_CLIENT, "10.96.5.2", 53, cgroup)
    assert r["reply"]["pod"] == "n1p2" and r["reply"]["echo"] == "hello"
    assert r["src"] == "10.96.5.2:53"


def test_node_process_outside_the_cgroup_is_untouched(lab: Lab, program: Any) -> None:
    program("slb-outside", "10.96.5.3", ["n1p1"])
    r = client(lab, TCP_CLIENT, "10.96.5.3", 80, None)
    assert "error" in r, r  # the node has no route to the service range: nothing translated it


def test_links_keep_working_while_the_agent_restarts(lab: Lab, program: Any, cgroup: Path) -> None:
    program("slb-restart", "10.96.5.4", ["n1p2"])
    lab.stop_agent("n1")
    try:
        r = client(lab, TCP_CLIENT, "10.96.5.4", 80, cgroup)
        assert r.get("reply", {}).get("pod") == "n1p2", r
    finally:
        lab.start_agent("n1")
        lab.wait_agent("n1")
    r = client(lab, TCP_CLIENT, "10.96.5.4", 80, cgroup)
    assert r.get("reply", {}).get("pod") == "n1p2", r


def test_node_process_reaches_an_ipv6_clusterip(lab: Lab, program_dual: Any, cgroup: Path) -> None:
    program_dual("slb-tcp6", "10.96.5.6", "fd00:10:96::5:6", ["n1p1", "n1p2"])
    seen = set()
    for _ in range(6):
        r = client(lab, TCP_CLIENT, "fd00:10:96::5:6", 80, cgroup)
        assert "error" not in r, r
        assert r["peer"] == "fd00:10:96::5:6:80"  # getpeername6 shows the service
        assert r["reply"]["ip"] in {lab.pod("n1p1").ip6, lab.pod("n1p2").ip6}, r
        seen.add(r["reply"]["pod"])
    assert seen <= {"n1p1", "n1p2"} and seen
    # nothing translates it outside the cgroup
    assert "error" in client(lab, TCP_CLIENT, "fd00:10:96::5:6", 80, None)


def test_udp_reply_comes_from_the_ipv6_service_address(lab: Lab, program_dual: Any, cgroup: Path) -> None:
    program_dual("slb-udp6", "10.96.5.7", "fd00:10:96::5:7", ["n1p2"], port=53, target=9090, protocol="UDP")
    r = client(lab, UDP_CLIENT, "fd00:10:96::5:7", 53, cgroup)
    assert r["reply"]["pod"] == "n1p2" and r["reply"]["echo"] == "hello"
    assert r["src"] == "fd00:10:96::5:7:53"


def test_dual_stack_socket_reaches_an_ipv4_clusterip_by_its_mapped_address(
    lab: Lab, program: Any, cgroup: Path
) -> None:
    program("slb-mapped", "10.96.5.8", ["n1p1"])
    program("slb-mapped-udp", "10.96.5.9", ["n1p2"], port=53, target=9090, protocol="UDP")
    r = client(lab, TCP_CLIENT, "::ffff:10.96.5.8", 80, cgroup)
    assert r.get("reply", {}).get("pod") == "n1p1", r
    assert r["reply"]["ip"] == lab.pod("n1p1").ip  # an IPv4 flow to the IPv4 backend
    assert r["peer"] == "::ffff:10.96.5.8:80"
    r = client(lab, UDP_CLIENT, "::ffff:10.96.5.9", 53, cgroup)
    assert r["reply"]["pod"] == "n1p2" and r["src"] == "::ffff:10.96.5.9:53"


def test_agent_without_a_usable_cgroup_runs_without_socket_lb(tc_object: Path, tmp_path: Path) -> None:
    """A socket-LB cgroup that cannot be used (here a plain directory, no cgroup2 below it) no longer
    stops the agent: it serves pods, logs an error naming the chart value, and `kproxy status` says why
    socket load balancing is off."""
    plain = tmp_path / "not-a-cgroup"
    plain.mkdir()
    with Lab(nodes=1, pods_per_node=1, agent_args=["--socket-lb-cgroup", str(plain)]) as lb:
        log = lb.log("agent-n1")
        assert "socket load balancing is OFF" in log and "socketLB.cgroupPath" in log, log[-2000:]
        # the lab runs the agent with --log-level debug: libbpf's own debug output stays out of it
        assert not [ln for ln in log.splitlines() if "DEBUG kproxy.libbpf" in ln]
        r = subprocess.run(
            [sys.executable, "-m", "kproxy", "status", "--bpffs", lb.node("n1").bpffs, "-o", "json"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["agent"]["running"] and st["agent"]["node"] == "n1"
        slb = st["socket_lb"]
        assert slb["wanted"] and slb["attached"] == [] and "not a cgroup v2 directory" in slb["problem"], slb
        assert not (Path(lb.node("n1").bpffs) / "links" / "cgroup:connect4").exists()
