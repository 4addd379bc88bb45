"""Prometheus metrics of the agent (prometheus-client; /metrics on --metrics-bind-address).

Push-style metrics are updated by the agent as things happen (a sync, a skipped object, a source
event); pull-style ones (map sizes, conntrack entries, the datapath counters of kp_stats_v1, objects
skipped by the store) are read when Prometheus scrapes, through the same typed map layer the CLI
uses, so a scrape costs nothing between scrapes.

Names follow kube-proxy where there is an equivalent: kproxy_network_programming_duration_seconds
is kube-proxy's network_programming_duration_seconds (object change -> programmed), and
kproxy_sync_duration_seconds its sync_proxy_rules_duration_seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

log = logging.getLogger("kproxy.observe.metrics")

# From a lone change (under a millisecond) to a full resync of 10,000 Services (seconds).
PROGRAMMING_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
SYNC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _MapCollector(Collector):
    """Reads map sizes and datapath counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        maps = self.metrics.maps
        if maps is not None:
            entries = GaugeMetricFamily("kproxy_map_entries", "Entries in a kproxy BPF map.", labels=["map"])
            capacity = GaugeMetricFamily(
                "kproxy_map_capacity", "Capacity (max_entries) of a BPF map.", labels=["map"]
            )
            conntrack: dict[str, int] = {}
            for attr in ("svc4", "be4", "ct4", "aff4", "svc6", "be6", "ct6", "aff6"):
                m = getattr(maps, attr, None)
                if m is None:
                    continue
                try:
                    n = len(m)
                except OSError as e:
                    log.debug("cannot count %s: %s", getattr(m, "name", attr), e)
                    continue
                name = getattr(m, "name", attr)
                entries.add_metric([name], n)
                capacity.add_metric([name], getattr(m, "max_entries", 0))
                if attr in ("ct4", "ct6"):
                    conntrack["IPv4" if attr == "ct4" else "IPv6"] = n
            yield entries
            yield capacity
            if conntrack:
                # Two entries (forward and reply) per tracked flow; sum() over family for the total.
                g = GaugeMetricFamily(
                    "kproxy_conntrack_entries",
                    "Entries in the conntrack maps (2 per flow), by IP family.",
                    labels=["family"],
                )
                for family, n in conntrack.items():
                    g.add_metric([family], n)
                yield g
            yield from self._stats(maps)
        store = self.metrics.store
        if store is not None:
            skipped = CounterMetricFamily(
                "kproxy_objects_skipped",
                "Objects skipped as malformed or unsupported.",
                labels=["kind", "reason"],
            )
            for (kind, reason), n in sorted(getattr(store, "skipped", {}).items()):
                skipped.add_metric([kind, reason], n)
            yield skipped
            normalized = CounterMetricFamily(
                "kproxy_objects_normalized",
                "Object versions used after reading a legacy spelling (an IPv4 address with leading zeros).",
                labels=["kind", "reason"],
            )
            for (kind, reason), n in sorted(getattr(store, "normalized", {}).items()):
                normalized.add_metric([kind, reason], n)
            yield normalized

    def _stats(self, maps: Any) -> Iterable[Any]:
        by_family = getattr(maps, "stat_totals_by_family", None)
        if by_family is None:
            return
        try:
            families: Mapping[str, Mapping[int, tuple[int, ...]]] = by_family()
        except OSError as e:
            log.debug("cannot read kp_stats_v1 / kp_stats6_v1: %s", e)
            return
        from kproxy.abi import Stat

        names = {int(s): s.name.lower() for s in Stat}
        packets = CounterMetricFamily(
            "kproxy_datapath_packets",
            "Datapath counters by IP family (kp_stats_v1, kp_stats6_v1); sum without (family) for the total.",
            labels=["counter", "family"],
        )
        nbytes = CounterMetricFamily(
            "kproxy_datapath_bytes", "Datapath byte counters by IP family.", labels=["counter", "family"]
        )
        for family, totals in families.items():
            for index, values in totals.items():
                if index not in names:
                    continue
                packets.add_metric([names[index], family], values[0])
                if len(values) > 1:
                    nbytes.add_metric([names[index], family], values[1])
        yield packets
        yield nbytes


