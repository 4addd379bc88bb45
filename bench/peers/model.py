"""Input model shared by the iptables and nftables peer generators.

One ``ServicePort`` is one port of one Service, which is the unit kube-proxy builds chains for
(a multi-port Service is several entries with the same namespace/name). The endpoint selection
below follows kube-proxy's ``CategorizeEndpoints`` for the cases the benchmarks use: ready
endpoints first, serving+terminating ones only when no endpoint is ready, and no topology hints.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass, field, replace

MASQ_MARK = 0x4000  # kube-proxy's default masquerade bit 14


@dataclass(frozen=True)
class Endpoint:
    ip: str
    local: bool = False
    ready: bool = True
    serving: bool = True
    terminating: bool = False


@dataclass(frozen=True)
class ServicePort:
    namespace: str
    name: str
    cluster_ip: str
    port: int
    target_port: int
    protocol: str = "TCP"
    port_name: str = ""
    type: str = "ClusterIP"  # ClusterIP | NodePort | LoadBalancer
    node_port: int | None = None
    endpoints: tuple[Endpoint, ...] = ()
    affinity_timeout: int | None = None  # seconds; set means sessionAffinity ClientIP
    external_local: bool = False  # externalTrafficPolicy: Local
    internal_local: bool = False  # internalTrafficPolicy: Local
    health_check_node_port: int | None = None
    lb_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()
    source_ranges: tuple[str, ...] = ()

    @property
    def proto(self) -> str:
        return self.protocol.lower()

    @property
    def port_name_string(self) -> str:
        """ServicePortName.String(): "ns/name:port", or "ns/name" for an unnamed port."""
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port_name}" if self.port_name else base

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.lb_ips or self.external_ips)

    def ep_string(self, ep: Endpoint) -> str:
        """endpointInfo.String(): net.JoinHostPort, so an IPv6 endpoint is "[addr]:port" (this string
        is in the KUBE-SEP- hash, the comments and the DNAT target)."""
        return f"[{ep.ip}]:{self.target_port}" if ":" in ep.ip else f"{ep.ip}:{self.target_port}"


@dataclass(frozen=True)
class NodeConfig:
    """What kube-proxy knows about its node: cluster CIDR (local-traffic detector), node IPs.

    One proxier serves one family (kube-proxy runs an IPv4 and an IPv6 proxier side by side on a
    dual-stack node): the family is the cluster CIDR's, see ``NODE6`` for the IPv6 one.
    """

    cluster_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    node_ips: tuple[str, ...] = ("192.168.250.2",)
    # Only default/kubernetes and similar have their own knobs in real clusters; these mirror
    # kube-proxy's defaults that are visible in the captured rules.
    localhost_nodeports: bool = True
    nfacct: bool = True
    ipv6_table: bool = True
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> int:
        """4 or 6: the family of this proxier (iptables vs ip6tables, ``table ip`` vs ``table ip6``)."""
        return 6 if ":" in self.cluster_cidr else 4

    @property
    def ipv6(self) -> bool:
        return self.family == 6


# The IPv6 proxier of the benchmarks' dual-stack node: the lab's cluster and service CIDRs.
CLUSTER_CIDR6 = "fd00:10:244::/56"
SERVICE_CIDR6 = "fd00:10:96::/108"
NODE6 = NodeConfig(cluster_cidr=CLUSTER_CIDR6, service_cidr=SERVICE_CIDR6, node_ips=("fd00:77::2",))


def _b32_sha256(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def ipt_hash(svc: ServicePort, endpoint: str = "") -> str:
    """kube-proxy iptables portProtoHash / servicePortEndpointChainName: 16 base32 chars."""
    return _b32_sha256(svc.port_name_string + svc.proto + endpoint)[:16]


def nft_base(svc: ServicePort, ep: Endpoint | None = None) -> str:
    """kube-proxy nftables servicePortChainNameBase / servicePortEndpointChainNameBase."""
    name = f"{svc.namespace}/{svc.name}/{svc.proto}/{svc.port_name}"
    if ep is not None:
        name += f"__{ep.ip.replace(':', '.')}/{svc.target_port}"
    name = _b32_sha256(name)[:8] + "-" + name
    limit = 128 - 16
    return name if len(name) <= limit else name[: limit - 3] + "..."


@dataclass(frozen=True)
class Categorized:
    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    reachable: tuple[Endpoint, ...]  # allLocallyReachableEndpoints, in endpoint order
    has_endpoints: bool
    uses_cluster_chain: bool
    uses_local_chain: bool
    has_internal: bool
    has_external: bool
    uses_external_chain: bool


def categorize(svc: ServicePort) -> Categorized:
    eps = svc.endpoints
    cluster = tuple(e for e in eps if e.ready) or tuple(e for e in eps if e.serving and e.terminating)
    local = tuple(e for e in eps if e.local and e.ready) or tuple(
        e for e in eps if e.local and e.serving and e.terminating
    )
    uses_cluster_eps = not svc.internal_local or (svc.externally_accessible and not svc.external_local)
    uses_local_eps = svc.internal_local or (svc.externally_accessible and svc.external_local)
    # "any usable endpoint anywhere" decides REJECT (none at all) against DROP (none local).
    has_endpoints = bool(cluster) or bool(local)
    if not uses_cluster_eps:
        cluster = ()
    if not uses_local_eps:
        local = ()
    seen = set()
    reachable = []
    for e in cluster + local:
        if e.ip not in seen:
            seen.add(e.ip)
            reachable.append(e)
    return Categorized(
        cluster=cluster,
        local=local,
        reachable=tuple(reachable),
        has_endpoints=has_endpoints,
        uses_cluster_chain=bool(cluster),
        uses_local_chain=bool(local),
        has_internal=has_endpoints and (not svc.internal_local or bool(local)),
        has_external=has_endpoints and (not svc.external_local or bool(local)),
        uses_external_chain=has_endpoints and svc.externally_accessible,
    )


def reference_services() -> list[ServicePort]:
    """The objects of /work/shared/peer-rules/README.md (plus default/kubernetes, which every
    cluster has and which appears in the captured rules without endpoints)."""
    return [
        ServicePort("default", "kubernetes", "10.96.0.1", 443, 6443, port_name="https"),
        ServicePort(
            "demo", "web", "10.96.176.40", 80, 8080, port_name="http",
            endpoints=(Endpoint("10.244.1.10", local=True), Endpoint("10.244.2.11"), Endpoint("10.244.2.12")),
        ),
        ServicePort(
            "demo", "dns", "10.96.13.10", 53, 5353, protocol="UDP", port_name="dns",
            endpoints=(Endpoint("10.244.1.20", local=True), Endpoint("10.244.2.21")),
            affinity_timeout=10800,
        ),
        ServicePort(
            "demo", "np", "10.96.74.70", 80, 8080, port_name="http", type="NodePort", node_port=30080,
            endpoints=(
                Endpoint("10.244.1.30", local=True),
                Endpoint("10.244.2.31", ready=False, serving=True, terminating=True),
            ),
        ),
        ServicePort(
            "demo", "lb", "10.96.103.182", 443, 8443, port_name="http", type="LoadBalancer",
            node_port=30443, health_check_node_port=30548, external_local=True,
            endpoints=(Endpoint("10.244.1.40", local=True), Endpoint("10.244.2.41")),
            lb_ips=("198.51.100.10",), source_ranges=("203.0.113.0/24",),
        ),
        ServicePort("demo", "empty", "10.96.87.112", 81, 8080),
    ]  # fmt: skip


def reference_services6() -> list[ServicePort]:
    """The reference objects as the IPv6 proxier of a dual-stack cluster sees them: the same Services
    with IPv6 ClusterIPs (fd00:10:96::/108), endpoints (fd00:10:244:1::/64 local, :2:: on `other`),
    LB IP and source range. kube-proxy v1.36 was captured for IPv4 only; the IPv6 layout is pinned by
    tests/unit/test_peer_rules.py (rule shapes, from kube-proxy's source) and
    tests/netns/test_peer_rules_apply.py (ip6tables-restore and nft -f into a kernel)."""
    six = {
        "10.96.0.1": "fd00:10:96::1", "10.96.176.40": "fd00:10:96::b028",
        "10.96.13.10": "fd00:10:96::d0a", "10.96.74.70": "fd00:10:96::4a46",
        "10.96.103.182": "fd00:10:96::67b6", "10.96.87.112": "fd00:10:96::5770",
        "198.51.100.10": "2001:db8:51::10", "203.0.113.0/24": "2001:db8:113::/64",
    }  # fmt: skip

    def ep6(ip: str) -> str:
        _, _, third, fourth = ip.split(".")
        return f"fd00:10:244:{third}::{fourth}"

    out = []
    for s in reference_services():
        out.append(
            replace(
                s,
                cluster_ip=six[s.cluster_ip],
                endpoints=tuple(replace(e, ip=ep6(e.ip)) for e in s.endpoints),
                lb_ips=tuple(six[ip] for ip in s.lb_ips),
                source_ranges=tuple(six[r] for r in s.source_ranges),
            )
        )
    return out


# Synthetic Services: ClusterIPs count up from here, endpoints cycle through 4,096 addresses from here.
_SYNTH_BASE = {
    4: (ipaddress.IPv4Address("10.96.1.0"), ipaddress.IPv4Address("10.244.16.0")),
    6: (ipaddress.IPv6Address("fd00:10:96::1:0"), ipaddress.IPv6Address("fd00:10:244:10::")),
}


def synth_services(
    n: int,
    endpoints_per_service: int = 10,
    target: ServicePort | None = None,
    target_index: int | None = None,
    namespace: str = "bench",
    family: int = 4,
) -> list[ServicePort]:
    """N ClusterIP services of ``endpoints_per_service`` endpoints each, as a benchmark input.

    Synthetic cluster IPs count up from 10.96.1.0 (IPv6: fd00:10:96::1:0) and endpoints cycle through
    10.244.16.0/20 (IPv6: fd00:10:244:10::/116; pods may back many Services; only the rule count
    matters for the unused ones). ``target`` (a real, reachable Service) replaces the one at
    ``target_index`` (default: the middle, the expected position of a Service in kube-proxy's
    randomly ordered KUBE-SERVICES chain).
    """
    if n > 60000:
        raise ValueError(f"synth_services: {n} services do not fit the 10.96.0.0/16 service CIDR")
    base_vip, base_ep = _SYNTH_BASE[family]
    out: list[ServicePort] = []
    for i in range(n):
        eps = tuple(
            Endpoint(str(base_ep + (i * endpoints_per_service + j) % 4096))
            for j in range(endpoints_per_service)
        )
        out.append(
            ServicePort(
                namespace, f"svc-{i}", str(base_vip + i), 80, 8080,
                port_name="http", endpoints=eps,
            )
        )  # fmt: skip
    if target is not None and n > 0:
        idx = n // 2 if target_index is None else target_index
        out[idx] = target
    return out
