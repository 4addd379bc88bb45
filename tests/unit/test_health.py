"""Health endpoints byte for byte as kube-proxy (v1.33+) writes them: status, headers and body.

The expected bodies are written out literally; the healthCheckNodePort one is also rebuilt from
kube-proxy's own Sprintf template (service_health.go), dedented and trimmed as it does.
"""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap

import pytest

from kproxy.agent.serve import Servers
from kproxy.config import AgentConfig
from kproxy.observe.health import (
    HealthServer,
    ServiceHealthServers,
    go_json_time,
    listen_addresses,
    service_health_body,
)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def raw_get(port: int, path: str = "/", host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """GET over a plain socket: the status, the headers (lower-case names) and the body as sent."""
    reader, writer = await asyncio.open_connection(host, port)
    host_header = f"[{host}]" if ":" in host else host
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_dual_port() -> int:
    """A port free on 0.0.0.0 and on :: both."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET6) as s6:
            try:
                s6.bind(("::", port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free in both families")


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


# ---- healthCheckNodePort ----

# service_health.go's template, as it stands in kube-proxy's source (tab-indented Go raw string).
GO_TEMPLATE = """
		{
			"service": {
				"namespace": %q,
				"name": %q
			},
			"localEndpoints": %d,
			"serviceProxyHealthy": %v
		}
		"""


def kube_proxy_body(namespace: str, name: str, count: int, healthy: bool) -> bytes:
    """strings.Trim(dedent.Dedent(fmt.Sprintf(template, ...)), "\\n") for DNS-label names."""
    filled = (
        GO_TEMPLATE.replace("%q", f'"{namespace}"', 1)
        .replace("%q", f'"{name}"', 1)
        .replace("%d", str(count))
        .replace("%v", "true" if healthy else "false")
    )
    return textwrap.dedent(filled).strip("\n").encode()


def test_service_health_body_is_kube_proxys_tab_indented_template() -> None:
    expected = b'{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "web"\n\t},\n\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}'  # noqa: E501
    assert service_health_body("default", "web", 2, True) == expected
    assert kube_proxy_body("default", "web", 2, True) == expected
    for args in (("kube-system", "dns", 0, True), ("a", "b", 1, False), ("ns-1", "svc-x", 17, False)):
        assert service_health_body(*args) == kube_proxy_body(*args)
    # %q: a name can never break out of its string
    assert service_health_body('a"b', "c\\d\n", 0, True).splitlines()[2:4] == [
        b'\t\t"namespace": "a\\"b",',
        b'\t\t"name": "c\\\\d\\n"',
    ]


def test_health_check_node_port_answers_byte_for_byte() -> None:
    async def scenario() -> None:
        state = {"healthy": True}
        hc = ServiceHealthServers(lambda: state["healthy"], addresses=("127.0.0.1",))
        port = free_port()
        svc = ("default", "web")
        try:
            await hc.sync({svc: (port, 2)})
            status, headers, body = await raw_get(port, "/any/path")
            assert status == 200
            assert headers["content-type"] == "application/json"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["x-load-balancing-endpoint-weight"] == "2"
            assert body == (
                b'{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "web"\n\t},\n'
                b'\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}'
            )

            await hc.sync({svc: (port, 0)})  # no local endpoint: 503, same shape
            status, headers, body = await raw_get(port)
            assert (status, headers["content-type"], headers["x-content-type-options"]) == (
                503,
                "application/json",
                "nosniff",
            )
            assert headers["x-load-balancing-endpoint-weight"] == "0"
            assert body == (
                b'{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "web"\n\t},\n'
                b'\t"localEndpoints": 0,\n\t"serviceProxyHealthy": true\n}'
            )

            await hc.sync({svc: (port, 1)})
            state["healthy"] = False  # local endpoints, but the proxy is not healthy: 503
            status, headers, body = await raw_get(port)
            assert status == 503 and headers["x-load-balancing-endpoint-weight"] == "1"
            assert body == kube_proxy_body("default", "web", 1, False)
        finally:
            await hc.close()

    asyncio.run(scenario())


@needs_ipv6
def test_health_check_node_port_answers_each_family_with_its_own_endpoints() -> None:
    """kube-proxy in dual-stack: the IPv4 proxier listens tcp4 0.0.0.0:<port>, the IPv6 one tcp6
    [::]:<port>, each counting its own family's endpoints; both listen on the same port."""

    async def scenario() -> None:
        addresses = listen_addresses(("IPv4", "IPv6"))
        assert addresses == ("0.0.0.0", "::")
        hc = ServiceHealthServers(lambda: True, addresses=addresses)
        port = free_dual_port()
        svc = ("default", "web")
        try:
            await hc.sync({svc: (port, {"IPv4": 2, "IPv6": 0})})
            assert hc.failed == {} and hc.ports == {svc: port}
            status, headers, body = await raw_get(port, host="127.0.0.1")
            assert (status, headers["x-load-balancing-endpoint-weight"]) == (200, "2")
            assert body == kube_proxy_body("default", "web", 2, True)
            status, headers, body = await raw_get(port, host="::1")
            assert (status, headers["x-load-balancing-endpoint-weight"]) == (503, "0")
            assert body == kube_proxy_body("default", "web", 0, True)

            await hc.sync({svc: (port, {"IPv4": 0, "IPv6": 3})})
            status, headers, _ = await raw_get(port, host="::1")
            assert (status, headers["x-load-balancing-endpoint-weight"]) == (200, "3")
            assert (await raw_get(port, host="127.0.0.1"))[0] == 503
        finally:
            await hc.close()
        # closed: both ports free again (SO_REUSEADDR: the probes' connections are in TIME_WAIT)
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            with socket.socket(family) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
                s.listen()

    asyncio.run(scenario())


@needs_ipv6
def test_health_check_node_port_on_an_ipv6_only_node_listens_on_ipv6_only() -> None:
    async def scenario() -> None:
        hc = ServiceHealthServers(lambda: True, addresses=listen_addresses(("IPv6",)))
        port = free_dual_port()
        svc = ("default", "web")
        try:
            await hc.sync({svc: (port, {"IPv6": 1})})
            status, _, body = await raw_get(port, host="::1")
            assert status == 200 and body == kube_proxy_body("default", "web", 1, True)
            with pytest.raises(OSError):  # IPV6_V6ONLY: no IPv4-mapped listener
                await raw_get(port, host="127.0.0.1")
        finally:
            await hc.close()

    asyncio.run(scenario())


def test_the_agent_serves_and_reports_the_families_of_its_node_ips() -> None:
    def families(*ips: str) -> tuple[str, ...]:
        return Servers(AgentConfig(node_name="n1", node_ips=list(ips))).families

    assert families("192.0.2.1") == ("IPv4",)
    assert families("192.0.2.1", "fd00::1") == ("IPv4", "IPv6")
    assert families("fd00::1", "192.0.2.1") == ("IPv4", "IPv6")
    assert families("fd00::1") == ("IPv6",)  # an IPv6-only node reports no IPv4
    assert listen_addresses(families("fd00::1")) == ("::",)
    assert listen_addresses(families("192.0.2.1")) == ("0.0.0.0",)


# ---- /healthz and /livez ----


@needs_ipv6
def test_healthz_on_an_unspecified_address_serves_both_families_as_go_listens() -> None:
    """kube-proxy's --healthz-bind-address 0.0.0.0:10256 is Go's net.Listen("tcp", ...): every
    address of both families. A specific address is listened on alone."""

    async def scenario() -> None:
        for wildcard in ("0.0.0.0", "::"):
            hs = HealthServer(wildcard, 0, clock=Clock(T0), ip_families=("IPv4", "IPv6"))
            await hs.start()
            try:
                assert hs.hosts == ["0.0.0.0", "::"]
                for host in ("127.0.0.1", "::1"):
                    status, _, body = await raw_get(hs.port, "/healthz", host=host)
                    assert status == 200 and set(json.loads(body)["status"]) == {"IPv4", "IPv6"}
            finally:
                await hs.stop()
        hs = HealthServer("127.0.0.1", 0, clock=Clock(T0))
        await hs.start()
        try:
            assert hs.hosts == ["127.0.0.1"]
            with pytest.raises(OSError):
                await raw_get(hs.port, "/healthz", host="::1")
        finally:
            await hs.stop()

    asyncio.run(scenario())


def test_go_json_time_is_rfc3339_nano_in_utc() -> None:
    assert go_json_time(None) == "0001-01-01T00:00:00Z"
    assert go_json_time(T0) == "2023-11-14T22:13:20Z"
    assert go_json_time(T0 + 1.25) == "2023-11-14T22:13:21.25Z"
    assert go_json_time(T0 + 0.000001) == "2023-11-14T22:13:20.000001Z"


def test_healthz_and_livez_answer_byte_for_byte() -> None:
    async def scenario() -> None:
        clock = Clock(T0)
        hs = HealthServer("127.0.0.1", 0, clock=clock)
        await hs.start()  # the sync loop starts: its family counts as updated now
        try:
            clock.t = T0 + 1.25
            hs.update(True)
            clock.t = T0 + 2.5
            synced = '"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:21.25Z","healthy":true}}'
            now = '"lastUpdated":"2023-11-14T22:13:22.5Z","currentTime":"2023-11-14T22:13:22.5Z"'

            status, headers, body = await raw_get(hs.port, "/healthz")
            assert (status, headers["content-type"], headers["x-content-type-options"]) == (
                200,
                "application/json",
                "nosniff",
            )
            assert body == f'{{{now},"nodeEligible":true,"healthy":true,{synced}}}'.encode()
            status, headers, body = await raw_get(hs.port, "/livez")
            assert (status, headers["content-type"], headers["x-content-type-options"]) == (
                200,
                "application/json",
                "nosniff",
            )
            assert body == f'{{{now},"healthy":true,{synced}}}'.encode()

            # KEP-3836: the Node is being deleted or drained -> /healthz 503, /livez still 200.
            # lastUpdated is then the real one; "healthy" stays the proxy's own health.
            hs.set_node_eligible(False)
            status, headers, body = await raw_get(hs.port, "/healthz")
            assert (status, headers["content-type"], headers["x-content-type-options"]) == (
                503,
                "application/json",
                "nosniff",
            )
            assert body == (
                b'{"lastUpdated":"2023-11-14T22:13:21.25Z","currentTime":"2023-11-14T22:13:22.5Z",'
                b'"nodeEligible":false,"healthy":true,' + synced.encode() + b"}"
            )
            status, _, body = await raw_get(hs.port, "/livez")
            assert status == 200 and body == f'{{{now},"healthy":true,{synced}}}'.encode()
            status, _, body = await raw_get(hs.port, "/readyz")  # readiness follows /healthz
            assert status == 503 and json.loads(body)["staleWatches"] == []

            # a watch the Service view needs is down: not ready; /healthz and /livez keep kube-proxy's
            # meaning (load balancers probe /healthz on every node)
            hs.set_node_eligible(True)
            hs.set_stale_watches(["endpointslices"])
            status, _, body = await raw_get(hs.port, "/readyz")
            assert status == 503 and json.loads(body)["staleWatches"] == ["endpointslices"]
            assert (await raw_get(hs.port, "/healthz"))[0] == 200 and (await raw_get(hs.port, "/livez"))[
                0
            ] == 200
            hs.set_stale_watches([])
            assert (await raw_get(hs.port, "/readyz"))[0] == 200

            # a change pending for the whole timeout: unhealthy on both, whatever the Node says
            hs.set_node_eligible(True)
            clock.t = T0 + 3
            hs.queued()
            clock.t = T0 + 63
            late = (
                '{"lastUpdated":"2023-11-14T22:13:21.25Z","currentTime":"2023-11-14T22:14:23Z",%s"healthy":false,'
                '"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:21.25Z","healthy":false}}}'
            )
            status, _, body = await raw_get(hs.port, "/healthz")
            assert status == 503 and body == (late % '"nodeEligible":true,').encode()
            status, _, body = await raw_get(hs.port, "/livez")
            assert status == 503 and body == (late % "").encode()

            status, headers, body = await raw_get(hs.port, "/nope")
            assert (status, body) == (404, b"404 page not found\n")
            assert headers["content-type"] == "text/plain; charset=utf-8"
        finally:
            await hs.stop()

    asyncio.run(scenario())


def test_before_the_sync_loop_starts_the_proxy_is_healthy_without_status() -> None:
    clock = Clock(T0)
    hs = HealthServer("127.0.0.1", 0, clock=clock)
    hs.queued()
    clock.t = T0 + 3600  # kube-proxy only times out families whose sync loop has started
    assert hs.livez() == (
        200,
        {"lastUpdated": "2023-11-14T23:13:20Z", "currentTime": "2023-11-14T23:13:20Z", "healthy": True},
    )
