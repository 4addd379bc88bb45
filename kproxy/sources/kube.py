"""The Kubernetes source: kopf watches the cluster, a paginated LIST proves the view is whole.

kopf is the watch layer, used for what an on.event-only node agent needs and nothing more: each
resource is one kopf watch stream (`infinite_watch`: paginated LIST, WATCH from the list's
resourceVersion, reconnects, 410 Gone, bookmarks, kopf's retries of API errors) with kopf's
credentials vault and re-login activity. kopf's reactor (per-object queues and worker tasks, cause
detection, handler invocation, progress and diff-base storage, observers, peering, event posting) is
not run: issue 13 measured it at most of the agent's CPU per event, for features a proxy never uses.
Nothing is ever written to the objects watched. Events cross from the watch threads to the agent's
loop in batches (one wake-up per burst, `_drain_inbox`).

kopf lacks three things a node proxy needs, and this module adds them:

- Completeness. kopf never says "the initial listing is complete". KubeSource does its own paginated
  LIST of Nodes, ServiceCIDRs, Services and EndpointSlices (plus the settings ConfigMap), feeds the
  store page by page and calls `store.mark_initial_sync_done()` only after the last page.
- Deletions during a gap. After a 410 Gone kopf re-lists and re-delivers every object but never
  reports the ones deleted meanwhile. KubeSource LISTs again whenever kopf re-lists (noticed as a
  second initial-listing event for the same object), after kopf restarts, and periodically; whatever
  it holds that the LIST no longer has (and that is not newer than the LIST) is deleted.
- Supervision and isolation. An ERROR event or a lasting API error (a 403) stops a kopf watch stream.
  So every resource has a stream of its own (`_Watch`), in its own thread and event loop (so its
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
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import aiohttp
import kopf
import yaml

# kopf's watch client (list, watch from the list's resourceVersion, 410 and reconnects, bookmarks,
# its API-error retries) and its login machinery, without its reactor: see _Watch.
from kopf._cogs.clients import auth as _kopf_auth
from kopf._cogs.clients import watching as _kopf_watching
from kopf._cogs.structs import credentials as _kopf_credentials
from kopf._cogs.structs import ephemera as _kopf_ephemera
from kopf._cogs.structs import references as _kopf_references
from kopf._core.engines import activities as _kopf_activities

from kproxy.config import DEFAULT_NAMESPACE, DEFAULT_SETTINGS_CONFIGMAP
from kproxy.heap import trim_heap
from kproxy.model import ZONE_LABEL, NodeInfo
from kproxy.store import SourceSink

log = logging.getLogger("kproxy.sources.kube")

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"

NODES = ("", "v1", "nodes")
SERVICES = ("", "v1", "services")
SLICES = ("discovery.k8s.io", "v1", "endpointslices")
SERVICE_CIDRS = ("networking.k8s.io", "v1", "servicecidrs")
CONFIGMAPS = ("", "v1", "configmaps")
DAEMONSETS = ("apps", "v1", "daemonsets")
CLUSTER_SCOPED = frozenset({"Node", "ServiceCIDR"})
# kopf's retries of a failing request before it gives up and the watch is down (about 6.5 s)
WATCH_ERROR_BACKOFFS = (0.5, 1, 2, 3)
# watch events applied per turn of the agent's loop
DRAIN_BATCH = 512


class SourceMetrics(Protocol):
    """The counters KubeSource reports (kproxy.observe.metrics.Metrics implements them)."""

    def object_skipped(self, kind: str, reason: str) -> None: ...
    def source_event(self, kind: str, event_type: str) -> None: ...
    def source_relist(self, reason: str) -> None: ...
    def source_restart(self, resource: str) -> None: ...
    def watch_status(self, resource: str, up: bool) -> None: ...


@dataclasses.dataclass
class KubeSourceConfig:
    """Settings of the Kubernetes source (the agent maps its CLI flags onto these).

    settings_configmap: "namespace/name" of the agent's ConfigMap with runtime settings.
    resync_interval: seconds between full LISTs that catch deletions kopf missed (0 disables).
    """

    node_name: str
    kubeconfig: str | None = None
    api_server: str | None = None
    settings_configmap: str | None = DEFAULT_SETTINGS_CONFIGMAP  # the chart's
    # "namespace/name" of the agent's own DaemonSet, watched by name: its deletion means an uninstall
    daemonset: str | None = None
    resync_interval: float = 300.0
    list_chunk_size: int = 500
    # kopf keeps a worker per object, holding the object's last body, until it idled this long: during
    # its listing of every object, 0.5 s kept thousands of bodies alive at once, and the peak stayed
    # as RSS (~10 MB more at 10,000 Services). Later events cost a new worker task each: microseconds.
    kopf_idle_timeout: float = 0.05
    kopf_restart_delay: float = 1.0

    @classmethod
    def from_any(cls, cfg: Any) -> KubeSourceConfig:
        """Build from an agent config object that has (some of) these attribute names."""
        if isinstance(cfg, KubeSourceConfig):
            return cfg
        names = [f.name for f in dataclasses.fields(cls)]
        aliases = {
            "api_server": ("k8s_api_server", "api_server"),
            "settings_configmap": ("configmap", "settings_configmap"),
        }
        values: dict[str, Any] = {}
        for name in names:
            for attr in aliases.get(name, (name,)):
                if getattr(cfg, attr, None) is not None:
                    values[name] = getattr(cfg, attr)
                    break
        if "node_name" not in values:
            raise ValueError("the Kubernetes source needs the node name: pass --node-name or set NODE_NAME")
        return cls(**values)


# ---- credentials ----


class CredentialsError(RuntimeError):
    pass


def resolve_connection(
    kubeconfig: str | None = None,
    api_server: str | None = None,
    env: Mapping[str, str] | None = None,
    sa_dir: str = SA_DIR,
) -> kopf.ConnectionInfo:
    """Find how to reach the API server, in the order a node agent without kube-proxy needs.

    1. --kubeconfig FILE (its server replaced by --k8s-api-server when both are given);
    2. --k8s-api-server URL, with the service account's token and CA when running in a pod;
    3. KUBECONFIG;
    4. in-cluster: KUBERNETES_SERVICE_HOST/_PORT and the service account. A kube-proxy replacement
       cannot use the `kubernetes` ClusterIP kubelet puts there by default, so the DaemonSet sets
       them to the real API server address;
    5. ~/.kube/config.
    """
    env = os.environ if env is None else env
    if kubeconfig:
        return _override_server(_from_kubeconfig(kubeconfig), api_server)
    if api_server:
        return _in_cluster(_normalize_server(api_server), sa_dir, required=False)
    if env.get("KUBECONFIG"):
        return _from_kubeconfig(env["KUBECONFIG"])
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if host and os.path.exists(os.path.join(sa_dir, "token")):
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address
        return _in_cluster(f"https://{host}:{port or '443'}", sa_dir, required=True)
    home_config = os.path.expanduser("~/.kube/config")
    if os.path.exists(home_config):
        return _from_kubeconfig(home_config)
    raise CredentialsError(
        "no Kubernetes credentials: pass --kubeconfig FILE or --k8s-api-server URL, set KUBECONFIG, "
        "or run in a pod with a service account and KUBERNETES_SERVICE_HOST/_PORT naming the API server"
    )


def _normalize_server(server: str) -> str:
    return server if "://" in server else f"https://{server}"


def _override_server(info: kopf.ConnectionInfo, api_server: str | None) -> kopf.ConnectionInfo:
    return info if not api_server else dataclasses.replace(info, server=_normalize_server(api_server))


def _in_cluster(server: str, sa_dir: str, required: bool) -> kopf.ConnectionInfo:
    token_path, ca_path = os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt")
    token = None
    if os.path.exists(token_path):
        with open(token_path, encoding="utf-8") as f:
            token = f.read().strip() or None
    elif required:
        raise CredentialsError(f"service account token {token_path} is missing")
    namespace = None
    ns_path = os.path.join(sa_dir, "namespace")
    if os.path.exists(ns_path):
        with open(ns_path, encoding="utf-8") as f:
            namespace = f.read().strip() or None
    return kopf.ConnectionInfo(
        server=server,
        ca_path=ca_path if os.path.exists(ca_path) else None,
        token=token,
        default_namespace=namespace,
    )


def _from_kubeconfig(paths: str) -> kopf.ConnectionInfo:
    contexts: dict[str, Any] = {}
    clusters: dict[str, Any] = {}
    users: dict[str, Any] = {}
    current: str | None = None
    for path in [os.path.expanduser(p.strip()) for p in paths.split(os.pathsep) if p.strip()]:
        try:
            with open(path, encoding="utf-8") as f:
                config = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise CredentialsError(f"cannot read kubeconfig {path}: {e}") from e
        base = os.path.dirname(os.path.abspath(path))
        current = current or config.get("current-context")
        for item in config.get("contexts") or []:
            contexts.setdefault(item["name"], item.get("context") or {})
        for item in config.get("clusters") or []:
            cluster = dict(item.get("cluster") or {})
            if cluster.get("certificate-authority"):
                cluster["certificate-authority"] = os.path.join(base, cluster["certificate-authority"])
            clusters.setdefault(item["name"], cluster)
        for item in config.get("users") or []:
            user = dict(item.get("user") or {})
            for key in ("client-certificate", "client-key", "tokenFile"):
                if user.get(key):
                    user[key] = os.path.join(base, user[key])
            users.setdefault(item["name"], user)
    if not current or current not in contexts:
        raise CredentialsError(f"kubeconfig {paths}: current-context {current!r} is not defined")
    context = contexts[current]
    cluster = clusters.get(context.get("cluster"), {})
    user = users.get(context.get("user"), {})
    if not cluster.get("server"):
        raise CredentialsError(f"kubeconfig {paths}: cluster {context.get('cluster')!r} has no server")
    token = user.get("token")
    if not token and user.get("tokenFile"):
        with open(user["tokenFile"], encoding="utf-8") as f:
            token = f.read().strip()
    return kopf.ConnectionInfo(
        server=cluster["server"],
        ca_path=cluster.get("certificate-authority"),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=cluster.get("insecure-skip-tls-verify"),
        certificate_path=user.get("client-certificate"),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=user.get("client-key"),
        private_key_data=user.get("client-key-data"),
        username=user.get("username"),
        password=user.get("password"),
        token=token,
        default_namespace=context.get("namespace"),
    )


def http_session(info: kopf.ConnectionInfo, user_agent: str = "kproxy") -> aiohttp.ClientSession:
    """An aiohttp session with INFO's credentials (the source's calls, and the CLI's: `kproxy dsr`)."""
    headers = dict(info.as_http_headers())
    if info.username and info.password and "Authorization" not in headers:
        raw = f"{info.username}:{info.password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
    headers["User-Agent"] = user_agent
    ssl_context = info.as_ssl_context() if info.server.startswith("https") else None
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context or False), headers=headers)


