"""The cluster's nodes as the datapath and the health server need them.

Every backend entry carries the address of the node running it (kp_be4_val.node_addr and
kp_be6_val.node_addr: the outer destination of DSR's tunnel, IPIP or IPv6-in-IPv6). EndpointSlice
endpoints name their node (nodeName); this table maps the name to an address of each family. Both
sources hand raw Node objects to the store's upsert_node() (the kproxy.store.SourceSink contract),
which reads them with kproxy.store.node_addresses() (the first InternalIP of each family): the
Kubernetes source from a watch on all Nodes, the file source from `kind: Node` manifests in its
directory.

This node's own Node object also decides kube-proxy's nodeEligible (node_eligible(), KEP-3836):
/healthz answers 503 while the Node is being deleted or carries the ToBeDeletedByClusterAutoscaler
taint, so that load balancers drain the node before it goes. The Kubernetes source reports it itself
(KubeSource's on_node_eligible); follow_local_node() does it for a source that only fills the node
table, such as the file source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

# The taint the cluster autoscaler puts on a node it is about to delete (kube-proxy's ToBeDeletedTaint).
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


def node_eligible(raw: Mapping[str, Any]) -> bool:
    """kube-proxy's NodeEligible for a raw Node: False when it has a deletionTimestamp or a taint
    with the key ToBeDeletedByClusterAutoscaler (whatever its effect), True otherwise."""
    meta = raw.get("metadata")
    if isinstance(meta, Mapping) and meta.get("deletionTimestamp"):
        return False
    spec = raw.get("spec")
    taints = spec.get("taints") if isinstance(spec, Mapping) else None
    return not any(isinstance(t, Mapping) and t.get("key") == TO_BE_DELETED_TAINT for t in taints or ())


class LocalNodeWatch:
    """This node's eligibility, from the versions of its Node object a source hands over.

    on_eligible is called with the new value whenever it changes (and with the first one). Without a
    Node object (none yet, or removed) the node is eligible: the file source's Node manifests are
    optional, the node itself is named on the command line.
    """

    def __init__(self, node_name: str, on_eligible: Callable[[bool], None]) -> None:
        self.node_name = node_name
        self.on_eligible = on_eligible
        self.eligible: bool | None = None

    def upserted(self, raw: Any) -> None:
        meta = raw.get("metadata") if isinstance(raw, Mapping) else None
        if isinstance(meta, Mapping) and meta.get("name") == self.node_name:
            self._set(node_eligible(raw))

    def deleted(self, name: str) -> None:
        if name == self.node_name:
            self._set(True)

    def _set(self, eligible: bool) -> None:
        before, self.eligible = self.eligible, eligible
        if eligible == before:
            return
        if not eligible:
            log.warning("node %s is being deleted or drained: /healthz answers 503", self.node_name)
        elif before is not None:
            log.info("node %s is eligible again: /healthz follows the proxy's health", self.node_name)
        self.on_eligible(eligible)


def follow_local_node(store: Any, node_name: str, on_eligible: Callable[[bool], None]) -> LocalNodeWatch:
    """Feed this node's Node objects, as a source hands them to `store`'s node table
    (upsert_node/delete_node), to a LocalNodeWatch reporting to on_eligible; reports the node
    eligible until its Node object says otherwise."""
    watch = LocalNodeWatch(node_name, on_eligible)
    upsert_node, delete_node = store.upsert_node, store.delete_node

    def upsert_and_watch(raw: Any, origin: str | None = None) -> bool:
        taken = bool(upsert_node(raw, origin=origin))
        watch.upserted(raw)
        return taken

    def delete_and_watch(name: str) -> bool:
        existed = bool(delete_node(name))
        watch.deleted(name)
        return existed

    # The store's node table is where every source's Node objects meet: watch them on their way in.
    store.upsert_node = upsert_and_watch
    store.delete_node = delete_and_watch
    watch.deleted(node_name)  # no Node object yet
    return watch
