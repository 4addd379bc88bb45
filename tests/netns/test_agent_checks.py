"""Host checks the agent repeats while it runs (issue 12): IPv4 forwarding, often turned on by the CNI
after the agent started, is checked at every sweep, and the log says when it changed.

Runs in a private network namespace (`unshare -n`), where the test turns forwarding off, then on.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.root

SCRIPT = """
import logging
from kproxy.agent import Agent
from kproxy.config import AgentConfig

def forwarding(value):
    for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/lo/forwarding"):
        with open(path, "w") as f:
            f.write(value)

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
# a new namespace copies the host's settings (devconf_inherit_init_net): start from "off" whatever they are
forwarding("0")
agent = Agent(AgentConfig(node_name="n1", node_ips=["192.0.2.1"], netdevs=["lo"]))
print("first", agent.check_forwarding(), flush=True)
print("again", agent.check_forwarding(), flush=True)
forwarding("1")
print("later", agent.check_forwarding(), flush=True)
"""


def test_forwarding_turned_on_later_is_noticed() -> None:
    r = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["first ['IPv4 lo']", "again ['IPv4 lo']", "later []"]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING") and "forwarding is off" in ln]
    assert len(warnings) == 1, r.stderr  # said once, not at every sweep
    assert "INFO IPv4 forwarding is on now on lo" in r.stderr.splitlines()


SCRIPT6 = """
import logging
from kproxy.agent import Agent
from kproxy.config import AgentConfig

def sysctl(path, value):
    with open(path, "w") as f:
        f.write(value)

def forwarding4(value):
    for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/lo/forwarding"):
        sysctl(path, value)

def forwarding6(value):
    for path in ("/proc/sys/net/ipv6/conf/all/forwarding", "/proc/sys/net/ipv6/conf/lo/forwarding"):
        sysctl(path, value)

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
forwarding4("1")
forwarding6("0")
dual = Agent(AgentConfig(node_name="n1", node_ips=["192.0.2.1", "fd00::1"], netdevs=["lo"]))
v4 = Agent(AgentConfig(node_name="n1", node_ips=["192.0.2.1"], netdevs=["lo"]))
v6 = Agent(AgentConfig(node_name="n1", node_ips=["fd00::1"], netdevs=["lo"]))
print("dual", dual.check_forwarding(), flush=True)
print("v4", v4.check_forwarding(), flush=True)
forwarding4("0")
print("v6", v6.check_forwarding(), flush=True)
print("dual", dual.check_forwarding(), flush=True)
forwarding6("1")
print("dual", dual.check_forwarding(), flush=True)
print("v6", v6.check_forwarding(), flush=True)
"""


def test_ipv6_forwarding_is_checked_for_nodes_with_an_ipv6_node_ip() -> None:
    """bpf_fib_lookup for IPv6 fails with IPv6 forwarding off (SNATed IPv6 flows are dropped): checked
    when an IPv6 --node-ip is given; the IPv4 sysctls only when an IPv4 one is."""
    r = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", SCRIPT6], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "dual ['IPv6 lo']",
        "v4 []",  # an IPv4-only node does not look at IPv6
        "v6 ['IPv6 lo']",  # an IPv6-only node does not look at IPv4
        "dual ['IPv4 lo', 'IPv6 lo']",
        "dual ['IPv4 lo']",
        "v6 []",
    ]
    lines = r.stderr.splitlines()
    warned6 = [ln for ln in lines if ln.startswith("WARNING IPv6 forwarding is off")]
    assert len(warned6) == 2, r.stderr  # said once by each agent that checks IPv6, not at every check
    assert "net.ipv6.conf.all.forwarding=1" in warned6[0] and "SNATed IPv6 flows" in warned6[0]
    assert len([ln for ln in lines if ln.startswith("WARNING IPv4 forwarding is off")]) == 1, r.stderr
    assert "INFO IPv6 forwarding is on now on lo" in lines


NETDEVS6 = """
import subprocess
from kproxy.agent import detect_netdevs

def ip(*args):
    subprocess.run(["ip", *args], check=True)

# kpa0: IPv4, with the IPv4 default route; kpb0: IPv6 only, with the IPv6 default route; kpc0: holds
# the IPv6 node IP, no route; kpp0: a pod interface (matches the glob) holding an IPv6 address
for a, b in (("kpa0", "kpa1"), ("kpb0", "kpb1"), ("kpc0", "kpc1"), ("kpp0", "kpp1")):
    ip("link", "add", a, "type", "veth", "peer", "name", b)
    ip("link", "set", a, "up")
    ip("link", "set", b, "up")
ip("addr", "add", "10.9.0.5/24", "dev", "kpa0")
ip("route", "add", "default", "via", "10.9.0.1", "dev", "kpa0")
ip("-6", "addr", "add", "fd00:9::5/64", "dev", "kpb0", "nodad")
ip("-6", "route", "add", "default", "via", "fd00:9::1", "dev", "kpb0")
ip("-6", "addr", "add", "fd00:a::5/64", "dev", "kpc0", "nodad")
ip("-6", "addr", "add", "fd00:b::5/64", "dev", "kpp0", "nodad")
print("v4", detect_netdevs(["10.9.0.5"], ["kpp*"]))
print("dual", detect_netdevs(["10.9.0.5", "fd00:a::5"], ["kpp*"]))
print("v6", detect_netdevs(["fd00:a:0::5"], ["kpp*"]))
print("pod", detect_netdevs(["fd00:b::5"], ["kpp*"]))
ip("-6", "route", "del", "default")
print("v6-no-route", detect_netdevs(["fd00:a::5"], ["kpp*"]))
"""


def test_netdev_autodetection_reads_ipv6_routes_and_addresses() -> None:
    """From the kernel: an IPv6 default route through another interface is attached too, and an
    IPv6-only node finds the interface holding its node IP."""
    r = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", NETDEVS6], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "v4 ['kpa0']",  # as before: IPv6 routes are not looked at without an IPv6 node IP
        "dual ['kpa0', 'kpb0', 'kpc0']",
        "v6 ['kpa0', 'kpb0', 'kpc0']",
        "pod ['kpa0', 'kpb0']",
        "v6-no-route ['kpa0', 'kpc0']",
    ]
