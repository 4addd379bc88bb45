"""Health endpoints as kube-proxy (v1.33 and later) serves them, byte for byte.

HealthServer: `/healthz` and `/livez` (on --health-bind-address), following kube-proxy's
pkg/proxy/healthcheck/proxy_health.go. kube-proxy listens with Go's net.Listen("tcp", addr), which on
an unspecified address (its default 0.0.0.0:10256, or [::]) takes both families: so does HealthServer,
with an IPv4 socket and an IPv6 one (IPV6_V6ONLY) on the same port (IPv4 only where the host has no
IPv6). A specific address is listened on alone. The proxy is healthy while no change has waited longer
than `health_timeout` (60 s, kube-proxy's default) to be programmed: it is healthy while starting up and
whenever it is fully synced. `/healthz` is also 503 while this Node is not eligible (being deleted,
tainted ToBeDeletedByClusterAutoscaler, or not seen yet by the Kubernetes source: KEP-3836, so load
balancers drain the node); `/livez` ignores the Node. Both bodies are kube-proxy's ProxyHealth as Go's
encoding/json writes it (compact, times in RFC 3339 with nanoseconds):

    {"lastUpdated":"…","currentTime":"…","nodeEligible":true,"healthy":true,
     "status":{"IPv4":{"lastUpdated":"…","healthy":true}}}

(one line; no nodeEligible in /livez; status once the sync loop has started, with an entry per
family kproxy programs: IPv4 on a node with an IPv4 --node-ip, IPv6 on one with an IPv6 --node-ip, as
kube-proxy's proxiers; one sync programs both, so both entries say the same). When the answer is 200,
the top-level lastUpdated is the current time (kube-proxy keeps that for compatibility); status keeps
the real one.

ServiceHealthServers: HTTP listeners per Service with externalTrafficPolicy Local on its
healthCheckNodePort (kube-proxy's service_health.go): 200 when the Service has endpoints on this node
and the proxy is healthy (the Node's eligibility does not count), else 503, both with kube-proxy's
tab-indented body (service_health_body) and X-Load-Balancing-Endpoint-Weight: N. kube-proxy's proxier
of each family listens on its own (tcp4 0.0.0.0:<port>, tcp6 [::]:<port>) and counts the endpoints of
its family: the agent listens on 0.0.0.0 on a node with an IPv4 --node-ip and on :: (IPV6_V6ONLY) on
one with an IPv6 --node-ip, and a probe is answered with the local endpoints of the family it came in
on (health_check_services(store, families)).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web

from kproxy.translate import health_check_node_port, local_ready_endpoints

log = logging.getLogger("kproxy.observe.health")

DEFAULT_HEALTH_TIMEOUT = 60.0
IP_FAMILY = "IPv4"  # the family of a node with no --node-ip given: kube-proxy's per-family status entry
IPV4, IPV6 = "IPv4", "IPv6"
_HEADERS = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"}
# Go's http.Error / ServeMux answer for an unknown path.
_NOT_FOUND_HEADERS = {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"}
_GO_ZERO_TIME = "0001-01-01T00:00:00Z"
# What binding "::" fails with where the host has no IPv6 (ipv6.disable=1, or no IPv6 address at all).
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def go_json_time(ts: float | None) -> str:
    """A Unix time as Go's encoding/json writes a time.Time in UTC (RFC 3339, fraction without
    trailing zeros; kube-proxy's image has no time zone, so UTC); None is Go's zero time."""
    if ts is None:
        return _GO_ZERO_TIME
    dt = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    fraction = f"{dt.microsecond:06d}".rstrip("0")
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def go_json(value: Any) -> bytes:
    """`value` as Go's json.Marshal writes it, for the times, booleans and ASCII keys used here:
    compact, keys in the order given."""
    return json.dumps(value, separators=(",", ":")).encode()


_GO_QUOTE_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def go_quote(s: str) -> str:
    """Go's %q of a string (strconv.Quote). Namespaces and names are DNS labels, which it leaves as
    they are; the rest is there so that no name can break the body."""
    out = ['"']
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in _GO_QUOTE_ESCAPES:
            out.append(_GO_QUOTE_ESCAPES[ch])
        elif ch.isprintable():  # Python's and Go's notions agree: not a control, format or separator
            out.append(ch)
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def service_health_body(namespace: str, name: str, local_endpoints: int, proxy_healthy: bool) -> bytes:
    """kube-proxy's healthCheckNodePort body: a Sprintf template, dedented and trimmed of newlines,
    so indented with tabs and without a final newline."""
    return (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {go_quote(namespace)},\n'
        f'\t\t"name": {go_quote(name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {local_endpoints},\n'
        f'\t"serviceProxyHealthy": {"true" if proxy_healthy else "false"}\n'
        "}"
    ).encode()


def address_family(host: str) -> str:
    """The family of a listener's address: IPv6 for an IPv6 literal, else IPv4."""
    return IPV6 if ":" in host else IPV4


