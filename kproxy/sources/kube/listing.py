"""Our own paginated LIST of the cluster: kopf never says "the initial listing is complete", and never
reports the objects deleted during a gap (after a 410 Gone, an outage, a restart). A full LIST does
both: the view is whole after its last page, and whatever is held that it no longer has is deleted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from kproxy.sources.kube.objects import NODES, SERVICE_CIDRS, SERVICES, SLICES, ns_name, slim_node
from kproxy.sources.kube.view import Key, ObjectView

log = logging.getLogger("kproxy.sources.kube")


class ApiError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, when the API server answered


class ApiClient:
    """GETs and paginated LISTs (pages of CHUNK_SIZE objects) from the API server at SERVER."""

    def __init__(self, session: aiohttp.ClientSession, server: str, chunk_size: int) -> None:
        self.session = session
        self.server = server
        self.chunk_size = chunk_size

    async def get(self, path: str) -> dict[str, Any] | None:
        url = self.server.rstrip("/") + path
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status == 404:
                return None
            if resp.status >= 400:
                raise ApiError(f"GET {path}: HTTP {resp.status} {(await resp.text())[:200]}")
            body: dict[str, Any] = await resp.json()
            return body

    async def pages(self, path: str) -> AsyncIterator[tuple[list[Any], int | None]]:
        """Yield (items, list resourceVersion) per page; a 410 on `continue` restarts the list."""
        token = ""
        while True:
            query = f"?limit={self.chunk_size}" + (f"&continue={token}" if token else "")
            url = self.server.rstrip("/") + path + query
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=120)) as resp:
                if resp.status == 410 and token:
                    raise ApiError(f"LIST {path}: continue token expired (410), listing again")
                if resp.status >= 400:
                    text = (await resp.text())[:200]
                    raise ApiError(f"LIST {path}: HTTP {resp.status} {text}", status=resp.status)
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


class ClusterLister:
    """A full LIST of Nodes, ServiceCIDRs, Services and EndpointSlices (plus the settings ConfigMap)
    into VIEW. ServiceCIDRs and the settings ConfigMap are optional: when they cannot be read, what is
    known of them stays and every later LIST tries again. `on_service_cidrs` is called whenever a LIST
    found out whether ServiceCIDRs can be listed (`service_cidrs_available`)."""

    def __init__(
        self,
        view: ObjectView,
        *,
        node_name: str,
        settings_configmap: tuple[str, str],
        on_service_cidrs: Callable[[], None],
    ) -> None:
        self.view = view
        self.node_name = node_name
        self._cm_ns, self._cm_name = settings_configmap
        self.on_service_cidrs = on_service_cidrs
        self._configmap_problem: str | None = None
        # Whether the API server lets us list ServiceCIDRs (None: not tried yet); why not, if not.
        self.service_cidrs_available: bool | None = None
        self.service_cidrs_problem: str | None = None

    async def list_all(self, client: ApiClient, quiet: bool) -> tuple[int, int]:
        """LIST everything; the counts of objects changed and deleted."""
        if self._cm_name:
            await self._read_settings(client)
        changed = deleted = 0
        for kind, gvr in (
            ("Node", NODES),
            ("ServiceCIDR", SERVICE_CIDRS),
            ("Service", SERVICES),
            ("EndpointSlice", SLICES),
        ):
            try:
                kind_changed, kind_deleted = await self._list_kind(client, kind, gvr, quiet)
            except ApiError as e:
                if kind != "ServiceCIDR" or e.status not in (403, 404):
                    raise
                self._service_cidrs_unavailable(e.status)
                continue
            if kind == "ServiceCIDR":
                self._service_cidrs_listed()
            changed += kind_changed
            deleted += kind_deleted
        return changed, deleted

    async def _read_settings(self, client: ApiClient) -> None:
        try:
            cm = await client.get(f"/api/v1/namespaces/{self._cm_ns}/configmaps/{self._cm_name}")
        except ApiError as e:
            # The settings are optional: the rest of the view must not wait for them.
            problem = f"reading the settings ConfigMap {self._cm_ns}/{self._cm_name} failed: {e}"
            if problem != self._configmap_problem:
                log.warning("%s; keeping the current settings, trying again at every full listing", problem)
            self._configmap_problem = problem
        else:
            self._configmap_problem = None
            self.view.apply_settings((cm or {}).get("data") or {})

    async def _list_kind(
        self, client: ApiClient, kind: str, gvr: tuple[str, str, str], quiet: bool
    ) -> tuple[int, int]:
        """LIST every object of KIND into the store; delete what we hold that the LIST does not have."""
        group, version, plural = gvr
        base = f"/api/{version}/{plural}" if not group else f"/apis/{group}/{version}/{plural}"
        changed = 0
        this_node_found = False
        listed: set[Key] = set()
        list_rv: int | None = None
        self.view.begin_list(kind)
        async for items, rv in client.pages(base):
            list_rv = rv if list_rv is None else list_rv
            for raw in items:
                ident = ns_name(raw) if isinstance(raw, dict) else None
                if ident is None:
                    continue
                if kind == "Node":
                    raw = slim_node(raw, self.node_name)
                    if ident[1] == self.node_name:
                        this_node_found = True
                        self.view.apply_node(raw, deleted=False)
                key = (kind, ident[0], ident[1])
                listed.add(key)
                if self.view.upsert(key, raw, quiet=quiet):
                    changed += 1
            del items  # the page's raw bodies: only the compact model is kept
            await asyncio.sleep(0)  # let watch events in between pages
        if kind == "Node" and not this_node_found:
            log.warning(
                "node %s not found in the API: NodePorts and local endpoints wait for it", self.node_name
            )
        return changed, self.view.sweep(kind, listed, list_rv, quiet)

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
        known = self.view.count("ServiceCIDR")
        if problem != self.service_cidrs_problem:
            log.warning(
                "%s; going on %s, and trying again at every full listing",
                problem,
                f"with the service CIDRs of the {known} ServiceCIDRs listed before"
                if known
                else "without the cluster's service CIDRs",
            )
        else:
            log.debug("ServiceCIDRs still unavailable: %s", problem)
        self.service_cidrs_problem = problem
        self.service_cidrs_available = False
        self.on_service_cidrs()

    def _service_cidrs_listed(self) -> None:
        if self.service_cidrs_problem is not None:
            log.info("ServiceCIDRs can be listed now: watching them from now on")
        self.service_cidrs_problem = None
        self.service_cidrs_available = True
        self.on_service_cidrs()
