"""The compact form of Services and EndpointSlices: what parse_service / parse_endpoint_slice return
and the store keeps.

The pydantic schema (kproxy.model.schema) costs about 1 KB per endpoint once validated; the store keeps
these NamedTuples instead (same attribute names, so translate and other readers do not care): about 200
bytes per endpoint, conditions shared, node names interned. Parsing goes through the fast path
(kproxy.model.fastpath), plain dict reads that accept only the common, unambiguous shapes; anything
else (an error, a quoted number, a snake_case key, an IPv6 address not in canonical form...) goes through
the schema, which
either rejects it with its message or accepts it, converted by kproxy.model.parse. Both routes give
equal objects (tests/unit/test_model.py checks this).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, NamedTuple, overload

from kproxy.model.names import SERVICE_NAME_LABEL, canonical_ip

_intern = sys.intern


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


# the 27 possible condition triples, shared by every endpoint
CONDITIONS: dict[tuple[bool | None, bool | None, bool | None], EndpointConditions] = {
    (r, s, t): EndpointConditions(r, s, t)
    for r in (None, True, False)
    for s in (None, True, False)
    for t in (None, True, False)
}
CONDITIONS_DEFAULT = CONDITIONS[(None, None, None)]
_COND_LIST = list(CONDITIONS.values())
_COND_INDEX = {c: i for i, c in enumerate(_COND_LIST)}
# Dotted quad <-> 4 bytes without the socket module (the model does no I/O): the addresses are
# validated IPv4 in canonical form, so splitting on dots is all inet_aton would do. Octets are looked up,
# not parsed, and whole slices are converted in C (map, zip): within ~1.5x of inet_aton / inet_ntoa.
_OCTET = {str(i): i for i in range(256)}.__getitem__
_dotted = "%d.%d.%d.%d".__mod__  # of a tuple of 4 ints


def _dotted_all(addrs: bytes) -> Iterator[str]:
    """The dotted quads of packed addresses, in order."""
    return map(_dotted, zip(addrs[0::4], addrs[1::4], addrs[2::4], addrs[3::4], strict=True))


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
            [_dotted(tuple(self._addrs[4 * i : 4 * i + 4]))], _COND_LIST[self._conds[i]],
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
            for a, c in zip(_dotted_all(addrs), conds, strict=True):
                yield Endpoint([a], _COND_LIST[c], nodes, zones)  # type: ignore[arg-type]
        else:
            for i in range(len(conds)):
                yield self._at(i)

    def rows(self) -> Iterator[tuple[str, EndpointConditions, str | None, str | None, None]]:
        """See endpoint_rows: zipped in C, no Python frame per endpoint."""
        nodes, zones = self._nodes, self._zones
        return zip(
            _dotted_all(self._addrs),
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


def pack_rows(rows: Sequence[tuple[Any, ...]]) -> PackedEndpoints | None:
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
        bytes(map(_OCTET, ".".join([r[0][0] for r in rows]).split("."))),
        bytes([_COND_INDEX[r[1]] for r in rows]),
        nodes[0] if nodes.count(nodes[0]) == len(nodes) else shared_tuple(nodes),
        zones[0] if zones.count(zones[0]) == len(zones) else shared_tuple(zones),
    )


def endpoint_rows(
    endpoints: Sequence[Endpoint],
) -> Iterator[tuple[str, EndpointConditions, str | None, str | None, EndpointHints | None]]:
    """(first address, conditions, node name, zone, hints) per endpoint: what translate reads, without
    building Endpoint tuples for packed slices."""
    if type(endpoints) is PackedEndpoints:
        return endpoints.rows()
    return ((e.addresses[0], e.conditions, e.node_name, e.zone, e.hints) for e in endpoints)


# Labels and annotations kept in the cluster view: those Kubernetes defines for Services and
# EndpointSlices (service-proxy-name, headless, service-name, topology...) and kproxy's own (kproxy.io/).
# kproxy reads nothing else, and the rest is often most of an object: kubectl's
# last-applied-configuration annotation repeats the whole object, users' labels and annotations come by
# the dozen. Dropping them kept 10,000 Services several MB smaller (issue 13).
KEPT_META_PREFIXES = (
    "kubernetes.io/", "service.kubernetes.io/", "service.beta.kubernetes.io/", "endpointslice.kubernetes.io/",
    "kproxy.io/",
)  # fmt: skip


def kept_meta(d: dict[str, str]) -> dict[str, str]:
    # keys (and values but the per-Service service-name) interned: each object's JSON has its own
    # copies of 'kubernetes.io/service-name', 'endpointslice-controller.k8s.io'... (~250 B a slice)
    kept = {
        _intern(k): v if k == SERVICE_NAME_LABEL else _intern(v)
        for k, v in d.items()
        if k.startswith(KEPT_META_PREFIXES)
    }
    return kept or EMPTY_META


# ---- sharing equal values between objects ----
# The compact objects are never mutated (the store replaces whole objects): equal small lists and
# tuples (["IPv4"], a Service's ports, a slice's ports, its endpoints' node names) can be one object
# for all of them. At 10,000 Services that saved ~4 MB. The table is bounded: cleared when full, which
# only costs sharing for what comes next.
SHARED_MAX = 4096
_shared: dict[Any, Any] = {}


def shared_list(items: list[Any]) -> list[Any]:
    """A list equal to `items` (hashable elements), the same object for equal values: never mutate it."""
    if not items:
        return EMPTY_LIST
    key = (list, tuple(map(type, items)), *items)  # by type too: ForZone("a") == ForNode("a"), True == 1
    got = _shared.get(key)
    if got is None:
        if len(_shared) >= SHARED_MAX:
            _shared.clear()
        got = _shared[key] = items
    return got  # type: ignore[no-any-return]


def shared_tuple(items: tuple[Any, ...]) -> tuple[Any, ...]:
    """A tuple equal to `items` (hashable elements), the same object for equal values."""
    key = (tuple, tuple(map(type, items)), *items)
    got = _shared.get(key)
    if got is None:
        if len(_shared) >= SHARED_MAX:
            _shared.clear()
        got = _shared[key] = items
    return got  # type: ignore[no-any-return]


# the one empty labels / annotations dict every object without kept ones shares (never mutated)
EMPTY_META: dict[str, str] = ObjectMeta.__new__.__defaults__[1]  # type: ignore[index]
STATUS_DEFAULT = ServiceStatus()  # shared by every Service without load balancer ingress
# the one empty list of every compact object without entries (never mutated)
EMPTY_LIST: list[Any] = ServiceSpec.__new__.__defaults__[2]  # type: ignore[index]

# ---- node ----


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """This node as translate needs it: its name, InternalIP addresses of both families (in the Node's
    order: the first of a family is the node's primary address of that family) and topology zone, and the
    addresses of its interfaces of both families (host_addresses: what --nodeport-addresses CIDRs select
    from).

    Addresses are kept in canonical text form (canonical_ip: translate compares and serves them as
    text, like every address of the model); an entry that is not an IP address is dropped."""

    name: str
    addresses: tuple[str, ...] = ()
    zone: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    host_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for attr in ("addresses", "host_addresses"):
            given: tuple[str, ...] = getattr(self, attr)
            canon = _canonical_addresses(given)
            if canon != given:
                object.__setattr__(self, attr, canon)


def _canonical_addresses(addresses: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for a in addresses:
        c = canonical_ip(a) if isinstance(a, str) else None
        if c is not None and c not in out:
            out.append(c)
    return tuple(out)
