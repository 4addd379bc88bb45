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
from dataclasses import dataclass, field

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
        return f"{ep.ip}:{self.target_port}"


@dataclass(frozen=True)
class NodeConfig:
    """What kube-proxy knows about its node: cluster CIDR (local-traffic detector), node IPs."""

    cluster_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    node_ips: tuple[str, ...] = ("192.168.250.2",)
    # Only default/kubernetes and similar have their own knobs in real clusters; these mirror
    # kube-proxy's defaults that are visible in the captured rules.
    localhost_nodeports: bool = True
    nfacct: bool = True
    ipv6_table: bool = True
    extra: dict[str, str] = field(default_factory=dict)


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


def synth_services(
    n: int,
    endpoints_per_service: int = 10,
    target: ServicePort | None = None,
    target_index: int | None = None,
    namespace: str = "bench",
) -> list[ServicePort]:
    """N ClusterIP services of ``endpoints_per_service`` endpoints each, as a benchmark input.

    Synthetic cluster IPs count up from 10.96.1.0 and endpoints cycle through 10.244.16.0/20
    (pods may back many Services; only the rule count matters for the unused ones). ``target``
    (a real, reachable Service) replaces the one at ``target_index`` (default: the middle, the
    expected position of a Service in kube-proxy's randomly ordered KUBE-SERVICES chain).
    """
    if n > 60000:
        raise ValueError(f"synth_services: {n} services do not fit the 10.96.0.0/16 service CIDR")
    base_vip = int(ipaddress.IPv4Address("10.96.1.0"))
    base_ep = int(ipaddress.IPv4Address("10.244.16.0"))
    out: list[ServicePort] = []
    for i in range(n):
        eps = tuple(
            Endpoint(str(ipaddress.IPv4Address(base_ep + (i * endpoints_per_service + j) % 4096)))
            for j in range(endpoints_per_service)
        )
        out.append(
            ServicePort(
                namespace, f"svc-{i}", str(ipaddress.IPv4Address(base_vip + i)), 80, 8080,
                port_name="http", endpoints=eps,
            )
        )  # fmt: skip
    if target is not None and n > 0:
        idx = n // 2 if target_index is None else target_index
        out[idx] = target
    return out
