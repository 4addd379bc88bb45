"""The pydantic validation schema: exactly what kproxy accepts from the API server (or a manifest file).

Unknown fields are ignored, and anything kproxy relies on is validated here so that translate can
trust it. kproxy.model.parse turns what it accepts into the compact form (kproxy.model.compact); the
fast path (kproxy.model.fastpath) must accept exactly the same objects.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kproxy.model.names import IPV4_EXACT as _V4
from kproxy.model.names import (
    MAX_AFFINITY_TIMEOUT,
    MAX_SERVICE_PORTS,
    SERVICE_NAME_LABEL,
    Protocol,
    canonical_ip,
    canonical_ipv6,
)


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
    """`value` in canonical text form (translate compares and serves addresses as text): IPv6 lower case
    and compressed as Go prints it, silently; legacy IPv4 spellings (leading zeros, an IPv4-mapped IPv6
    address, which Kubernetes reads as the IPv4 address) rewritten and noted."""
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r} is not an IP address")
    if _V4(value) is not None:
        return value
    v6 = canonical_ipv6(value)
    if v6 is not None:
        return v6
    fixed = canonical_ip(value) or sloppy_ipv4(value)
    if fixed is None:
        raise ValueError(f"{what} {value!r} is not an IP address")
    _legacy_notes.append(f"{what} {value!r} read as {fixed}")
    return fixed


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
        """Endpoint addresses in canonical form: IPv4 ones written with leading zeros (see _check_ip),
        IPv6 ones lower case and compressed (silently)."""
        if not isinstance(raw, dict):
            return raw
        eps = raw.get("endpoints")
        if not isinstance(eps, list):
            return raw
        if raw.get("addressType") == "IPv6":
            return cls._canonical_ipv6_addresses(raw, eps)
        if raw.get("addressType") != "IPv4":
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

    @staticmethod
    def _canonical_ipv6_addresses(raw: dict[str, Any], eps: list[Any]) -> dict[str, Any]:
        new_eps = []
        changed = False
        for ep in eps:
            addrs = ep.get("addresses") if isinstance(ep, dict) else None
            if isinstance(addrs, list):
                fixed = [(canonical_ipv6(a) or a) if isinstance(a, str) else a for a in addrs]
                if fixed != addrs:
                    ep = {**ep, "addresses": fixed}
                    changed = True
            new_eps.append(ep)
        return {**raw, "endpoints": new_eps} if changed else raw

    @model_validator(mode="after")
    def _addresses(self) -> _SEndpointSlice:
        """Every address of the slice's family; an IPv6 one plain (no zone, not IPv4-mapped: the API
        server's IsValidIPv6Address rejects those too) and, after _legacy_addresses, canonical."""
        if self.address_type == "FQDN":
            return self
        version = 4 if self.address_type == "IPv4" else 6
        for i, ep in enumerate(self.endpoints):
            for addr in ep.addresses:
                ok = _V4(addr) is not None if version == 4 else canonical_ipv6(addr) == addr
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


@contextlib.contextmanager
def noting(notes: list[str] | None) -> Iterator[None]:
    """Collect what a schema parse read in a legacy spelling into `notes` (if given)."""
    _legacy_notes.clear()
    try:
        yield
    finally:
        if notes is not None:
            notes.extend(_legacy_notes)
        _legacy_notes.clear()