# ---- kopf tuning ----


def kopf_settings(
    cfg: KubeSourceConfig, field_selector: str | None = None, resource: str = "configmaps"
) -> kopf.OperatorSettings:
    """Settings of one watch's kopf operator; `field_selector` narrows its LIST and WATCH of RESOURCE
    (a plural)."""
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False
    settings.watching.chunk_size = cfg.list_chunk_size
    # Retry API errors quickly (a proxy wants to be back soon after an outage), then give up: the
    # watch's supervisor marks it down (a metric, /readyz for the watches the view needs) and
    # restarts it with a growing delay. kopf's own retries would hide a lasting 403 for long.
    settings.networking.error_backoffs = WATCH_ERROR_BACKOFFS
    settings.networking.connect_timeout = 5
    # The agent decides when to exit; kopf must never SIGKILL it.
    settings.process.ultimate_exiting_timeout = None
    # Only the built-in resources below are watched: no CRD or namespace scanning (and no RBAC for it).
    settings.scanning.disabled = True
    if field_selector:
        settings.watching.field_selectors[resource] = field_selector
    return settings


def _quiet_kopf() -> None:
    logging.getLogger("kopf").setLevel(logging.WARNING)
    # kopf warns that it ignores OS signals outside the main thread: that is what we want.
    logging.getLogger("kopf._core.reactor.running").setLevel(logging.ERROR)


