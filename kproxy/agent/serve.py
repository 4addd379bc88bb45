"""The agent's servers: /healthz and /readyz (HealthServer), the healthCheckNodePort listeners of
Services with externalTrafficPolicy Local (ServiceHealthServers), and /metrics (Metrics)."""

from __future__ import annotations

import logging

from kproxy.config import AgentConfig, split_hostport
from kproxy.observe.health import (
    IP_FAMILY,
    HealthServer,
    ServiceHealthServers,
    health_check_services,
    listen_addresses,
)
from kproxy.observe.metrics import Metrics
from kproxy.store import ClusterStore
from kproxy.sync import ApplyReport

from .dataplane import Dataplane
from .errors import AgentError

log = logging.getLogger("kproxy.agent")


class Servers:
    """The health and metrics servers; made by start, once the store and the maps exist."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.health: HealthServer | None = None
        self.service_health: ServiceHealthServers | None = None
        self.metrics: Metrics | None = None

    async def start(self, store: ClusterStore, dataplane: Dataplane) -> None:
        host, port = split_hostport(self.cfg.health_bind)
        self.health = HealthServer(host, port, ip_families=self.families)
        store.add_listener(self.health.queued)
        try:
            await self.health.start()
        except OSError as e:
            raise AgentError(
                f"cannot serve /healthz on {self.cfg.health_bind}: {e}; pass --health-bind-address"
            ) from e
        # kube-proxy's proxier of each family listens on the healthCheckNodePorts: tcp4 0.0.0.0, tcp6 ::
        self.service_health = ServiceHealthServers(
            self.health.is_healthy, addresses=listen_addresses(self.families)
        )
        self.metrics = Metrics()
        self.metrics.bind(maps=dataplane.maps, store=store)
        if self.cfg.socket_lb_cgroup:
            self.metrics.socket_lb_attached.set(1 if dataplane.socklb is not None else 0)
        dataplane.write_status()
        host, port = split_hostport(self.cfg.metrics_bind)
        try:
            await self.metrics.start(host, port)
        except OSError as e:
            raise AgentError(
                f"cannot serve metrics on {self.cfg.metrics_bind}: {e}; pass --metrics-bind-address"
            ) from e

    @property
    def families(self) -> tuple[str, ...]:
        """The IP families this node has (those of its --node-ip), IPv4 first: the ones kproxy programs
        and reports, as kube-proxy runs a proxier for each (IPv4 alone when no --node-ip is known)."""
        families = tuple(
            fam for fam, ip in (("IPv4", self.cfg.primary_ipv4), ("IPv6", self.cfg.primary_ipv6)) if ip
        )
        return families or (IP_FAMILY,)

    async def observe_sync(
        self, report: ApplyReport, t0: float, full: bool, store: ClusterStore | None
    ) -> None:
        """A sync was applied: count it, report the proxy healthy, follow the healthCheckNodePorts."""
        if self.metrics is not None:
            self.metrics.observe_sync(report, t0, getattr(report, "first_change", None), full=full)
        if self.health is not None:
            # Services that cannot be programmed (a conflict, a full map) are logged and counted; the
            # proxy itself is working, so they do not fail /healthz (and restart the agent for nothing).
            self.health.update(True)
        if self.service_health is not None and store is not None:
            await self.service_health.sync(health_check_services(store, self.families))

    async def stop(self) -> None:
        for what, obj, method in (
            ("healthCheckNodePort listeners", self.service_health, "close"),
            ("health server", self.health, "stop"),
            ("metrics server", self.metrics, "stop"),
        ):
            if obj is not None:
                try:
                    await getattr(obj, method)()
                except Exception as e:
                    log.warning("stopping the %s failed: %s", what, e)
