"""What both conformance modules describe their cases with: the lab's addresses and pods by role, the
pod servers' ports, and a Service port and an EndpointSlice endpoint as the tables write them."""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.lab.cluster import LAN_PREFIX

N1_IP = f"{LAN_PREFIX}.11"  # the ingress node of every external client
N2_IP = f"{LAN_PREFIX}.12"
# Lab pods by role (conftest.py): C the client pod, L* on the ingress node n1, R* on n2.
C, L1, L2, L3, L4, R1, R2, R3 = "n1p1", "n1p2", "n1p3", "n1p4", "n1p5", "n2p1", "n2p2", "n2p3"
P = 8080  # the pod servers' first port (upstream's endpoint ports 80, 53, 9376, 8090)
Q = 9090  # their second port (upstream's "different target port": 8443, 5353)


@dataclass(frozen=True)
class Port:
    """A Service port; `target` is the pod servers' port it maps to."""

    name: str
    port: int = 80
    target: int = P
    protocol: str = "TCP"
    node_port: int | None = None


@dataclass(frozen=True)
class Ep:
    """One EndpointSlice endpoint as the controller writes it for a lab pod: the pod's address, its
    node as nodeName unless `node` says otherwise."""

    pod: str
    node: str | None = None
    ready: bool = True
    serving: bool | None = None
    terminating: bool | None = None
