"""Each watch on its own: one that fails (403, the resource gone) stops no other, says so in a metric,
and fails readiness (/readyz) while the Service view needs it (issue 12: a forbidden ConfigMap watch
took every watch down for 30 s of every 50 s, and /healthz stayed 200).

The real KubeSource and kopf against the API double. No timing assertions: waits are bounded only so
that a failure ends.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.controller.apiserver import FakeApiServer, endpoint_slice, pod_ip, service
from tests.controller.conftest import Harness, new_api, run


async def _harness(api: FakeApiServer, maps: Any, **kw: Any) -> Harness:
    h = Harness(api, maps, **kw)
    await h.start()
    await h.settled()
    return h


def _up(h: Harness, resource: str) -> float | None:
    return h.metrics.registry.get_sample_value("kproxy_source_watch_up", {"resource": resource})


async def _all_up(h: Harness, resources: list[str]) -> None:
    await h.wait_for(f"watches of {resources} up", lambda: all(_up(h, r) == 1 for r in resources), timeout=60)


@pytest.mark.parametrize(
    ("resource", "required"),
    [("endpointslices", True), ("configmaps", False)],
)
def test_a_failing_watch_stops_nothing_else(mapset_factory: Any, resource: str, required: bool) -> None:
    async def scenario() -> None:
        api = new_api()
        api.put(service("web", "10.96.0.10"))
        api.put(endpoint_slice("web", [pod_ip(1)]))
        await api.start()
        h = await _harness(api, mapset_factory())
        try:
            assert h.source is not None
            source = h.source
            await _all_up(h, ["services", "endpointslices", "nodes", "configmaps"])
            assert h.health.readyz()[0] == 200
            runs = source.watch_status("services").runs

            api.set_access(resource, allowed=False)  # RBAC taken away: its watch ends, 403 from now on
            await h.wait_for(f"the {resource} watch down", lambda: _up(h, resource) == 0, timeout=60)
            st = source.watch_status(resource)
            assert not st.up and st.error is not None and "403" in st.error, st
            # readiness (/readyz) fails while the view misses a resource it needs; /healthz, which cloud
            # load balancers probe on every node, keeps kube-proxy's meaning, and /livez too (a restart
            # would not help)
            code, body = h.health.readyz()
            assert (code, body["staleWatches"]) == ((503, [resource]) if required else (200, []))
            assert h.health.healthz()[0] == 200 and h.health.livez()[0] == 200
            # every other watch goes on: a new Service arrives through its watch
            api.put(service("late", "10.96.0.20"))
            if resource != "endpointslices":
                api.put(endpoint_slice("late", [pod_ip(3)]))
            await h.wait_for("a Service added meanwhile", lambda: "default/late" in h.store.services)
            assert source.watch_status("services").runs == runs and source.watch_status("services").up
            assert _up(h, "services") == 1

            api.set_access(resource)  # allowed again: its watch comes back by itself
            await _all_up(h, [resource])
            assert h.health.readyz()[0] == 200
            assert source.watch_status("services").runs == runs
        finally:
            await h.stop()
            await api.stop()

    run(scenario(), timeout=180)


def test_events_and_status_cross_to_the_loop_in_order() -> None:
    """Watch threads hand events and status changes to the agent's loop through one queue, drained in
    batches: a stream that died with thousands of events still queued is down once they are applied
    (not marked up again by them), every event arrives, in order, each dated by its arrival."""
    import asyncio
    import threading

    import kopf

    from kproxy.sources.kube import DRAIN_BATCH, KubeSource, KubeSourceConfig
    from kproxy.store import ClusterStore

    async def scenario() -> None:
        store = ClusterStore()
        src = KubeSource(
            store, KubeSourceConfig(node_name="n1"), connection=kopf.ConnectionInfo(server="http://x")
        )
        src._inbox.attach(asyncio.get_running_loop())
        w = src._watches["Service"]
        w._thread = threading.current_thread()  # "running"
        n = 3 * DRAIN_BATCH + 7

        def watch_thread() -> None:
            w._listed()
            for i in range(n):
                raw = service(f"s{i}", f"10.96.{i // 200}.{i % 200 + 1}")
                raw["metadata"]["resourceVersion"] = str(i + 1)
                w._post({"type": "ADDED", "object": raw})
            w._down("APIForbiddenError (HTTP 403): no")

        t = threading.Thread(target=watch_thread)
        t.start()
        t.join()
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(store.services) == n
        assert not w.status.up and "403" in (w.status.error or "")
        dirty = store.take_dirty_with_times()
        times = [dirty[f"default/s{i}"] for i in range(n)]
        assert times == sorted(times)  # dated by arrival, in order
        w._listed()
        await asyncio.sleep(0)
        assert w.status.up
        w._stop.set()  # stopped (as the ServiceCIDR watch is): what it still had queued changes nothing
        w._listed()
        await asyncio.sleep(0)
        assert w.status.up  # unchanged: a stopped watch's late items are dropped
        assert store.change_time is None

    asyncio.run(scenario())
