"""ServiceCIDRs (networking.k8s.io/v1) through the real KubeSource into store.service_cidrs.

Like Services: kopf's watch and KubeSource's own LIST, a relist removing what vanished, invalid objects
skipped and counted. Unlike them, optional: an API server that does not serve them (before Kubernetes
1.33) or forbids them (RBAC) must leave everything else working, with one warning, and be tried again
at every full listing. No timing assertions: waits are bounded only so that a failure ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import aiohttp
import kopf
import pytest

from kproxy.sources.kube import KubeSourceConfig, kopf_settings
from tests.controller.apiserver import (
    DEFAULT_TOKEN,
    FakeApiServer,
    endpoint_slice,
    pod_ip,
    service,
    service_cidr,
)
from tests.controller.conftest import NODE, Harness, new_api, run

PLURAL = "servicecidrs"


async def _harness(api: FakeApiServer, maps: Any, **kw: Any) -> Harness:
    h = Harness(api, maps, **kw)
    await h.start()
    await h.settled()
    return h


def _with_web(api: FakeApiServer, vip: str = "10.96.0.10") -> None:
    api.put(service("web", vip))
    api.put(endpoint_slice("web", [pod_ip(1)]))


def _sample(h: Harness, name: str, **labels: str) -> float:
    return h.metrics.registry.get_sample_value(name, labels) or 0.0


def _warnings(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()
    ]


async def _kopf_settles(h: Harness, api: FakeApiServer, *, watching_cidrs: bool) -> None:
    """Wait until kopf watches Services (and ServiceCIDRs, or not) and its run count stops moving."""
    assert h.source is not None
    source = h.source
    await h.wait_for(
        "kopf (re)started watching services" + (" and servicecidrs" if watching_cidrs else " only"),
        lambda: (
            source.kopf_watches_service_cidrs == watching_cidrs
            and api.watch_count("services") > 0
            and (api.watch_count(PLURAL) > 0) == watching_cidrs
        ),
        timeout=60,
    )
    # A spinning kopf would restart again and again: its run count must stay put for a while.
    runs = [w.runs for w in source.watches]
    lists = source.lists_done
    await h.wait_for("two more full listings", lambda: source.lists_done >= lists + 2, timeout=60)
    assert [w.runs for w in source.watches] == runs, "a watch restarted although nothing changed"


def test_service_cidrs_created_updated_deleted_reach_the_store(mapset_factory: Any) -> None:
    async def scenario() -> None:
        api = new_api()
        api.put(service_cidr("kubernetes", "10.96.0.0/16", "fd00:10:96::/112"))
        _with_web(api)
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            # from the initial LIST, both families (the IPv6 range goes to kp_svcnet6_v1)
            assert h.store.service_cidrs == ["10.96.0.0/16", "fd00:10:96::/112"]
            assert h.source is not None and h.source.service_cidrs_available is True
            await h.wait_for("kopf watching servicecidrs", lambda: api.watch_count(PLURAL) > 0)

            api.put(service_cidr("extra", "10.100.0.0/16"))
            await h.wait_for(
                "created ServiceCIDR in the store",
                lambda: h.store.service_cidrs == ["10.100.0.0/16", "10.96.0.0/16", "fd00:10:96::/112"],
            )
            api.patch("ServiceCIDR", None, "extra", {"spec": {"cidrs": ["10.101.0.0/16"]}})
            await h.wait_for(
                "updated ServiceCIDR in the store",
                lambda: h.store.service_cidrs == ["10.101.0.0/16", "10.96.0.0/16", "fd00:10:96::/112"],
            )
            api.delete("ServiceCIDR", None, "extra")
            await h.wait_for(
                "deleted ServiceCIDR gone",
                lambda: h.store.service_cidrs == ["10.96.0.0/16", "fd00:10:96::/112"],
            )
            assert _sample(h, "kproxy_source_events_total", kind="ServiceCIDR", type="DELETED") >= 1
            # Services are unaffected
            assert h.backends_of("10.96.0.10", 80) == [f"{pod_ip(1)}:8080"]
        finally:
            await h.stop()
            await api.stop()

    run(scenario())


def test_relist_removes_a_service_cidr_that_vanished_unseen(mapset_factory: Any) -> None:
    async def scenario() -> None:
        api = new_api()
        api.put(service_cidr("kubernetes", "10.96.0.0/16"))
        api.put(service_cidr("extra", "10.100.0.0/16"))
        _with_web(api)
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            assert h.source is not None
            assert h.store.service_cidrs == ["10.100.0.0/16", "10.96.0.0/16"]
            await h.wait_for("kopf watching servicecidrs", lambda: api.watch_count(PLURAL) > 0)
            # No DELETED event ever reaches kopf: only a full listing can notice.
            api.delete_silently("ServiceCIDR", None, "extra")
            h.source.request_resync("test")
            await h.wait_for("vanished ServiceCIDR gone", lambda: h.store.service_cidrs == ["10.96.0.0/16"])
            assert h.backends_of("10.96.0.10", 80) == [f"{pod_ip(1)}:8080"]
        finally:
            await h.stop()
            await api.stop()

    run(scenario())


def test_invalid_service_cidrs_are_skipped_logged_and_counted(
    mapset_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        api = new_api()
        api.put(service_cidr("kubernetes", "10.96.0.0/16"))
        api.put(service_cidr("bad-prefix", "10.97.0.0/33"))  # at the initial listing
        api.put({"kind": "ServiceCIDR", "metadata": {"name": "no-spec"}})
        _with_web(api)
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            await h.wait_for("kopf watching servicecidrs", lambda: api.watch_count(PLURAL) > 0)
            # and by watch
            api.put(service_cidr("bad-text", "not-a-cidr"))
            api.put(
                {"kind": "ServiceCIDR", "metadata": {"name": "bad-shape"}, "spec": {"cidrs": "10.0.0.0/8"}}
            )
            api.put(service_cidr("empty"))
            api.put(service_cidr("good-late", "10.98.0.0/16"))
            # an invalid edit of a valid one keeps its last valid ranges
            api.put(service_cidr("kubernetes", "10.96.0.0/99"))
            bad = ["bad-prefix", "no-spec", "bad-text", "bad-shape", "empty", "kubernetes"]
            await h.wait_for(
                "every invalid ServiceCIDR counted",
                lambda: (
                    sum(n for (kind, _), n in h.store.skipped.items() if kind == "ServiceCIDR") >= len(bad)
                ),
            )
            await h.wait_for(
                "the valid late one in the store",
                lambda: h.store.service_cidrs == ["10.96.0.0/16", "10.98.0.0/16"],
            )
            for name in bad:
                assert _warnings(caplog, f"ServiceCIDR {name} skipped"), name
            assert {reason for (kind, reason) in h.store.skipped if kind == "ServiceCIDR"} == {
                "invalid_cidr",
                "missing_spec",
                "invalid_cidrs",
            }
            assert 'kproxy_objects_skipped_total{kind="ServiceCIDR"' in h.metrics.render().decode()
            # Services still work, by watch too
            api.put(endpoint_slice("web", [pod_ip(1), pod_ip(2)]))
            await h.wait_for(
                "Service update programmed", lambda: len(h.backends_of("10.96.0.10", 80) or []) == 2
            )
            # a full listing does not log the unchanged invalid objects again
            lines = len(caplog.records)
            assert h.source is not None
            n = h.source.lists_done
            h.source.request_resync("test")
            await h.wait_for("resync done", lambda: h.source is not None and h.source.lists_done > n)
            assert not [r for r in caplog.records[lines:] if "skipped" in r.getMessage()]
            # fixed: used again
            api.put(service_cidr("kubernetes", "10.96.0.0/12"))
            await h.wait_for(
                "fixed one used", lambda: h.store.service_cidrs == ["10.96.0.0/12", "10.98.0.0/16"]
            )
        finally:
            await h.stop()
            await api.stop()

    caplog.set_level(logging.INFO)
    run(scenario())


@pytest.mark.parametrize(
    ("access", "needle"),
    [
        pytest.param({"unserved": {PLURAL}}, "does not serve ServiceCIDRs", id="not-served-404"),
        pytest.param({"forbidden": {PLURAL}}, "is forbidden (HTTP 403)", id="forbidden-403"),
    ],
)
def test_without_service_cidrs_everything_else_works_and_they_are_tried_again(
    mapset_factory: Any, caplog: pytest.LogCaptureFixture, access: dict[str, set[str]], needle: str
) -> None:
    async def scenario() -> None:
        api = new_api(**access)
        api.put(service_cidr("kubernetes", "10.96.0.0/16"))  # in etcd, but not to be seen
        _with_web(api)
        await api.start()
        # A short resync interval: "tried again at the next periodic resync" without waiting minutes.
        h = await _harness(api, mapset_factory(), resync_interval=0.5)
        try:
            source = h.source
            assert source is not None
            assert source.initial_sync_done.is_set() and h.store.initial_sync_done
            assert h.backends_of("10.96.0.10", 80) == [f"{pod_ip(1)}:8080"]
            assert h.store.service_cidrs == []
            assert source.service_cidrs_available is False
            await _kopf_settles(h, api, watching_cidrs=False)
            # never tried (a forbidden watch would only fail), nothing restarted
            assert api.requests[f"WATCH {PLURAL}"] == 0
            assert source.watch_status(PLURAL).runs == 0
            assert [w.runs for w in source.watches if w.resource != PLURAL] == [1] * (len(source.watches) - 1)
            assert _sample(h, "kproxy_source_restarts_total", resource="services") == 0
            # one warning, however many listings tried again
            assert source.lists_done >= 3
            assert len(_warnings(caplog, needle)) == 1, _warnings(caplog, "ServiceCIDR")
            # Services and slices still flow through kopf
            api.put(service("late", "10.96.0.20"))
            api.put(endpoint_slice("late", [pod_ip(3)]))
            await h.wait_for("a Service added by watch", lambda: h.backends_of("10.96.0.20", 80) is not None)

            # The API server serves / allows them now: the next periodic listing picks them up and kopf
            # is restarted once to watch them.
            api.set_access(PLURAL)
            await h.wait_for("ServiceCIDRs listed", lambda: h.store.service_cidrs == ["10.96.0.0/16"])
            await _kopf_settles(h, api, watching_cidrs=True)
            assert source.watch_status(PLURAL).runs == 1
            assert source.watch_status("services").runs == 1  # the other watches were left alone
            api.put(service_cidr("extra", "10.100.0.0/16"))
            await h.wait_for(
                "a ServiceCIDR added", lambda: h.store.service_cidrs == ["10.100.0.0/16", "10.96.0.0/16"]
            )
            await h.wait_for(
                "it came through kopf",
                lambda: _sample(h, "kproxy_source_events_total", kind="ServiceCIDR", type="ADDED") >= 1,
            )
            api.put(endpoint_slice("late", [pod_ip(3), pod_ip(4)]))
            await h.wait_for("Services still flow", lambda: len(h.backends_of("10.96.0.20", 80) or []) == 2)
        finally:
            await h.stop()
            await api.stop()

    caplog.set_level(logging.INFO)
    run(scenario(), timeout=180)


@pytest.mark.parametrize("access", [{"served": False}, {"allowed": False}], ids=["stops-serving", "forbids"])
def test_service_cidrs_going_away_while_watched_do_not_break_the_other_watches(
    mapset_factory: Any, caplog: pytest.LogCaptureFixture, access: dict[str, bool]
) -> None:
    async def scenario() -> None:
        api = new_api()
        api.put(service_cidr("kubernetes", "10.96.0.0/16"))
        _with_web(api)
        await api.start()
        h = await _harness(api, mapset_factory(), resync_interval=0.5)
        try:
            source = h.source
            assert source is not None
            await _kopf_settles(h, api, watching_cidrs=True)
            # kopf's watch of them ends (an API server restarted without them, or RBAC changed)
            api.set_access(PLURAL, **access)
            await h.wait_for(
                "ServiceCIDRs found unavailable", lambda: source.service_cidrs_available is False
            )
            await _kopf_settles(h, api, watching_cidrs=False)
            assert h.store.service_cidrs == ["10.96.0.0/16"], "the last known ranges stay"
            api.put(endpoint_slice("web", [pod_ip(1), pod_ip(2)]))
            await h.wait_for("Services still flow", lambda: len(h.backends_of("10.96.0.10", 80) or []) == 2)
            assert _warnings(caplog, "ServiceCIDRs (networking.k8s.io/v1 servicecidrs")
        finally:
            await h.stop()
            await api.stop()

    caplog.set_level(logging.INFO)
    run(scenario(), timeout=180)


def test_unserved_resource_is_absent_from_discovery_and_forbidden_one_is_not() -> None:
    """The double behaves as kube-apiserver does, which is what kopf's discovery relies on."""

    async def scenario() -> None:
        async with FakeApiServer(unserved={PLURAL}) as api, aiohttp.ClientSession() as http:

            async def get(path: str) -> tuple[int, Any]:
                async with http.get(api.url + path) as resp:
                    return resp.status, await resp.json()

            _, groups = await get("/apis")
            assert "networking.k8s.io" not in {g["name"] for g in groups["groups"]}
            assert (await get("/apis/networking.k8s.io/v1"))[0] == 404
            assert (await get(f"/apis/networking.k8s.io/v1/{PLURAL}"))[0] == 404

            api.set_access(PLURAL, allowed=False)
            status, listing = await get("/apis/networking.k8s.io/v1")
            assert status == 200 and [r["name"] for r in listing["resources"]] == [PLURAL]
            status, body = await get(f"/apis/networking.k8s.io/v1/{PLURAL}")
            assert status == 403 and body["reason"] == "Forbidden" and "cannot list" in body["message"]

            api.set_access(PLURAL)
            api.put(service_cidr("kubernetes", "10.96.0.0/16"))
            status, body = await get(f"/apis/networking.k8s.io/v1/{PLURAL}")
            assert status == 200 and [i["spec"]["cidrs"] for i in body["items"]] == [["10.96.0.0/16"]]

    run(scenario())


