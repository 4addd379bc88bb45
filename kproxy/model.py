"""Kubernetes objects kproxy reads, and the desired-state types translate produces.

The pydantic models accept exactly what the API server (or a manifest file) gives us: unknown fields
are ignored, and anything kproxy relies on is validated here so that translate can trust it. A
validation failure becomes a ModelError whose message names the object, where it came from and
what is wrong with which field.

Frontend and BackendRef are the desired state: frozen slots dataclasses because sync creates and
compares hundreds of thousands of them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

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
    model_config = ConfigDict(
        extra="ignore", frozen=True, alias_generator=to_camel, populate_by_name=True, strict=False
    )


def _check_ip(value: str, what: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an IP address") from None
    return value


class ObjectMeta(_Model):
    name: str = Field(min_length=1)
    namespace: str = Field(default="default", min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels", "annotations", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


# ---- Service v1 ----


class ServicePort(_Model):
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


class ClientIPConfig(_Model):
    timeout_seconds: int | None = Field(default=None, ge=1, le=MAX_AFFINITY_TIMEOUT)


class SessionAffinityConfig(_Model):
    client_ip: ClientIPConfig | None = Field(default=None, alias="clientIP")


class ServiceSpec(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    cluster_ips: list[str] = Field(default_factory=list, alias="clusterIPs")
    ip_families: list[Literal["IPv4", "IPv6"]] = Field(default_factory=list)
    ports: list[ServicePort] = Field(default_factory=list)
    external_ips: list[str] = Field(default_factory=list, alias="externalIPs")
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: SessionAffinityConfig | None = None
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
        for ip in v:
            if ip not in ("", "None"):
                _check_ip(ip, "clusterIPs entry")
        return v

    @field_validator("external_ips")
    @classmethod
    def _external_ips(cls, v: list[str]) -> list[str]:
        for ip in v:
            _check_ip(ip, "externalIPs entry")
        return v

    @field_validator("load_balancer_source_ranges")
    @classmethod
    def _ranges(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise ValueError(f"loadBalancerSourceRanges entry {cidr!r} is not a CIDR") from None
        return v

    @model_validator(mode="after")
    def _ports_consistent(self) -> ServiceSpec:
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


class LoadBalancerIngress(_Model):
    ip: str | None = None
    hostname: str | None = None

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        return v if not v else _check_ip(v, "status.loadBalancer.ingress ip")


class LoadBalancerStatus(_Model):
    ingress: list[LoadBalancerIngress] = Field(default_factory=list)

    @field_validator("ingress", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return [] if v is None else v


class ServiceStatus(_Model):
    load_balancer: LoadBalancerStatus = Field(default_factory=LoadBalancerStatus)

    @field_validator("load_balancer", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return {} if v is None else v


class Service(_Model):
    kind: Literal["Service"] = "Service"
    metadata: ObjectMeta
    spec: ServiceSpec = Field(default_factory=ServiceSpec)
    status: ServiceStatus = Field(default_factory=ServiceStatus)

    @field_validator("spec", "status", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return {} if v is None else v

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


# ---- EndpointSlice discovery.k8s.io/v1 ----


class EndpointConditions(_Model):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ForZone(_Model):
    name: str


class EndpointHints(_Model):
    for_zones: list[ForZone] = Field(default_factory=list)

    @field_validator("for_zones", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return [] if v is None else v


class Endpoint(_Model):
    addresses: list[str] = Field(min_length=1)
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    node_name: str | None = None
    zone: str | None = None
    hints: EndpointHints | None = None

    @field_validator("conditions", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return {} if v is None else v


class EndpointPort(_Model):
    name: str = ""
    port: int | None = Field(default=None, ge=1, le=65535)
    protocol: Protocol = "TCP"

    @field_validator("name", mode="before")
    @classmethod
    def _none_name(cls, v: Any) -> Any:
        return "" if v is None else v


class EndpointSlice(_Model):
    kind: Literal["EndpointSlice"] = "EndpointSlice"
    metadata: ObjectMeta
    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] = Field(default_factory=list)

    @field_validator("endpoints", "ports", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        return [] if v is None else v

    @model_validator(mode="after")
    def _addresses(self) -> EndpointSlice:
        if self.address_type == "FQDN":
            return self
        version = 4 if self.address_type == "IPv4" else 6
        for i, ep in enumerate(self.endpoints):
            for addr in ep.addresses:
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


def _parse(model: type[_Model], kind: str, raw: Any, origin: str | None) -> Any:
    ns, name = _meta_of(raw)
    if not isinstance(raw, dict):
        raise ModelError(kind, ns, name, [f"expected a mapping, got {type(raw).__name__}"], origin)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ModelError(kind, ns, name, _problems(err), origin) from None


def parse_service(raw: Any, origin: str | None = None) -> Service:
    svc: Service = _parse(Service, "Service", raw, origin)
    return svc


def parse_endpoint_slice(raw: Any, origin: str | None = None) -> EndpointSlice:
    es: EndpointSlice = _parse(EndpointSlice, "EndpointSlice", raw, origin)
    return es


# ---- node ----


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """This node as translate needs it: its name, InternalIP addresses and topology zone."""

    name: str
    addresses: tuple[str, ...] = ()
    zone: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


# ---- desired state ----

FrontendType = Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalIP"]


class BackendRef(NamedTuple):
    """One endpoint as a backend. A NamedTuple: translate makes one per endpoint per apply, and a
    frozen dataclass costs twice as much to build."""

    address: str
    port: int
    protocol: str  # "TCP" | "UDP"
    node_name: str | None = None
    local: bool = False
    terminating: bool = False
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class Frontend:
    """One service address as the datapath sees it: a slot-0 entry of kp_svc4 and its backend slots.

    `backends` get the slots (new connections); `retained` are endpoints still listed by the
    EndpointSlices but not eligible for new connections (terminating or not ready): their backend
    entries stay so that flows already going to them continue.
    """

    service: str  # "namespace/name"
    port_name: str
    type: FrontendType
    address: str
    port: int
    protocol: str  # "TCP" | "UDP"
    scope: int  # kproxy.bpf.abi.Scope
    flags: int  # kproxy.bpf.abi.SvcFlag
    affinity_timeout: int
    backends: tuple[BackendRef, ...]
    retained: tuple[BackendRef, ...] = field(default=())
