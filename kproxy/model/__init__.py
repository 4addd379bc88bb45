"""Kubernetes objects kproxy reads (translate's output types are in kproxy.desired).

- schema: the pydantic schema (_S* classes) defines exactly what is accepted from the API server (or a
  manifest file): unknown fields are ignored, and anything kproxy relies on is validated there so that
  translate can trust it.
- compact: what parse_service / parse_endpoint_slice return, and the store keeps, is a compact
  NamedTuple form with the same attribute names (Service, EndpointSlice, ...): about a fifth of the
  memory. NodeInfo, this node as translate needs it, is there too.
- fastpath: common objects are read straight from the dicts by a fast path that accepts only what the
  schema would accept unchanged; everything else goes through the schema.
- parse: THE parser (parse_service, parse_endpoint_slice): the fast path first, the schema for the
  rest. A validation failure becomes a ModelError (errors) whose message names the object, where it
  came from and what is wrong with which field.
- names: the labels, annotations and limits of the Kubernetes API kproxy relies on, and the canonical
  text of addresses (canonical_ip, canonical_ipv6): every address the model hands out is in that form,
  so readers compare addresses as text and tell families apart by a colon.

Pure: no I/O. Import the public names from here.
"""

from __future__ import annotations

from kproxy.model.compact import (
    KEPT_META_PREFIXES,
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
    NodeInfo,
    ObjectMeta,
    PackedEndpoints,
    Service,
    ServicePort,
    ServiceSpec,
    ServiceStatus,
    SessionAffinityConfig,
    endpoint_rows,
)
from kproxy.model.errors import ModelError
from kproxy.model.names import (
    DEFAULT_AFFINITY_TIMEOUT,
    HEADLESS_LABEL,
    LB_ALGORITHM_ANNOTATION,
    LB_ALGORITHMS,
    MAX_AFFINITY_TIMEOUT,
    MAX_SERVICE_PORTS,
    SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    TOPOLOGY_HINTS_ANNOTATION,
    TOPOLOGY_MODE_ANNOTATION,
    ZONE_LABEL,
    Protocol,
    canonical_ip,
    canonical_ipv6,
)
from kproxy.model.parse import parse_endpoint_slice, parse_service
from kproxy.model.schema import sloppy_ipv4

__all__ = [
    "DEFAULT_AFFINITY_TIMEOUT",
    "HEADLESS_LABEL",
    "KEPT_META_PREFIXES",
    "LB_ALGORITHMS",
    "LB_ALGORITHM_ANNOTATION",
    "MAX_AFFINITY_TIMEOUT",
    "MAX_SERVICE_PORTS",
    "SERVICE_NAME_LABEL",
    "SERVICE_PROXY_NAME_LABEL",
    "TOPOLOGY_HINTS_ANNOTATION",
    "TOPOLOGY_MODE_ANNOTATION",
    "ZONE_LABEL",
    "ClientIPConfig",
    "Endpoint",
    "EndpointConditions",
    "EndpointHints",
    "EndpointPort",
    "EndpointSlice",
    "ForNode",
    "ForZone",
    "LoadBalancerIngress",
    "LoadBalancerStatus",
    "ModelError",
    "NodeInfo",
    "ObjectMeta",
    "PackedEndpoints",
    "Protocol",
    "Service",
    "ServicePort",
    "ServiceSpec",
    "ServiceStatus",
    "SessionAffinityConfig",
    "canonical_ip",
    "canonical_ipv6",
    "endpoint_rows",
    "parse_endpoint_slice",
    "parse_service",
    "sloppy_ipv4",
]