class Metrics:
    """All agent metrics in one registry.

    Push: observe_sync(), observe_programmed(), sync_error(), object_skipped(), source_event(),
    source_relist(), source_restart(), watch_status(). Pull: bind(maps=..., store=...) once they exist.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.programming = Histogram(
            "kproxy_network_programming_duration_seconds",
            "Time from a Service or EndpointSlice change seen by the agent to its map entries written.",
            buckets=PROGRAMMING_BUCKETS,
            registry=r,
        )
        self.sync_duration = Histogram(
            "kproxy_sync_duration_seconds",
            "Duration of one sync (translate + map writes) of all dirty Services.",
            ["kind"],
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.sync_errors = Counter(
            "kproxy_sync_errors", "Services that could not be programmed, by reason.", ["reason"], registry=r
        )
        self.last_sync = Gauge(
            "kproxy_last_sync_timestamp_seconds", "Unix time of the last successful sync.", registry=r
        )
        self.services_changed = Counter(
            "kproxy_services_changed", "Services whose map entries changed in a sync.", registry=r
        )
        self.map_writes = Counter("kproxy_map_writes", "Map entries written or deleted by sync.", registry=r)
        self.skipped = Counter(
            "kproxy_source_objects_skipped",
            "Objects the source could not read (no name, undecodable), by kind and reason.",
            ["kind", "reason"],
            registry=r,
        )
        self.source_events = Counter(
            "kproxy_source_events", "Watch events received, by kind and type.", ["kind", "type"], registry=r
        )
        self.relists = Counter(
            "kproxy_source_relists", "Full listings of the cluster, by reason.", ["reason"], registry=r
        )
        self.restarts = Counter(
            "kproxy_source_restarts",
            "Restarts of a watch (its own kopf operator) after it stopped, by resource.",
            ["resource"],
            registry=r,
        )
        self.watch_up = Gauge(
            "kproxy_source_watch_up",
            "1 while the watch of a resource works, 0 while it is down (it failed: e.g. 403, see the log).",
            ["resource"],
            registry=r,
        )
        self.socket_lb_attached = Gauge(
            "kproxy_socket_lb_attached",
            "1 while socket load balancing is attached to its cgroup, 0 when it was asked for and could not "
            "be (the log and `kproxy status` say why).",
            registry=r,
        )
        self.udp_sockets_destroyed = Counter(
            "kproxy_socket_lb_udp_sockets_destroyed",
            "Connected UDP sockets of socket load balancing destroyed (ECONNABORTED) because their backend "
            "left the Service they reached it through, by IP family of the flow.",
            ["family"],
            registry=r,
        )
        self.udp_destroy_errors = Counter(
            "kproxy_socket_lb_udp_destroy_errors",
            "Connected UDP sockets of a removed backend that bpf_sock_destroy could not destroy.",
            registry=r,
        )
        self.udp_removals_unhandled = Counter(
            "kproxy_socket_lb_udp_removals_unhandled",
            "UDP backends that left a Service port whose connected sockets were not looked for, by reason: "
            "unsupported (the kernel has no bpf_sock_destroy, Linux >= 6.5, or no UDP socket iterator), "
            "error (a run of the iterator failed; the log says why), disabled "
            "(--no-socket-lb-destroy-connected-udp).",
            ["reason"],
            registry=r,
        )
        self.maps: Any = None
        self.store: Any = None
        self.registry.register(_MapCollector(self))
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see _child

    def bind(self, *, maps: Any = None, store: Any = None) -> None:
        if maps is not None:
            self.maps = maps
        if store is not None:
            self.store = store

    # ---- push ----
    def observe_sync(
        self,
        report: Any,
        started: float,
        dirty_times: Mapping[str, float] | None = None,
        *,
        full: bool = False,
        now: float | None = None,
    ) -> None:
        """Record one sync. `started` and `dirty_times` (service -> first change) are time.monotonic()."""
        end = time.monotonic() if now is None else now
        self._child(self.sync_duration, "full" if full else "incremental").observe(max(0.0, end - started))
        changed = set(getattr(report, "changed", ()) or ())
        failed: Mapping[str, str] = getattr(report, "failed", {}) or {}
        for service, when in (dirty_times or {}).items():
            if service in changed and service not in failed:
                self.programming.observe(max(0.0, end - when))
        self.services_changed.inc(len(changed))
        self.map_writes.inc(getattr(report, "writes", 0))
        for why in failed.values():
            self.sync_errors.labels(_reason(why)).inc()
        if not failed:
            self.last_sync.set(time.time())

    def observe_programmed(self, seconds: float) -> None:
        self.programming.observe(max(0.0, seconds))

    def sync_error(self, reason: str) -> None:
        self.sync_errors.labels(reason).inc()

    def object_skipped(self, kind: str, reason: str) -> None:
        self.skipped.labels(kind, reason).inc()

    def source_event(self, kind: str, event_type: str) -> None:
        self._child(self.source_events, kind, event_type).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), kept: prometheus_client's labels() takes a lock and builds tuples
        (~5 us), and an event or a sync asks for the same few children every time."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def source_relist(self, reason: str) -> None:
        self.relists.labels(reason).inc()

    def source_restart(self, resource: str) -> None:
        self.restarts.labels(resource).inc()

    def watch_status(self, resource: str, up: bool) -> None:
        self.watch_up.labels(resource).set(1 if up else 0)

    # ---- exposition ----
    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def start(self, host: str, port: int) -> None:
        """Serve /metrics on the agent's --metrics-bind-address (kproxy.config.DEFAULT_METRICS_BIND)."""

        async def handle(request: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1] if port == 0 and self._runner.addresses else port
        log.info("serving metrics on http://%s:%d/metrics", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _reason(why: str) -> str:
    """A short label from a failure message ("map kp_svc4_v1 is full: ..." -> "map_full")."""
    text = why.lower()
    if "full" in text:
        return "map_full"
    if "conflict" in text or "already" in text:
        return "conflict"
    return "other"


def scrape_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """The value of one sample in Prometheus text output (for tests and benchmarks)."""
    want = "" if not labels else "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith(name + want + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


Clock = Callable[[], float]
