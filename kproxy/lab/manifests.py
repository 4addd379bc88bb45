"""Builders for the Kubernetes objects the lab feeds to the file source, and an atomic writer.

IPv4 by default, exactly as before. Dual stack is opt-in: `service(..., cluster_ip6=...)` makes a
dual-stack Service (RequireDualStack, ipFamilies and clusterIPs of both families), `endpoint_slices`
one EndpointSlice per family as the EndpointSlice controller does, `node(..., internal_ip6=...)` a
Node with InternalIPs of both families, and `dual_stack_objects` all of a Service at once:

    lab.write_manifest("web", mf.dual_stack_objects(
        "web", [mf.Port("http", 80)], "10.96.5.1", "fd00:10:96::5:1",
        [(p.ip, p.ip6, p.node) for p in lab.pods]))
"""

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
    cluster_ip6: str | None = None,
    ip_family_policy: str | None = None,
    ip_families: Sequence[str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Service (with ANNOTATIONS, e.g. kproxy.io/lb-algorithm). With only `cluster_ip` (IPv4) it has
    no family fields, as before. With `cluster_ip6` it is dual-stack: ipFamilyPolicy RequireDualStack
    unless `ip_family_policy` says otherwise, ipFamilies ["IPv4", "IPv6"] unless `ip_families` gives
    another order, clusterIPs in that order and clusterIP the first of them. With `cluster_ip6` and no
    `cluster_ip`: SingleStack IPv6. `external_ips` and `lb_ips` may mix both families."""
    spec: dict[str, Any] = {
        "type": type,
        "ports": [],
        "selector": {"app": name},
    }
    if cluster_ip6 is not None or ip_family_policy is not None or ip_families is not None:
        spec.update(_family_fields(cluster_ip, cluster_ip6, ip_family_policy, ip_families))
    elif cluster_ip:
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
    if annotations:
        obj["metadata"]["annotations"] = dict(annotations)
    lbs = list(lb_ips)
    if lbs:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lbs]}}
    return obj


def _family_fields(
    cluster_ip: str | None,
    cluster_ip6: str | None,
    policy: str | None,
    families: Sequence[str] | None,
) -> dict[str, Any]:
    by_family = {"IPv4": cluster_ip, "IPv6": cluster_ip6}
    for fam, addr in by_family.items():
        if addr and address_type(addr) != fam:
            raise ValueError(f"{addr!r} is not an {fam} address (cluster_ip is IPv4, cluster_ip6 IPv6)")
    fams = list(families) if families is not None else [f for f, a in by_family.items() if a]
    if not fams:
        raise ValueError("a Service with family fields needs cluster_ip6, cluster_ip or ip_families")
    out: dict[str, Any] = {
        "ipFamilyPolicy": policy or ("SingleStack" if len(fams) == 1 else "RequireDualStack"),
        "ipFamilies": fams,
    }
    ips = [a for a in (by_family.get(f) for f in fams) if a]
    if ips:
        out["clusterIP"] = ips[0]
        out["clusterIPs"] = ips
    return out


def address_type(addr: str) -> str:
    """EndpointSlice addressType (and Service ipFamilies entry) of an address: IPv4 or IPv6. Not a
    validation: a test may well hand an invalid address to the agents on purpose."""
    return "IPv6" if ":" in addr else "IPv4"


def endpoint_slice(
    service_name: str,
    endpoints: Iterable[tuple[str, str]],
    ports: Sequence[Port],
    namespace: str = "default",
    slice_name: str | None = None,
    addr_type: str | None = None,
) -> dict[str, Any]:
    """An EndpointSlice of ready endpoints, given as (pod address, node name) pairs. Its addressType is
    `addr_type`, else that of the addresses (all of one family), else IPv4 (an empty slice)."""
    eps = list(endpoints)
    types = {address_type(a) for a, _ in eps}
    if len(types) > 1:
        raise ValueError(f"EndpointSlice of {service_name} mixes address families: use endpoint_slices()")
    if addr_type is not None and types - {addr_type}:
        raise ValueError(
            f"EndpointSlice of {service_name}: addressType {addr_type} with {types.pop()} endpoints"
        )
    kind = addr_type or (types.pop() if types else "IPv4")
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name or f"{service_name}-1",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": kind,
        "endpoints": [
            {"addresses": [addr], "conditions": {"ready": True}, "nodeName": node} for addr, node in eps
        ],
        "ports": [{"name": p.name, "port": p.target, "protocol": p.protocol} for p in ports],
    }


def endpoint_slices(
    service_name: str,
    endpoints: Iterable[tuple[str, str]],
    ports: Sequence[Port],
    namespace: str = "default",
    families: Sequence[str] = ("IPv4", "IPv6"),
) -> list[dict[str, Any]]:
    """One EndpointSlice per family of FAMILIES, as the EndpointSlice controller makes them for a
    dual-stack Service: the IPv4 one named as endpoint_slice() names it (`<service>-1`), the IPv6 one
    `<service>-v6-1`. ENDPOINTS are (address, node) pairs of either family; a family with none gets an
    empty slice (a Service of that family without ready endpoints)."""
    eps = list(endpoints)
    out = []
    for fam in families:
        name = f"{service_name}-1" if fam == "IPv4" else f"{service_name}-v6-1"
        mine = [(a, n) for a, n in eps if address_type(a) == fam]
        out.append(endpoint_slice(service_name, mine, ports, namespace, slice_name=name, addr_type=fam))
    return out


def dual_stack_objects(
    name: str,
    ports: Sequence[Port],
    cluster_ip: str,
    cluster_ip6: str,
    endpoints: Iterable[tuple[str, str, str]],
    namespace: str = "default",
    **service_kw: Any,
) -> list[dict[str, Any]]:
    """A dual-stack Service (see service()) and its two EndpointSlices, from (IPv4 address, IPv6
    address, node name) triples such as `(pod.ip, pod.ip6, pod.node)`."""
    eps = list(endpoints)
    return [
        service(name, ports, cluster_ip, namespace=namespace, cluster_ip6=cluster_ip6, **service_kw),
        *endpoint_slices(
            name, [(a4, n) for a4, _, n in eps] + [(a6, n) for _, a6, n in eps], ports, namespace
        ),
    ]


def node(name: str, internal_ip: str, internal_ip6: str | None = None) -> dict[str, Any]:
    """A Node object as the agents' node table reads it: name and InternalIP (of both families with
    `internal_ip6`, IPv4 first as a dual-stack kubelet reports them)."""
    addresses = [{"type": "InternalIP", "address": internal_ip}]
    if internal_ip6:
        addresses.append({"type": "InternalIP", "address": internal_ip6})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": addresses},
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
