"""The cluster's nodes as the datapath needs them: node name -> IPv4 InternalIP.

Every backend entry carries the address of the node running it (kp_be4_val.node_addr: the outer
destination of DSR IPIP). EndpointSlice endpoints name their node (nodeName); this table maps the
name to an address. Both sources hand raw Node objects to ClusterStore.upsert_node(), which reads
them with node_address(): the Kubernetes source from a watch on all Nodes, the file source from
`kind: Node` manifests in its directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def node_address(raw: Mapping[str, Any]) -> tuple[str, str | None]:
    """(name, first IPv4 InternalIP or None) of a raw Node object."""
    meta = raw.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError("Node without metadata.name")
    status = raw.get("status") or {}
    for a in (status.get("addresses") or []) if isinstance(status, Mapping) else []:
        if isinstance(a, Mapping) and a.get("type") == "InternalIP":
            addr = a.get("address")
            if isinstance(addr, str) and "." in addr and ":" not in addr:
                return name, addr
    return name, None
