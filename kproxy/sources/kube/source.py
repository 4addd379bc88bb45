"""KubeSource: the Kubernetes source as the agent sees it. It runs our own LIST (`listing`) until the
view is complete, then the kopf watches (`watch`), applies their events, queued by the watch threads
(`inbox`), to the store through ObjectView (`view`), and LISTs again whenever kopf may have missed
deletions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import kopf

from kproxy.config import DEFAULT_NAMESPACE
from kproxy.heap import trim_heap
from kproxy.sources.kube.config import KubeSourceConfig, SourceMetrics
from kproxy.sources.kube.credentials import http_session, resolve_connection
from kproxy.sources.kube.inbox import Inbox
from kproxy.sources.kube.listing import ApiClient, ApiError, ClusterLister
from kproxy.sources.kube.objects import ns_name, resource_version
from kproxy.sources.kube.view import ObjectView
from kproxy.sources.kube.watch import Queued, WatchSet, WatchStatus, quiet_kopf
from kproxy.store import SourceSink

log = logging.getLogger("kproxy.sources.kube")


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
        cm_ns, _, cm_name = cm.partition("/") if cm else ("", "", "")
        if cm and not cm_name:
            cm_ns, cm_name = DEFAULT_NAMESPACE, cm
        self._cm_ns, self._cm_name = cm_ns, cm_name
        self._view = ObjectView(
            store, node_name=self.cfg.node_name, settings_configmap=f"{cm_ns}/{cm_name}", metrics=metrics,
            on_settings=on_settings, on_node_eligible=on_node_eligible,
        )  # fmt: skip
        self._lister = ClusterLister(
            self._view, node_name=self.cfg.node_name, settings_configmap=(cm_ns, cm_name),
            on_service_cidrs=self._sync_service_cidr_watch,
        )  # fmt: skip
        self._last_kopf_listing = 0.0  # monotonic time of the last listing event from kopf
        self._resync_wanted = asyncio.Event()
        self._resync_reasons: set[str] = set()
        # watch events from the watch threads, applied in the agent's loop (_apply_queued)
        self._inbox: Inbox[Queued] = Inbox(self._apply_queued, self._batch_applied)
        self._watches = WatchSet(
            self.cfg, self._inbox, settings_configmap=(cm_ns, cm_name), metrics=metrics,
            on_status=on_watch_status, request_resync=self.request_resync,
        )  # fmt: skip
        # seen deleted (or being deleted) by the DaemonSet watch (WatchSet); None: not seen yet
        self.daemonset_deleted: bool | None = None
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
        quiet_kopf()
        self._inbox.attach(asyncio.get_running_loop())
        info = self._connection or resolve_connection(self.cfg.kubeconfig, self.cfg.api_server)
        self._connection = info
        log.info("watching Kubernetes at %s as node %s", info.server, self.cfg.node_name)
        try:
            async with http_session(info) as session:
                await self._resync_loop(ApiClient(session, info.server, self.cfg.list_chunk_size), info)
        finally:
            await self._watches.stop()

    def compact(self) -> int:
        """Shrink the view's tables that deletions left oversized; the bytes saved."""
        return self._view.compact()

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
        return [w.status for w in self._watches]

    def watch_status(self, resource: str) -> WatchStatus:
        """The status of the watch of RESOURCE (a plural: "services", "configmaps", ...)."""
        return self._watches.status(resource)

    @property
    def kopf_watches_service_cidrs(self) -> bool:
        return self._watches["ServiceCIDR"].running

    def stale_watches(self) -> list[str]:
        """The watches the Service view needs that are down: they failed and are not back yet."""
        return self._watches.stale()

    @property
    def service_cidrs_available(self) -> bool | None:
        """Whether the API server lets us list ServiceCIDRs (None: not tried yet)."""
        return self._lister.service_cidrs_available

    def _start_watches(self, info: kopf.ConnectionInfo) -> None:
        self._watches.start(info)
        self._sync_service_cidr_watch()

    def _sync_service_cidr_watch(self) -> None:
        self._watches.sync_service_cidrs(
            self._lister.service_cidrs_available, self._lister.service_cidrs_problem
        )

    # ---- events (agent loop) ----
    def _apply_queued(self, item: Queued) -> None:
        """Apply a watch event or a watch's status change queued by a watch thread (see Inbox). Each
        event's store change is dated when its watch thread received it (kproxy_network_programming_
        duration_seconds)."""
        kind, etype, raw, w, received = item
        try:
            if not kind:
                if etype == "ran":
                    self._watches.ran(w)
                elif w.running:  # not for a watch stopped meanwhile (ServiceCIDRs)
                    self._watches.set_status(w, etype == "up", raw)
                return
            # an event of a watch that is not (yet) up: it works (a stopped one delivers no more)
            if not (w.status.up and w.status.listed_since_resync) and w.running:
                self._watches.set_status(w, True, None)
            self.store.change_time = received
            self._on_event(kind, etype, raw)
        except Exception:  # one bad event must not cost the others
            log.exception("%s %s not applied", kind or "watch status", etype or "LISTED")

    def _batch_applied(self) -> None:
        self.store.change_time = None

    def request_resync(self, reason: str) -> None:
        """Ask for a full LIST soon (coalesced)."""
        self._resync_reasons.add(reason)
        self._resync_wanted.set()

    def _on_event(self, kind: str, etype: str | None, raw: Any) -> None:
        if not isinstance(raw, dict):
            return
        ident = ns_name(raw)
        if ident is None:
            log.warning("%s without metadata.name in a watch event skipped", kind)
            self._view.count_skipped(kind, "missing_name")
            return
        if self.metrics is not None:
            self.metrics.source_event(kind, etype or "LISTED")
        if kind == "Node" and ident[1] == self.cfg.node_name:
            self._view.apply_node(raw, deleted=etype == "DELETED")
        if kind == "ConfigMap":
            if ident == (self._cm_ns, self._cm_name):
                self._view.apply_settings({} if etype == "DELETED" else raw.get("data") or {})
            return
        if kind == "DaemonSet":
            if f"{ident[0]}/{ident[1]}" == self.cfg.daemonset:
                self._on_daemonset(
                    etype == "DELETED" or bool((raw.get("metadata") or {}).get("deletionTimestamp"))
                )
            return
        key = (kind, ident[0], ident[1])
        if etype is None and self.initial_sync_done.is_set():
            # kopf is (re-)listing: after a 410 or an outage, or its first listing finishing after
            # ours. Its listing never reports what was deleted before its snapshot and after ours
            # (or during the gap): our own LIST, once kopf's listing is over, will.
            self._last_kopf_listing = time.monotonic()
            self.request_resync("kopf re-listed")
        if etype == "DELETED":
            self._view.delete(key, resource_version(raw), quiet=False)
        else:
            self._view.upsert(key, raw, quiet=not self.initial_sync_done.is_set())

    def _on_daemonset(self, deleted: bool) -> None:
        if deleted and not self.daemonset_deleted:
            log.info("DaemonSet %s is being deleted: the dataplane goes with this agent", self.cfg.daemonset)
        self.daemonset_deleted = deleted

    # ---- our own LIST (agent loop) ----
    async def _resync_loop(self, client: ApiClient, info: kopf.ConnectionInfo) -> None:
        reason = "initial"
        while True:
            await self._full_list(client, reason)
            # the LIST's pages, and kopf's listing before it (a re-list waits for kopf's to end), leave
            # freed C heap behind that glibc keeps otherwise
            trim_heap()
            if not self._watches.started and self.kopf_gate is not None and not self.kopf_gate.is_set():
                await self.kopf_gate.wait()
                self.request_resync("kopf started")  # whatever was deleted while kopf was not watching
            if not self._watches.started:
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

    async def _full_list(self, client: ApiClient, reason: str) -> None:
        started = time.monotonic()
        backoff = 0.2
        while True:
            try:
                counts = await self._lister.list_all(client, quiet=not self.initial_sync_done.is_set())
                break
            except (aiohttp.ClientError, TimeoutError, ApiError) as e:
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
                self._view.count("Service"),
                self._view.count("EndpointSlice"),
                f"{self._view.count('ServiceCIDR')} ServiceCIDRs"
                if self._lister.service_cidrs_available
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
