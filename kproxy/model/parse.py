"""THE parser of Kubernetes objects: parse_service and parse_endpoint_slice.

The fast path (kproxy.model.fastpath) reads common objects straight from the dicts; everything else
goes through the pydantic schema (kproxy.model.schema), which either accepts it, converted here to the
compact form (kproxy.model.compact), or rejects it: a ModelError whose message names the object, where
it came from and what is wrong with which field.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import ValidationError

from kproxy.model.compact import CONDITIONS as _CONDS
from kproxy.model.compact import STATUS_DEFAULT as _STATUS_DEFAULT
from kproxy.model.compact import (
    ClientIPConfig,
    Endpoint,
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
from kproxy.model.compact import shared_list as _shared
from kproxy.model.errors import ModelError
from kproxy.model.fastpath import _fast_service, _fast_slice
from kproxy.model.schema import _Model, _SEndpointSlice, _SObjectMeta, _SService
from kproxy.model.schema import noting as _noting

_intern = sys.intern


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "object"


def _problems(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors(include_url=False):
        # pydantic adds the union member or validator name to loc; drop the noise for people.
        loc = tuple(p for p in e["loc"] if isinstance(p, int) or not (p in ("int", "str") or "[" in p))
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        if e["type"] in ("missing", "value_error"):
            shown = ""  # our own messages already quote the value
        problems.append(f"{_loc(loc)}: {msg}{shown}" if loc else f"{msg}{shown}")
    return problems


def _meta_of(raw: Any) -> tuple[str | None, str | None]:
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    if not isinstance(meta, dict):
        return None, None
    name, ns = meta.get("name"), meta.get("namespace")
    return (
        ns if isinstance(ns, str) and ns else "default",
        name if isinstance(name, str) and name else None,
    )


def _validate(model: type[_Model], kind: str, raw: Any, origin: str | None) -> Any:
    ns, name = _meta_of(raw)
    if not isinstance(raw, dict):
        raise ModelError(kind, ns, name, [f"expected a mapping, got {type(raw).__name__}"], origin)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ModelError(kind, ns, name, _problems(err), origin) from None


def parse_service(raw: Any, origin: str | None = None, notes: list[str] | None = None) -> Service:
    """A Service in its compact form; raises ModelError naming the object, origin and problem.
    `notes` (if given) receives what was read in a legacy spelling ("clusterIP '10.0.0.010' read as
    10.0.0.10")."""
    svc = _fast_service(raw) if type(raw) is dict else None
    if svc is None:  # unusual or invalid: the schema decides, and words the error
        with _noting(notes):
            svc = _service_from_schema(_validate(_SService, "Service", raw, origin))
    return svc


def parse_endpoint_slice(
    raw: Any, origin: str | None = None, notes: list[str] | None = None
) -> EndpointSlice:
    """An EndpointSlice in its compact form; raises ModelError naming the object, origin and problem.
    `notes`: as for parse_service."""
    es = _fast_slice(raw) if type(raw) is dict else None
    if es is None:
        with _noting(notes):
            es = _slice_from_schema(_validate(_SEndpointSlice, "EndpointSlice", raw, origin))
    return es


# ---- schema -> compact (for what the fast path leaves to the schema) ----


def _meta_from_schema(m: _SObjectMeta) -> ObjectMeta:
    return ObjectMeta(m.name, _intern(m.namespace), _kept(m.labels), _kept(m.annotations))


def _service_from_schema(m: _SService) -> Service:
    s = m.spec
    sac = None
    if s.session_affinity_config is not None:
        ci = s.session_affinity_config.client_ip
        sac = SessionAffinityConfig(None if ci is None else ClientIPConfig(ci.timeout_seconds))
    cips = list(s.cluster_ips)
    if cips and cips[0] == s.cluster_ip:
        cips[0] = s.cluster_ip  # one string for both, as the fast path keeps them
    spec = ServiceSpec(
        s.type, s.cluster_ip, cips or _shared(cips), _shared(list(s.ip_families)),
        _shared([ServicePort(p.name, p.protocol, p.port, p.target_port, p.node_port) for p in s.ports]),
        list(s.external_ips) or _shared([]), s.session_affinity, sac, s.external_traffic_policy,
        s.internal_traffic_policy, s.health_check_node_port,
        list(s.load_balancer_source_ranges) or _shared([]), s.allocate_load_balancer_node_ports,
        s.traffic_distribution, s.external_name,
    )  # fmt: skip
    ing = m.status.load_balancer.ingress
    status = (
        ServiceStatus(LoadBalancerStatus([LoadBalancerIngress(i.ip, i.hostname, i.ip_mode) for i in ing]))
        if ing
        else _STATUS_DEFAULT
    )
    return Service(_meta_from_schema(m.metadata), spec, status)


def _slice_from_schema(m: _SEndpointSlice) -> EndpointSlice:
    eps = []
    for e in m.endpoints:
        c = e.conditions
        hints = (
            None
            if e.hints is None
            else EndpointHints(
                [ForZone(z.name) for z in e.hints.for_zones], [ForNode(n.name) for n in e.hints.for_nodes]
            )  # fmt: skip
        )
        eps.append(
            Endpoint(
                list(e.addresses), _CONDS[(c.ready, c.serving, c.terminating)],
                None if e.node_name is None else _intern(e.node_name),
                None if e.zone is None else _intern(e.zone), hints,
            )
        )  # fmt: skip
    ports = _shared([EndpointPort(p.name, p.port, p.protocol) for p in m.ports])
    packed = _pack_rows(eps) if m.address_type == "IPv4" else None
    return EndpointSlice(_meta_from_schema(m.metadata), m.address_type, packed or eps, ports)
