"""The kopf glue: each resource is one kopf watch stream (`Watch`), in a thread and event loop of its
own, under a supervisor that restarts it; `WatchSet` is the source's set of them and their status as
the agent's loop sees it (logs, the metric kproxy_source_watch_up{resource}, readiness)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import kopf

# kopf's watch client (list, watch from the list's resourceVersion, 410 and reconnects, bookmarks,
# its API-error retries) and its login machinery, without its reactor: see Watch.
from kopf._cogs.clients import auth as _kopf_auth
from kopf._cogs.clients import watching as _kopf_watching
from kopf._cogs.structs import credentials as _kopf_credentials
from kopf._cogs.structs import ephemera as _kopf_ephemera
from kopf._cogs.structs import references as _kopf_references
from kopf._core.engines import activities as _kopf_activities

from kproxy.sources.kube.config import KubeSourceConfig, SourceMetrics
from kproxy.sources.kube.inbox import Inbox
from kproxy.sources.kube.objects import (
    CLUSTER_SCOPED,
    CONFIGMAPS,
    DAEMONSETS,
    NODES,
    SERVICE_CIDRS,
    SERVICES,
    SLICES,
    slim_node,
)

log = logging.getLogger("kproxy.sources.kube")

# kopf's retries of a failing request before it gives up and the watch is down (about 6.5 s)
WATCH_ERROR_BACKOFFS = (0.5, 1, 2, 3)


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


def quiet_kopf() -> None:
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


# a watch event queued for the agent's loop: kind, event type (None: listed), object, its watch, received;
# or a status change of the watch: kind "", event type "ran" / "up" / "down" (object: why)
Queued = tuple[str, "str | None", Any, "Watch", float]


class Watch:
    """One resource watched by a kopf watch stream of its own, in its own thread and event loop, under
    a supervisor that restarts it (with a growing delay) when it stops. A watch that fails (a 403, a
    resource gone) stops nothing else: each watch is its own stream.

    Up once its LIST succeeded (even an empty one) or an event arrived since it started; down when
    the stream stopped (kopf gave up retrying an API error). Its events and status changes go to the
    source's loop through INBOX, in the order they happened.
    """

    def __init__(
        self,
        cfg: KubeSourceConfig,
        inbox: Inbox[Queued],
        kind: str,
        gvr: tuple[str, str, str],
        *,
        required: bool,
        namespace: str | None = None,
        field_selector: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.inbox = inbox
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
    def _ran(self) -> None:
        """A run of the stream starts."""
        self.inbox.put(("", "ran", None, self, 0.0))

    def _down(self, why: str) -> None:
        """The stream stopped (after the events it delivered: one queue keeps the order)."""
        self.inbox.put(("", "down", why, self, 0.0))

    def _listed(self) -> None:
        """The stream's LIST succeeded."""
        self.inbox.put(("", "up", None, self, 0.0))

    def _post(self, event: dict[str, Any]) -> None:
        """Queue EVENT for the agent's loop; a Node is cut down first (see slim_node)."""
        raw = event.get("object")
        if self.kind == "Node" and isinstance(raw, dict):
            raw = slim_node(raw, self.cfg.node_name)
        self.inbox.put((self.kind, event.get("type"), raw, self, time.monotonic()))

    def _main(self, info: kopf.ConnectionInfo, stop: threading.Event) -> None:
        backoff = self.cfg.kopf_restart_delay
        while not stop.is_set():
            started = time.monotonic()
            self._ran()
            try:
                asyncio.run(self._operator(info, stop))
            except BaseException as e:  # noqa: BLE001 - any kopf failure means: restart it
                if stop.is_set():
                    break
                why = _failure(e)
            else:
                if stop.is_set():
                    break
                why = "kopf exited"
            self._down(why)
            backoff = self.cfg.kopf_restart_delay if time.monotonic() - started > 60 else min(backoff * 2, 30)
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
        settings = kopf_settings(self.cfg, self.field_selector, self.gvr[2])
        vault = _kopf_credentials.Vault()
        _kopf_auth.vault_var.set(vault)
        authenticator = self._authenticator(info, settings, vault)
        # requests wait for credentials while the vault is empty: should the login task ever fail,
        # the stream must fail with it (and be restarted), not wait forever
        authenticator.add_done_callback(lambda t: t.cancelled() or t.exception() is None or task.cancel())
        post, listed = self._post, self._listed
        try:
            async for event in _kopf_watching.infinite_watch(
                settings=settings, resource=self._kopf_resource(),
                namespace=_kopf_references.NamespaceName(self.namespace) if self.namespace else None,
            ):  # fmt: skip
                if event is _kopf_watching.Bookmark.LISTED:
                    listed()  # its LIST succeeded (even an empty one): the watch is up
                elif isinstance(event, dict) and event.get("type") != "BOOKMARK":
                    post(cast(dict[str, Any], event))
        finally:
            authenticator.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await authenticator
            with contextlib.suppress(Exception):
                await vault.close()
            if self._stopper is mine:
                self._stopper = None

    def _authenticator(
        self, info: kopf.ConnectionInfo, settings: kopf.OperatorSettings, vault: _kopf_credentials.Vault
    ) -> asyncio.Task[Any]:
        """kopf's re-login activity, filling VAULT with INFO (our login handler)."""
        registry = kopf.OperatorRegistry()

        @kopf.on.login(registry=registry)
        async def login(**_: Any) -> kopf.ConnectionInfo:
            return info

        return asyncio.create_task(
            _kopf_activities.authenticator(
                registry=registry, settings=settings, indices={}, vault=vault,
                memo=_kopf_ephemera.AnyMemo(_kopf_ephemera.Memo()),
            ),
            name=f"kopf login for {self.gvr[2]}",
        )  # fmt: skip

    def _kopf_resource(self) -> _kopf_references.Resource:
        group, version, plural = self.gvr
        return _kopf_references.Resource(
            group, version, plural, kind=self.kind, namespaced=self.kind not in CLUSTER_SCOPED,
            verbs=frozenset({"list", "watch"}),
        )  # fmt: skip