def test_kopf_skips_a_watched_resource_the_api_server_does_not_serve() -> None:
    """What KubeSource relies on: a handler for a resource missing from discovery costs kopf nothing (it
    never lists or watches it) and the other watchers work; only a forbidden one is fatal to kopf."""

    async def scenario() -> None:
        api = new_api(unserved={PLURAL})
        _with_web(api)
        await api.start()
        seen: list[tuple[str, str]] = []
        stop = threading.Event()
        failure: list[BaseException] = []
        registry = kopf.OperatorRegistry()

        @kopf.on.login(registry=registry)
        async def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=api.url, token=DEFAULT_TOKEN)

        @kopf.on.event("v1", "services", registry=registry)
        async def on_service(event: Any, **_: Any) -> None:
            seen.append(("Service", event["object"]["metadata"]["name"]))

        @kopf.on.event("networking.k8s.io", "v1", PLURAL, registry=registry)
        async def on_service_cidr(event: Any, **_: Any) -> None:
            seen.append(("ServiceCIDR", event["object"]["metadata"]["name"]))

        def kopf_thread() -> None:
            settings = kopf_settings(KubeSourceConfig(node_name=NODE))
            try:
                asyncio.run(
                    kopf.operator(
                        registry=registry,
                        settings=settings,
                        standalone=True,
                        clusterwide=True,
                        stop_flag=stop,
                    )
                )
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                failure.append(e)

        thread = threading.Thread(target=kopf_thread, name="test-kopf", daemon=True)
        thread.start()
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while ("Service", "web") not in seen and thread.is_alive():
                assert asyncio.get_running_loop().time() < deadline, "kopf never listed Services"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            api.put(service("late", "10.96.0.20"))
            while ("Service", "late") not in seen and thread.is_alive():
                assert asyncio.get_running_loop().time() < deadline, "kopf never watched Services"
                await asyncio.sleep(0.05)
            assert thread.is_alive() and not failure, failure
            assert not [k for k in api.requests if k.endswith(PLURAL)], api.requests
            assert not [s for s in seen if s[0] == "ServiceCIDR"]
        finally:
            stop.set()
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 30)
            await api.stop()
        assert not failure, failure

    run(scenario())