def wildcard_hosts(host: str) -> tuple[str, ...]:
    """Where kube-proxy's net.Listen("tcp", HOST:port) listens: an unspecified address (0.0.0.0, ::, or
    empty) is every address of both families, so 0.0.0.0 and :: (IPv4 first); any other, itself."""
    if host in ("", "0.0.0.0", "::"):
        return ("0.0.0.0", "::")
    return (host,)


class _Listener:
    """An aiohttp low-level server on one address; closing it frees the port at once. An IPv6 address
    is listened on with IPV6_V6ONLY (asyncio sets it on every AF_INET6 server socket), so "::" takes
    only IPv6 and can share its port with a listener on 0.0.0.0."""

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
        host: str,  # the agent's --health-bind-address (kproxy.config.DEFAULT_HEALTH_BIND)
        port: int,
        *,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
        clock: Callable[[], float] = time.time,
        ip_families: Sequence[str] = (IP_FAMILY,),
    ) -> None:
        self.ip_families = tuple(ip_families)
        self.host = host
        self.port = port
        self.health_timeout = health_timeout
        self.clock = clock
        self.last_updated: float | None = None
        self.oldest_pending: float | None = None
        self.last_sync_ok: bool | None = None
        # kube-proxy's nodeEligible: False until its Node is seen. Sources that know the Node call
        # set_node_eligible(); the file source may have no Node manifest, hence True here (the agent
        # sets False for the Kubernetes source until its Node is listed).
        self.node_eligible = True
        # Watches the Service view needs that are down (the source's stale_watches()): the view may
        # miss changes, so the pod is not ready (/readyz).
        self.stale_watches: list[str] = []
        self._listeners: list[_Listener] = []

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

    def set_stale_watches(self, resources: Iterable[str]) -> None:
        self.stale_watches = sorted(resources)

    def is_healthy(self, now: float | None = None) -> bool:
        """kube-proxy's rule, without the Node's state: healthy before the sync loop started (nothing
        updated yet), then while nothing has been pending for health_timeout or longer."""
        if self.oldest_pending is None or self.last_updated is None:
            return True
        now = self.clock() if now is None else now
        return now - self.oldest_pending < self.health_timeout

    # ---- HTTP ----
    def _proxy_health(self, with_node: bool) -> tuple[int, dict[str, Any]]:
        """kube-proxy's healthz/livez handler: status code and ProxyHealth, fields in its order."""
        now = self.clock()
        healthy = self.is_healthy(now)
        ok = healthy and (self.node_eligible or not with_node)
        body: dict[str, Any] = {
            "lastUpdated": go_json_time(now if ok else self.last_updated),
            "currentTime": go_json_time(now),
        }
        if with_node:
            body["nodeEligible"] = self.node_eligible
        body["healthy"] = healthy
        if self.last_updated is not None:
            family = {"lastUpdated": go_json_time(self.last_updated), "healthy": healthy}
            body["status"] = {f: family for f in self.ip_families}
        return (200 if ok else 503), body

    def healthz(self) -> tuple[int, dict[str, Any]]:
        return self._proxy_health(with_node=True)

    def livez(self) -> tuple[int, dict[str, Any]]:
        return self._proxy_health(with_node=False)

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """The pod's readiness: /healthz, and 503 while a watch the Service view needs is down (the view
        may miss changes). /healthz itself keeps kube-proxy's meaning: cloud load balancers probe it
        for every node, and an API server outage must not take every node out of them at once."""
        status, body = self.healthz()
        body = {**body, "staleWatches": list(self.stale_watches)}
        return (503 if self.stale_watches else status), body

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if request.path == "/healthz":
            status, body = self.healthz()
        elif request.path == "/livez":
            status, body = self.livez()
        elif request.path == "/readyz":
            status, body = self.readyz()
        else:
            return web.Response(status=404, body=b"404 page not found\n", headers=_NOT_FOUND_HEADERS)
        return web.Response(status=status, body=go_json(body), headers=_HEADERS)

    async def start(self) -> None:
        hosts = wildcard_hosts(self.host)
        listeners: list[_Listener] = []
        try:
            for host in hosts:
                # port 0 (tests): the IPv6 socket takes the port the IPv4 one was given
                listener = _Listener(self._handle, host, listeners[0].port if listeners else self.port)
                try:
                    await listener.start()
                except OSError as e:
                    if not listeners or e.errno not in _NO_IPV6:
                        raise
                    # kube-proxy (Go) listens on IPv4 alone where the host has no IPv6
                    log.info("not serving /healthz on [%s]:%d: %s (no IPv6 on this host)", host, self.port, e)
                    continue
                listeners.append(listener)
        except BaseException:
            for listener in listeners:
                await listener.stop()
            raise
        self._listeners = listeners
        self.port = listeners[0].port
        if self.last_updated is None:
            # kube-proxy's sync loop marks its family updated as it starts ("in case Sync() never
            # succeeds"); the agent starts its sync loop with this server.
            self.last_updated = self.clock()
        log.info(
            "serving /healthz, /livez and /readyz on %s",
            ", ".join(_hostport(listener.host, listener.port) for listener in listeners),
        )

    @property
    def hosts(self) -> list[str]:
        """The addresses listened on (two for an unspecified --health-bind-address: see wildcard_hosts)."""
        return [listener.host for listener in self._listeners]

    async def stop(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            await listener.stop()


def listen_addresses(families: Iterable[str]) -> tuple[str, ...]:
    """Where healthCheckNodePorts are listened on for a node of FAMILIES ("IPv4", "IPv6": those of its
    --node-ip): kube-proxy's proxier of each family, tcp4 on 0.0.0.0 and tcp6 on ::."""
    wanted = set(families)
    return tuple(addr for fam, addr in ((IPV4, "0.0.0.0"), (IPV6, "::")) if fam in wanted)


# Local ready endpoints of a Service: one count for every family (as the tests and the controller
# double give it), or a count per family ({"IPv4": n, "IPv6": m}), a probe getting its own family's.
LocalEndpoints = int | Mapping[str, int]


class ServiceHealthServers:
    """healthCheckNodePort listeners, opened and closed to match `sync()`.

    healthy: the proxy's health (HealthServer.is_healthy or any callable returning a bool).
    addresses: where to listen, one listener each; kube-proxy listens on all addresses of its proxier's
    family (listen_addresses) unless --nodeport-addresses narrows them. A probe is answered with the
    local endpoints of the family of the address it came in on.
    """

    def __init__(self, healthy: Callable[[], bool], addresses: Sequence[str] = ("0.0.0.0",)) -> None:
        self.healthy = healthy
        self.addresses = tuple(addresses)
        self._ports: dict[tuple[str, str], int] = {}
        self._endpoints: dict[tuple[str, str], LocalEndpoints] = {}
        self._listeners: dict[tuple[str, str], list[_Listener]] = {}
        self.failed: dict[tuple[str, str], str] = {}  # service -> why its port could not be opened

    @property
    def ports(self) -> dict[tuple[str, str], int]:
        return dict(self._ports)

    def local_endpoints(self, service: tuple[str, str], family: str | None = None) -> int:
        """The Service's local ready endpoints as a probe on FAMILY sees them (0 for a family the Service
        is not served in: kube-proxy has no listener there)."""
        counts = self._endpoints.get(service, 0)
        if isinstance(counts, int):
            return counts
        if family is None:
            return next(iter(counts.values()), 0)
        return counts.get(family, 0)

    def answer(self, service: tuple[str, str], family: str | None = None) -> tuple[int, dict[str, Any]]:
        """Status and body for a probe of SERVICE that came in on FAMILY ("IPv4" / "IPv6")."""
        count = self.local_endpoints(service, family)
        healthy = bool(self.healthy())
        body = {
            "service": {"namespace": service[0], "name": service[1]},
            "localEndpoints": count,
            "serviceProxyHealthy": healthy,
        }
        return (200 if count > 0 and healthy else 503), body

    def response(
        self, service: tuple[str, str], family: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body exactly as kube-proxy's hcHandler writes them."""
        status, body = self.answer(service, family)
        count, healthy = body["localEndpoints"], body["serviceProxyHealthy"]
        headers = {**_HEADERS, "X-Load-Balancing-Endpoint-Weight": str(count)}
        return status, headers, service_health_body(service[0], service[1], count, healthy)

    def _handler(self, service: tuple[str, str], family: str) -> Callable[[web.BaseRequest], Any]:
        async def handle(_request: web.BaseRequest) -> web.Response:
            status, headers, body = self.response(service, family)
            return web.Response(status=status, body=body, headers=headers)

        return handle

    async def sync(self, services: Mapping[tuple[str, str], tuple[int, LocalEndpoints]]) -> None:
        """Make the listeners match {(namespace, name): (healthCheckNodePort, local endpoints)}, the
        local endpoints one count or one per family (LocalEndpoints)."""
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
                    listener = _Listener(self._handler(svc, address_family(host)), host, port)
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


def health_check_services(
    store: Any, families: Sequence[str] | None = None
) -> dict[tuple[str, str], tuple[int, LocalEndpoints]]:
    """{(namespace, name): (healthCheckNodePort, local ready endpoints)} for the store's Services that
    have a healthCheckNodePort; translate decides which do and counts the endpoints, as kube-proxy does
    (translate.health_check_node_port, translate.local_ready_endpoints). With FAMILIES (the node's:
    "IPv4", "IPv6") the endpoints are counted per family, {family: count}, as each of kube-proxy's
    proxiers counts its own; without, one count, of the Service's primary family."""
    result: dict[tuple[str, str], tuple[int, LocalEndpoints]] = {}
    keys = getattr(store, "health_check_keys", None)  # the store's index: not every Service
    for key in sorted(keys) if keys is not None else list(store.services):
        svc = store.services.get(key)
        if svc is None:
            continue
        port = health_check_node_port(svc)
        if port is None:
            continue
        ns, name = key.split("/", 1)
        slices = list(store.slices_of(key))
        if families is None:
            result[(ns, name)] = (port, local_ready_endpoints(svc, slices, store.node))
        else:
            counts = {fam: local_ready_endpoints(svc, slices, store.node, family=fam) for fam in families}
            result[(ns, name)] = (port, counts)
    return result
