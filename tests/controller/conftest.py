"""Controller test harness: the real KubeSource, store, translate and sync against the API double.

Harness wires what the agent wires (source -> store -> sync -> maps, plus health and metrics) on
either real pinned maps in a private bpffs (when root and the BPF object are available) or the
in-memory MapSet twin, and decodes the maps back into readable frontends for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import pytest

from kproxy import abi
from kproxy.bpf.mapapi import MemoryMapSet
from kproxy.observe.health import HealthServer, ServiceHealthServers, health_check_services
from kproxy.observe.metrics import Metrics
from kproxy.pipeline import sync_dirty
from kproxy.sources.kube import KubeSource, KubeSourceConfig
from kproxy.store import ClusterStore
from kproxy.sync import Syncer
from kproxy.translate import TranslateConfig
from tests.controller.apiserver import DEFAULT_TOKEN, FakeApiServer, node
from tests.controller.rbac import Rbac, render_chart, settings_configmap

NODE = "node-a"
NODE_IP = "192.168.0.10"
TC_OBJECT = Path(__file__).resolve().parents[2] / "kproxy" / "bpf" / "obj" / "kproxy_tc.bpf.o"
PROTO = {abi.IPPROTO_TCP: "TCP", abi.IPPROTO_UDP: "UDP"}


def real_maps_possible() -> bool:
    return os.geteuid() == 0 and TC_OBJECT.exists()


def _ip(nbo: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", nbo))


def frontends(maps: Any) -> dict[tuple[str, int, str, int], dict[str, Any]]:
    """Decode kp_svc4/kp_be4: (vip, port, proto, scope) -> {count, flags, svc_id, backends, ids}."""
    backends = {int(k.value): v for k, v in maps.be4.items()}
    out: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    slots: dict[tuple[str, int, str, int], dict[int, int]] = {}
    for k, v in maps.svc4.items():
        fk = (_ip(k.addr), socket.ntohs(k.port), PROTO.get(k.proto, str(k.proto)), k.scope)
        if k.slot == 0:
            out[fk] = {"count": v.count, "flags": v.flags, "svc_id": v.svc_id, "affinity": v.affinity_timeout}
        else:
            slots.setdefault(fk, {})[k.slot] = v.backend_id
    for fk, entry in out.items():
        ids = [slots.get(fk, {}).get(i) for i in range(1, entry["count"] + 1)]
        entry["ids"] = ids
        entry["backends"] = sorted(
            f"{_ip(backends[i].addr)}:{socket.ntohs(backends[i].port)}" if i in backends else f"missing:{i}"
            for i in ids
        )
    return out


@dataclass
class Harness:
    api: FakeApiServer
    maps: Any
    store: ClusterStore = field(default_factory=lambda: ClusterStore())
    source: KubeSource | None = None
    syncer: Syncer | None = None
    health: HealthServer = field(default_factory=lambda: HealthServer("127.0.0.1", 0))
    hc: ServiceHealthServers | None = None
    metrics: Metrics = field(default_factory=Metrics)
    reports: list[Any] = field(default_factory=list)
    settings: list[dict[str, str]] = field(default_factory=list)
    resync_interval: float = 0.0
    store_factory: Callable[[], ClusterStore] = ClusterStore
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def start(self) -> None:
        self.store = self.store_factory()
        self.hc = ServiceHealthServers(self.health.is_healthy, addresses=("127.0.0.1",))
        self.metrics.bind(maps=self.maps, store=self.store)
        self.store.add_listener(self.health.queued)
        cm_ns, cm_name = settings_configmap(render_chart())
        cfg = KubeSourceConfig(
            node_name=NODE, resync_interval=self.resync_interval, kopf_restart_delay=0.2,
            settings_configmap=f"{cm_ns}/{cm_name}",
        )  # fmt: skip
        self.source = KubeSource(
            self.store,
            cfg,
            on_settings=self.settings.append,
            on_node_eligible=self.health.set_node_eligible,
            on_watch_status=self._watch_status,
            metrics=self.metrics,
            # the chart's ServiceAccount: the double enforces the chart's RBAC for it (new_api)
            connection=kopf.ConnectionInfo(server=self.api.url, token=DEFAULT_TOKEN),
        )
        await self.health.start()
        self._tasks = [
            asyncio.create_task(self.source.run(), name="source"),
            asyncio.create_task(self._sync_loop(), name="sync"),
        ]

    def _watch_status(self, _status: Any) -> None:
        """What the agent does (Agent.watch_status_changed)."""
        assert self.source is not None
        self.health.set_stale_watches(self.source.stale_watches())

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        assert self.hc is not None
        await self.hc.close()
        await self.health.stop()

    async def _sync_loop(self) -> None:
        """The agent's sync loop: wait for the complete listing, adopt, full sync, then increments."""
        store = self.store
        tcfg = TranslateConfig()
        while not store.initial_sync_done:
            store.event.clear()
            if store.initial_sync_done:
                break
            await store.event.wait()
        self.syncer = Syncer(self.maps)
        self.syncer.adopt()
        full = True
        while True:
            store.event.clear()
            t0 = time.monotonic()
            dirty_times = dict(store._dirty)  # first-change times, for the programming histogram
            try:
                report = sync_dirty(store, self.syncer, tcfg, full=full)
            except Exception:
                self.health.update(False)
                raise
            self.metrics.observe_sync(report, t0, dirty_times, full=full)
            self.health.update(not report.failed)
            assert self.hc is not None
            await self.hc.sync(health_check_services(store))
            self.reports.append(report)
            full = False
            await store.event.wait()
            await asyncio.sleep(0.002)

    # ---- helpers ----
    def frontends(self) -> dict[tuple[str, int, str, int], dict[str, Any]]:
        return frontends(self.maps)

    def backends_of(self, vip: str, port: int, proto: str = "TCP", scope: int = 0) -> list[str] | None:
        fe = self.frontends().get((vip, port, proto, scope))
        return None if fe is None else fe["backends"]

    async def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        """Wait until predicate() holds (no timing assertion: the timeout only bounds a failure)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
            await asyncio.sleep(0.02)

    async def settled(self) -> None:
        """Wait until the store has nothing dirty and the sync loop has applied it."""
        await self.wait_for("initial sync", lambda: bool(self.reports))
        await self.wait_for("no dirty services", lambda: self.store.dirty_count == 0)
        n = len(self.reports)
        await asyncio.sleep(0.05)
        await self.wait_for("sync idle", lambda: self.store.dirty_count == 0 and len(self.reports) >= n)


def new_api(**kw: Any) -> FakeApiServer:
    """The API double enforcing the Helm chart's RBAC for the agent (its requests carry
    DEFAULT_TOKEN): a request the chart does not grant gets 403, as from a real API server."""
    kw.setdefault("rbac", Rbac.from_chart())
    api = FakeApiServer(bookmark_interval=0.5, **kw)
    api.put(node(NODE, NODE_IP, zone="zone-a"))
    return api


@pytest.fixture
def mapset_factory(request: pytest.FixtureRequest) -> Callable[[], Any]:
    """Name: mapset_factory. Scope: function. Depends: bpffs (when root).

    Returns a function giving the map set a controller test programs: real pinned maps in a private
    bpffs when running as root with the BPF object built (the same pins on every call, as after an
    agent restart), the in-memory twin otherwise (one shared instance per test).
    """
    if real_maps_possible():
        bpffs = request.getfixturevalue("bpffs")
        from kproxy.bpf.loader import Loader

        opened: list[Any] = []
        try:
            probe = Loader(bpffs)
            probe.open_maps().close()
            probe.close()
        except Exception as e:  # e.g. abi.py and the built object disagree (tests/abi reports it)
            warnings.warn(
                f"real pinned maps unusable ({e}); controller tests use the in-memory twin", stacklevel=1
            )
            shared_twin = MemoryMapSet()
            yield lambda: shared_twin
            return

        def make_real() -> Any:
            loader = Loader(bpffs)
            maps = loader.open_maps()
            opened.append((loader, maps))
            return maps

        yield make_real
        for loader, maps in opened:
            maps.close()
            loader.close()
        return
    shared = MemoryMapSet()
    yield lambda: shared


def run(coro: Awaitable[Any], timeout: float = 90) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())
