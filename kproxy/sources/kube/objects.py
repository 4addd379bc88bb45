"""The resources the Kubernetes source reads, and what it reads of their objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kproxy.model import ZONE_LABEL, NodeInfo
from kproxy.sources.nodes import TO_BE_DELETED_TAINT

NODES = ("", "v1", "nodes")
SERVICES = ("", "v1", "services")
SLICES = ("discovery.k8s.io", "v1", "endpointslices")
SERVICE_CIDRS = ("networking.k8s.io", "v1", "servicecidrs")
CONFIGMAPS = ("", "v1", "configmaps")
DAEMONSETS = ("apps", "v1", "daemonsets")
CLUSTER_SCOPED = frozenset({"Node", "ServiceCIDR"})


def resource_version(raw: Mapping[str, Any]) -> int | None:
    meta = raw.get("metadata")
    value = meta.get("resourceVersion") if isinstance(meta, dict) else None
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # opaque versions: always apply


def ns_name(raw: Mapping[str, Any]) -> tuple[str, str] | None:
    meta = raw.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return None
    ns = meta.get("namespace")
    return (ns if isinstance(ns, str) and ns else "default", meta["name"])


def display(kind: str, ns: str, name: str) -> str:
    return f"{kind} {name}" if kind in CLUSTER_SCOPED else f"{kind} {ns}/{name}"


class InvalidServiceCIDR(ValueError):
    """A ServiceCIDR kproxy cannot use; `reason` is the label it is counted under."""

    def __init__(self, name: str, problem: str, reason: str) -> None:
        super().__init__(
            f"ServiceCIDR {name} skipped: {problem}; an earlier valid version of it stays in use"
        )
        self.reason = reason


def service_cidr_owner(name: str) -> str:
    """The owner under which the store keeps the ranges of ServiceCIDR NAME."""
    return f"ServiceCIDR/{name}"


def service_cidrs_of(raw: Mapping[str, Any], name: str) -> list[str]:
    """spec.cidrs of a ServiceCIDR, checked for shape (the store checks each CIDR)."""
    spec = raw.get("spec")
    if not isinstance(spec, dict):
        raise InvalidServiceCIDR(name, "it has no spec", "missing_spec")
    cidrs = spec.get("cidrs")
    if not isinstance(cidrs, list) or not cidrs or not all(isinstance(c, str) for c in cidrs):
        shown = repr(cidrs)[:200]
        raise InvalidServiceCIDR(
            name, f"spec.cidrs must be a list of 1 or 2 CIDRs, not {shown}", "invalid_cidrs"
        )
    return cidrs


def node_info(raw: Mapping[str, Any]) -> NodeInfo:
    meta = raw.get("metadata") or {}
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if isinstance(v, str)}
    addresses = tuple(
        a["address"]
        for a in ((raw.get("status") or {}).get("addresses") or [])
        if isinstance(a, dict) and a.get("type") == "InternalIP" and isinstance(a.get("address"), str)
    )
    return NodeInfo(
        name=meta.get("name", ""),
        addresses=addresses,
        zone=labels.get(ZONE_LABEL),
        labels=tuple(sorted(labels.items())),
    )


def slim_node(raw: Mapping[str, Any], this_node: str) -> dict[str, Any]:
    """What the agent keeps of a Node: name, resourceVersion, InternalIPs and zone; for this node also
    its labels, deletion mark and the autoscaler taint (set_node and /healthz need them)."""

    def mapping(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    meta = mapping(raw.get("metadata"))
    labels = mapping(meta.get("labels"))
    status = mapping(raw.get("status"))
    addresses = [
        {"type": "InternalIP", "address": a["address"]}
        for a in (status.get("addresses") or [])
        if isinstance(a, dict) and a.get("type") == "InternalIP" and isinstance(a.get("address"), str)
    ]
    slim_meta: dict[str, Any] = {"name": meta.get("name"), "resourceVersion": meta.get("resourceVersion")}
    out: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": slim_meta}
    out["status"] = {"addresses": addresses}
    if meta.get("name") == this_node:
        slim_meta["labels"] = dict(labels)
        if meta.get("deletionTimestamp"):
            slim_meta["deletionTimestamp"] = meta["deletionTimestamp"]
        taints = (raw.get("spec") or {}).get("taints") if isinstance(raw.get("spec"), dict) else None
        out["spec"] = {
            "taints": [
                t for t in (taints or []) if isinstance(t, dict) and t.get("key") == TO_BE_DELETED_TAINT
            ]
        }
    elif isinstance(labels.get(ZONE_LABEL), str):
        slim_meta["labels"] = {ZONE_LABEL: labels[ZONE_LABEL]}
    return out
