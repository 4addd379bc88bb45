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