def _failure(e: BaseException) -> str:
    """Why a watch stream stopped, from the exception that stopped it."""
    # kopf's API errors carry (message, Status body): the message says it all
    detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    status = getattr(e, "status", None)
    why = f"{type(e).__name__}{f' (HTTP {status})' if status else ''}: {detail}"
    if isinstance(e, _kopf_credentials.LoginError):  # kopf's words for a refused token
        why = "HTTP 401 Unauthorized: the API server refused the agent's credentials"
    return why


class WatchSet:
    """The source's watches, by kind, and their status as the agent's loop sees it (every method here
    runs in the agent's loop).

    One kopf watch stream per resource, each in its own thread (see Watch); started after the first
    LIST. Only the agent's own ConfigMap is watched, in its namespace, by name: what the chart's Role
    grants. ServiceCIDRs only while our LIST can read them (`sync_service_cidrs`).
    """

    def __init__(
        self,
        cfg: KubeSourceConfig,
        inbox: Inbox[Queued],
        *,
        settings_configmap: tuple[str, str],
        metrics: SourceMetrics | None,
        on_status: Callable[[WatchStatus], None] | None,
        request_resync: Callable[[str], None],
    ) -> None:
        self.metrics = metrics
        self.on_status = on_status
        self.request_resync = request_resync
        self._watches: dict[str, Watch] = {
            "Node": Watch(cfg, inbox, "Node", NODES, required=True),
            "Service": Watch(cfg, inbox, "Service", SERVICES, required=True),
            "EndpointSlice": Watch(cfg, inbox, "EndpointSlice", SLICES, required=True),
            "ServiceCIDR": Watch(cfg, inbox, "ServiceCIDR", SERVICE_CIDRS, required=False),
        }
        cm_ns, cm_name = settings_configmap
        if cm_name:
            self._watches["ConfigMap"] = Watch(
                cfg, inbox, "ConfigMap", CONFIGMAPS, required=False, namespace=cm_ns,
                field_selector=f"metadata.name={cm_name}",
            )  # fmt: skip
        # The agent's DaemonSet, watched by name like the ConfigMap: `helm uninstall` deletes it, then
        # the Role that lets us read it, and only then do the pods get SIGTERM. An open watch still
        # sees the deletion (authorization is checked when a watch starts); a GET at SIGTERM may not.
        if cfg.daemonset:
            ds_ns, _, ds_name = cfg.daemonset.partition("/")
            self._watches["DaemonSet"] = Watch(
                cfg, inbox, "DaemonSet", DAEMONSETS, required=False, namespace=ds_ns,
                field_selector=f"metadata.name={ds_name}",
            )  # fmt: skip
        self.started = False
        self._connection: kopf.ConnectionInfo | None = None

    def __getitem__(self, kind: str) -> Watch:
        return self._watches[kind]

    def __iter__(self) -> Iterator[Watch]:
        return iter(self._watches.values())

    def status(self, resource: str) -> WatchStatus:
        """The status of the watch of RESOURCE (a plural: "services", "configmaps", ...)."""
        for w in self._watches.values():
            if w.gvr[2] == resource:
                return w.status
        raise KeyError(resource)

    def stale(self) -> list[str]:
        """The watches the Service view needs that are down: they failed and are not back yet."""
        return [
            w.gvr[2]
            for w in self._watches.values()
            if w.status.required and not w.status.up and w.status.error is not None
        ]

    def start(self, info: kopf.ConnectionInfo) -> None:
        """Start every watch but the ServiceCIDRs' (see `sync_service_cidrs`)."""
        self._connection = info
        for kind, w in self._watches.items():
            if kind != "ServiceCIDR" and not w.running:
                w.start(info)
        self.started = True

    async def stop(self) -> None:
        for w in self._watches.values():
            w.stop()
        loop = asyncio.get_running_loop()
        for w in self._watches.values():
            if not await loop.run_in_executor(None, w.join, 30):
                log.error("the %s watch did not stop within 30 s; leaving its thread", w.gvr[2])
        self.started = False

    def sync_service_cidrs(self, available: bool | None, problem: str | None) -> None:
        """Watch ServiceCIDRs while our LIST can read them; a forbidden watch would only fail."""
        w = self._watches["ServiceCIDR"]
        if not self.started or self._connection is None:
            return
        want = available is True
        if want and not w.running:
            if w.status.runs:
                log.info("watching ServiceCIDRs again")
            w.start(self._connection)
        elif not want and w.running:
            log.info("no longer watching ServiceCIDRs")
            w.stop()
            self.set_status(w, False, problem or "not listable")

    def ran(self, w: Watch) -> None:
        """A run of W's stream started."""
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

    def set_status(self, w: Watch, up: bool, why: str | None) -> None:
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
        if self.on_status is not None:
            self.on_status(st)
