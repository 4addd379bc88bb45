"""The fast path: Services and EndpointSlices in their common shapes, read straight from the dicts.

It must accept exactly what the schema (kproxy.model.schema) accepts unchanged, and give the same
compact objects: anything unusual or invalid (a quoted number, a snake_case key, an IPv6 address not
in canonical form, a legacy spelling, an error...) returns None, and kproxy.model.parse leaves it to the
schema, which accepts it or words the error. tests/unit/test_model.py keeps the two routes equal.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Sequence
from typing import Any

from kproxy.model.compact import CONDITIONS as _CONDS
from kproxy.model.compact import CONDITIONS_DEFAULT as _COND_DEFAULT
from kproxy.model.compact import EMPTY_LIST as _EMPTY_LIST
from kproxy.model.compact import EMPTY_META as _EMPTY_DICT
from kproxy.model.compact import STATUS_DEFAULT as _STATUS_DEFAULT
from kproxy.model.compact import (
    ClientIPConfig,
    Endpoint,
    EndpointConditions,
    EndpointHints,
    EndpointPort,
    EndpointSlice,
    ForNode,
    ForZone,
    LoadBalancerIngress,
    LoadBalancerStatus,
    ObjectMeta,
    Service,
    ServicePort,
    ServiceSpec,
    ServiceStatus,
    SessionAffinityConfig,
)
from kproxy.model.compact import kept_meta as _kept
from kproxy.model.compact import pack_rows as _pack_rows
from kproxy.model.compact import shared_list as _shared_list
from kproxy.model.names import IPV4_EXACT as _V4
from kproxy.model.names import MAX_AFFINITY_TIMEOUT, MAX_SERVICE_PORTS
from kproxy.model.names import canonical_ipv6 as _V6

_intern = sys.intern
_PROTOCOLS = frozenset(("TCP", "UDP", "SCTP"))
_SVC_TYPES = frozenset(("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"))
_POLICY = {None: "Cluster", "": "Cluster", "Global": "Cluster", "Cluster": "Cluster", "Local": "Local"}
_ADDRESS_TYPES = frozenset(("IPv4", "IPv6", "FQDN"))


def _is_bool_or_none(v: Any) -> bool:
    return v is None or v is True or v is False


def _str_dict(d: Any) -> dict[str, str] | None:
    """The kept part (KEPT_META_PREFIXES) of a str -> str mapping (None, {} -> the shared empty one);
    None if it is anything else."""
    if d is None or d == {}:
        return _EMPTY_DICT
    if type(d) is not dict:
        return None
    for k, v in d.items():
        if type(k) is not str or type(v) is not str:
            return None
    return _kept(d)


def _fast_meta(meta: Any) -> ObjectMeta | None:
    if type(meta) is not dict:
        return None
    name = meta.get("name")
    ns = meta.get("namespace", "default")
    if type(name) is not str or not name or type(ns) is not str or not ns:
        return None
    labels = _str_dict(meta.get("labels"))
    annotations = _str_dict(meta.get("annotations"))
    if labels is None or annotations is None:
        return None
    return ObjectMeta(name, _intern(ns), labels, annotations)


def _is_ip(v: Any) -> bool:
    """An IPv4 or IPv6 address in canonical text form (anything else: the schema rewrites or rejects it)."""
    return type(v) is str and (_V4(v) is not None or _V6(v) == v)


def _ip_list(v: Any) -> list[str] | None:
    if v is None or v == []:
        return _EMPTY_LIST
    if type(v) is not list:
        return None
    for ip in v:
        if not _is_ip(ip):
            return None
    return v[:]


def _port(v: Any, low: int = 1) -> bool:
    return type(v) is int and low <= v <= 65535


def _fast_service_port(p: Any) -> ServicePort | None:
    if type(p) is not dict or "target_port" in p or "node_port" in p:
        return None
    name = p.get("name", "")
    protocol = p.get("protocol", "TCP")
    port = p.get("port")
    if type(name) is not str or protocol not in _PROTOCOLS or not _port(port):
        return None
    tp = p.get("targetPort")
    if tp is not None:
        if type(tp) is str:
            if tp.isdigit():
                if not tp.isascii():
                    return None
                tp = int(tp)
                if not 1 <= tp <= 65535:
                    return None
            elif not tp or len(tp) > 15:
                return None
            else:
                tp = _intern(tp)
        elif not _port(tp):
            return None
    np_ = p.get("nodePort")
    if np_ is not None and not _port(np_, 0):
        return None
    return ServicePort(_intern(name), _intern(protocol), port, tp, np_)  # type: ignore[arg-type]


def _fast_cluster_ips(cips: Any) -> list[str] | None:
    if cips is None or cips == []:
        return _EMPTY_LIST
    if type(cips) is not list:
        return None
    for ip in cips:
        if ip != "" and ip != "None" and not _is_ip(ip):
            return None
    return cips[:]


def _fast_families(fams: Any) -> list[str] | None:
    if fams is None:
        return _EMPTY_LIST
    if type(fams) is not list or any(f != "IPv4" and f != "IPv6" for f in fams):
        return None
    return _shared_list([_intern(f) for f in fams])


def _fast_ports(raw_ports: Any) -> list[ServicePort] | None:
    """The Service's ports, checked as the schema's _ports_consistent does."""
    ports: list[ServicePort] = []
    if raw_ports is None:
        return _EMPTY_LIST
    if type(raw_ports) is not list or len(raw_ports) > MAX_SERVICE_PORTS:
        return None
    seen_port = set()
    seen_name = set()
    for rp in raw_ports:
        sp = _fast_service_port(rp)
        if sp is None:
            return None
        if (sp.port, sp.protocol) in seen_port or sp.name in seen_name:
            return None
        seen_port.add((sp.port, sp.protocol))
        seen_name.add(sp.name)
        ports.append(sp)
    if len(ports) > 1 and "" in seen_name:
        return None
    return _shared_list(ports)


def _fast_affinity_config(sac: Any) -> SessionAffinityConfig | None:
    """A sessionAffinityConfig that is there (not None); None if invalid."""
    if type(sac) is not dict:
        return None
    cic = sac.get("clientIP")
    if cic is None:
        return SessionAffinityConfig()
    if type(cic) is not dict:
        return None
    t = cic.get("timeoutSeconds")
    if t is not None and not (type(t) is int and 1 <= t <= MAX_AFFINITY_TIMEOUT):
        return None
    return SessionAffinityConfig(ClientIPConfig(t))


def _fast_ranges(ranges: Any) -> list[str] | None:
    if ranges is None:
        return _EMPTY_LIST
    if type(ranges) is not list:
        return None
    if not ranges:
        return _EMPTY_LIST
    for cidr in ranges:
        if type(cidr) is not str:
            return None
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            return None
    return ranges[:]


def _fast_spec(spec: Any) -> ServiceSpec | None:
    if spec is None or spec == {}:
        return ServiceSpec()
    if type(spec) is not dict:
        return None
    for k in spec:
        if "_" in k:  # a snake_case field name the schema would also read
            return None
    g = spec.get
    stype = g("type", "ClusterIP")
    if stype not in _SVC_TYPES:
        return None
    cip = g("clusterIP")
    if cip is not None and cip != "" and cip != "None" and not _is_ip(cip):
        return None
    cips = _fast_cluster_ips(g("clusterIPs"))
    fams = _fast_families(g("ipFamilies"))
    ports = _fast_ports(g("ports"))
    ext = _ip_list(g("externalIPs"))
    if cips is None or fams is None or ports is None or ext is None:
        return None
    affinity = g("sessionAffinity", "None")
    if affinity != "None" and affinity != "ClientIP":
        return None
    sac = g("sessionAffinityConfig")
    if sac is not None:
        sac = _fast_affinity_config(sac)
        if sac is None:
            return None
    etp = _POLICY.get(g("externalTrafficPolicy"))
    itp = _POLICY.get(g("internalTrafficPolicy"))
    if etp is None or itp is None:
        return None
    hc = g("healthCheckNodePort")
    if hc is not None and not _port(hc, 0):
        return None
    ranges = _fast_ranges(g("loadBalancerSourceRanges"))
    if ranges is None:
        return None
    alloc = g("allocateLoadBalancerNodePorts")
    td = g("trafficDistribution")
    en = g("externalName")
    if not _is_bool_or_none(alloc) or (td is not None and type(td) is not str):
        return None
    if en is not None and type(en) is not str:
        return None
    if cips and cips[0] == cip:
        cips[0] = cip  # one string for both (cips is our copy)
    return ServiceSpec(
        _intern(stype), cip, cips, fams, ports, ext, _intern(affinity), sac, etp, itp, hc, ranges,
        alloc, td, en,
    )  # fmt: skip


def _fast_status(status: Any) -> ServiceStatus | None:
    if status is None or status == {}:
        return _STATUS_DEFAULT
    if type(status) is not dict or "load_balancer" in status:
        return None
    lb = status.get("loadBalancer")
    if lb is None or lb == {}:
        return _STATUS_DEFAULT
    if type(lb) is not dict:
        return None
    ing = lb.get("ingress")
    if ing is None:
        return _STATUS_DEFAULT
    if type(ing) is not list:
        return None
    out = []
    for i in ing:
        if type(i) is not dict:
            return None
        ip = i.get("ip")
        host = i.get("hostname")
        mode = i.get("ipMode")
        if (ip is not None and ip != "" and not _is_ip(ip)) or (host is not None and type(host) is not str):
            return None
        if mode is not None and type(mode) is not str:
            return None
        out.append(LoadBalancerIngress(ip, host, mode))
    return ServiceStatus(LoadBalancerStatus(out))


def _fast_service(raw: dict[str, Any]) -> Service | None:
    if raw.get("kind", "Service") != "Service":
        return None
    meta = _fast_meta(raw.get("metadata"))
    if meta is None:
        return None
    spec = _fast_spec(raw.get("spec"))
    if spec is None:
        return None
    status = _fast_status(raw.get("status"))
    if status is None:
        return None
    return Service(meta, spec, status)


def _fast_hints(h: Any) -> EndpointHints | None:
    if type(h) is not dict or "for_zones" in h or "for_nodes" in h:
        return None
    fz = h.get("forZones")
    fn = h.get("forNodes")
    if (fz is not None and type(fz) is not list) or (fn is not None and type(fn) is not list):
        return None
    zones = []
    for z in fz or ():
        if type(z) is not dict or type(z.get("name")) is not str:
            return None
        zones.append(ForZone(_intern(z["name"])))
    nodes = []
    for n in fn or ():
        if type(n) is not dict or type(n.get("name")) is not str:
            return None
        nodes.append(ForNode(_intern(n["name"])))
    return EndpointHints(zones, nodes)


_Row = tuple[list[str], EndpointConditions, str | None, str | None, EndpointHints | None]


def _fast_endpoints(raw_eps: Any, address_type: str) -> list[_Row] | None:
    """(addresses, conditions, node, zone, hints) of each endpoint; None if any is unusual (an address
    not of the slice's family or not in canonical form included)."""
    rows: list[_Row] = []
    if raw_eps is None:
        return rows
    if type(raw_eps) is not list:
        return None
    conds = _CONDS
    v4 = address_type == "IPv4"
    v6 = address_type == "IPv6"
    v4match = _V4
    v6canon = _V6
    append = rows.append
    for e in raw_eps:
        if type(e) is not dict or "node_name" in e:
            return None
        addrs = e.get("addresses")
        if type(addrs) is not list or not addrs:
            return None
        for a in addrs:
            if type(a) is not str or (v4 and v4match(a) is None) or (v6 and v6canon(a) != a):
                return None
        c = e.get("conditions")
        if c is None:
            cond = _COND_DEFAULT
        elif type(c) is dict:
            r, s, t = c.get("ready"), c.get("serving"), c.get("terminating")
            if not (_is_bool_or_none(r) and _is_bool_or_none(s) and _is_bool_or_none(t)):
                return None
            cond = conds[(r, s, t)]
        else:
            return None
        node = e.get("nodeName")
        if node is not None:
            if type(node) is not str:
                return None
            node = _intern(node)
        zone = e.get("zone")
        if zone is not None:
            if type(zone) is not str:
                return None
            zone = _intern(zone)
        hints = e.get("hints")
        if hints is not None:
            hints = _fast_hints(hints)
            if hints is None:
                return None
        append((addrs, cond, node, zone, hints))
    return rows


def _fast_endpoint_ports(raw_ports: Any) -> list[EndpointPort] | None:
    ports: list[EndpointPort] = []
    if raw_ports is None:
        return _EMPTY_LIST
    if type(raw_ports) is not list:
        return None
    for p in raw_ports:
        if type(p) is not dict:
            return None
        name = p.get("name")
        port = p.get("port")
        protocol = p.get("protocol", "TCP")
        if name is None:
            name = ""
        elif type(name) is not str:
            return None
        if (port is not None and not _port(port)) or protocol not in _PROTOCOLS:
            return None
        ports.append(EndpointPort(_intern(name), port, _intern(protocol)))
    return _shared_list(ports)


def _fast_slice(raw: dict[str, Any]) -> EndpointSlice | None:
    if raw.get("kind", "EndpointSlice") != "EndpointSlice" or "address_type" in raw:
        return None
    meta = _fast_meta(raw.get("metadata"))
    if meta is None:
        return None
    at = raw.get("addressType")
    if at not in _ADDRESS_TYPES:
        return None  # anything invalid: the schema words the error
    v4 = at == "IPv4"
    rows = _fast_endpoints(raw.get("endpoints"), at)
    if rows is None:
        return None
    ports = _fast_endpoint_ports(raw.get("ports"))
    if ports is None:
        return None
    endpoints: Sequence[Endpoint] | None = _pack_rows(rows) if v4 else None
    if endpoints is None:
        endpoints = [Endpoint(a[:], c, n, z, h) for a, c, n, z, h in rows]
    return EndpointSlice(meta, _intern(at), endpoints, ports)
