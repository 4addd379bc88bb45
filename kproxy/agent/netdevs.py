"""Which interfaces are the node's netdevs (when --netdev is not given), and whether they forward IPv4."""

from __future__ import annotations

import fcntl
import fnmatch
import logging
import socket
import struct
from collections.abc import Iterable

log = logging.getLogger("kproxy.agent")

SIOCGIFADDR = 0x8915


# ---- netdev autodetection ----
def default_route_ifaces(route_table: str) -> list[str]:
    """Interfaces of IPv4 default routes in a /proc/net/route text."""
    out = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000" and fields[0] not in out:
            out.append(fields[0])
    return out


def _iface_ipv4(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(res[20:24])


def detect_netdevs(node_ips: Iterable[str], pod_globs: Iterable[str]) -> list[str]:
    """Interfaces with a default route or holding a node IP, minus loopback and pod interfaces.

    Only the primary IPv4 address of each interface is checked (SIOCGIFADDR): the node IP the
    kubelet reports is that address on every common setup.
    """
    try:
        with open("/proc/net/route") as f:
            found = default_route_ifaces(f.read())
    except OSError:
        found = []
    ips = set(node_ips)
    for _, name in socket.if_nameindex():
        if name not in found and _iface_ipv4(name) in ips:
            found.append(name)
    globs = list(pod_globs)
    return [n for n in found if n != "lo" and not any(fnmatch.fnmatchcase(n, g) for g in globs)]


# ---- IPv4 forwarding ----
def forwarding_off(netdevs: Iterable[str], said: Iterable[str]) -> list[str]:
    """Netdevs on which IPv4 forwarding is off (globally or on the device); a warning for each one not
    in SAID (those found off at the last check: said already)."""
    said = set(said)
    off: list[str] = []
    for dev in netdevs:
        for path in ("/proc/sys/net/ipv4/ip_forward", f"/proc/sys/net/ipv4/conf/{dev}/forwarding"):
            try:
                with open(path) as f:
                    on = f.read().strip() != "0"
            except OSError:
                continue
            if not on:
                off.append(dev)
                if dev in said:
                    break  # said already
                log.warning(
                    "IPv4 forwarding is off (%s = 0): external traffic through %s to pods will be "
                    "dropped; enable it (sysctl -w net.ipv4.ip_forward=1 net.ipv4.conf.all.forwarding=1)",
                    path, dev,
                )  # fmt: skip
                break
    return off
