"""Names and limits of the Kubernetes API that kproxy relies on, shared by the schema, the fast path
and translate."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
TOPOLOGY_MODE_ANNOTATION = "service.kubernetes.io/topology-mode"
TOPOLOGY_HINTS_ANNOTATION = "service.kubernetes.io/topology-aware-hints"  # deprecated spelling
ZONE_LABEL = "topology.kubernetes.io/zone"
# kproxy's own: how the Service's external frontends (NodePort, LoadBalancer, externalIPs) pick a
# backend for a new flow, "maglev" or "random"; without it, the agent's --lb-algorithm
LB_ALGORITHM_ANNOTATION = "kproxy.io/lb-algorithm"
LB_ALGORITHMS = ("random", "maglev")

DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400
# Kubernetes itself sets no limit on Service ports; EndpointSlices carry at most 100. A Service with
# more ports than that is treated as malformed rather than programmed half-way.
MAX_SERVICE_PORTS = 100

Protocol = Literal["TCP", "UDP", "SCTP"]

# IPv4 exactly as ipaddress accepts it (no leading zeros, ASCII digits); anything else: the schema
IPV4_EXACT = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
).fullmatch


def canonical_ipv6(value: str) -> str | None:
    """The canonical text of an IPv6 address (RFC 5952, as Go's net.IP prints it: lower case, the
    longest run of zero groups compressed), or None unless `value` is a plain IPv6 address. A zone
    ("fe80::1%eth0") is not one (Go's ParseIP rejects it), nor is an IPv4-mapped address
    ("::ffff:10.0.0.1"): Kubernetes reads that as the IPv4 address (see canonical_ip)."""
    if ":" not in value:
        return None
    if _is_canonical_ipv6(value):
        return value
    try:
        ip = ipaddress.IPv6Address(value)
    except ValueError:
        return None
    if ip.scope_id is not None or ip.ipv4_mapped is not None:
        return None
    return ip.compressed


def canonical_ip(value: str) -> str | None:
    """The canonical text of an IP address of either family, as Kubernetes reads it (netutils'
    ParseIPSloppy, then String()): IPv4 dotted without leading zeros, an IPv4-mapped IPv6 address as
    its IPv4 address, IPv6 as canonical_ipv6. None if `value` is not an IP address."""
    if IPV4_EXACT(value) is not None:
        return value
    v6 = canonical_ipv6(value)
    if v6 is not None:
        return v6
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return None if ip.ipv4_mapped is None or ip.scope_id is not None else str(ip.ipv4_mapped)
    return str(ip)


_HEX_COLON = frozenset("0123456789abcdef:")


def _is_canonical_ipv6(value: str) -> bool:
    """Whether `value` is a plain IPv6 address already in canonical form: string checks only, about 5x
    faster than ipaddress (which canonical_ipv6 falls back to for anything else). Eight groups of 1-4
    lower-case hex digits without leading zeros, the longest run (the first of equal ones) of two or
    more zero groups written "::", no other one, not IPv4-mapped."""
    if not _HEX_COLON.issuperset(value):
        return False
    head, sep, tail = value.partition("::")
    run: tuple[int, int] | None = None
    if sep:
        if "::" in tail:
            return False
        head_groups = head.split(":") if head else []
        tail_groups = tail.split(":") if tail else []
        n = len(head_groups) + len(tail_groups)
        if n > 6:
            return False
        groups = head_groups + ["0"] * (8 - n) + tail_groups
        run = (len(head_groups), 8 - n)
    else:
        groups = value.split(":")
        if len(groups) != 8:
            return False
    for g in groups:
        if not g or len(g) > 4 or (g[0] == "0" and g != "0"):
            return False
    if groups[5] == "ffff" and groups[:5] == ["0"] * 5:
        return False  # IPv4-mapped
    best = (0, 0)
    i = 0
    while i < 8:
        if groups[i] == "0":
            j = i + 1
            while j < 8 and groups[j] == "0":
                j += 1
            if j - i > best[1]:
                best = (i, j - i)
            i = j
        else:
            i += 1
    return run is None if best[1] < 2 else run == best
