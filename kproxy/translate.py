"""Service + EndpointSlices + this node -> the frontends to program. Pure: no I/O, no clock, no logging.

Every Kubernetes rule kproxy implements lives here, following kube-proxy (pkg/proxy, topology.go's
CategorizeEndpoints):
- IPv4 and IPv6 alike, each family apart, as kube-proxy runs one proxier per family: a family serves
  the Service when it has a clusterIP of that family (SingleStack, PreferDualStack, RequireDualStack,
  either order), with only the Service's addresses and source ranges of that family and only the
  endpoints of EndpointSlices of that addressType. Every address is canonical text (the model's
  canonical_ip), so families are told apart by text alone: no per-endpoint parsing.
- ClusterIP frontends on every spec.clusterIPs entry; NodePort frontends on the node addresses of the
  family selected by the nodeport-addresses CIDRs of the family (default: the node's InternalIPs of the
  family); LoadBalancer ingress IPs; spec.externalIPs.
- Endpoints: ready ones; when none is ready anywhere, serving+terminating ones (KEP-1669). Local
  traffic policies use this node's ready endpoints, else its serving+terminating ones.
- externalTrafficPolicy Local: the external frontends' EXT scope gets the local endpoints, and pods
  (INT scope) get all cluster endpoints, as kube-proxy short-circuits pod -> external traffic.
- internalTrafficPolicy Local: ClusterIP frontends get the local endpoints only.
- A local-policy scope with no local endpoint while others exist drops (NO_LOCAL_DROP) instead of
  rejecting, as kube-proxy does.
- Topology (kube-proxy 1.36's topologyModeFromHints): the hints the EndpointSlice controller wrote
  for the Service's trafficDistribution (PreferSameNode, PreferSameZone / PreferClose) or topology-mode
  annotation decide, not the Service itself. Same-node when every ready endpoint has node hints and
  one is for this node; else same-zone when every ready endpoint has zone hints and one is for this
  node's zone; else every ready endpoint. Local traffic policies ignore topology.
- Endpoints listed but not eligible for new connections (terminating, not ready) are `retained`:
  their backend entries stay so flows already going to them continue.
- LoadBalancer ingress IPs with ipMode Proxy (KEP-1860) are not served: packets to them go to the load
  balancer, which proxies them (kube-proxy's IsVIPMode).
- kproxy.io/lb-algorithm (else the agent's --lb-algorithm): "maglev" flags the EXT scope of the external
  frontends (NodePort, LoadBalancer, externalIPs) SvcFlag.MAGLEV, so new flows from outside take the
  backend of the port's Maglev table; ClusterIPs and pods' INT scope stay random.
- loadBalancerSourceRanges (those of the frontend's family) restrict the LoadBalancer IP frontends
  only (kube-proxy's KUBE-FW chains: NodePorts, ClusterIPs and external IPs stay open, and pods and the
  node get no exemption); see lb_source_ranges.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import NamedTuple

from kproxy.abi import Scope, SvcFlag
from kproxy.desired import BackendRef, Frontend
from kproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    HEADLESS_LABEL,
    LB_ALGORITHM_ANNOTATION,
    LB_ALGORITHMS,
    SERVICE_PROXY_NAME_LABEL,
    EndpointConditions,
    EndpointSlice,
    NodeInfo,
    Service,
    ServicePort,
    ServiceSpec,
    endpoint_rows,
)

MAX_BACKENDS_PER_FRONTEND = 65535  # slot-0 count is a u16
_EXT = int(Scope.EXT)
_INT = int(Scope.INT)


class TranslateError(ValueError):
    """A Service that parsed but cannot be programmed. `reason` is a short label for counters."""

    def __init__(self, service: str, reason: str, message: str) -> None:
        super().__init__(f"Service {service} skipped: {message}")
        self.service = service
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TranslateConfig:
    """The agent settings translate depends on."""

    # CIDRs selecting the node addresses NodePorts listen on; empty = the node's InternalIPs.
    nodeport_addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # how external frontends pick backends unless the Service's kproxy.io/lb-algorithm says: "random" or
    # "maglev" (the agent's --lb-algorithm)
    lb_algorithm: str = "random"

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str], lb_algorithm: str = "random") -> TranslateConfig:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs), lb_algorithm)


def lb_algorithm(svc: Service, cfg: TranslateConfig, skipped: Counter[str] | None = None) -> str:
    """How the Service's external frontends (NodePort, LoadBalancer, externalIPs) pick a backend for a new
    flow: its kproxy.io/lb-algorithm annotation ("maglev" or "random", case-insensitive), else the agent's
    --lb-algorithm. Another value is counted (`lb_algorithm_invalid`) and the agent's default applies: a
    typo never takes a Service down. ClusterIP frontends (cluster-internal traffic) stay random."""
    value = svc.metadata.annotations.get(LB_ALGORITHM_ANNOTATION)
    if value is None:
        return cfg.lb_algorithm
    v = value.strip().lower()
    if v in LB_ALGORITHMS:
        return v
    if skipped is not None:
        skipped["lb_algorithm_invalid"] += 1
    return cfg.lb_algorithm


def _is_v4(address: str) -> bool:
    # ipaddress is slow; the model already validated the syntax and canonicalised the text (an
    # IPv4-mapped IPv6 address became its IPv4 one), so a colon means IPv6.
    return ":" not in address


def skip_reason(svc: Service) -> str | None:
    """Why kproxy serves none of this Service, or None. The values are counters' reasons.

    As kube-proxy 1.36 filters its Service watch: the service-proxy-name label and clusterIP None.
    The service.kubernetes.io/headless label filters EndpointSlices, not Services (see
    _endpoints_for_port): the EndpointSlice controller puts it on the slices of headless Services only.
    """
    labels = svc.metadata.labels
    if SERVICE_PROXY_NAME_LABEL in labels:
        return "other_proxy"
    spec = svc.spec
    if spec.type == "ExternalName":
        return "external_name"
    first = spec.cluster_ips[0] if spec.cluster_ips else spec.cluster_ip
    if first == "None":
        return "headless"
    return None


class _NodeView(NamedTuple):
    """What translate reads of this node, per family: worked out once per (node, config)."""

    nodeport_v4: tuple[str, ...]
    nodeport_v6: tuple[str, ...]


def _family_nodeport_addresses(
    internal: list[str], host: Iterable[str], nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> list[str]:
    """One family's NodePort addresses among its InternalIPs and host addresses, for that family's
    --nodeport-addresses CIDRs (`nets`). kube-proxy's NewNodePortAddresses: no CIDR of the family, or
    a zero CIDR (0.0.0.0/0, ::/0), matches every address of the family. Loopback never."""
    match_all = not nets or any(n.prefixlen == 0 for n in nets)
    out = []
    for a in internal + [h for h in host if h not in internal]:
        ip = ipaddress.ip_address(a)
        if not ip.is_loopback and (match_all or any(ip in n for n in nets)):
            out.append(a)
    return out


@lru_cache(maxsize=8)
def _node_view(node: NodeInfo, cfg: TranslateConfig) -> _NodeView:
    v4 = [a for a in node.addresses if _is_v4(a)]
    v6 = [a for a in node.addresses if not _is_v4(a)]
    np4, np6 = v4, v6
    if cfg.nodeport_addresses:
        host_v4 = [a for a in node.host_addresses if _is_v4(a)]
        host_v6 = [a for a in node.host_addresses if not _is_v4(a)]
        nets = cfg.nodeport_addresses
        np4 = _family_nodeport_addresses(v4, host_v4, [n for n in nets if n.version == 4])
        np6 = _family_nodeport_addresses(v6, host_v6, [n for n in nets if n.version == 6])
    return _NodeView(tuple(np4), tuple(np6))


def nodeport_addresses(node: NodeInfo, cfg: TranslateConfig) -> list[str]:
    """The node addresses NodePorts are served on, IPv4 ones first, then IPv6 ones: the node's
    InternalIPs by default (kube-proxy's "primary"); with --nodeport-addresses, every address of the
    node's interfaces (InternalIPs included) in those CIDRs, loopback never (kube-proxy's nftables
    mode). Each family is selected by the CIDRs of its own family, as kube-proxy's per-family
    NewNodePortAddresses does: a family with no CIDR of its own (--nodeport-addresses 10.0.0.0/8 on a
    dual-stack node) is served on every address of that family, as kube-proxy warns at start-up."""
    view = _node_view(node, cfg)
    return [*view.nodeport_v4, *view.nodeport_v6]


def lb_source_ranges(svc: Service, lb_ips: list[str], node: NodeInfo) -> tuple[str, ...]:
    """The sources allowed to open flows to the LoadBalancer IPs `lb_ips` (all of one family), as
    kube-proxy's firewall chain of that family has them.

    The loadBalancerSourceRanges of the LB IPs' family, normalised ("10.1.2.0/24", "2001:db8::/32"):
    kube-proxy filters the ranges by family (MapCIDRsByIPFamily), so a family with no range of its own
    is not restricted (empty result), nor is one with a zero-prefix range (IsZeroCIDR: "allow any").
    Plus the LoadBalancer IPs themselves as /32 (/128) when a range holds this node's primary address
    of the family (its first InternalIP of it): a VIP routed to the node locally loops back with itself
    as the source (kube-proxy's allowFromNode)."""
    if not lb_ips:
        return ()
    want_v4 = _is_v4(lb_ips[0])
    nets: set[ipaddress.IPv4Network] | set[ipaddress.IPv6Network] = set()
    for cidr in svc.spec.load_balancer_source_ranges:
        try:
            net = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            raise TranslateError(
                svc.key, "invalid_source_range", f"loadBalancerSourceRanges entry {cidr!r} is not a CIDR"
            ) from None
        if (net.version == 4) == want_v4:
            nets.add(net)  # type: ignore[arg-type]
    if not nets or any(n.prefixlen == 0 for n in nets):
        return ()
    node_ip = next((a for a in node.addresses if _is_v4(a) == want_v4), None)
    if node_ip is not None:
        ip = ipaddress.ip_address(node_ip)
        if any(ip in n for n in nets):
            bits = 32 if want_v4 else 128
            nets.update(ipaddress.ip_network(f"{a}/{bits}") for a in lb_ips)  # type: ignore[misc]
    return tuple(str(n) for n in sorted(nets))  # type: ignore[type-var]


def is_ready(c: EndpointConditions) -> bool:
    """kube-proxy's IsReady (endpointslicecache): ready unless the ready condition is false. Unset means
    ready (an EndpointSlice controller that does not set it), and terminating does not count: the
    controller sets ready false on a terminating endpoint, and kube-proxy reads only ready."""
    return c.ready is None or c.ready


def is_local(node_name: str | None, this_node: str) -> bool:
    """kube-proxy's IsLocal: the endpoint's nodeName is this node. An endpoint without one is never
    local (this node cannot know it is its own)."""
    return node_name is not None and node_name == this_node


class _Ep(NamedTuple):
    ref: BackendRef
    ready: bool
    serving: bool
    terminating: bool
    zone_hints: frozenset[str] | None
    node_hints: frozenset[str] | None


# NamedTuples built without their Python-level __new__ (4x cheaper; one per endpoint per translate)
_new_ep = partial(tuple.__new__, _Ep)
_new_ref = partial(tuple.__new__, BackendRef)


def _endpoints_for_port(sp: ServicePort, slices: list[EndpointSlice], node: NodeInfo) -> list[_Ep]:
    """Endpoints of one Service port, merged over slices (of one family, none labelled headless: see
    _slices_by_family) and de-duplicated by address and port."""
    by_addr: dict[tuple[str, int], _Ep] = {}
    for es in slices:
        port = None
        for p in es.ports:
            if p.name == sp.name and p.protocol == sp.protocol:
                port = p.port
                break
        if port is None:
            continue
        node_name_here = node.name
        protocol = sp.protocol
        # the API says addresses are fungible; kube-proxy uses the first
        for address, c, node_name, zone, ep_hints in endpoint_rows(es.endpoints):
            ready = is_ready(c)
            key = (address, port)
            old = by_addr.get(key)
            if old is not None and (old.ready or not ready):
                continue  # keep the first copy unless this one is ready and the first is not
            hints = node_hints = None
            if ep_hints is not None:
                if ep_hints.for_zones:
                    hints = frozenset(z.name for z in ep_hints.for_zones)
                if ep_hints.for_nodes:
                    node_hints = frozenset(n.name for n in ep_hints.for_nodes)
            terminating = bool(c.terminating)
            ref = _new_ref((
                address, port, protocol, node_name, is_local(node_name, node_name_here),
                terminating, zone,
            ))  # fmt: skip
            serving = c.serving is None or c.serving
            by_addr[key] = _new_ep((ref, ready, serving, terminating, hints, node_hints))
    # sorted once here so every list filtered from it is sorted too (stable slot order)
    return [by_addr[k] for k in sorted(by_addr)]


_SAME_NODE = "PreferSameNode"
_SAME_ZONE = "PreferSameZone"


def _topology_mode(eps: list[_Ep], node: NodeInfo) -> str | None:
    """kube-proxy's topologyModeFromHints: PreferSameNode, PreferSameZone or None (no topology)."""
    any_ready = False
    all_node_hints = all_zone_hints = True
    for_node = for_zone = False
    name, zone = node.name, node.zone
    for ep in eps:
        if not ep.ready:
            continue
        any_ready = True
        if not ep.node_hints:
            all_node_hints = False
        elif name in ep.node_hints:
            for_node = True
        if not ep.zone_hints:
            all_zone_hints = False
        elif zone and zone in ep.zone_hints:
            for_zone = True
    if not any_ready:
        return None
    if all_node_hints and for_node:
        return _SAME_NODE
    if all_zone_hints and for_zone:
        return _SAME_ZONE
    return None


def _for_topology(ep: _Ep, mode: str | None, node: NodeInfo) -> bool:
    if mode is None:
        return True
    if mode == _SAME_NODE:
        return ep.node_hints is not None and node.name in ep.node_hints
    return ep.zone_hints is not None and node.zone in ep.zone_hints


def _categorize(
    svc: Service, eps: list[_Ep], node: NodeInfo, uses_cluster: bool, uses_local: bool
) -> tuple[list[BackendRef], list[BackendRef], bool]:
    """kube-proxy's CategorizeEndpoints: (cluster endpoints, local endpoints, any usable endpoint)."""
    cluster: list[BackendRef] = []
    local: list[BackendRef] = []
    has_any = False
    if uses_cluster:
        topo = _topology_mode(eps, node)
        if topo is None:
            cluster = [e.ref for e in eps if e.ready]
        else:
            cluster = [e.ref for e in eps if e.ready and _for_topology(e, topo, node)]
        if not cluster:
            cluster = [e.ref for e in eps if e.serving and e.terminating]
        has_any = bool(cluster)
    if uses_local:
        local = [e.ref for e in eps if e.ready and e.ref.local]
        if not local:
            local = [e.ref for e in eps if not e.ready and e.serving and e.terminating and e.ref.local]
        if not has_any:
            has_any = any(e.ready or (e.serving and e.terminating) for e in eps)
    return cluster, local, has_any


def service_families(svc: Service) -> tuple[str, ...]:
    """The IP families ("IPv4", "IPv6") kproxy serves the Service in, primary first: those of its
    clusterIPs, as kube-proxy's proxier of a family sees only the Services with a ClusterIP of that
    family (GetClusterIPByFamily). Empty for a Service served in none (skip_reason)."""
    if skip_reason(svc) is not None:
        return ()
    return tuple(f for f, _ips in _cluster_ips_by_family(svc.spec))


def local_ready_endpoints(
    svc: Service, slices: Iterable[EndpointSlice], node: NodeInfo, family: str | None = None
) -> int:
    """What the Service's healthCheckNodePort reports as localEndpoints: kube-proxy's LocalReadyEndpoints,
    the distinct addresses of the ready (is_ready) endpoints on this node (is_local), of any Service port.
    The endpoints are those translate_service programs (slices not labelled headless, matching a port,
    first address, de-duplicated alike). Terminating-but-serving local endpoints do not count, though
    they get traffic when nothing is ready: kube-proxy wants the health check to fail then, so load
    balancers move new connections to other nodes.

    Per family, as in kube-proxy: in dual-stack each family's proxier runs its own health check server
    (tcp4 / tcp6 on the healthCheckNodePort) counting only its own family's EndpointSlices, so a
    dual-stack pod counts once, not twice. `family` ("IPv4" / "IPv6") is the family the probe came in
    on; None means the Service's primary family (service_families()[0]: the first of its clusterIPs,
    spec.ipFamilies[0]), which is what an IPv4-only or IPv6-only cluster, and a probe to the node's
    primary-family address, gets. A family the Service is not served in counts 0 (kube-proxy has no
    listener for it there)."""
    families = service_families(svc)
    if family is None:
        if not families:
            return 0
        family = families[0]
    elif family not in families:
        return 0
    slice_list = sorted(slices, key=lambda s: s.metadata.name)
    fam_slices = _slices_by_family(slice_list, None)[0 if family == _IPV4 else 1]
    addresses: set[str] = set()
    for sp in svc.spec.ports:
        for ep in _endpoints_for_port(sp, fam_slices, node):
            if ep.ready and ep.ref.local:
                addresses.add(ep.ref.address)
    return len(addresses)


def health_check_node_port(svc: Service) -> int | None:
    """The healthCheckNodePort to serve for this Service, or None: NodePort and LoadBalancer Services
    with externalTrafficPolicy Local have one (kube-proxy's ExternalPolicyLocal), unless kproxy serves
    none of the Service (skip_reason: another proxy's, as kube-proxy never sees those)."""
    spec = svc.spec
    if spec.external_traffic_policy != "Local" or not spec.health_check_node_port:
        return None
    if skip_reason(svc) is not None:
        return None
    if spec.type not in ("NodePort", "LoadBalancer"):
        return None
    return spec.health_check_node_port


def _sorted(refs: list[BackendRef]) -> tuple[BackendRef, ...]:
    return tuple(refs)  # already in address order: filtered from _endpoints_for_port's sorted list


class _Family(NamedTuple):
    """What translate_service works out once per Service and IP family it is served in, for every port:
    kube-proxy's ServicePortInfo of that family's proxier (newBaseServiceInfo filters every address
    and range by family)."""

    address_type: str  # "IPv4" / "IPv6": the EndpointSlice addressType whose endpoints it gets
    cluster_ips: list[str]
    external_ips: list[str]
    lb_ips: list[str]
    lb_ranges: tuple[str, ...]
    src_ranges: int  # SvcFlag.SRC_RANGES or 0
    node_addrs: tuple[str, ...]
    etp_local: bool
    uses_cluster: bool
    uses_local: bool


_new_family = partial(tuple.__new__, _Family)


class _Plan(NamedTuple):
    """What translate_service works out once per Service, for every port and family."""

    key: str
    spec: ServiceSpec
    families: list[_Family]  # primary first
    affinity_flag: int
    affinity_timeout: int
    itp_local: bool
    maglev_flag: int  # SvcFlag.MAGLEV or 0, for the external frontends' EXT scope


_IPV4 = "IPv4"
_IPV6 = "IPv6"
_FAMILY_INDEX = {_IPV4: 0, _IPV6: 1}  # in (IPv4 ..., IPv6 ...) pairs
_NONE_BY_FAMILY: tuple[list[str], list[str]] = ([], [])  # never mutated


def _slices_by_family(
    slice_list: list[EndpointSlice], skipped: Counter[str] | None
) -> tuple[list[EndpointSlice], list[EndpointSlice]]:
    """(IPv4 slices, IPv6 slices): each family's proxier in kube-proxy gets only the slices of its
    addressType (the MetaProxier dispatches them so), and its EndpointSlice watch leaves out slices
    labelled headless; FQDN slices go to neither (counted when `skipped` is given)."""
    v4: list[EndpointSlice] = []
    v6: list[EndpointSlice] = []
    for es in slice_list:
        if HEADLESS_LABEL in es.metadata.labels:
            if skipped is not None:
                skipped["endpointslice_headless"] += 1
        elif es.address_type == _IPV4:
            v4.append(es)
        elif es.address_type == _IPV6:
            v6.append(es)
        elif skipped is not None:
            skipped[f"endpointslice_{es.address_type.lower()}"] += 1
    return v4, v6


def _by_family(ips: Iterable[str | None]) -> tuple[list[str], list[str]]:
    """(IPv4 ones, IPv6 ones) of canonical addresses (the model validated and canonicalised them)."""
    v4: list[str] = []
    v6: list[str] = []
    for ip in ips:
        if not ip or ip == "None":
            continue
        (v4 if _is_v4(ip) else v6).append(ip)
    return v4, v6


def _cluster_ips_by_family(spec: ServiceSpec) -> tuple[tuple[str, list[str]], ...]:
    """((family, its clusterIPs), ...) of the families the Service has clusterIPs of, primary family
    (that of the first clusterIP) first. Every clusterIPs entry counts (spec.clusterIP when there is no
    clusterIPs list, as before dual-stack); for a valid Service that is kube-proxy's
    GetClusterIPByFamily (one per family, in spec.ipFamilies order)."""
    cluster_ips = spec.cluster_ips or ([spec.cluster_ip] if spec.cluster_ip else [])
    if not cluster_ips:
        # No clusterIP at all: a standalone manifest (the API server always allocates one). Served in
        # the families it asks for, IPv4 by default, as before dual-stack: NodePorts, LoadBalancer and
        # external IPs, no ClusterIP frontend.
        return tuple((f, []) for f in (spec.ip_families or (_IPV4,)))
    if len(cluster_ips) == 1:  # single-stack: the common case, kept cheap
        ip = cluster_ips[0]
        if not ip or ip == "None":
            return ()
        return ((_IPV4 if _is_v4(ip) else _IPV6, cluster_ips),)
    v4, v6 = _by_family(cluster_ips)
    if not v6:
        return ((_IPV4, v4),) if v4 else ()
    if not v4:
        return ((_IPV6, v6),)
    if cluster_ips.index(v6[0]) < cluster_ips.index(v4[0]):
        return ((_IPV6, v6), (_IPV4, v4))
    return ((_IPV4, v4), (_IPV6, v6))


def _lb_ips(svc: Service, skipped: Counter[str]) -> list[str]:
    lb_ips: list[str] = []
    for ing in svc.status.load_balancer.ingress:
        if not ing.ip:
            continue
        if ing.ip_mode == "Proxy":
            # KEP-1860: the load balancer proxies (PROXY protocol, TLS...); traffic to its IP goes
            # to it, also from pods and nodes of the cluster, as kube-proxy leaves it alone
            skipped["lb_ip_mode_proxy"] += 1
            continue
        lb_ips.append(ing.ip)
    return lb_ips


def _plan(svc: Service, node: NodeInfo, cfg: TranslateConfig, skipped: Counter[str]) -> _Plan:
    spec = svc.spec
    lb_ips_all = _lb_ips(svc, skipped) if spec.type == "LoadBalancer" else []
    lb_by_family = _by_family(lb_ips_all) if lb_ips_all else _NONE_BY_FAMILY
    ext_by_family = _by_family(spec.external_ips) if spec.external_ips else _NONE_BY_FAMILY
    has_node_ports = spec.type in ("NodePort", "LoadBalancer") and any(p.node_port for p in spec.ports)
    view = _node_view(node, cfg) if has_node_ports else None
    etp_policy_local = spec.external_traffic_policy == "Local"
    itp_local = spec.internal_traffic_policy == "Local"

    served = _cluster_ips_by_family(spec)
    if lb_ips_all or spec.external_ips:
        # kube-proxy's proxier of a family without a clusterIP does not see the Service at all
        lost = len(lb_ips_all) + len(spec.external_ips)
        lost -= sum(
            len(lb_by_family[_FAMILY_INDEX[f]]) + len(ext_by_family[_FAMILY_INDEX[f]]) for f, _ in served
        )
        if lost:
            skipped["family_without_cluster_ip"] += lost
    families: list[_Family] = []
    for family, cluster_ips in served:
        i = _FAMILY_INDEX[family]
        external_ips = ext_by_family[i]
        lb_ips = lb_by_family[i]
        lb_ranges: tuple[str, ...] = ()
        if lb_ips and spec.load_balancer_source_ranges:
            lb_ranges = lb_source_ranges(svc, lb_ips, node)
        node_addrs: tuple[str, ...] = ()
        if view is not None:
            node_addrs = view.nodeport_v4 if i == 0 else view.nodeport_v6
        externally_accessible = has_node_ports or bool(lb_ips or external_ips)
        etp_local = externally_accessible and etp_policy_local
        families.append(
            _new_family((
                family, cluster_ips, external_ips, lb_ips, lb_ranges,
                SvcFlag.SRC_RANGES if lb_ranges else 0, node_addrs, etp_local,
                # kube-proxy's UsesClusterEndpoints / UsesLocalEndpoints
                not itp_local or externally_accessible, itp_local or etp_local,
            ))
        )  # fmt: skip

    affinity_flag = 0
    affinity_timeout = 0
    if spec.session_affinity == "ClientIP":
        affinity_flag = SvcFlag.AFFINITY
        conf = spec.session_affinity_config
        t = conf.client_ip.timeout_seconds if conf and conf.client_ip else None
        affinity_timeout = t or DEFAULT_AFFINITY_TIMEOUT
    maglev_flag = 0
    if lb_algorithm(svc, cfg, skipped) == "maglev":
        maglev_flag = SvcFlag.MAGLEV
    return _Plan(svc.key, spec, families, affinity_flag, affinity_timeout, itp_local, int(maglev_flag))


def translate_service(
    svc: Service,
    slices: Iterable[EndpointSlice],
    node: NodeInfo,
    cfg: TranslateConfig,
    skipped: Counter[str] | None = None,
) -> list[Frontend]:
    """The frontends of one Service on this node, of both IP families. `skipped` (if given) counts what
    was left out, by reason.

    Each family works as kube-proxy's proxier of that family: only the Service's addresses of the
    family (clusterIPs, node addresses, LoadBalancer ingress IPs, externalIPs, source ranges) and only
    the endpoints of EndpointSlices of that addressType; a family without a clusterIP is not served.
    Raises TranslateError for a Service that cannot be programmed at all.
    """
    if skipped is None:
        skipped = Counter()
    reason = skip_reason(svc)
    if reason is not None:
        skipped[reason] += 1
        return []
    slice_list = list(slices)
    if len(slice_list) > 1:
        slice_list.sort(key=lambda s: s.metadata.name)
    by_family = _slices_by_family(slice_list, skipped)
    plan = _plan(svc, node, cfg, skipped)
    families = plan.families
    if len(families) < 2:
        only = families[0].address_type if families else None
        if by_family[0] and only != _IPV4:
            skipped["endpointslice_family_without_cluster_ip"] += len(by_family[0])
        if by_family[1] and only != _IPV6:
            skipped["endpointslice_family_without_cluster_ip"] += len(by_family[1])

    out: list[Frontend] = []
    seen: set[tuple[str, int, str, int]] = set()
    for sp in plan.spec.ports:
        for fam in families:
            eps = _endpoints_for_port(sp, by_family[_FAMILY_INDEX[fam.address_type]], node)
            for fe in _port_frontends(plan, fam, svc, sp, eps, node, skipped):
                k = (fe.address, fe.port, fe.protocol, fe.scope)
                if k in seen:
                    skipped["duplicate_frontend"] += 1
                    continue
                seen.add(k)
                out.append(fe)
    return out


def _port_frontends(
    plan: _Plan,
    fam: _Family,
    svc: Service,
    sp: ServicePort,
    eps: list[_Ep],
    node: NodeInfo,
    skipped: Counter[str],
) -> list[Frontend]:
    """The frontends of one Service port in one family, in order: ClusterIPs, then each external
    address (EXT scope, then INT with externalTrafficPolicy Local)."""
    key, spec, etp_local, itp_local = plan.key, plan.spec, fam.etp_local, plan.itp_local
    affinity_flag, affinity_timeout = plan.affinity_flag, plan.affinity_timeout
    cluster, local, has_any = _categorize(svc, eps, node, fam.uses_cluster, fam.uses_local)
    internal = local if itp_local else cluster
    external = local if etp_local else cluster
    if max(len(internal), len(external), len(cluster)) > MAX_BACKENDS_PER_FRONTEND:
        raise TranslateError(
            key,
            "too_many_backends",
            f"port {sp.name or sp.port} has more than {MAX_BACKENDS_PER_FRONTEND} usable endpoints",
        )
    if not itp_local and not etp_local and len(cluster) == len(eps):
        retained: tuple[BackendRef, ...] = ()  # every endpoint is active (the common case)
    else:
        active = {(r.address, r.port) for r in internal}
        active.update((r.address, r.port) for r in external)
        if etp_local:
            active.update((r.address, r.port) for r in cluster)
        retained = _sorted([e.ref for e in eps if (e.ref.address, e.ref.port) not in active])
    internal_t = _sorted(internal)
    external_t = _sorted(external)
    cluster_t = _sorted(cluster) if etp_local else external_t

    out: list[Frontend] = []
    int_flags = affinity_flag | (SvcFlag.ITP_LOCAL if itp_local else 0)
    if itp_local and not internal and has_any:
        int_flags |= SvcFlag.NO_LOCAL_DROP
    for ip in fam.cluster_ips:
        out.append(
            Frontend(
                key, sp.name, "ClusterIP", ip, sp.port, sp.protocol, _EXT,
                int(int_flags), affinity_timeout, internal_t, retained,
            )
        )  # fmt: skip

    ext_base = affinity_flag | (SvcFlag.ETP_LOCAL | SvcFlag.TWO_SCOPES if etp_local else 0)
    ext_drop = SvcFlag.NO_LOCAL_DROP if etp_local and not external and has_any else 0
    externals: list[tuple[str, int, str, int]] = []
    if sp.node_port and spec.type in ("NodePort", "LoadBalancer"):
        externals += [("NodePort", SvcFlag.NODEPORT, ip, sp.node_port) for ip in fam.node_addrs]
    elif fam is plan.families[0] and (
        spec.type == "NodePort"
        or (spec.type == "LoadBalancer" and spec.allocate_load_balancer_node_ports is not False)
    ):
        skipped["nodeport_unallocated"] += 1  # once per port, not per family
    externals += [("LoadBalancer", SvcFlag.LOADBALANCER | fam.src_ranges, ip, sp.port) for ip in fam.lb_ips]
    externals += [("ExternalIP", SvcFlag.EXTERNAL_IP, ip, sp.port) for ip in fam.external_ips]
    for ftype, type_flag, address, port in externals:
        flags = int(ext_base | type_flag)
        ranges = fam.lb_ranges if ftype == "LoadBalancer" else ()
        out.append(
            Frontend(
                key, sp.name, ftype, address, port, sp.protocol, _EXT,  # type: ignore[arg-type]
                int(flags | ext_drop | plan.maglev_flag), affinity_timeout, external_t, retained, ranges,
            )
        )  # fmt: skip
        if etp_local:
            out.append(
                Frontend(
                    key, sp.name, ftype, address, port, sp.protocol, _INT,  # type: ignore[arg-type]
                    flags, affinity_timeout, cluster_t, retained, ranges,
                )
            )  # fmt: skip
    return out
