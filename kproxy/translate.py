"""Service + EndpointSlices + this node -> the frontends to program. Pure: no I/O, no clock, no logging.

Every Kubernetes rule kproxy implements lives here, following kube-proxy (pkg/proxy, topology.go's
CategorizeEndpoints):
- ClusterIP frontends on every IPv4 spec.clusterIPs entry; NodePort frontends on the node addresses
  selected by the nodeport-addresses CIDRs (default: the node's InternalIPs); LoadBalancer ingress
  IPs; spec.externalIPs.
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
- loadBalancerSourceRanges restrict the LoadBalancer IP frontends only (kube-proxy's KUBE-FW chains:
  NodePorts, ClusterIPs and external IPs stay open, and pods and the node get no exemption); see
  lb_source_ranges.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from kproxy.abi import Scope, SvcFlag
from kproxy.desired import BackendRef, Frontend
from kproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    HEADLESS_LABEL,
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

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> TranslateConfig:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs))


def _is_v4(address: str) -> bool:
    # ipaddress is slow; the model already validated the syntax, so a dot without a colon is IPv4.
    return "." in address and ":" not in address


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


def nodeport_addresses(node: NodeInfo, cfg: TranslateConfig) -> list[str]:
    """The IPv4 node addresses NodePorts are served on: the node's InternalIPs by default (kube-proxy's
    "primary"); with --nodeport-addresses, every address of the node's interfaces in those CIDRs (as
    kube-proxy picks them), InternalIPs included, loopback never (kube-proxy's nftables mode)."""
    v4 = [a for a in node.addresses if _is_v4(a)]
    if not cfg.nodeport_addresses:
        return v4
    cands = v4 + [a for a in node.host_addresses if _is_v4(a) and a not in v4]
    out = []
    for a in cands:
        ip = ipaddress.IPv4Address(a)
        if not ip.is_loopback and any(ip in net for net in cfg.nodeport_addresses):
            out.append(a)
    return out


def lb_source_ranges(
    svc: Service, lb_ips: list[str], node: NodeInfo, skipped: Counter[str]
) -> tuple[str, ...]:
    """The sources allowed to open flows to the LoadBalancer IPs, as kube-proxy's firewall chain has them.

    The IPv4 loadBalancerSourceRanges (IPv6 ones belong to the other family: counted and left out,
    and a Service with IPv6 ranges only is not restricted for IPv4, as kube-proxy filters ranges by
    family), plus the LoadBalancer IPs themselves as /32 when a range holds this node's primary
    address: a VIP routed to the node locally loops back with itself as the source.
    """
    nets: set[ipaddress.IPv4Network] = set()
    for cidr in svc.spec.load_balancer_source_ranges:
        try:
            net = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            raise TranslateError(
                svc.key, "invalid_source_range", f"loadBalancerSourceRanges entry {cidr!r} is not a CIDR"
            ) from None
        if isinstance(net, ipaddress.IPv4Network):
            nets.add(net)
        else:
            skipped["ipv6_source_range"] += 1
    if not nets:
        return ()
    node_ip = next((a for a in node.addresses if _is_v4(a)), None)
    if node_ip is not None and any(ipaddress.IPv4Address(node_ip) in n for n in nets):
        nets.update(ipaddress.IPv4Network(f"{ip}/32") for ip in lb_ips)
    return tuple(str(n) for n in sorted(nets))


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
    """Endpoints of one Service port, merged over slices and de-duplicated by address and port."""
    by_addr: dict[tuple[str, int], _Ep] = {}
    for es in slices:
        if es.address_type != "IPv4" or HEADLESS_LABEL in es.metadata.labels:
            continue  # kube-proxy's EndpointSlice watch leaves out slices labelled headless
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


def local_ready_endpoints(svc: Service, slices: Iterable[EndpointSlice], node: NodeInfo) -> int:
    """What the Service's healthCheckNodePort reports as localEndpoints: kube-proxy's LocalReadyEndpoints,
    the distinct addresses of the ready (is_ready) endpoints on this node (is_local), of any Service port.
    The endpoints are those translate_service programs (IPv4 slices not labelled headless, matching a
    port, first address, de-duplicated alike). Terminating-but-serving local endpoints do not count,
    though they get traffic when nothing is ready: kube-proxy wants the health check to fail then, so
    load balancers move new connections to other nodes."""
    slice_list = sorted(slices, key=lambda s: s.metadata.name)
    addresses: set[str] = set()
    for sp in svc.spec.ports:
        for ep in _endpoints_for_port(sp, slice_list, node):
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


class _Plan(NamedTuple):
    """What translate_service works out once per Service, for every port."""

    key: str
    spec: ServiceSpec
    cluster_v4: list[str]
    external_ips: list[str]
    lb_ips: list[str]
    lb_ranges: tuple[str, ...]
    src_ranges: int  # SvcFlag.SRC_RANGES or 0
    node_addrs: list[str]
    affinity_flag: int
    affinity_timeout: int
    itp_local: bool
    etp_local: bool
    uses_cluster: bool
    uses_local: bool


def _count_slices_left_out(slice_list: list[EndpointSlice], skipped: Counter[str]) -> None:
    for es in slice_list:
        if HEADLESS_LABEL in es.metadata.labels:
            skipped["endpointslice_headless"] += 1
        elif es.address_type != "IPv4":
            skipped[f"endpointslice_{es.address_type.lower()}"] += 1


def _v4_only(ips: Iterable[str], skipped: Counter[str]) -> list[str]:
    out = []
    for ip in ips:
        if _is_v4(ip):
            out.append(ip)
        elif ip:
            skipped["ipv6_address"] += 1
    return out


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
        if _is_v4(ing.ip):
            lb_ips.append(ing.ip)
        else:
            skipped["ipv6_address"] += 1
    return lb_ips


def _plan(svc: Service, node: NodeInfo, cfg: TranslateConfig, skipped: Counter[str]) -> _Plan:
    spec = svc.spec
    cluster_ips = spec.cluster_ips or ([spec.cluster_ip] if spec.cluster_ip else [])
    cluster_v4 = _v4_only(cluster_ips, skipped)
    external_ips = _v4_only(spec.external_ips, skipped)
    lb_ips: list[str] = []
    src_ranges = 0
    lb_ranges: tuple[str, ...] = ()
    if spec.type == "LoadBalancer":
        lb_ips = _lb_ips(svc, skipped)
        if spec.load_balancer_source_ranges and lb_ips:
            lb_ranges = lb_source_ranges(svc, lb_ips, node, skipped)
            src_ranges = SvcFlag.SRC_RANGES if lb_ranges else 0
    has_node_ports = spec.type in ("NodePort", "LoadBalancer") and any(p.node_port for p in spec.ports)
    node_addrs = nodeport_addresses(node, cfg) if has_node_ports else []

    affinity_flag = 0
    affinity_timeout = 0
    if spec.session_affinity == "ClientIP":
        affinity_flag = SvcFlag.AFFINITY
        conf = spec.session_affinity_config
        t = conf.client_ip.timeout_seconds if conf and conf.client_ip else None
        affinity_timeout = t or DEFAULT_AFFINITY_TIMEOUT

    itp_local = spec.internal_traffic_policy == "Local"
    externally_accessible = has_node_ports or bool(lb_ips or external_ips)
    etp_local = externally_accessible and spec.external_traffic_policy == "Local"
    # kube-proxy's UsesClusterEndpoints / UsesLocalEndpoints
    uses_cluster = not itp_local or externally_accessible
    uses_local = itp_local or etp_local
    return _Plan(
        svc.key, spec, cluster_v4, external_ips, lb_ips, lb_ranges, src_ranges, node_addrs,
        affinity_flag, affinity_timeout, itp_local, etp_local, uses_cluster, uses_local,
    )  # fmt: skip


def translate_service(
    svc: Service,
    slices: Iterable[EndpointSlice],
    node: NodeInfo,
    cfg: TranslateConfig,
    skipped: Counter[str] | None = None,
) -> list[Frontend]:
    """The frontends of one Service on this node. `skipped` (if given) counts what was left out, by reason.

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
    _count_slices_left_out(slice_list, skipped)
    plan = _plan(svc, node, cfg, skipped)

    out: list[Frontend] = []
    seen: set[tuple[str, int, str, int]] = set()
    for sp in plan.spec.ports:
        if sp.protocol == "SCTP":
            skipped["sctp_port"] += 1
            continue
        for fe in _port_frontends(plan, svc, sp, _endpoints_for_port(sp, slice_list, node), node, skipped):
            k = (fe.address, fe.port, fe.protocol, fe.scope)
            if k in seen:
                skipped["duplicate_frontend"] += 1
                continue
            seen.add(k)
            out.append(fe)
    return out


def _port_frontends(
    plan: _Plan, svc: Service, sp: ServicePort, eps: list[_Ep], node: NodeInfo, skipped: Counter[str]
) -> list[Frontend]:
    """The frontends of one Service port, in order: ClusterIPs, then each external address (EXT scope,
    then INT with externalTrafficPolicy Local)."""
    key, spec, etp_local, itp_local = plan.key, plan.spec, plan.etp_local, plan.itp_local
    affinity_flag, affinity_timeout = plan.affinity_flag, plan.affinity_timeout
    cluster, local, has_any = _categorize(svc, eps, node, plan.uses_cluster, plan.uses_local)
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
    for ip in plan.cluster_v4:
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
        externals += [("NodePort", SvcFlag.NODEPORT, ip, sp.node_port) for ip in plan.node_addrs]
    elif spec.type == "NodePort" or (
        spec.type == "LoadBalancer" and spec.allocate_load_balancer_node_ports is not False
    ):
        skipped["nodeport_unallocated"] += 1
    externals += [("LoadBalancer", SvcFlag.LOADBALANCER | plan.src_ranges, ip, sp.port) for ip in plan.lb_ips]
    externals += [("ExternalIP", SvcFlag.EXTERNAL_IP, ip, sp.port) for ip in plan.external_ips]
    for ftype, type_flag, address, port in externals:
        flags = int(ext_base | type_flag)
        ranges = plan.lb_ranges if ftype == "LoadBalancer" else ()
        out.append(
            Frontend(
                key, sp.name, ftype, address, port, sp.protocol, _EXT,  # type: ignore[arg-type]
                int(flags | ext_drop), affinity_timeout, external_t, retained, ranges,
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
