"""What translate makes of the cluster view: the frontends and backends the datapath should hold.

The Syncer programs these into kp_svc4/kp_be4 (IPv4 addresses) and kp_svc6/kp_be6 (IPv6: an address
with ':'); nothing here reads Kubernetes objects or maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

FrontendType = Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalIP"]


class BackendRef(NamedTuple):
    """One endpoint as a backend. A NamedTuple: translate makes one per endpoint per apply, and a
    frozen dataclass costs twice as much to build."""

    address: str
    port: int
    protocol: str  # "TCP" | "UDP" | "SCTP"
    node_name: str | None = None
    local: bool = False
    terminating: bool = False
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class Frontend:
    """One service address as the datapath sees it: a slot-0 entry of kp_svc4 (kp_svc6 for an IPv6
    address, whose backends and source ranges are IPv6 too) and its backend slots.

    `backends` get the slots (new connections); `retained` are endpoints still listed by the
    EndpointSlices but not eligible for new connections (terminating or not ready): their backend
    entries stay so that flows already going to them continue. `source_ranges` (LoadBalancer
    frontends of Services with loadBalancerSourceRanges) are the only sources new flows may come from.
    """

    service: str  # "namespace/name"
    port_name: str
    type: FrontendType
    address: str
    port: int
    protocol: str  # "TCP" | "UDP" | "SCTP"
    scope: int  # kproxy.abi.Scope
    flags: int  # kproxy.abi.SvcFlag
    affinity_timeout: int
    backends: tuple[BackendRef, ...]
    retained: tuple[BackendRef, ...] = field(default=())
    # SvcFlag.SRC_RANGES frontends: the sources allowed (of the frontend's family), as normalised CIDRs
    # ("10.0.0.0/8", "2001:db8::/32")
    source_ranges: tuple[str, ...] = field(default=())