# ---- one watch: a kopf watch stream of its own ----
@dataclasses.dataclass
class WatchStatus:
    """What `KubeSource.watches` says about one watch (read from the agent's loop)."""

    kind: str
    resource: str  # the plural, as RBAC and the metrics name it
    required: bool  # the Service view needs it: /readyz fails while it is down
    up: bool = False
    error: str | None = None  # why it is down
    since: float = dataclasses.field(default_factory=time.monotonic)  # of the last change of `up`
    runs: int = 0
    failures: int = 0
    # it delivered events since the last full LIST that its restart asked for: a restart may have
    # missed deletions, which only our LIST finds (a watch failing again and again asks once)
    listed_since_resync: bool = False


class _Watch:
    """One resource watched by a kopf watch stream of its own, in its own thread and event loop, under
    a supervisor that restarts it (with a growing delay) when it stops. A watch that fails (a 403, a
    resource gone) stops nothing else: each watch is its own stream.

    Up once its LIST succeeded (even an empty one) or an event arrived since it started; down when
    the stream stopped (kopf gave up retrying an API error). Status changes are handed to the
    source's loop (`on_status`).
    """

    def __init__(
        self,
        source: KubeSource,
        kind: str,
        gvr: tuple[str, str, str],
        *,
        required: bool,
        namespace: str | None = None,
        field_selector: str | None = None,
    ) -> None:
        self.source = source
        self.kind = kind
        self.gvr = gvr
        self.namespace = namespace
        self.field_selector = field_selector
        self.status = WatchStatus(kind, gvr[2], required)
        self._stop = threading.Event()
        self._stopper: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self, info: kopf.ConnectionInfo) -> None:
        # A thread of its own stop flag: one still winding down from stop() never sees it cleared.
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._main, args=(info, self._stop), name=f"kproxy-watch-{self.gvr[2]}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ask the operator to stop (returns at once; `join()` waits)."""
        self._stop.set()
        stopper = self._stopper
        if stopper is not None:
            with contextlib.suppress(RuntimeError):  # its loop just closed
                stopper[0].call_soon_threadsafe(stopper[1].cancel)

    def join(self, timeout: float) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        self._thread = None
        return True

    # kopf's thread
    def _main(self, info: kopf.ConnectionInfo, stop: threading.Event) -> None:
        source = self.source
        backoff = source.cfg.kopf_restart_delay
        while not stop.is_set():
            started = time.monotonic()
            source._watch_ran(self)
            try:
                asyncio.run(self._operator(info, stop))
            except BaseException as e:  # noqa: BLE001 - any kopf failure means: restart it
                if stop.is_set():
                    break
                # kopf's API errors carry (message, Status body): the message says it all
                detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
                status = getattr(e, "status", None)
                why = f"{type(e).__name__}{f' (HTTP {status})' if status else ''}: {detail}"
                if isinstance(e, _kopf_credentials.LoginError):  # kopf's words for a refused token
                    why = "HTTP 401 Unauthorized: the API server refused the agent's credentials"
            else:
                if stop.is_set():
                    break
                why = "kopf exited"
            source._watch_down(self, why)
            backoff = (
                source.cfg.kopf_restart_delay if time.monotonic() - started > 60 else min(backoff * 2, 30)
            )
            stop.wait(backoff)

    async def _operator(self, info: kopf.ConnectionInfo, stop: threading.Event) -> None:
        """kopf's watch stream of this resource, its events handed to the source as they come.

        An on.event-only node agent needs kopf's watch client, not its reactor: kopf.operator would
        route every event through a per-object queue and worker task, cause detection, a handler
        invocation with some twenty keyword arguments, resource and namespace observers and
        discovery; issue 13 measured that path at most of the agent's CPU per event. So the stream
        comes straight from kopf's `infinite_watch` (paginated LIST, WATCH from the list's
        resourceVersion, 410 Gone and reconnects, bookmarks, kopf's retries of API errors) with
        kopf's credentials vault and re-login activity (`authenticator`, our login handler), and
        nothing else.
        """
        registry = kopf.OperatorRegistry()

        @kopf.on.login(registry=registry)
        async def login(**_: Any) -> kopf.ConnectionInfo:
            return info

        loop = asyncio.get_running_loop()
        # kopf's failed requests can leave "exception never retrieved" tasks behind: already reported.
        loop.set_exception_handler(lambda _loop, ctx: log.debug("kopf: %s", ctx.get("message")))
        task = asyncio.current_task()
        assert task is not None
        mine = (loop, task)
        if stop is self._stop:  # an older run winding down must not take the newest one's place
            self._stopper = mine
        if stop.is_set():
            return
        settings = kopf_settings(self.source.cfg, self.field_selector, self.gvr[2])
        vault = _kopf_credentials.Vault()
        _kopf_auth.vault_var.set(vault)
        authenticator = asyncio.create_task(
            _kopf_activities.authenticator(
                registry=registry, settings=settings, indices={}, vault=vault,
                memo=_kopf_ephemera.AnyMemo(_kopf_ephemera.Memo()),
            ),
            name=f"kopf login for {self.gvr[2]}",
        )  # fmt: skip
        # requests wait for credentials while the vault is empty: should the login task ever fail,
        # the stream must fail with it (and be restarted), not wait forever
        authenticator.add_done_callback(lambda t: t.cancelled() or t.exception() is None or task.cancel())
        group, version, plural = self.gvr
        resource = _kopf_references.Resource(
            group, version, plural, kind=self.kind, namespaced=self.kind not in CLUSTER_SCOPED,
            verbs=frozenset({"list", "watch"}),
        )  # fmt: skip
        post, listed = self.source._post_threadsafe, self.source._watch_up_threadsafe
        kind = self.kind
        try:
            async for event in _kopf_watching.infinite_watch(
                settings=settings, resource=resource,
                namespace=_kopf_references.NamespaceName(self.namespace) if self.namespace else None,
            ):  # fmt: skip
                if event is _kopf_watching.Bookmark.LISTED:
                    listed(self)  # its LIST succeeded (even an empty one): the watch is up
                elif isinstance(event, dict) and event.get("type") != "BOOKMARK":
                    post(kind, cast(dict[str, Any], event), self)
        finally:
            authenticator.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await authenticator
            with contextlib.suppress(Exception):
                await vault.close()
            if self._stopper is mine:
                self._stopper = None


