"""Builders of raw Kubernetes objects for unit tests (dicts as the API server or a manifest gives them)."""

from __future__ import annotations

from typing import Any

from kproxy.model import EndpointSlice, NodeInfo, Service, parse_endpoint_slice, parse_service

NODE = NodeInfo(name="node-a", addresses=("192.168.1.10",), zone="zone-a")


def svc_raw(
    name: str = "web",
    namespace: str = "default",
    *,
    type: str = "ClusterIP",
    cluster_ip: str | None = "10.96.0.10",
    ports: list[dict[str, Any]] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    lb_ips: list[str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    s: dict[str, Any] = {"type": type, **spec}
    if cluster_ip is not None:
        s["clusterIP"] = cluster_ip
        s.setdefault("clusterIPs", [cluster_ip])
    s["ports"] = ports if ports is not None else [{"name": "http", "port": 80, "targetPort": "http"}]
    raw: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": s,
    }
    if annotations:
        raw["metadata"]["annotations"] = annotations
    if lb_ips is not None:
        raw["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return raw


def ep(
    address: str,
    node: str | None = "node-b",
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    zone: str | None = None,
    hints: list[str] | None = None,
) -> dict[str, Any]:
    cond: dict[str, Any] = {}
    if ready is not None:
        cond["ready"] = ready
    if serving is not None:
        cond["serving"] = serving
    if terminating is not None:
        cond["terminating"] = terminating
    e: dict[str, Any] = {"addresses": [address], "conditions": cond}
    if node is not None:
        e["nodeName"] = node
    if zone is not None:
        e["zone"] = zone
    if hints is not None:
        e["hints"] = {"forZones": [{"name": z} for z in hints]}
    return e


def slice_raw(
    service: str = "web",
    name: str | None = None,
    namespace: str = "default",
    *,
    endpoints: list[dict[str, Any]] | None = None,
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service}-abc",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": address_type,
        "endpoints": endpoints if endpoints is not None else [ep("10.0.0.1"), ep("10.0.0.2")],
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def svc(**kw: Any) -> Service:
    return parse_service(svc_raw(**kw))


def es(**kw: Any) -> EndpointSlice:
    return parse_endpoint_slice(slice_raw(**kw))
