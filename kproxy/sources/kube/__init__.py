"""The Kubernetes source: kopf watches the cluster, a paginated LIST proves the view is whole.

kopf is the watch layer, used for what an on.event-only node agent needs and nothing more: each
resource is one kopf watch stream (`infinite_watch`: paginated LIST, WATCH from the list's
resourceVersion, reconnects, 410 Gone, bookmarks, kopf's retries of API errors) with kopf's
credentials vault and re-login activity. kopf's reactor (per-object queues and worker tasks, cause
detection, handler invocation, progress and diff-base storage, observers, peering, event posting) is
not run: issue 13 measured it at most of the agent's CPU per event, for features a proxy never uses.
Nothing is ever written to the objects watched. Events cross from the watch threads to the agent's
loop in batches (one wake-up per burst, `inbox.Inbox`).

kopf lacks three things a node proxy needs, and this module adds them:

- Completeness. kopf never says "the initial listing is complete". KubeSource does its own paginated
  LIST of Nodes, ServiceCIDRs, Services and EndpointSlices (plus the settings ConfigMap), feeds the
  store page by page and calls `store.mark_initial_sync_done()` only after the last page.
- Deletions during a gap. After a 410 Gone kopf re-lists and re-delivers every object but never
  reports the ones deleted meanwhile. KubeSource LISTs again whenever kopf re-lists (noticed as a
  second initial-listing event for the same object), after kopf restarts, and periodically; whatever
  it holds that the LIST no longer has (and that is not newer than the LIST) is deleted.
- Supervision and isolation. An ERROR event or a lasting API error (a 403) stops a kopf watch stream.
  So every resource has a stream of its own (`watch.Watch`), in its own thread and event loop (so its
  shutdown, which cancels every task of its loop, never touches the agent),
  under a supervisor that restarts it: one failing watch stops no other. Each watch asks only for
  what the chart's RBAC grants: Services, EndpointSlices, Nodes and ServiceCIDRs cluster-wide, the
  settings ConfigMap in its namespace by name. A watch that is down is logged, shown by the metric
  kproxy_source_watch_up{resource}, and, for the three the Service view needs, fails readiness (/readyz)
  (`on_watch_status`, `stale_watches()`). The store and the maps are left alone meanwhile: the
  dataplane keeps serving the last known state.

Nodes: this node's addresses and labels drive `store.set_node`; every node's name, InternalIP and
zone go to the store's node table (`store.upsert_node`/`delete_node`, for the node address of remote
backends). Node bodies are large (images, conditions): they are cut down to those fields in kopf's
thread, before they cross to the agent's loop, and only the cut-down copy is ever kept.

ServiceCIDRs (networking.k8s.io/v1, GA in Kubernetes 1.33) give the cluster's service address ranges
(`store.set_service_cidrs("ServiceCIDR/<name>", spec.cidrs)`). An API server that does not serve them
(404: before 1.33, or the API disabled) or an agent not allowed to list them (403) is no reason to stop:
one warning, the last known ranges stay, and every later full LIST tries again. Their watch runs only
while our LIST can read them (started and stopped as that changes). The settings ConfigMap is optional
in the same way: when it cannot be read, the current settings stay.

Every object carries a resourceVersion; KubeSource keeps the last one applied per object and ignores
anything not newer, so the LIST and the watch can race freely and re-listings cost no store work and
no log line. The store is only ever touched from the agent's loop.

The package: `credentials` (how to reach the API server), `objects` (the resources and what is read
of their objects), `listing` (our own LIST), `watch` (the kopf glue: watch streams and their
supervision), `inbox` (from the watch threads to the agent's loop), `view` (the objects held, applied
to the store), `source` (KubeSource, tying them together), `config` (KubeSourceConfig).
"""

from kproxy.sources.kube.config import KubeSourceConfig, SourceMetrics
from kproxy.sources.kube.credentials import SA_DIR, CredentialsError, http_session, resolve_connection
from kproxy.sources.kube.inbox import DRAIN_BATCH
from kproxy.sources.kube.objects import (
    CLUSTER_SCOPED,
    CONFIGMAPS,
    DAEMONSETS,
    NODES,
    SERVICE_CIDRS,
    SERVICES,
    SLICES,
    InvalidServiceCIDR,
    node_info,
    service_cidr_owner,
    service_cidrs_of,
    slim_node,
)
from kproxy.sources.kube.source import KubeSource
from kproxy.sources.kube.watch import WATCH_ERROR_BACKOFFS, WatchStatus, kopf_settings

__all__ = [
    "CLUSTER_SCOPED",
    "CONFIGMAPS",
    "DAEMONSETS",
    "DRAIN_BATCH",
    "NODES",
    "SA_DIR",
    "SERVICES",
    "SERVICE_CIDRS",
    "SLICES",
    "WATCH_ERROR_BACKOFFS",
    "CredentialsError",
    "InvalidServiceCIDR",
    "KubeSource",
    "KubeSourceConfig",
    "SourceMetrics",
    "WatchStatus",
    "http_session",
    "kopf_settings",
    "node_info",
    "resolve_connection",
    "service_cidr_owner",
    "service_cidrs_of",
    "slim_node",
]