# ---- the source ----


def _rv(raw: Mapping[str, Any]) -> int | None:
    meta = raw.get("metadata")
    value = meta.get("resourceVersion") if isinstance(meta, dict) else None
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # opaque versions: always apply


def _ns_name(raw: Mapping[str, Any]) -> tuple[str, str] | None:
    meta = raw.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return None
    ns = meta.get("namespace")
    return (ns if isinstance(ns, str) and ns else "default", meta["name"])


def _display(kind: str, ns: str, name: str) -> str:
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


def node_eligible(raw: Mapping[str, Any]) -> bool:
    """kube-proxy's /healthz rule: a node being deleted or drained by the autoscaler is not eligible."""
    if (raw.get("metadata") or {}).get("deletionTimestamp"):
        return False
    taints = (raw.get("spec") or {}).get("taints") or []
    return not any(isinstance(t, dict) and t.get("key") == TO_BE_DELETED_TAINT for t in taints)


# a watch event queued for the agent's loop: kind, event type (None: listed), object, its watch, received
_Queued = tuple[str, "str | None", Any, "_Watch | None", float]


class KubeSource:
    """Feeds the store from the Kubernetes API. `await run()` until cancelled (or `await stop()`).

    store: the ClusterStore, written through kproxy.store.SourceSink (the contract the file source
        uses too), only ever called from the loop that runs `run()`.
    config: a KubeSourceConfig or an agent config with the same attribute names.
    on_settings: called with the settings ConfigMap's `data` (an empty dict when it is deleted)
        whenever it changes, e.g. {"dsr-mode": "ipip"}.
    on_node_eligible: called with False when this Node is being deleted or tainted
        ToBeDeletedByClusterAutoscaler (kube-proxy then fails /healthz), True otherwise.
    on_watch_status: called with a WatchStatus whenever a watch goes up or down (the agent fails
        readiness (/readyz) while a watch the Service view needs is down).
    metrics: optional SourceMetrics.
    connection: explicit credentials (tests); otherwise resolve_connection(config).
    kopf_gate: when given, kopf starts only once it is set (the agent sets it after its first full
        sync): kopf's own listing of every object then does not overlap the first sync, which keeps
        the peak memory, and with it the RSS that stays afterwards, lower.
    """

    def __init__(
        self,
        store: SourceSink,
        config: Any,
        *,
        on_settings: Callable[[dict[str, str]], None] | None = None,
        on_node_eligible: Callable[[bool], None] | None = None,
        on_watch_status: Callable[[WatchStatus], None] | None = None,
        metrics: SourceMetrics | None = None,
        connection: kopf.ConnectionInfo | None = None,
        kopf_gate: asyncio.Event | None = None,
    ) -> None:
        self.store = store
        self.cfg = KubeSourceConfig.from_any(config)
        self.on_settings = on_settings
        self.on_node_eligible = on_node_eligible
        self.on_watch_status = on_watch_status
        self.metrics = metrics
        self._connection = connection
        self.kopf_gate = kopf_gate
        cm = self.cfg.settings_configmap
        self._cm_ns, _, self._cm_name = cm.partition("/") if cm else ("", "", "")
        if cm and not self._cm_name:
            self._cm_ns, self._cm_name = DEFAULT_NAMESPACE, cm
        # resourceVersion last applied per (kind, namespace, name); None for opaque versions.
        self._seen: dict[tuple[str, str, str], int | None] = {}
        # Deletions seen by the watch, so that an older LIST page cannot resurrect the object.
        self._tombstones: dict[tuple[str, str, str], int] = {}
        self._last_kopf_listing = 0.0  # monotonic time of the last listing event from kopf
        self._settings: dict[str, str] | None = None
        self._node_eligible: bool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resync_wanted = asyncio.Event()
        self._resync_reasons: set[str] = set()
        # watch events from the watch threads, applied in the agent's loop (_drain_inbox)
        self._inbox: collections.deque[_Queued] = collections.deque()
        self._inbox_scheduled = False
        # One kopf operator per resource, each in its own thread (see _Watch); started after the
        # first LIST. Only the agent's own ConfigMap is watched, in its namespace, by name: what the
        # chart's Role grants. ServiceCIDRs only while our LIST can read them.
        self._watches: dict[str, _Watch] = {
            "Node": _Watch(self, "Node", NODES, required=True),
            "Service": _Watch(self, "Service", SERVICES, required=True),
            "EndpointSlice": _Watch(self, "EndpointSlice", SLICES, required=True),
            "ServiceCIDR": _Watch(self, "ServiceCIDR", SERVICE_CIDRS, required=False),
        }
        if self._cm_name:
            self._watches["ConfigMap"] = _Watch(
                self, "ConfigMap", CONFIGMAPS, required=False, namespace=self._cm_ns,
                field_selector=f"metadata.name={self._cm_name}",
            )  # fmt: skip
        # The agent's DaemonSet, watched by name like the ConfigMap: `helm uninstall` deletes it, then
        # the Role that lets us read it, and only then do the pods get SIGTERM. An open watch still
        # sees the deletion (authorization is checked when a watch starts); a GET at SIGTERM may not.
        self.daemonset_deleted: bool | None = None  # None: not seen yet
        if self.cfg.daemonset:
            ds_ns, _, ds_name = self.cfg.daemonset.partition("/")
            self._watches["DaemonSet"] = _Watch(
                self, "DaemonSet", DAEMONSETS, required=False, namespace=ds_ns,
                field_selector=f"metadata.name={ds_name}",
            )  # fmt: skip
        self._watches_started = False
        self._configmap_problem: str | None = None
        # Whether the API server lets us list ServiceCIDRs (None: not tried yet); why not, if not.
        self.service_cidrs_available: bool | None = None
        self._service_cidrs_problem: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.initial_sync_done = asyncio.Event()
        self.lists_done = 0
        self.last_list_time: float | None = None

    # ---- lifecycle ----
    async def start(self) -> None:
        """Start in the background; returns at once. Wait for `initial_sync_done` if needed."""
        self._task = asyncio.create_task(self.run(), name="kube source")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        _quiet_kopf()
        self._loop = asyncio.get_running_loop()
        self._inbox_scheduled = False  # a drain scheduled on an earlier run's loop never comes
        info = self._connection or resolve_connection(self.cfg.kubeconfig, self.cfg.api_server)
        self._connection = info
        log.info("watching Kubernetes at %s as node %s", info.server, self.cfg.node_name)
        try:
            async with http_session(info) as session:
                await self._resync_loop(session, info)
        finally:
            for w in self._watches.values():
                w.stop()
            loop = asyncio.get_running_loop()
            for w in self._watches.values():
                if not await loop.run_in_executor(None, w.join, 30):
                    log.error("the %s watch did not stop within 30 s; leaving its thread", w.gvr[2])
            self._watches_started = False

    async def daemonset_gone(self, ref: str, timeout: float = 5.0) -> bool | None:
        """Whether the DaemonSet REF ("namespace/name") is gone or being deleted (True: an uninstall),
        still there (False: a restart, an upgrade, a drain), or None when the API server did not say."""
        if ref == self.cfg.daemonset and self.daemonset_deleted:
            return True  # the watch saw it go (our RBAC may be gone with it by now)
        ns, _, name = ref.partition("/")
        info = self._connection or resolve_connection(self.cfg.kubeconfig, self.cfg.api_server)
        url = f"{info.server.rstrip('/')}/apis/apps/v1/namespaces/{ns}/daemonsets/{name}"
        try:
            async with (
                http_session(info) as session,
                session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp,
            ):
                if resp.status == 404:
                    return True
                if resp.status >= 400:
                    log.warning("GET DaemonSet %s: HTTP %d %s", ref, resp.status, (await resp.text())[:200])
                    return None
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("GET DaemonSet %s failed: %s", ref, e)
            return None
        return bool((body.get("metadata") or {}).get("deletionTimestamp"))

    # ---- watches ----
    @property
    def watches(self) -> list[WatchStatus]:
        """Every watch's status, ServiceCIDRs included (down while they cannot be listed)."""
        return [w.status for w in self._watches.values()]

    def watch_status(self, resource: str) -> WatchStatus:
        """The status of the watch of RESOURCE (a plural: "services", "configmaps", ...)."""
        for w in self._watches.values():
            if w.gvr[2] == resource:
                return w.status
        raise KeyError(resource)

    @property
    def kopf_watches_service_cidrs(self) -> bool:
        return self._watches["ServiceCIDR"].running

    def stale_watches(self) -> list[str]:
        """The watches the Service view needs that are down: they failed and are not back yet."""
        return [
            w.gvr[2]
            for w in self._watches.values()
            if w.status.required and not w.status.up and w.status.error is not None
        ]

    def _start_watches(self, info: kopf.ConnectionInfo) -> None:
        for kind, w in self._watches.items():
            if kind != "ServiceCIDR" and not w.running:
                w.start(info)
        self._watches_started = True
        self._sync_service_cidr_watch()

    def _watch_ran(self, w: _Watch) -> None:
        """A watch thread: a run of W's stream starts."""
        self._enqueue(("", "ran", None, w, 0.0))

    def _watch_started(self, w: _Watch) -> None:
        st = w.status
        st.runs += 1
        if st.runs > 1:
            if self.metrics is not None:
                self.metrics.source_restart(w.gvr[2])
            # A restarted watch re-lists, but deletions during its absence need our own LIST: once per
            # outage, not at every restart of a watch that keeps failing (each LIST reads everything).
            if st.listed_since_resync and w.kind not in ("ConfigMap", "DaemonSet"):
                st.listed_since_resync = False
                self.request_resync("kopf restarted")

    def _watch_down(self, w: _Watch, why: str) -> None:
        """A watch thread: W's stream stopped (after the events it delivered: one queue keeps the order)."""
        self._enqueue(("", "down", why, w, 0.0))

    def _watch_up_threadsafe(self, w: _Watch) -> None:
        """A watch thread: W's LIST succeeded."""
        self._enqueue(("", "up", None, w, 0.0))

    def _set_watch(self, w: _Watch, up: bool, why: str | None) -> None:
        st = w.status
        if up:
            st.listed_since_resync = True
        else:
            st.failures += 1
        if st.up == up and (up or st.error == why):
            return
        was_down = st.runs > 0 and not st.up and st.error is not None
        st.up, st.error, st.since = up, why, time.monotonic()
        what = w.gvr[2] + (f" in namespace {w.namespace}" if w.namespace else "")
        if up:
            if was_down:
                log.info("watch of %s is up again", what)
        else:
            hint = (
                ": the agent's RBAC does not allow it (the Helm chart's ClusterRole and Role grant what it "
                "needs)"
                if why and ("403" in why or "Forbidden" in why)
                else ""
            )
            log.warning(
                "watch of %s is down (%s)%s; %s, restarting it",
                what, why, hint,
                "not ready (/readyz) until it is back" if st.required else "the rest of the view is fine",
            )  # fmt: skip
        if self.metrics is not None:
            self.metrics.watch_status(w.gvr[2], up)
        if self.on_watch_status is not None:
            self.on_watch_status(st)

    def _post_threadsafe(self, kind: str, event: dict[str, Any], w: _Watch | None = None) -> None:
        """A watch thread: queue EVENT for the agent's loop."""
        raw = event.get("object")
        if kind == "Node" and isinstance(raw, dict):
            raw = slim_node(raw, self.cfg.node_name)
        self._enqueue((kind, event.get("type"), raw, w, time.monotonic()))

    def _enqueue(self, item: _Queued) -> None:
        """A watch thread: queue a watch event or a watch's status change for the agent's loop, in the
        order they happened. The loop is woken (a write to its self-pipe, a syscall in each thread)
        only when the queue was empty: a burst crosses in one wake-up."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._inbox.append(item)
        if not self._inbox_scheduled:
            self._inbox_scheduled = True
            try:
                loop.call_soon_threadsafe(self._drain_inbox)
            except RuntimeError:  # the loop closed meanwhile
                self._inbox_scheduled = False

    def _drain_inbox(self) -> None:
        """The agent's loop: apply queued watch events and status changes in order, at most DRAIN_BATCH
        per turn of the loop (a burst of thousands does not hold up the health server). Each event's
        store change is dated when its watch thread received it (kproxy_network_programming_duration_
        seconds). A status item: kind "", etype "ran" / "up" / "down" (raw: why)."""
        self._inbox_scheduled = False  # before draining: an event queued from now on schedules again
        inbox, store = self._inbox, self.store
        try:
            for _ in range(min(len(inbox), DRAIN_BATCH)):
                kind, etype, raw, w, received = inbox.popleft()
                try:
                    if not kind:
                        assert w is not None
                        if etype == "ran":
                            self._watch_started(w)
                        elif w.running:  # not for a watch stopped meanwhile (ServiceCIDRs)
                            self._set_watch(w, etype == "up", raw)
                        continue
                    # an event of a watch that is not (yet) up: it works (a stopped one delivers no more)
                    if w is not None and not (w.status.up and w.status.listed_since_resync) and w.running:
                        self._set_watch(w, True, None)
                    store.change_time = received
                    self._on_event(kind, etype, raw)
                except Exception:  # one bad event must not cost the others
                    log.exception("%s %s not applied", kind or "watch status", etype or "LISTED")
        finally:
            store.change_time = None
        if inbox and not self._inbox_scheduled and self._loop is not None:
            self._inbox_scheduled = True
            self._loop.call_soon(self._drain_inbox)

    def _request_resync_threadsafe(self, reason: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.request_resync, reason)

    # ---- events (agent loop) ----
    def request_resync(self, reason: str) -> None:
        """Ask for a full LIST soon (coalesced)."""
        self._resync_reasons.add(reason)
        self._resync_wanted.set()

    def _on_event(self, kind: str, etype: str | None, raw: Any) -> None:
        if not isinstance(raw, dict):
            return
        ident = _ns_name(raw)
        if ident is None:
            log.warning("%s without metadata.name in a watch event skipped", kind)
            self._count_skipped(kind, "missing_name")
            return
        if self.metrics is not None:
            self.metrics.source_event(kind, etype or "LISTED")
        if kind == "Node" and ident[1] == self.cfg.node_name:
            self._apply_node(raw, deleted=etype == "DELETED")
        if kind == "ConfigMap":
            if ident == (self._cm_ns, self._cm_name):
                self._apply_settings({} if etype == "DELETED" else raw.get("data") or {})
            return
        if kind == "DaemonSet":
            if f"{ident[0]}/{ident[1]}" == self.cfg.daemonset:
                deleted = etype == "DELETED" or bool((raw.get("metadata") or {}).get("deletionTimestamp"))
                if deleted and not self.daemonset_deleted:
                    log.info(
                        "DaemonSet %s is being deleted: the dataplane goes with this agent",
                        self.cfg.daemonset,
                    )
                self.daemonset_deleted = deleted
            return
        key = (kind, ident[0], ident[1])
        if etype is None and self.initial_sync_done.is_set():
            # kopf is (re-)listing: after a 410 or an outage, or its first listing finishing after
            # ours. Its listing never reports what was deleted before its snapshot and after ours
            # (or during the gap): our own LIST, once kopf's listing is over, will.
            self._last_kopf_listing = time.monotonic()
            self.request_resync("kopf re-listed")
        if etype == "DELETED":
            self._apply_delete(key, _rv(raw), quiet=False)
        else:
            self._apply_upsert(key, raw, quiet=not self.initial_sync_done.is_set())

    def _apply_upsert(self, key: tuple[str, str, str], raw: dict[str, Any], quiet: bool) -> bool:
        rv = _rv(raw)
        if rv is not None:
            last = self._seen.get(key)
            if last is not None and last >= rv:
                return False  # already applied (a re-listing, or the LIST raced the watch)
            gone = self._tombstones.get(key)
            if gone is not None and gone >= rv:
                return False  # an older copy of an object the watch saw deleted
        existed = key in self._seen
        self._seen[key] = rv
        self._tombstones.pop(key, None)
        kind, ns, name = key
        detail = ""
        try:
            if kind == "Service":
                self.store.upsert_service(raw, origin="kubernetes")
            elif kind == "Node":
                self.store.upsert_node(raw, origin="kubernetes")
            elif kind == "ServiceCIDR":
                cidrs = service_cidrs_of(raw, name)
                try:
                    self.store.set_service_cidrs(service_cidr_owner(name), cidrs)
                except ValueError as e:
                    raise InvalidServiceCIDR(name, f"spec.cidrs {cidrs}: {e}", "invalid_cidr") from e
                detail = ": " + ", ".join(cidrs)
            else:
                self.store.upsert_slice(raw, origin="kubernetes")
        except InvalidServiceCIDR as e:  # the store only raises: count it as it counts the others
            log.warning("%s", e)
            self.store.skipped[(kind, e.reason)] += 1
            return True
        except ValueError as e:  # kproxy.model.ModelError and friends: the store names the problem
            log.warning("%s", e)
            self._count_skipped(kind, getattr(e, "reason", "invalid"))
            return True
        if not quiet and log.isEnabledFor(logging.DEBUG):  # a line per event costs as much as the event
            log.debug("%s %s%s", _display(kind, ns, name), "updated" if existed else "added", detail)
        return True

    def _apply_delete(self, key: tuple[str, str, str], rv: int | None, quiet: bool) -> None:
        if rv is not None:
            last = self._seen.get(key)
            if last is not None and last > rv:
                return
            self._tombstones[key] = rv
        if key not in self._seen:
            return
        del self._seen[key]
        kind, ns, name = key
        if kind == "Service":
            self.store.delete_service(ns, name)
        elif kind == "Node":
            self.store.delete_node(name)
        elif kind == "ServiceCIDR":
            self.store.delete_service_cidrs(service_cidr_owner(name))
        else:
            self.store.delete_slice(ns, name)
        if not quiet:
            log.debug("%s deleted", _display(kind, ns, name))

    def _apply_node(self, raw: dict[str, Any], deleted: bool) -> None:
        if deleted:
            eligible = False
        else:
            self.store.set_node(node_info(raw))
            eligible = node_eligible(raw)
        if eligible != self._node_eligible:
            self._node_eligible = eligible
            if not eligible:
                log.warning("node %s is being deleted or drained: /healthz will fail", self.cfg.node_name)
            if self.on_node_eligible is not None:
                self.on_node_eligible(eligible)

    def _apply_settings(self, data: dict[str, Any]) -> None:
        settings = {str(k): str(v) for k, v in data.items()}
        if settings == self._settings:
            return
        self._settings = settings
        log.info(
            "runtime settings from ConfigMap %s/%s: %s", self._cm_ns, self._cm_name, settings or "defaults"
        )
        if self.on_settings is not None:
            try:
                self.on_settings(settings)
            except Exception:
                log.exception("applying runtime settings %s failed; keeping the previous ones", settings)

    def _count_skipped(self, kind: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.object_skipped(kind, reason)

    # ---- our own LIST (agent loop) ----
    async def _resync_loop(self, session: aiohttp.ClientSession, info: kopf.ConnectionInfo) -> None:
        reason = "initial"
        while True:
            await self._full_list(session, reason)
            # the LIST's pages, and kopf's listing before it (a re-list waits for kopf's to end), leave
            # freed C heap behind that glibc keeps otherwise
            trim_heap()
            if not self._watches_started and self.kopf_gate is not None and not self.kopf_gate.is_set():
                await self.kopf_gate.wait()
                self.request_resync("kopf started")  # whatever was deleted while kopf was not watching
            if not self._watches_started:
                # The watches start only now: their listings would otherwise compete with ours (and
                # the first sync) for the CPU. Whatever changed in between, their listings deliver;
                # whatever was deleted in between, the LIST that follows their listings removes.
                self._start_watches(info)
            interval = self.cfg.resync_interval if self.cfg.resync_interval > 0 else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resync_wanted.wait(), interval)
            # Let kopf finish its listing (no listing event for a moment) before listing ourselves.
            await asyncio.sleep(0.2)
            while time.monotonic() - self._last_kopf_listing < 0.5:
                await asyncio.sleep(0.2)
            self._resync_wanted.clear()
            reason = ", ".join(sorted(self._resync_reasons)) or "periodic"
            self._resync_reasons.clear()

    async def _full_list(self, session: aiohttp.ClientSession, reason: str) -> None:
        started = time.monotonic()
        backoff = 0.2
        while True:
            try:
                counts = await self._list_once(session)
                break
            except (aiohttp.ClientError, TimeoutError, _ApiError) as e:
                log.warning("listing the cluster (%s) failed: %s; retrying in %.1f s", reason, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self.lists_done += 1
        self.last_list_time = time.time()
        if self.metrics is not None:
            self.metrics.source_relist(reason.split(",")[0])
        added, deleted = counts
        took = time.monotonic() - started
        if not self.initial_sync_done.is_set():
            self.store.mark_initial_sync_done()
            self.initial_sync_done.set()
            log.info(
                "initial listing complete in %.2f s: %d Services, %d EndpointSlices, %s",
                took,
                sum(1 for k in self._seen if k[0] == "Service"),
                sum(1 for k in self._seen if k[0] == "EndpointSlice"),
                f"{sum(1 for k in self._seen if k[0] == 'ServiceCIDR')} ServiceCIDRs"
                if self.service_cidrs_available
                else "no ServiceCIDRs (see above)",
            )
        elif added or deleted:
            log.info(
                "full listing (%s) in %.2f s found %d changed and %d deleted objects",
                reason,
                took,
                added,
                deleted,
            )
        else:
            log.debug("full listing (%s) in %.2f s: no difference", reason, took)

    async def _list_once(self, session: aiohttp.ClientSession) -> tuple[int, int]:
        if self._cm_name:
            try:
                cm = await self._get(session, f"/api/v1/namespaces/{self._cm_ns}/configmaps/{self._cm_name}")
            except _ApiError as e:
                # The settings are optional: the rest of the view must not wait for them.
                problem = f"reading the settings ConfigMap {self._cm_ns}/{self._cm_name} failed: {e}"
                if problem != self._configmap_problem:
                    log.warning(
                        "%s; keeping the current settings, trying again at every full listing", problem
                    )
                self._configmap_problem = problem
            else:
                self._configmap_problem = None
                self._apply_settings((cm or {}).get("data") or {})
        changed = deleted = 0
        quiet = not self.initial_sync_done.is_set()
        for kind, gvr in (
            ("Node", NODES),
            ("ServiceCIDR", SERVICE_CIDRS),
            ("Service", SERVICES),
            ("EndpointSlice", SLICES),
        ):
            try:
                kind_changed, kind_deleted = await self._list_kind(session, kind, gvr, quiet)
            except _ApiError as e:
                if kind != "ServiceCIDR" or e.status not in (403, 404):
                    raise
                self._service_cidrs_unavailable(e.status)
                continue
            if kind == "ServiceCIDR":
                self._service_cidrs_listed()
            changed += kind_changed
            deleted += kind_deleted
        return changed, deleted

    async def _list_kind(
        self, session: aiohttp.ClientSession, kind: str, gvr: tuple[str, str, str], quiet: bool
    ) -> tuple[int, int]:
        """LIST every object of KIND into the store; delete what we hold that the LIST does not have."""
        group, version, plural = gvr
        base = f"/api/{version}/{plural}" if not group else f"/apis/{group}/{version}/{plural}"
        changed = deleted = 0
        this_node_found = False
        listed: set[tuple[str, str, str]] = set()
        list_rv: int | None = None
        async for items, rv in self._pages(session, base):
            list_rv = rv if list_rv is None else list_rv
            for raw in items:
                ident = _ns_name(raw) if isinstance(raw, dict) else None
                if ident is None:
                    continue
                if kind == "Node":
                    raw = slim_node(raw, self.cfg.node_name)
                    if ident[1] == self.cfg.node_name:
                        this_node_found = True
                        self._apply_node(raw, deleted=False)
                key = (kind, ident[0], ident[1])
                listed.add(key)
                if self._apply_upsert(key, raw, quiet=quiet):
                    changed += 1
            del items  # the page's raw bodies: only the compact model is kept
            await asyncio.sleep(0)  # let watch events in between pages
        if kind == "Node" and not this_node_found:
            log.warning(
                "node %s not found in the API: NodePorts and local endpoints wait for it",
                self.cfg.node_name,
            )
        for key, seen_rv in list(self._seen.items()):
            if key[0] != kind or key in listed:
                continue
            if list_rv is not None and seen_rv is not None and seen_rv > list_rv:
                continue  # created after the LIST's snapshot
            self._apply_delete(key, list_rv, quiet=quiet)
            deleted += 1
        for key, gone_rv in list(self._tombstones.items()):
            if key[0] == kind and list_rv is not None and gone_rv <= list_rv:
                del self._tombstones[key]
        return changed, deleted

    def _service_cidrs_unavailable(self, status: int | None) -> None:
        """ServiceCIDRs cannot be listed: say so once, keep what we know, go on with the rest."""
        if status == 404:
            problem = (
                "this API server does not serve ServiceCIDRs (networking.k8s.io/v1 servicecidrs, HTTP 404: "
                "Kubernetes before 1.33, or the API is disabled)"
            )
        else:
            problem = (
                "listing ServiceCIDRs (networking.k8s.io/v1 servicecidrs) is forbidden (HTTP 403): give the "
                "agent's ClusterRole list and watch on them (the Helm chart's does)"
            )
        known = sum(1 for k in self._seen if k[0] == "ServiceCIDR")
        if problem != self._service_cidrs_problem:
            log.warning(
                "%s; going on %s, and trying again at every full listing",
                problem,
                f"with the service CIDRs of the {known} ServiceCIDRs listed before"
                if known
                else "without the cluster's service CIDRs",
            )
        else:
            log.debug("ServiceCIDRs still unavailable: %s", problem)
        self._service_cidrs_problem = problem
        self.service_cidrs_available = False
        self._sync_service_cidr_watch()

    def _service_cidrs_listed(self) -> None:
        if self._service_cidrs_problem is not None:
            log.info("ServiceCIDRs can be listed now: watching them from now on")
        self._service_cidrs_problem = None
        self.service_cidrs_available = True
        self._sync_service_cidr_watch()

    def _sync_service_cidr_watch(self) -> None:
        """Watch ServiceCIDRs while our LIST can read them; a forbidden watch would only fail."""
        w = self._watches["ServiceCIDR"]
        if not self._watches_started or self._connection is None:
            return
        want = self.service_cidrs_available is True
        if want and not w.running:
            if w.status.runs:
                log.info("watching ServiceCIDRs again")
            w.start(self._connection)
        elif not want and w.running:
            log.info("no longer watching ServiceCIDRs")
            w.stop()
            self._set_watch(w, False, self._service_cidrs_problem or "not listable")

    async def _get(self, session: aiohttp.ClientSession, path: str) -> dict[str, Any] | None:
        assert self._connection is not None
        url = self._connection.server.rstrip("/") + path
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status == 404:
                return None
            if resp.status >= 400:
                raise _ApiError(f"GET {path}: HTTP {resp.status} {(await resp.text())[:200]}")
            body: dict[str, Any] = await resp.json()
            return body

    async def _pages(self, session: aiohttp.ClientSession, path: str) -> Any:
        """Yield (items, list resourceVersion) per page; a 410 on `continue` restarts the list."""
        token = ""
        while True:
            query = f"?limit={self.cfg.list_chunk_size}" + (f"&continue={token}" if token else "")
            assert self._connection is not None
            url = self._connection.server.rstrip("/") + path + query
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=120)) as resp:
                if resp.status == 410 and token:
                    raise _ApiError(f"LIST {path}: continue token expired (410), listing again")
                if resp.status >= 400:
                    text = (await resp.text())[:200]
                    raise _ApiError(f"LIST {path}: HTTP {resp.status} {text}", status=resp.status)
                body = await resp.json()
            meta = body.get("metadata") or {}
            try:
                rv: int | None = int(meta.get("resourceVersion"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                rv = None
            yield body.get("items") or [], rv
            token = meta.get("continue") or ""
            if not token:
                return


class _ApiError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, when the API server answered
