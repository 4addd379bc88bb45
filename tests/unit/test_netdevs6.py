"""Netdev autodetection with IPv6 (issue 15): IPv6 default routes (/proc/net/ipv6_route) and IPv6 node
IPs matched against every IPv6 address of the interfaces (/proc/net/if_inet6), from texts as the
kernel writes them. The kernel path itself is tested in tests/netns/test_agent_checks.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from kproxy.agent import netdevs
from kproxy.agent.netdevs import default_route6_ifaces, detect_netdevs, iface_ipv6_addresses

Z = "0" * 32

# As on a dual-stack host: the kernel's own unreachable ::/0 on lo (RTF_REJECT), a default via a router
# on eth1, a link route and a local address on eth0, and a multipath-ish second default on eth1.
IPV6_ROUTE = (
    f"fd000000000000000000000000000000 40 {Z} 00 {Z} 00000100 00000001 00000000 00000001     eth0\n"
    f"{Z} 00 {Z} 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth1\n"
    f"{Z} 00 {Z} 00 fe800000000000000000000000000001 00000400 00000003 00000000 00000003     eth1\n"
    f"{Z} 00 {Z} 00 {Z} ffffffff 00000001 00000000 00200200       lo\n"
    f"fd000000000000000000000000000002 80 {Z} 00 {Z} 00000000 00000004 00000000 80200001     eth0\n"
)
IF_INET6 = (
    "fd000000000000000000000000000002 02 40 00 80     eth0\n"
    "fe8000000000000000fc00fffe000001 02 40 20 80     eth0\n"
    "fd00000000000000000000000000000a 03 40 00 80     eth0\n"  # a second address: matched too
    "fd0000000000000000000000000000b0 04 40 00 80     cali1\n"
    "00000000000000000000000000000001 01 80 10 80       lo\n"
)
ROUTE_HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"


def test_default_route6_ifaces_skips_rejects_and_other_prefixes() -> None:
    assert default_route6_ifaces(IPV6_ROUTE) == ["eth1"]
    assert default_route6_ifaces("") == []
    assert default_route6_ifaces("garbage line\n") == []


def test_iface_ipv6_addresses_are_canonical_and_all_of_them() -> None:
    addrs = iface_ipv6_addresses(IF_INET6)
    assert addrs["eth0"] == {"fd00::2", "fe80::fc:ff:fe00:1", "fd00::a"}
    assert addrs["lo"] == {"::1"}


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /proc/net with interfaces lo, eth0 (10.0.0.5), eth1, cali1 and no IPv4 default route."""
    (tmp_path / "route").write_text(
        ROUTE_HEADER + "eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    (tmp_path / "ipv6_route").write_text(IPV6_ROUTE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    names = ["lo", "eth0", "eth1", "cali1"]
    monkeypatch.setattr(netdevs.socket, "if_nameindex", lambda: list(enumerate(names, 1)))
    ipv4 = {"lo": "127.0.0.1", "eth0": "10.0.0.5"}
    monkeypatch.setattr(netdevs, "_iface_ipv4", ipv4.get)
    return tmp_path


def test_an_ipv6_only_node_finds_its_netdev(host: Path) -> None:
    (host / "ipv6_route").write_text("")  # no IPv6 default route either: the address decides
    assert detect_netdevs(["fd00::a"], ["cali*"], proc_net=str(host)) == ["eth0"]
    assert detect_netdevs(["FD00:0::0:2"], ["cali*"], proc_net=str(host)) == ["eth0"]  # any spelling


def test_an_ipv6_default_route_through_another_interface_is_attached_too(host: Path) -> None:
    assert detect_netdevs(["10.0.0.5", "fd00::2"], ["cali*"], proc_net=str(host)) == ["eth1", "eth0"]
    (host / "route").write_text(ROUTE_HEADER + "eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert detect_netdevs(["10.0.0.5", "fd00::2"], ["cali*"], proc_net=str(host)) == ["eth0", "eth1"]


def test_ipv4_only_nodes_are_detected_as_before(host: Path) -> None:
    # no IPv6 node IP: IPv6 default routes and addresses are not looked at
    assert detect_netdevs(["10.0.0.5"], ["cali*"], proc_net=str(host)) == ["eth0"]
    (host / "route").write_text(ROUTE_HEADER)
    assert detect_netdevs(["10.0.0.9"], ["cali*"], proc_net=str(host)) == []


def test_pod_interfaces_and_lo_are_never_netdevs(host: Path) -> None:
    assert detect_netdevs(["fd00::b0", "::1"], ["cali*"], proc_net=str(host)) == ["eth1"]
