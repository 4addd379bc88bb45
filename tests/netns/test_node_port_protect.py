"""--protect-node-port-range in a lab node: the NodePort range joins net.ipv4.ip_local_reserved_ports of
the node's network namespace (never the root namespace's), others' entries survive, a restart writes
nothing, and no ephemeral port of either family lands in the range even when ip_local_port_range
overlaps it. --no-protect-node-port-range takes out exactly what the agent added."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy.bpf import reserved_ports as rp
from kproxy.lab import Lab

pytestmark = pytest.mark.root

RESERVED = "/proc/sys/net/ipv4/ip_local_reserved_ports"
PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
NODE_PORTS = (30000, 32767)

# Binds port 0 (TCP and UDP, IPv4 and IPv6) with ip_local_port_range overlapping the NodePort range in
# this namespace only, keeping every socket open so each bind takes a new port; prints the ports.
EPHEMERAL = """
import json, socket, subprocess
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    saved = f.read()
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("32600 32900\\n")  # 168 ports in the NodePort range, 133 above it
try:
    ports, keep = {}, []
    for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        for kind, typ in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
            got = ports.setdefault(f"{fam.name}/{kind}", [])
            for _ in range(120):
                s = socket.socket(fam, typ)
                s.bind((addr, 0))
                keep.append(s)
                got.append(s.getsockname()[1])
    print(json.dumps(ports))
finally:
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write(saved)
"""


@pytest.fixture(scope="module")
def lab(tc_object: Path) -> Iterator[Lab]:
    with Lab(nodes=1, pods_per_node=1) as lb:
        yield lb


def node_read(lab: Lab, path: str) -> str:
    r = lab.run_in(lab.node("n1"), ["cat", path])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def node_write(lab: Lab, path: str, value: str) -> None:
    r = lab.run_in(lab.node("n1"), ["sh", "-c", 'printf "%s\\n" "$1" > "$0"', path, value])
    assert r.returncode == 0, r.stderr


def restart(lab: Lab, *extra: str) -> None:
    lab.stop_agent("n1")
    saved = list(lab.agent_args)
    lab.agent_args = [*saved, *extra]
    try:
        lab.start_agent("n1")
        lab.wait_agent("n1")
    finally:
        lab.agent_args = saved


def test_node_port_range_is_reserved_in_the_node_namespace(lab: Lab) -> None:
    assert rp.parse(node_read(lab, RESERVED)) == [NODE_PORTS]
    assert "ip_local_reserved_ports: added 30000-32767" in lab.log("agent-n1")


def test_ephemeral_ports_never_take_a_node_port(lab: Lab) -> None:
    r = lab.run_in(lab.node("n1"), [sys.executable, "-c", EPHEMERAL])
    assert r.returncode == 0, r.stderr
    ports = json.loads(r.stdout)
    for what, got in ports.items():
        assert len(set(got)) == 120, what
        assert not [p for p in got if NODE_PORTS[0] <= p <= NODE_PORTS[1]], (what, got)


def test_others_entries_survive_and_a_covered_range_is_not_written(lab: Lab) -> None:
    node_write(lab, RESERVED, "8080,30000-32767,40000-40010")
    restart(lab)
    assert node_read(lab, RESERVED) == "8080,30000-32767,40000-40010"
    assert lab.log("agent-n1").count("ip_local_reserved_ports: added") == 1  # the first start's only


def test_protection_off_removes_what_the_agent_added_only(lab: Lab) -> None:
    restart(lab, "--no-protect-node-port-range")
    assert node_read(lab, RESERVED) == "8080,40000-40010"
    assert "NodePort range protection off: removed 30000-32767" in lab.log("agent-n1")
    restart(lab)  # back on: added again, and the others kept
    assert node_read(lab, RESERVED) == "8080,30000-32767,40000-40010"


def test_cleanup_removes_what_the_agent_added_only(lab: Lab) -> None:
    """`kproxy cleanup` (run in the node's namespace, as an uninstall's agent would) takes the recorded
    range out and leaves the others'. (The record names its namespace: elsewhere it removes nothing.)"""
    lab.stop_agent("n1")
    bpffs = lab.node("n1").bpffs
    r = lab.run_in(lab.node("n1"), [sys.executable, "-m", "kproxy", "cleanup", "--bpffs", bpffs])
    assert r.returncode == 0, r.stderr
    assert "ip_local_reserved_ports 30000-32767" in r.stdout, r.stdout
    assert node_read(lab, RESERVED) == "8080,40000-40010"
