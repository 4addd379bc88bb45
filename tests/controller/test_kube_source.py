"""The real KubeSource (kopf + its own LIST) against the API double, down to the maps.

Maps are real pinned maps in a private bpffs when running as root with the BPF object built, the
in-memory twin otherwise (see conftest.mapset_factory). No timing assertions: waits are bounded
only so that a failure ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from kproxy import abi
from tests.controller.apiserver import DEFAULT_TOKEN, endpoint_slice, pod_ip, service
from tests.controller.conftest import NODE, NODE_IP, Harness, new_api, run
from tests.controller.rbac import render_chart, settings_configmap

F = abi.SvcFlag


async def _harness(api: Any, maps: Any, **kw: Any) -> Harness:
    h = Harness(api, maps, **kw)
    await h.start()
    await h.settled()
    return h


def test_every_service_type_created_updated_deleted(mapset_factory: Any) -> None:
    async def scenario() -> None:
        api = new_api()
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            api.put(service("web", "10.96.0.10"))
            api.put(endpoint_slice("web", ["10.128.0.1", "10.128.0.2"]))
            api.put(
                service(
                    "np",
                    "10.96.0.11",
                    [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}],
                    svc_type="NodePort",
                )
            )
            api.put(endpoint_slice("np", ["10.128.0.3"]))
            lb = service(
                "lb",
                "10.96.0.12",
                [{"name": "dns", "port": 53, "targetPort": 5353, "nodePort": 30053, "protocol": "UDP"}],
                svc_type="LoadBalancer",
            )
            lb["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}
            api.put(lb)
            api.put(
                endpoint_slice("lb", ["10.128.0.4"], ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}])
            )
            api.put(service("ext", "10.96.0.13", externalIPs=["198.51.100.9"]))
            api.put(endpoint_slice("ext", ["10.128.0.5"]))
            # Services and their slices come through separate watches: wait for both, not for a count of
            # frontends (Services without endpoints yet have frontends too).
            want = {
                ("10.96.0.10", 80, "TCP"): ["10.128.0.1:8080", "10.128.0.2:8080"],
                (NODE_IP, 30080, "TCP"): ["10.128.0.3:8080"],
                ("203.0.113.7", 53, "UDP"): ["10.128.0.4:5353"],
                (NODE_IP, 30053, "UDP"): ["10.128.0.4:5353"],
            }
            await h.wait_for(
                "all four Services and their endpoints programmed",
                lambda: (
                    all(h.backends_of(*fe) == bes for fe, bes in want.items())
                    and bool(h.backends_of("198.51.100.9", 80))
                ),
            )
            await h.settled()
            fes = h.frontends()
            assert fes[("10.96.0.10", 80, "TCP", 0)]["backends"] == ["10.128.0.1:8080", "10.128.0.2:8080"]
            assert fes[("10.96.0.10", 80, "TCP", 0)]["flags"] & (F.NODEPORT | F.LOADBALANCER) == 0
            assert fes[(NODE_IP, 30080, "TCP", 0)]["flags"] & F.NODEPORT
            assert fes[(NODE_IP, 30080, "TCP", 0)]["backends"] == ["10.128.0.3:8080"]
            assert fes[("203.0.113.7", 53, "UDP", 0)]["flags"] & F.LOADBALANCER
            assert fes[("203.0.113.7", 53, "UDP", 0)]["backends"] == ["10.128.0.4:5353"]
            assert fes[(NODE_IP, 30053, "UDP", 0)]["backends"] == ["10.128.0.4:5353"]
            assert fes[("198.51.100.9", 80, "TCP", 0)]["flags"] & F.EXTERNAL_IP

            # update: scale web up, change np's port, drop lb's slice
            api.put(endpoint_slice("web", ["10.128.0.1", "10.128.0.2", "10.128.0.9"]))
            api.patch(
                "Service",
                "default",
                "np",
                {
                    "spec": {
                        "ports": [
                            {
                                "name": "http",
                                "port": 81,
                                "targetPort": 8080,
                                "nodePort": 30081,
                                "protocol": "TCP",
                            }
                        ]
                    }
                },
            )
            api.delete("EndpointSlice", "default", "lb-abc")
            await h.wait_for(
                "updates programmed",
                lambda: (
                    h.backends_of("10.96.0.10", 80) is not None
                    and len(h.backends_of("10.96.0.10", 80) or []) == 3
                    and h.backends_of("10.96.0.11", 81) == ["10.128.0.3:8080"]
                    and h.frontends().get(("203.0.113.7", 53, "UDP", 0), {}).get("count") == 0
                ),
            )
            await h.settled()
            fes = h.frontends()
            assert ("10.96.0.11", 80, "TCP", 0) not in fes
            assert (NODE_IP, 30080, "TCP", 0) not in fes
            assert fes[(NODE_IP, 30081, "TCP", 0)]["backends"] == ["10.128.0.3:8080"]

            # delete every Service
            for name in ("web", "np", "lb", "ext"):
                api.delete("Service", "default", name)
            await h.wait_for("all frontends gone", lambda: not h.frontends())
            await h.settled()
            for name in ("web", "np", "ext"):
                api.delete("EndpointSlice", "default", f"{name}-abc")
            await h.wait_for("all backends gone", lambda: len(h.maps.be4) == 0)
        finally:
            await h.stop()
            await api.stop()

    run(scenario())


def test_thousand_rapid_updates_end_in_exactly_the_right_maps(mapset_factory: Any) -> None:
    async def scenario() -> None:
        api = new_api()
        for i in range(20):
            api.put(service(f"s{i}", f"10.96.1.{i + 1}"))
            api.put(endpoint_slice(f"s{i}", [pod_ip(i * 10)]))
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            expected: dict[int, list[str]] = {}
            for n in range(1000):
                i = n % 20
                addrs = [pod_ip(1000 + n * 4 + j) for j in range(n % 4 + 1)]
                api.put(endpoint_slice(f"s{i}", addrs))
                expected[i] = sorted(f"{a}:8080" for a in addrs)
                if n % 100 == 0:
                    await asyncio.sleep(0)  # let the watch deliver part of the burst mid-way
            await h.wait_for(
                "last update of every Service programmed",
                lambda: all(h.backends_of(f"10.96.1.{i + 1}", 80) == expected[i] for i in range(20)),
                timeout=40,
            )
            await h.settled()
            fes = h.frontends()
            assert len(fes) == 20
            for i in range(20):
                assert fes[(f"10.96.1.{i + 1}", 80, "TCP", 0)]["backends"] == expected[i]
            # nothing else: exactly the backends the last slices name
            assert len(h.maps.be4) == sum(len(v) for v in expected.values())
        finally:
            await h.stop()
            await api.stop()

    run(scenario())


def _raw(maps: Any) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    return (
        {bytes(k): bytes(v) for k, v in maps.svc4.items()},
        {bytes(k): bytes(v) for k, v in maps.be4.items()},
    )


def test_restart_with_unchanged_objects_leaves_entries_and_ids_untouched(mapset_factory: Any) -> None:
    async def scenario() -> None:
        api = new_api()
        for i in range(50):
            api.put(
                service(
                    f"s{i}",
                    f"10.96.2.{i + 1}",
                    svc_type="NodePort" if i % 5 == 0 else "ClusterIP",
                    ports=[
                        {
                            "name": "http",
                            "port": 80,
                            "targetPort": 8080,
                            "protocol": "TCP",
                            **({"nodePort": 30000 + i} if i % 5 == 0 else {}),
                        }
                    ],
                )
            )
            api.put(endpoint_slice(f"s{i}", [pod_ip(i * 3 + j) for j in range(3)]))
        await api.start()
        first = await _harness(api, mapset_factory())
        before = _raw(first.maps)
        ids_before = {k: v["ids"] for k, v in first.frontends().items()}
        await first.stop()
        assert len(before[0]) > 0

        second = await _harness(api, mapset_factory())
        try:
            assert _raw(second.maps) == before
            assert {k: v["ids"] for k, v in second.frontends().items()} == ids_before
            # the adopting full sync found nothing to write
            assert second.reports[0].writes == 0, second.reports[0]
        finally:
            await second.stop()
            await api.stop()

    run(scenario())


def test_410_with_deletions_during_the_gap_removes_those_services(mapset_factory: Any) -> None:
    async def scenario() -> None:
        api = new_api()
        for i in range(10):
            api.put(service(f"s{i}", f"10.96.3.{i + 1}"))
            api.put(endpoint_slice(f"s{i}", [pod_ip(i)]))
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            assert len(h.frontends()) == 10
            await h.wait_for(
                "kopf watching", lambda: api.watch_count("services") and api.watch_count("endpointslices")
            )
            gone_before = api.requests["GONE services"]
            # Deleted while the watch history is compacted away: no DELETED event ever reaches kopf.
            for i in (2, 5, 7):
                api.delete_silently("Service", "default", f"s{i}")
                api.delete_silently("EndpointSlice", "default", f"s{i}-abc")
            api.put(service("fresh", "10.96.3.100"))  # a change kopf will also only see by re-listing
            api.expire_history()
            await h.wait_for("kopf got 410 Gone", lambda: api.requests["GONE services"] > gone_before)
            await h.wait_for(
                "deleted Services gone from the maps",
                lambda: all((f"10.96.3.{i + 1}", 80, "TCP", 0) not in h.frontends() for i in (2, 5, 7)),
            )
            await h.settled()
            fes = h.frontends()
            assert {k[0] for k in fes} == {f"10.96.3.{i + 1}" for i in range(10) if i not in (2, 5, 7)} | {
                "10.96.3.100"
            }
            assert h.source is not None and h.source.lists_done >= 2
        finally:
            await h.stop()
            await api.stop()

    run(scenario())


# kopf retries after 0.5, 1, 1, 2, 2, 3 ... s: 4 s spans several retries; 30 s is the case.
OUTAGE_SECONDS = [4.0, pytest.param(30.0, marks=pytest.mark.slow)]


@pytest.mark.parametrize("outage", OUTAGE_SECONDS)
def test_api_outage_keeps_serving_then_recovers(mapset_factory: Any, outage: float) -> None:
    async def scenario() -> None:
        api = new_api()
        for i in range(10):
            api.put(service(f"s{i}", f"10.96.4.{i + 1}"))
            api.put(endpoint_slice(f"s{i}", [pod_ip(i)]))
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            before = _raw(h.maps)
            await api.go_down()
            # Changes made while the agent cannot see them (as if on another API server replica).
            api.delete("Service", "default", "s1")
            api.put(endpoint_slice("s2", [pod_ip(100), pod_ip(101)]))
            api.put(service("born-in-outage", "10.96.4.200"))
            api.put(endpoint_slice("born-in-outage", [pod_ip(200)]))
            await asyncio.sleep(outage)
            # The dataplane kept the last known state during the whole outage.
            assert _raw(h.maps) == before
            assert h.store.initial_sync_done
            await api.come_up()
            await h.wait_for(
                "changes made during the outage programmed",
                lambda: (
                    ("10.96.4.2", 80, "TCP", 0) not in h.frontends()
                    and h.backends_of("10.96.4.3", 80)
                    == sorted([f"{pod_ip(100)}:8080", f"{pod_ip(101)}:8080"])
                    and h.backends_of("10.96.4.200", 80) == [f"{pod_ip(200)}:8080"]
                ),
                timeout=outage + 30,
            )
        finally:
            await h.stop()
            await api.stop()

    run(scenario(), timeout=outage + 90)


def test_error_event_stops_kopf_and_the_supervisor_restarts_it(mapset_factory: Any) -> None:
    async def scenario() -> None:
        api = new_api()
        api.put(service("a", "10.96.5.1"))
        api.put(endpoint_slice("a", [pod_ip(1)]))
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            assert h.source is not None
            source = h.source
            await h.wait_for("kopf watching", lambda: api.watch_count("services") > 0)
            runs = source.watch_status("services").runs
            before = _raw(h.maps)
            api.inject_error(500)
            await h.wait_for("kopf restarted", lambda: source.watch_status("services").runs > runs)
            assert _raw(h.maps) == before  # nothing was touched while kopf was down
            api.put(endpoint_slice("a", [pod_ip(1), pod_ip(2)]))
            await h.wait_for(
                "a change after the restart programmed",
                lambda: len(h.backends_of("10.96.5.1", 80) or []) == 2,
            )
        finally:
            await h.stop()
            await api.stop()

    run(scenario())


def test_nothing_is_programmed_before_the_initial_listing_completes(mapset_factory: Any) -> None:
    async def scenario() -> None:
        api = new_api()
        api.put(service("a", "10.96.6.1"))
        api.put(endpoint_slice("a", [pod_ip(1)]))
        await api.start()
        await api.go_down()
        maps = mapset_factory()
        h = Harness(api, maps)
        await h.start()
        try:
            await asyncio.sleep(1.5)
            assert not h.store.initial_sync_done
            assert len(maps.svc4) == 0 and not h.reports
            await api.come_up()
            await h.settled()
            assert h.backends_of("10.96.6.1", 80) == [f"{pod_ip(1)}:8080"]
        finally:
            await h.stop()
            await api.stop()

    run(scenario())


MALFORMED: list[tuple[str, dict[str, Any]]] = [
    ("missing-spec-ports-port", service("bad-noport", "10.96.7.1", [{"name": "http", "protocol": "TCP"}])),
    ("wrong-type", service("bad-type", "10.96.7.2", [{"name": "http", "port": "eighty", "protocol": "TCP"}])),
    ("invalid-ip", service("bad-ip", "10.96.7.300")),
    ("port-0", service("bad-port0", "10.96.7.4", [{"name": "http", "port": 0, "protocol": "TCP"}])),
    (
        "port-70000",
        service("bad-port70000", "10.96.7.5", [{"name": "http", "port": 70000, "protocol": "TCP"}]),
    ),
    (
        "duplicate-ports",
        service(
            "bad-dup",
            "10.96.7.6",
            [{"name": "a", "port": 80, "protocol": "TCP"}, {"name": "b", "port": 80, "protocol": "TCP"}],
        ),
    ),
    (
        "thousand-ports",
        service(
            "bad-many",
            "10.96.7.7",
            [{"name": f"p{i}", "port": 1000 + i, "protocol": "TCP"} for i in range(1000)],
        ),
    ),
    (
        "spec-not-a-map",
        {"kind": "Service", "metadata": {"name": "bad-spec", "namespace": "default"}, "spec": "x"},
    ),
]


def test_malformed_objects_are_skipped_logged_and_counted(
    mapset_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        api = new_api()
        api.put(service("good-early", "10.96.7.100"))
        api.put(endpoint_slice("good-early", [pod_ip(1)]))
        for _, obj in MALFORMED[:4]:
            api.put(dict(obj))  # some are there at the initial listing, the others arrive by watch
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            for _, obj in MALFORMED[4:]:
                api.put(dict(obj))
            api.put(
                endpoint_slice("good-early", [pod_ip(1)], name="bad-slice-ip")
                | {"endpoints": [{"addresses": ["not-an-ip"], "conditions": {"ready": True}}]}
            )
            api.put(service("good-late", "10.96.7.101"))
            api.put(endpoint_slice("good-late", [pod_ip(2)]))
            await h.wait_for(
                "valid Services programmed", lambda: h.backends_of("10.96.7.101", 80) is not None
            )
            await h.wait_for(
                "every malformed object counted", lambda: sum(h.store.skipped.values()) >= len(MALFORMED) + 1
            )
            await h.settled()
            vips = {k[0] for k in h.frontends()}
            assert vips == {"10.96.7.100", "10.96.7.101"}
            assert h.backends_of("10.96.7.100", 80) == [f"{pod_ip(1)}:8080"]
            text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
            for _, obj in MALFORMED:
                assert f"Service default/{obj['metadata']['name']}" in text
            assert "EndpointSlice default/bad-slice-ip" in text
            metrics = h.metrics.render().decode()
            assert 'kproxy_objects_skipped_total{kind="Service"' in metrics
            assert 'kind="EndpointSlice"' in metrics
            # A resync does not log the unchanged malformed objects again (no spam per listing).
            lines = len(caplog.records)
            assert h.source is not None
            h.source.request_resync("test")
            n = h.source.lists_done
            await h.wait_for("resync done", lambda: h.source is not None and h.source.lists_done > n)
            assert not [r for r in caplog.records[lines:] if "skipped" in r.getMessage()]
        finally:
            await h.stop()
            await api.stop()

    caplog.set_level(logging.INFO)
    run(scenario())


def test_settings_configmap_patch_reaches_the_callback(mapset_factory: Any) -> None:
    """The chart's ConfigMap, watched in its namespace by name (all the chart's Role grants), patched
    as `kproxy dsr enable` does from a pod with the ServiceAccount's token."""

    async def scenario() -> None:
        ns, name = settings_configmap(render_chart())
        api = new_api()
        api.put(
            {"kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}, "data": {"dsr-mode": "off"}}
        )
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            assert h.settings[-1] == {"dsr-mode": "off"}
            async with aiohttp.ClientSession() as http:
                url = f"{api.url}/api/v1/namespaces/{ns}/configmaps/{name}"
                async with http.patch(
                    url,
                    json={"data": {"dsr-mode": "ipip"}},
                    headers={
                        "Content-Type": "application/merge-patch+json",
                        "Authorization": f"Bearer {DEFAULT_TOKEN}",
                    },
                ) as r:
                    assert r.status == 200
            await h.wait_for("new settings delivered", lambda: h.settings[-1] == {"dsr-mode": "ipip"})
            api.delete("ConfigMap", ns, name)
            await h.wait_for("deleted ConfigMap means defaults", lambda: h.settings[-1] == {})
            assert not api.denied, api.denied  # the agent asked for nothing the chart does not grant
        finally:
            await h.stop()
            await api.stop()

    run(scenario())


def test_healthz_and_health_check_node_ports(mapset_factory: Any) -> None:
    async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
        async with http.get(url) as r:
            return r.status, await r.json(content_type=None)

    async def scenario() -> None:
        import socket as s

        def free_port() -> int:
            with s.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return int(sock.getsockname()[1])

        hc_local, hc_remote = free_port(), free_port()
        api = new_api()
        for name, hc, ep_node in (("local", hc_local, NODE), ("remote", hc_remote, "node-b")):
            api.put(
                service(
                    name,
                    f"10.96.8.{hc % 200 + 1}",
                    [
                        {
                            "name": "http",
                            "port": 80,
                            "targetPort": 8080,
                            "nodePort": 30000 + hc % 2000,
                            "protocol": "TCP",
                        }
                    ],
                    svc_type="LoadBalancer",
                    externalTrafficPolicy="Local",
                    healthCheckNodePort=hc,
                )
            )
            api.put(endpoint_slice(name, [pod_ip(hc % 1000)], node=ep_node))
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            async with aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{h.health.port}"
                status, body = await get(http, base + "/healthz")
                assert status == 200 and body["nodeEligible"] is True
                # kube-proxy v1.33+ (ProxyHealth), in its order; exact bytes: tests/unit/test_health.py
                assert list(body) == ["lastUpdated", "currentTime", "nodeEligible", "healthy", "status"]
                status, body = await get(http, base + "/livez")
                assert status == 200 and list(body) == ["lastUpdated", "currentTime", "healthy", "status"]

                status, body = await get(http, f"http://127.0.0.1:{hc_local}/")
                assert status == 200
                assert body == {
                    "service": {"namespace": "default", "name": "local"},
                    "localEndpoints": 1,
                    "serviceProxyHealthy": True,
                }
                status, body = await get(http, f"http://127.0.0.1:{hc_remote}/")
                assert status == 503 and body["localEndpoints"] == 0 and body["serviceProxyHealthy"] is True

                # the local endpoint moves away -> 503; back -> 200
                api.put(endpoint_slice("local", [pod_ip(hc_local % 1000)], node="node-b"))
                await h.wait_for(
                    "local endpoint count 0",
                    lambda: h.hc is not None and h.hc.answer(("default", "local"))[0] == 503,
                )
                status, body = await get(http, f"http://127.0.0.1:{hc_local}/")
                assert status == 503 and body["localEndpoints"] == 0

                # the Service stops being eTP=Local -> its port is closed
                api.patch(
                    "Service",
                    "default",
                    "remote",
                    {"spec": {"externalTrafficPolicy": "Cluster", "healthCheckNodePort": None}},
                )
                await h.wait_for(
                    "health port closed", lambda: h.hc is not None and ("default", "remote") not in h.hc.ports
                )
                with pytest.raises(aiohttp.ClientConnectionError):
                    await get(http, f"http://127.0.0.1:{hc_remote}/")

                # node tainted for deletion: /healthz fails, /livez does not
                api.patch(
                    "Node",
                    None,
                    NODE,
                    {"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}},
                )
                await h.wait_for("node not eligible", lambda: not h.health.node_eligible)
                status, body = await get(http, base + "/healthz")
                assert status == 503 and body["nodeEligible"] is False
                status, _ = await get(http, base + "/livez")
                assert status == 200

                # a change that cannot be programmed for longer than the timeout: unhealthy everywhere
                h.health.health_timeout = 0.0
                h.health.queued()
                status, _ = await get(http, base + "/livez")
                assert status == 503
                api.put(endpoint_slice("local", [pod_ip(hc_local % 1000)], node=NODE))
                await h.wait_for(
                    "local endpoint back",
                    lambda: h.hc is not None and h.hc.answer(("default", "local"))[1]["localEndpoints"] == 1,
                )
                h.health.queued()
                status, body = await get(http, f"http://127.0.0.1:{hc_local}/")
                assert status == 503 and body["serviceProxyHealthy"] is False and body["localEndpoints"] == 1
        finally:
            await h.stop()
            await api.stop()

    run(scenario())
