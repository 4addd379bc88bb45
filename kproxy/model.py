"""Kubernetes objects kproxy reads (translate's output types are in kproxy.desired).

The pydantic schema (_S* classes) defines exactly what is accepted from the API server (or a
manifest file): unknown fields are ignored, and anything kproxy relies on is validated here so that
translate can trust it. A validation failure becomes a ModelError whose message names the object,
where it came from and what is wrong with which field.

What parse_service / parse_endpoint_slice return, and the store keeps, is a compact NamedTuple form
with the same attribute names (Service, EndpointSlice, ...): about a fifth of the memory. Common
objects are read straight from the dicts by a fast path that accepts only what the schema would
accept unchanged; everything else goes through the schema (see "the compact form" below).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Literal, NamedTuple, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
TOPOLOGY_MODE_ANNOTATION = "service.kubernetes.io/topology-mode"
TOPOLOGY_HINTS_ANNOTATION = "service.kubernetes.io/topology-aware-hints"  # deprecated spelling
ZONE_LABEL = "topology.kubernetes.io/zone"

DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400
# Kubernetes itself sets no limit on Service ports; EndpointSlices carry at most 100. A Service with
# more ports than that is treated as malformed rather than programmed half-way.
MAX_SERVICE_PORTS = 100

Protocol = Literal["TCP", "UDP", "SCTP"]


class _Model(BaseModel):
    # defer_build: a validator is built on first use (3 MB less RSS): the fast path parses most objects
    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        strict=False,
        defer_build=True,
    )


# Legacy IPv4 spellings: Kubernetes validated addresses with Go's net.ParseIP before Go 1.17, which
# read "172.30.0.041" as decimal 172.30.0.41; objects written then are still served, and kube-proxy
# parses them with netutils.ParseIPSloppy, as it always did. kproxy does the same: the address is
# rewritten to its canonical form (never octal, as inet_aton would read it) and the object is counted.
_SLOPPY_V4 = re.compile(r"([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)").fullmatch

# What the current parse rewrote (reset by parse_service / parse_endpoint_slice): "what 'old' -> new".
_legacy_notes: list[str] = []


def sloppy_ipv4(value: str) -> str | None:
    """The canonical form of a dotted-quad IPv4 address written with leading zeros, read as decimal
    (Go's ParseIPSloppy); None if `value` is not such an address."""
    m = _SLOPPY_V4(value)
    if m is None:
        return None
    octets = [int(g) for g in m.groups()]
    if any(o > 255 for o in octets):
        return None
    return ".".join(map(str, octets))


def _check_ip(value: str, what: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        fixed = sloppy_ipv4(value) if isinstance(value, str) else None
        if fixed is None:
            raise ValueError(f"{what} {value!r} is not an IP address") from None
        _legacy_notes.append(f"{what} {value!r} read as {fixed}")
        return fixed
    return value


def _check_cidr(value: str, what: str) -> str:
    """A CIDR as ParseCIDRSloppy reads it: the address part may have leading zeros (canonicalized)."""
    cidr = value.strip()
    try:
        ipaddress.ip_network(cidr, strict=False)
        return value
    except ValueError:
        addr, sep, bits = cidr.partition("/")
        fixed = sloppy_ipv4(addr)
        if fixed is not None and sep and bits.isdigit():
            out = f"{fixed}/{int(bits)}"
            try:
                ipaddress.ip_network(out, strict=False)
            except ValueError:
                pass
            else:
                _legacy_notes.append(f"{what} {value!r} read as {out}")
                return out
        raise ValueError(f"{what} {value!r} is not a CIDR") from None


class _SObjectMeta(_Model):
    name: str = Field(min_length=1)
    namespace: str = Field(default="default", min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels", "annotations", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


# ---- Service v1 (validation schema) ----


class _SServicePort(_Model):
    name: str = ""
    protocol: Protocol = "TCP"
    port: int = Field(ge=1, le=65535)
    target_port: int | str | None = None
    node_port: int | None = Field(default=None, ge=0, le=65535)

    @field_validator("target_port")
    @classmethod
    def _target_port(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and not 1 <= v <= 65535:
            raise ValueError(f"targetPort {v} is outside 1..65535")
        if isinstance(v, str):
            if v.isdigit():  # a quoted number means the number, as the API server reads it
                return cls._target_port(int(v))
            if not v or len(v) > 15:
                raise ValueError(f"targetPort name {v!r} must be 1..15 characters")
        return v


class _SClientIPConfig(_Model):
    timeout_seconds: int | None = Field(default=None, ge=1, le=MAX_AFFINITY_TIMEOUT)


class _SSessionAffinityConfig(_Model):
    client_ip: _SClientIPConfig | None = Field(default=None, alias="clientIP")


class _SServiceSpec(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    cluster_ips: list[str] = Field(default_factory=list, alias="clusterIPs")
    ip_families: list[Literal["IPv4", "IPv6"]] = Field(default_factory=list)
    ports: list[_SServicePort] = Field(default_factory=list)
    external_ips: list[str] = Field(default_factory=list, alias="externalIPs")
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: _SSessionAffinityConfig | None = None
    external_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    internal_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    health_check_node_port: int | None = Field(default=None, ge=0, le=65535)
    load_balancer_source_ranges: list[str] = Field(default_factory=list)
    allocate_load_balancer_node_ports: bool | None = None
    traffic_distribution: str | None = None
    external_name: str | None = None

    @field_validator(
        "cluster_ips", "ports", "external_ips", "load_balancer_source_ranges", "ip_families", mode="before"
    )
    @classmethod
    def _none_is_empty_list(cls, v: Any) -> Any:
        return [] if v is None else v

    @field_validator("external_traffic_policy", "internal_traffic_policy", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> Any:
        # "Global" is the pre-1.24 spelling of "Cluster"; an empty value means the default.
        return "Cluster" if v in (None, "", "Global") else v

    @field_validator("cluster_ip")
    @classmethod
    def _cluster_ip(cls, v: str | None) -> str | None:
        if v in (None, "", "None"):
            return v
        return _check_ip(v, "clusterIP")

    @field_validator("cluster_ips")
    @classmethod
    def _cluster_ips(cls, v: list[str]) -> list[str]:
        return [ip if ip in ("", "None") else _check_ip(ip, "clusterIPs entry") for ip in v]

    @field_validator("external_ips")
    @classmethod
    def _external_ips(cls, v: list[str]) -> list[str]:
        return [_check_ip(ip, "externalIPs entry") for ip in v]

    @field_validator("load_balancer_source_ranges")
    @classmethod
    def _ranges(cls, v: list[str]) -> list[str]:
        return [_check_cidr(cidr, "loadBalancerSourceRanges entry") for cidr in v]

    @model_validator(mode="after")
    def _ports_consistent(self) -> _SServiceSpec:
        if len(self.ports) > MAX_SERVICE_PORTS:
            raise ValueError(
                f"{len(self.ports)} ports; kproxy accepts at most {MAX_SERVICE_PORTS} per Service"
            )
        if len(self.ports) > 1 and any(not p.name for p in self.ports):
            raise ValueError("every port needs a name when a Service has more than one port")
        seen_port: set[tuple[int, str]] = set()
        seen_name: set[str] = set()
        for p in self.ports:
            if (p.port, p.protocol) in seen_port:
                raise ValueError(f"duplicate port {p.port}/{p.protocol}")
            seen_port.add((p.port, p.protocol))
            if p.name in seen_name:
                raise ValueError(f"duplicate port name {p.name!r}")
            seen_name.add(p.name)
        return self


class _SLoadBalancerIngress(_Model):
    ip: str | None = None
    hostname: str | None = None
    # KEP-1860: "VIP" (the default) or "Proxy"; unknown values are kept and treated as VIP, as
    # kube-proxy's IsVIPMode does for anything but "Proxy"
    ip_mode: str | None = None

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        return v if not v else _check_ip(v, "status.loadBalancer.ingress ip")


class _SLoadBalancerStatus(_Model):
    ingress: list[_SLoadBalancerIngress] = Field(default_factory=list)

    @field_validator("ingress", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return [] if v is None else v


class _SServiceStatus(_Model):
    load_balancer: _SLoadBalancerStatus = Field(default_factory=_SLoadBalancerStatus)

    @field_validator("load_balancer", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return {} if v is None else v


class _SService(_Model):
    kind: Literal["Service"] = "Service"
    metadata: _SObjectMeta
    spec: _SServiceSpec = Field(default_factory=_SServiceSpec)
    status: _SServiceStatus = Field(default_factory=_SServiceStatus)

    @field_validator("spec", "status", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return {} if v is None else v

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


# ---- EndpointSlice discovery.k8s.io/v1 ----


class _SEndpointConditions(_Model):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class _SForZone(_Model):
    name: str


class _SForNode(_Model):
    name: str


class _SEndpointHints(_Model):
    for_zones: list[_SForZone] = Field(default_factory=list)
    for_nodes: list[_SForNode] = Field(default_factory=list)  # trafficDistribution PreferSameNode

    @field_validator("for_zones", "for_nodes", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return [] if v is None else v


class _SEndpoint(_Model):
    addresses: list[str] = Field(min_length=1)
    conditions: _SEndpointConditions = Field(default_factory=_SEndpointConditions)
    node_name: str | None = None
    zone: str | None = None
    hints: _SEndpointHints | None = None

    @field_validator("conditions", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return {} if v is None else v


class _SEndpointPort(_Model):
    name: str = ""
    port: int | None = Field(default=None, ge=1, le=65535)
    protocol: Protocol = "TCP"

    @field_validator("name", mode="before")
    @classmethod
    def _none_name(cls, v: Any) -> Any:
        return "" if v is None else v


class _SEndpointSlice(_Model):
    kind: Literal["EndpointSlice"] = "EndpointSlice"
    metadata: _SObjectMeta
    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: list[_SEndpoint] = Field(default_factory=list)
    ports: list[_SEndpointPort] = Field(default_factory=list)

    @field_validator("endpoints", "ports", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return [] if v is None else v

    @model_validator(mode="before")
    @classmethod
    def _legacy_addresses(cls, raw: Any) -> Any:
        """IPv4 endpoint addresses written with leading zeros, in canonical form (see _check_ip)."""
        if not isinstance(raw, dict) or raw.get("addressType") != "IPv4":
            return raw
        eps = raw.get("endpoints")
        if not isinstance(eps, list):
            return raw
        new_eps = []
        changed = False
        for i, ep in enumerate(eps):
            addrs = ep.get("addresses") if isinstance(ep, dict) else None
            if isinstance(addrs, list) and any(isinstance(a, str) and _V4(a) is None for a in addrs):
                fixed = []
                for a in addrs:
                    canon = sloppy_ipv4(a) if isinstance(a, str) and _V4(a) is None else None
                    if canon is not None:
                        _legacy_notes.append(f"endpoints[{i}] address {a!r} read as {canon}")
                        changed = True
                    fixed.append(a if canon is None else canon)
                ep = {**ep, "addresses": fixed}
            new_eps.append(ep)
        return {**raw, "endpoints": new_eps} if changed else raw

    @model_validator(mode="after")
    def _addresses(self) -> _SEndpointSlice:
        if self.address_type == "FQDN":
            return self
        version = 4 if self.address_type == "IPv4" else 6
        for i, ep in enumerate(self.endpoints):
            for addr in ep.addresses:
                if version == 4 and _V4(addr) is not None:
                    continue
                try:
                    ok = ipaddress.ip_address(addr).version == version
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"endpoints[{i}] address {addr!r} is not an {self.address_type} address")
        return self

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"

    @property
    def service_name(self) -> str | None:
        return self.metadata.labels.get(SERVICE_NAME_LABEL) or None

    @property
    def service_key(self) -> str | None:
        name = self.service_name
        return None if name is None else f"{self.metadata.namespace}/{name}"


# ---- errors ----


class ModelError(ValueError):
    """A Kubernetes object kproxy cannot use. `reason` is a short label for counters."""

    def __init__(
        self,
        kind: str,
        namespace: str | None,
        name: str | None,
        problems: list[str],
        origin: str | None = None,
        reason: str = "invalid",
    ) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.origin = origin
        self.problems = problems
        self.reason = reason
        super().__init__(self.describe())

    @property
    def object_name(self) -> str:
        if self.name is None:
            return f"{self.kind} without metadata.name"
        return f"{self.kind} {self.namespace or 'default'}/{self.name}"

    def describe(self) -> str:
        where = f" in {self.origin}" if self.origin else ""
        return f"{self.object_name}{where} skipped: " + "; ".join(self.problems)


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


@contextlib.contextmanager
def _noting(notes: list[str] | None) -> Iterator[None]:
    """Collect what a schema parse read in a legacy spelling into `notes` (if given)."""
    _legacy_notes.clear()
    try:
        yield
    finally:
        if notes is not None:
            notes.extend(_legacy_notes)
        _legacy_notes.clear()


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


# ---- the compact form the store keeps ----
#
# The pydantic schema above costs about 1 KB per endpoint once validated; the store keeps these
# NamedTuples instead (same attribute names, so translate and other readers do not care): about 200
# bytes per endpoint, conditions shared, node names interned. Parsing goes through _fast_service /
# _fast_slice, plain dict reads that accept only the common, unambiguous shapes; anything else (an
# error, a quoted number, a snake_case key, an IPv6 address...) returns None and goes through the
# schema, which either rejects it with its message or accepts it, converted by *_from_schema. Both
# routes give equal objects (tests/unit/test_model.py checks this).


class ObjectMeta(NamedTuple):
    name: str
    namespace: str = "default"
    labels: dict[str, str] = {}  # noqa: RUF012 -- shared empty default, never mutated
    annotations: dict[str, str] = {}  # noqa: RUF012


class ServicePort(NamedTuple):
    name: str = ""
    protocol: str = "TCP"
    port: int = 0
    target_port: int | str | None = None
    node_port: int | None = None


class ClientIPConfig(NamedTuple):
    timeout_seconds: int | None = None


class SessionAffinityConfig(NamedTuple):
    client_ip: ClientIPConfig | None = None


class ServiceSpec(NamedTuple):
    type: str = "ClusterIP"
    cluster_ip: str | None = None
    cluster_ips: list[str] = []  # noqa: RUF012
    ip_families: list[str] = []  # noqa: RUF012
    ports: list[ServicePort] = []  # noqa: RUF012
    external_ips: list[str] = []  # noqa: RUF012
    session_affinity: str = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    health_check_node_port: int | None = None
    load_balancer_source_ranges: list[str] = []  # noqa: RUF012
    allocate_load_balancer_node_ports: bool | None = None
    traffic_distribution: str | None = None
    external_name: str | None = None


class LoadBalancerIngress(NamedTuple):
    """One status.loadBalancer.ingress entry. ip_mode "Proxy" (KEP-1860): the load balancer proxies
    (PROXY protocol, TLS termination...), so its IP is not served on the node."""

    ip: str | None = None
    hostname: str | None = None
    ip_mode: str | None = None


class LoadBalancerStatus(NamedTuple):
    ingress: list[LoadBalancerIngress] = []  # noqa: RUF012


class ServiceStatus(NamedTuple):
    load_balancer: LoadBalancerStatus = LoadBalancerStatus()


class Service(NamedTuple):
    metadata: ObjectMeta
    spec: ServiceSpec = ServiceSpec()
    status: ServiceStatus = ServiceStatus()

    @property
    def kind(self) -> str:
        return "Service"

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


class EndpointConditions(NamedTuple):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ForZone(NamedTuple):
    name: str


class ForNode(NamedTuple):
    name: str


class EndpointHints(NamedTuple):
    for_zones: list[ForZone] = []  # noqa: RUF012
    for_nodes: list[ForNode] = []  # noqa: RUF012


class Endpoint(NamedTuple):
    addresses: list[str]
    conditions: EndpointConditions = EndpointConditions()
    node_name: str | None = None
    zone: str | None = None
    hints: EndpointHints | None = None


class EndpointPort(NamedTuple):
    name: str = ""
    port: int | None = None
    protocol: str = "TCP"


class EndpointSlice(NamedTuple):
    metadata: ObjectMeta
    address_type: str
    endpoints: Sequence[Endpoint] = []  # noqa: RUF012 -- a list, or PackedEndpoints
    ports: list[EndpointPort] = []  # noqa: RUF012

    @property
    def kind(self) -> str:
        return "EndpointSlice"

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"

    @property
    def service_name(self) -> str | None:
        return self.metadata.labels.get(SERVICE_NAME_LABEL) or None

    @property
    def service_key(self) -> str | None:
        name = self.service_name
        return None if name is None else f"{self.metadata.namespace}/{name}"


_intern = sys.intern
# the 27 possible condition triples, shared by every endpoint
_CONDS: dict[tuple[bool | None, bool | None, bool | None], EndpointConditions] = {
    (r, s, t): EndpointConditions(r, s, t)
    for r in (None, True, False)
    for s in (None, True, False)
    for t in (None, True, False)
}
_COND_DEFAULT = _CONDS[(None, None, None)]
_COND_LIST = list(_CONDS.values())
_COND_INDEX = {c: i for i, c in enumerate(_COND_LIST)}
_inet_aton = socket.inet_aton
_inet_ntoa = socket.inet_ntoa


class PackedEndpoints(Sequence[Endpoint]):
    """The endpoints of an IPv4 EndpointSlice in the common shape (one address each, no hints), packed:
    addresses as 4 bytes each, conditions as one byte each, node and zone once when all endpoints share
    them. About 20 bytes per endpoint instead of ~210 for Endpoint tuples, lists and strings (100,000
    endpoints at scale); reading yields equal Endpoint tuples, built on the fly."""

    __slots__ = ("_addrs", "_conds", "_nodes", "_zones")

    def __init__(
        self, addrs: bytes, conds: bytes, nodes: str | None | tuple[str | None, ...],
        zones: str | None | tuple[str | None, ...],
    ) -> None:  # fmt: skip
        self._addrs = addrs
        self._conds = conds
        self._nodes = nodes  # a tuple (one per endpoint) unless all are the same
        self._zones = zones

    def __len__(self) -> int:
        return len(self._conds)

    def _at(self, i: int) -> Endpoint:
        nodes, zones = self._nodes, self._zones
        return Endpoint(
            [_inet_ntoa(self._addrs[4 * i : 4 * i + 4])], _COND_LIST[self._conds[i]],
            nodes[i] if isinstance(nodes, tuple) else nodes, zones[i] if isinstance(zones, tuple) else zones,
        )  # fmt: skip

    @overload
    def __getitem__(self, i: int) -> Endpoint: ...
    @overload
    def __getitem__(self, i: slice) -> list[Endpoint]: ...
    def __getitem__(self, i: int | slice) -> Endpoint | list[Endpoint]:
        if isinstance(i, slice):
            return [self._at(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("endpoint index out of range")
        return self._at(i % n)

    def __iter__(self) -> Iterator[Endpoint]:
        addrs, conds, nodes, zones = self._addrs, self._conds, self._nodes, self._zones
        if type(nodes) is not tuple and type(zones) is not tuple:
            for i, c in enumerate(conds):
                yield Endpoint([_inet_ntoa(addrs[4 * i : 4 * i + 4])], _COND_LIST[c], nodes, zones)  # type: ignore[arg-type]
        else:
            for i in range(len(conds)):
                yield self._at(i)

    def rows(self) -> Iterator[tuple[str, EndpointConditions, str | None, str | None, None]]:
        """See endpoint_rows: zipped in C, no Python frame per endpoint."""
        a = self._addrs
        nodes, zones = self._nodes, self._zones
        return zip(
            map(_inet_ntoa, [a[i : i + 4] for i in range(0, len(a), 4)]),
            map(_COND_LIST.__getitem__, self._conds),
            nodes if isinstance(nodes, tuple) else repeat(nodes),
            zones if isinstance(zones, tuple) else repeat(zones),
            repeat(None),
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is PackedEndpoints:
            return (self._addrs, self._conds, self._nodes, self._zones) == (
                other._addrs, other._conds, other._nodes, other._zones,
            )  # fmt: skip
        if isinstance(other, list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))


def _pack_rows(rows: Sequence[tuple[Any, ...]]) -> PackedEndpoints | None:
    """PackedEndpoints from (addresses, conditions, node, zone, hints) rows of validated IPv4
    endpoints, or None unless every row has the common shape (one address, no hints)."""
    if not rows:
        return None
    for r in rows:
        if len(r[0]) != 1 or r[4] is not None:
            return None
    nodes = tuple([r[2] for r in rows])
    zones = tuple([r[3] for r in rows])
    return PackedEndpoints(
        b"".join([_inet_aton(r[0][0]) for r in rows]),
        bytes([_COND_INDEX[r[1]] for r in rows]),
        nodes[0] if nodes.count(nodes[0]) == len(nodes) else nodes,
        zones[0] if zones.count(zones[0]) == len(zones) else zones,
    )


def endpoint_rows(
    endpoints: Sequence[Endpoint],
) -> Iterator[tuple[str, EndpointConditions, str | None, str | None, EndpointHints | None]]:
    """(first address, conditions, node name, zone, hints) per endpoint: what translate reads, without
    building Endpoint tuples for packed slices."""
    if type(endpoints) is PackedEndpoints:
        return endpoints.rows()
    return ((e.addresses[0], e.conditions, e.node_name, e.zone, e.hints) for e in endpoints)


# IPv4 exactly as ipaddress accepts it (no leading zeros, ASCII digits); anything else: the schema
_V4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
).fullmatch
_PROTOCOLS = frozenset(("TCP", "UDP", "SCTP"))
_SVC_TYPES = frozenset(("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"))
_POLICY = {None: "Cluster", "": "Cluster", "Global": "Cluster", "Cluster": "Cluster", "Local": "Local"}
_ADDRESS_TYPES = frozenset(("IPv4", "IPv6", "FQDN"))


def _is_bool_or_none(v: Any) -> bool:
    return v is None or v is True or v is False


# Labels and annotations kept in the cluster view: those Kubernetes defines for Services and
# EndpointSlices (service-proxy-name, headless, service-name, topology...). kproxy reads nothing else,
# and the rest is often most of an object: kubectl's last-applied-configuration annotation repeats the
# whole object, users' labels and annotations come by the dozen. Dropping them kept 10,000 Services
# several MB smaller (issue 13).
KEPT_META_PREFIXES = (
    "kubernetes.io/", "service.kubernetes.io/", "service.beta.kubernetes.io/", "endpointslice.kubernetes.io/",
)  # fmt: skip


def _kept(d: dict[str, str]) -> dict[str, str]:
    kept = {k: v for k, v in d.items() if k.startswith(KEPT_META_PREFIXES)}
    return kept or _EMPTY_DICT


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


_EMPTY_DICT: dict[str, str] = ObjectMeta.__new__.__defaults__[1]  # type: ignore[index]


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
    return type(v) is str and _V4(v) is not None


def _ip_list(v: Any) -> list[str] | None:
    if v is None:
        return []
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
    cips = g("clusterIPs")
    if cips is None:
        cips = []
    elif type(cips) is not list:
        return None
    else:
        for ip in cips:
            if ip != "" and ip != "None" and not _is_ip(ip):
                return None
        cips = cips[:]
    fams = g("ipFamilies")
    if fams is None:
        fams = []
    elif type(fams) is not list or any(f != "IPv4" and f != "IPv6" for f in fams):
        return None
    else:
        fams = [_intern(f) for f in fams]
    raw_ports = g("ports")
    ports: list[ServicePort] = []
    if raw_ports is not None:
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
    ext = _ip_list(g("externalIPs"))
    if ext is None:
        return None
    affinity = g("sessionAffinity", "None")
    if affinity != "None" and affinity != "ClientIP":
        return None
    sac = g("sessionAffinityConfig")
    if sac is not None:
        if type(sac) is not dict:
            return None
        cic = sac.get("clientIP")
        if cic is None:
            sac = SessionAffinityConfig()
        elif type(cic) is not dict:
            return None
        else:
            t = cic.get("timeoutSeconds")
            if t is not None and not (type(t) is int and 1 <= t <= MAX_AFFINITY_TIMEOUT):
                return None
            sac = SessionAffinityConfig(ClientIPConfig(t))
    etp = _POLICY.get(g("externalTrafficPolicy"))
    itp = _POLICY.get(g("internalTrafficPolicy"))
    if etp is None or itp is None:
        return None
    hc = g("healthCheckNodePort")
    if hc is not None and not _port(hc, 0):
        return None
    ranges = g("loadBalancerSourceRanges")
    if ranges is None:
        ranges = []
    elif type(ranges) is not list:
        return None
    elif ranges:
        for cidr in ranges:
            if type(cidr) is not str:
                return None
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                return None
        ranges = ranges[:]
    alloc = g("allocateLoadBalancerNodePorts")
    td = g("trafficDistribution")
    en = g("externalName")
    if not _is_bool_or_none(alloc) or (td is not None and type(td) is not str):
        return None
    if en is not None and type(en) is not str:
        return None
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


_STATUS_DEFAULT = ServiceStatus()


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


def _fast_slice(raw: dict[str, Any]) -> EndpointSlice | None:
    if raw.get("kind", "EndpointSlice") != "EndpointSlice" or "address_type" in raw:
        return None
    meta = _fast_meta(raw.get("metadata"))
    if meta is None:
        return None
    at = raw.get("addressType")
    if at != "IPv4" and at != "FQDN":
        return None  # IPv6 and anything invalid: the schema checks those
    v4 = at == "IPv4"
    raw_eps = raw.get("endpoints")
    rows: list[tuple[list[str], EndpointConditions, str | None, str | None, EndpointHints | None]] = []
    if raw_eps is not None:
        if type(raw_eps) is not list:
            return None
        conds = _CONDS
        v4match = _V4
        append = rows.append
        for e in raw_eps:
            if type(e) is not dict or "node_name" in e:
                return None
            addrs = e.get("addresses")
            if type(addrs) is not list or not addrs:
                return None
            for a in addrs:
                if type(a) is not str or (v4 and v4match(a) is None):
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
    raw_ports = raw.get("ports")
    ports: list[EndpointPort] = []
    if raw_ports is not None:
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
    endpoints: Sequence[Endpoint] | None = _pack_rows(rows) if v4 else None
    if endpoints is None:
        endpoints = [Endpoint(a[:], c, n, z, h) for a, c, n, z, h in rows]
    return EndpointSlice(meta, _intern(at), endpoints, ports)


# ---- schema -> compact (for what the fast path leaves to the schema) ----


def _meta_from_schema(m: _SObjectMeta) -> ObjectMeta:
    return ObjectMeta(m.name, _intern(m.namespace), _kept(m.labels), _kept(m.annotations))


def _service_from_schema(m: _SService) -> Service:
    s = m.spec
    sac = None
    if s.session_affinity_config is not None:
        ci = s.session_affinity_config.client_ip
        sac = SessionAffinityConfig(None if ci is None else ClientIPConfig(ci.timeout_seconds))
    spec = ServiceSpec(
        s.type, s.cluster_ip, list(s.cluster_ips), list(s.ip_families),
        [ServicePort(p.name, p.protocol, p.port, p.target_port, p.node_port) for p in s.ports],
        list(s.external_ips), s.session_affinity, sac, s.external_traffic_policy, s.internal_traffic_policy,
        s.health_check_node_port, list(s.load_balancer_source_ranges), s.allocate_load_balancer_node_ports,
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
    ports = [EndpointPort(p.name, p.port, p.protocol) for p in m.ports]
    packed = _pack_rows(eps) if m.address_type == "IPv4" else None
    return EndpointSlice(_meta_from_schema(m.metadata), m.address_type, packed or eps, ports)


# ---- node ----


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """This node as translate needs it: its name, InternalIP addresses and topology zone, and the
    addresses of its interfaces (host_addresses: what --nodeport-addresses CIDRs select from)."""

    name: str
    addresses: tuple[str, ...] = ()
    zone: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    host_addresses: tuple[str, ...] = ()
