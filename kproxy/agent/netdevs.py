"""Which interfaces are the node's netdevs (when --netdev is not given), and whether they forward IPv4
and IPv6."""

from __future__ import annotations

import fcntl
import fnmatch
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable

log = logging.getLogger("kproxy.agent")

SIOCGIFADDR = 0x8915
# /proc/net/ipv6_route flags (include/uapi/linux/route.h, ipv6_route.h)
RTF_UP = 0x0001
RTF_REJECT = 0x0200  # unreachable / prohibit: the kernel's own "default" on lo is one

IPV4, IPV6 = "IPv4", "IPv6"


# ---- netdev autodetection ----
def default_route_ifaces(route_table: str) -> list[str]:
    """Interfaces of IPv4 default routes in a /proc/net/route text."""
    out = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000" and fields[0] not in out:
            out.append(fields[0])
    return out


def default_route6_ifaces(ipv6_route_table: str) -> list[str]:
    """Interfaces of IPv6 default routes (::/0, up, not unreachable) in a /proc/net/ipv6_route text:
    dst, dst_len, src, src_len, next hop, metric, refcnt, use, flags, device per line, in hex."""
    out = []
    for line in ipv6_route_table.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[0] != "0" * 32 or fields[1] != "00":
            continue
        try:
            flags = int(fields[8], 16)
        except ValueError:
            continue
        if flags & RTF_UP and not flags & RTF_REJECT and fields[9] not in out:
            out.append(fields[9])
    return out


def iface_ipv6_addresses(if_inet6: str) -> dict[str, set[str]]:
    """{interface: its IPv6 addresses (canonical text)} from a /proc/net/if_inet6 text: address in hex,
    ifindex, prefix length, scope, flags, device per line; every address, not only the first."""
    out: dict[str, set[str]] = {}
    for line in if_inet6.splitlines():
        fields = line.split()
        if len(fields) < 6 or len(fields[0]) != 32:
            continue
        try:
            addr = str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
        except ValueError:
            continue
        out.setdefault(fields[5], set()).add(addr)
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _iface_ipv4(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(res[20:24])


def detect_netdevs(
    node_ips: Iterable[str],
    pod_globs: Iterable[str],
    *,
    proc_net: str = "/proc/net",
) -> list[str]:
    """Interfaces with a default route or holding a node IP, minus loopback and pod interfaces: those
    of IPv4 default routes, then (with an IPv6 node IP) those of IPv6 default routes, then the others
    holding a node IP. A dual-stack node whose IPv6 default route leaves through another interface
    gets both; an IPv6-only node finds its netdev.

    Only the primary IPv4 address of each interface is checked (SIOCGIFADDR): the node IP the
    kubelet reports is that address on every common setup. IPv6 node IPs are matched against every
    IPv6 address of the interfaces (/proc/net/if_inet6). PROC_NET: where route, ipv6_route and
    if_inet6 are read (tests).
    """
    ips = set(node_ips)
    ips6 = set()
    for ip in ips:
        try:
            parsed = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if parsed.version == 6:
            ips6.add(str(parsed))
    found = default_route_ifaces(_read(f"{proc_net}/route"))
    if ips6:
        found += [n for n in default_route6_ifaces(_read(f"{proc_net}/ipv6_route")) if n not in found]
    addrs6 = iface_ipv6_addresses(_read(f"{proc_net}/if_inet6")) if ips6 else {}
    for _, name in socket.if_nameindex():
        if name in found:
            continue
        if _iface_ipv4(name) in ips or addrs6.get(name, set()) & ips6:
            found.append(name)
    globs = list(pod_globs)
    return [n for n in found if n != "lo" and not any(fnmatch.fnmatchcase(n, g) for g in globs)]


# ---- forwarding ----
# Per family: the sysctls that must not be 0 (global, then the device's), what turns them on, what
# breaks when they are off.
_FORWARDING = {
    IPV4: (
        ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/{dev}/forwarding"),
        "sysctl -w net.ipv4.ip_forward=1 net.ipv4.conf.all.forwarding=1",
        "external traffic through {dev} to pods will be dropped",
    ),
    IPV6: (
        ("/proc/sys/net/ipv6/conf/all/forwarding", "/proc/sys/net/ipv6/conf/{dev}/forwarding"),
        # forwarding=1 makes the kernel ignore router advertisements unless accept_ra is 2
        "sysctl -w net.ipv6.conf.all.forwarding=1; with a default route learnt from router "
        "advertisements set net.ipv6.conf.{dev}.accept_ra=2 first",
        "external IPv6 traffic through {dev} to pods, and SNATed IPv6 flows (bpf_fib_lookup fails), "
        "will be dropped",
    ),
}


def forwarding_off(
    netdevs: Iterable[str], said: Iterable[str], families: Iterable[str] = (IPV4,)
) -> list[str]:
    """Where forwarding of a family is off (globally or on the device), as "FAMILY DEV" ("IPv4 eth0",
    "IPv6 eth0"), for each of FAMILIES (the node's: those of its --node-ip) and netdev; a warning for
    each one not in SAID (those found off at the last check: said already)."""
    said = set(said)
    devs = list(netdevs)
    off: list[str] = []
    for family in (f for f in (IPV4, IPV6) if f in set(families)):
        paths, fix, effect = _FORWARDING[family]
        for dev in devs:
            which = f"{family} {dev}"
            for path in (p.format(dev=dev) for p in paths):
                try:
                    with open(path) as f:
                        on = f.read().strip() != "0"
                except OSError:
                    continue
                if not on:
                    off.append(which)
                    if which not in said:
                        log.warning(
                            "%s forwarding is off (%s = 0): %s; enable it (%s)",
                            family, path, effect.format(dev=dev), fix.format(dev=dev),
                        )  # fmt: skip
                    break
    return off
