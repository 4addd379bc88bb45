"""Health endpoints as kube-proxy serves them.

HealthServer: `/healthz` and `/livez` (default 0.0.0.0:10256), following kube-proxy's
pkg/proxy/healthcheck/proxy_health.go. The proxy is healthy while no change has waited longer than
`health_timeout` (60 s, kube-proxy's default) to be programmed: it is healthy while starting up and
whenever it is fully synced. `/healthz` is also 503 while this Node is being deleted or carries the
ToBeDeletedByClusterAutoscaler taint (so load balancers drain the node); `/livez` ignores that.
The body is kube-proxy's: {"lastUpdated": ..., "currentTime": ...[, "nodeEligible": ...]}, with
times in Go's time.Time format; when healthy, lastUpdated is the current time (kube-proxy keeps that
for compatibility).

ServiceHealthServers: one HTTP listener per Service with externalTrafficPolicy Local on its
healthCheckNodePort (kube-proxy's service_health.go): 200 when the Service has endpoints on this node
and the proxy is healthy, else 503, both with the body
{"service": {"namespace": ..., "name": ...}, "localEndpoints": N, "serviceProxyHealthy": bool}.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

log = logging.getLogger("kproxy.observe.health")

DEFAULT_HEALTH_TIMEOUT = 60.0
_HEADERS = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"}


def go_time(ts: float | None) -> str:
    """Format like Go's time.Time.String() in UTC (what kube-proxy's %q prints, minus the monotonic part)."""
    if ts is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    dt = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    nanos = f"{dt.microsecond * 1000:09d}".rstrip("0")
    return dt.strftime("%Y-%m-%d %H:%M:%S") + (f".{nanos}" if nanos else "") + " +0000 UTC"


class _Listener:
    """An aiohttp low-level server on one address; closing it frees the port at once."""

    def __init__(self, handler: Callable[[web.BaseRequest], Any], host: str, port: int) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self._runner: web.ServerRunner | None = None

    async def start(self) -> None:
        runner = web.ServerRunner(web.Server(self.handler), handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        if self.port == 0 and runner.addresses:
            self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class HealthServer:
    """Tracks sync health and serves /healthz and /livez.

    Call `queued()` when a change is waiting to be programmed, `update(True)` after each successful
    sync and `update(False)` after a failed one, `set_node_eligible()` when this Node changes.
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 10256,
        *,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.port = port
        self.health_timeout = health_timeout
        self.clock = clock
        self.last_updated: float | None = None
        self.oldest_pending: float | None = None
        self.last_sync_ok: bool | None = None
        self.node_eligible = True  # until a Node event says otherwise, as kube-proxy does
        self._listener: _Listener | None = None

    # ---- state ----
    def queued(self, when: float | None = None) -> None:
        if self.oldest_pending is None:
            self.oldest_pending = self.clock() if when is None else when

    def update(self, sync_ok: bool, when: float | None = None) -> None:
        """Record a sync: a success clears what was pending; a failure leaves (or marks) it pending."""
        now = self.clock() if when is None else when
        self.last_sync_ok = sync_ok
        if sync_ok:
            self.last_updated = now
            self.oldest_pending = None
        else:
            self.queued(now)

    def set_node_eligible(self, eligible: bool) -> None:
        self.node_eligible = eligible

    def is_healthy(self, now: float | None = None) -> bool:
        """kube-proxy's rule, without the Node's state."""
        if self.oldest_pending is None:
            return True
        now = self.clock() if now is None else now
        return now - self.oldest_pending < self.health_timeout

    # ---- HTTP ----
    def healthz(self) -> tuple[int, dict[str, Any]]:
        now = self.clock()
        healthy = self.is_healthy(now) and self.node_eligible
        last = now if healthy else self.last_updated
        body = {"lastUpdated": go_time(last), "currentTime": go_time(now), "nodeEligible": self.node_eligible}
        return (200 if healthy else 503), body

    def livez(self) -> tuple[int, dict[str, Any]]:
        now = self.clock()
        healthy = self.is_healthy(now)
        last = now if healthy else self.last_updated
        return (200 if healthy else 503), {"lastUpdated": go_time(last), "currentTime": go_time(now)}

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if request.path == "/healthz":
            status, body = self.healthz()
        elif request.path == "/livez":
            status, body = self.livez()
        else:
            return web.Response(status=404, text="404 page not found\n")
        # kube-proxy writes this exact shape with Fprintf; keep the key order.
        return web.Response(status=status, text=json.dumps(body), headers=_HEADERS)

    async def start(self) -> None:
        self._listener = _Listener(self._handle, self.host, self.port)
        await self._listener.start()
        self.port = self._listener.port
        log.info("serving /healthz and /livez on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None


class ServiceHealthServers:
    """healthCheckNodePort listeners, opened and closed to match `sync()`.

    healthy: the proxy's health (HealthServer.is_healthy or any callable returning a bool).
    addresses: where to listen; kube-proxy listens on all addresses unless --nodeport-addresses
    narrows them.
    """

    def __init__(self, healthy: Callable[[], bool], addresses: Sequence[str] = ("0.0.0.0",)) -> None:
        self.healthy = healthy
        self.addresses = tuple(addresses)
        self._ports: dict[tuple[str, str], int] = {}
        self._endpoints: dict[tuple[str, str], int] = {}
        self._listeners: dict[tuple[str, str], list[_Listener]] = {}
        self.failed: dict[tuple[str, str], str] = {}  # service -> why its port could not be opened

    @property
    def ports(self) -> dict[tuple[str, str], int]:
        return dict(self._ports)

    def answer(self, service: tuple[str, str]) -> tuple[int, dict[str, Any]]:
        count = self._endpoints.get(service, 0)
        healthy = bool(self.healthy())
        body = {
            "service": {"namespace": service[0], "name": service[1]},
            "localEndpoints": count,
            "serviceProxyHealthy": healthy,
        }
        return (200 if count > 0 and healthy else 503), body

    def _handler(self, service: tuple[str, str]) -> Callable[[web.BaseRequest], Any]:
        async def handle(_request: web.BaseRequest) -> web.Response:
            status, body = self.answer(service)
            return web.Response(status=status, text=json.dumps(body, indent=2), headers=_HEADERS)

        return handle

    async def sync(self, services: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        """Make the listeners match {(namespace, name): (healthCheckNodePort, local endpoints)}."""
        for svc, (_port, count) in services.items():
            self._endpoints[svc] = count
        for svc in [s for s in self._endpoints if s not in services]:
            del self._endpoints[svc]
        for svc, port in list(self._ports.items()):
            wanted = services.get(svc)
            if wanted is None or wanted[0] != port:
                await self._close(svc)
        for svc, (port, _count) in services.items():
            if svc in self._ports or not port:
                continue
            opened: list[_Listener] = []
            try:
                for host in self.addresses:
                    listener = _Listener(self._handler(svc), host, port)
                    await listener.start()
                    opened.append(listener)
            except OSError as e:
                for listener in opened:
                    await listener.stop()
                why = f"cannot open healthCheckNodePort {port} of Service {svc[0]}/{svc[1]}: {e}"
                if self.failed.get(svc) != why:
                    log.error("%s; is another process using the port?", why)
                self.failed[svc] = why
                continue
            self.failed.pop(svc, None)
            self._ports[svc] = port
            self._listeners[svc] = opened
            log.info("opened healthCheckNodePort %d for Service %s/%s", port, svc[0], svc[1])

    async def _close(self, svc: tuple[str, str]) -> None:
        port = self._ports.pop(svc, None)
        for listener in self._listeners.pop(svc, []):
            await listener.stop()
        if port is not None:
            log.info("closed healthCheckNodePort %d of Service %s/%s", port, svc[0], svc[1])

    async def close(self) -> None:
        for svc in list(self._ports):
            await self._close(svc)


async def serve_forever(server: HealthServer) -> None:
    """Run the health server until cancelled (a task for the agent)."""
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await server.stop()


def health_check_services(store: Any) -> dict[tuple[str, str], tuple[int, int]]:
    """{(namespace, name): (healthCheckNodePort, local ready endpoints)} for the store's Services
    with externalTrafficPolicy Local, as kube-proxy counts them (distinct ready addresses on this node).
    """
    node = getattr(store.node, "name", "")
    result: dict[tuple[str, str], tuple[int, int]] = {}
    for key, svc in store.services.items():
        spec = svc.spec
        if spec.external_traffic_policy != "Local" or not spec.health_check_node_port:
            continue
        if spec.type not in ("NodePort", "LoadBalancer"):
            continue
        local: set[str] = set()
        for es in store.slices_of(key):
            for ep in es.endpoints:
                ready = ep.conditions.ready is not False and not ep.conditions.terminating
                if ready and ep.node_name == node:
                    local.update(ep.addresses)
        ns, name = key.split("/", 1)
        result[(ns, name)] = (spec.health_check_node_port, len(local))
    return result
