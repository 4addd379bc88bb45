"""Builders for the Kubernetes objects the lab feeds to the file source, and an atomic writer."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Port:
    """One Service port: `target` is the pod port the lab's pod servers listen on."""

    name: str
    port: int
    target: int = 8080
    protocol: str = "TCP"
    node_port: int | None = None


def service_port(p: Port, node_port: bool = True) -> dict[str, Any]:
    """One spec.ports entry (anything with Port's attributes); nodePort only if `node_port`."""
    entry: dict[str, Any] = {"name": p.name, "port": p.port, "targetPort": p.target, "protocol": p.protocol}
    if node_port and p.node_port is not None:
        entry["nodePort"] = p.node_port
    return entry


def service(
    name: str,
    ports: Sequence[Port],
    cluster_ip: str | None,
    type: str = "ClusterIP",
    namespace: str = "default",
    external_ips: Iterable[str] = (),
    lb_ips: Iterable[str] = (),
    affinity_timeout: int | None = None,
    external_traffic_policy: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": type,
        "ports": [],
        "selector": {"app": name},
    }
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
        spec["clusterIPs"] = [cluster_ip]
    spec["ports"] = [service_port(p) for p in ports]
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if external_traffic_policy is not None:
        spec["externalTrafficPolicy"] = external_traffic_policy
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    lbs = list(lb_ips)
    if lbs:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lbs]}}
    return obj


def endpoint_slice(
    service_name: str,
    endpoints: Iterable[tuple[str, str]],
    ports: Sequence[Port],
    namespace: str = "default",
    slice_name: str | None = None,
) -> dict[str, Any]:
    """An EndpointSlice of ready endpoints, given as (pod address, node name) pairs."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name or f"{service_name}-1",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [addr], "conditions": {"ready": True}, "nodeName": node} for addr, node in endpoints
        ],
        "ports": [{"name": p.name, "port": p.target, "protocol": p.protocol} for p in ports],
    }


def node(name: str, internal_ip: str) -> dict[str, Any]:
    """A Node object as the agents' node table reads it: name and InternalIP."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": internal_ip}]},
    }


def write_atomic(path: Path, objects: Sequence[dict[str, Any]]) -> None:
    """Write a multi-document YAML file so that a reader never sees it half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A dot-prefixed tmp name with a non-YAML suffix, so the file source never picks it up.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump_all(list(objects), f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
