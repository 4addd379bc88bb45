"""The agent's sync loop: wait until the source reports its initial listing complete, adopt the pinned
maps and apply the whole view once (only the diff is written), then apply dirty Services as they come,
all dirty ones in one batch. After each apply: the log line, the orphan window of deleted TCP frontends,
services.json (ServiceMetadata), metrics and health (kproxy.agent.serve.Servers.observe_sync)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kproxy.bpf.maps import KproxyMaps
from kproxy.config import AgentConfig
from kproxy.heap import compact_dicts
from kproxy.observe import metadata
from kproxy.pipeline import sync_dirty
from kproxy.store import ClusterStore
from kproxy.sync import ApplyReport, Syncer

from .serve import Servers

log = logging.getLogger("kproxy.agent")

# services.json is rewritten at most this often (seconds) while service ids change
METADATA_INTERVAL = 0.25
# a sync is logged at INFO when it changed this many Services or took this long (ms); else DEBUG
SYNC_LOG_SERVICES = 100
SYNC_LOG_MS = 100.0


class SyncLoop:
    """Owns the Syncer (made when the loop starts) and the Event set after the first full apply."""

    def __init__(
        self,
        cfg: AgentConfig,
        servers: Servers,
        *,
        on_frontends_removed: Callable[[], None],
        on_udp_left: Callable[[list[tuple[int, int, bytes, int]]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.servers = servers
        self.on_frontends_removed = on_frontends_removed
        self.on_udp_left = on_udp_left  # UDP backends left service ports (ApplyReport.udp_left)
        self.syncer: Syncer | None = None
        self.synced = asyncio.Event()  # first full apply done
        self.metadata = ServiceMetadata(cfg)

    def compact(self) -> int:
        """Shrink the syncer's and services.json's tables that deletions left oversized."""
        return (self.syncer.compact() if self.syncer is not None else 0) + self.metadata.compact()

    async def run(self, store: ClusterStore, maps: KproxyMaps) -> None:
        tcfg = self.cfg.translate_config()
        syncer = self.syncer = Syncer(maps, maglev_size=self.cfg.maglev_table_size)
        while not store.initial_sync_done:
            store.event.clear()
            if store.initial_sync_done:
                break
            await store.event.wait()
        t0 = time.monotonic()
        syncer.adopt()
        store.event.clear()
        report = sync_dirty(store, syncer, tcfg, full=True)
        await self.after_apply(store, report, t0, full=True)
        self.synced.set()
        while True:
            await store.event.wait()
            # Let callbacks already queued run first (a burst of watch events is one drain of the
            # source's inbox; while a sync runs, the next events queue up and form the next batch):
            # batching under load, no added delay for a lone change.
            await asyncio.sleep(0)
            store.event.clear()
            if not store.dirty_count:
                # the service address space alone (a ServiceCIDR object) needs no Service translated
                if store.service_cidrs_version != syncer.svcnet.cidrs_version:
                    syncer.svcnet.sync(store)
                continue
            t0 = time.monotonic()
            report = sync_dirty(store, syncer, tcfg)
            await self.after_apply(store, report, t0)

    async def after_apply(
        self, store: ClusterStore, report: ApplyReport, t0: float, full: bool = False
    ) -> None:
        ms = (time.monotonic() - t0) * 1000
        if report.tcp_frontends_removed:
            self.on_frontends_removed()
        if report.udp_left and self.on_udp_left is not None:
            self.on_udp_left(report.udp_left)  # queued: destroyed off the sync's path
        if report.changed or full:
            # One line per sync would be one line per watch event under steady churn: the small ones
            # are debug (kproxy_sync_duration_seconds and kproxy_services_changed count them all).
            big = full or len(report.changed) >= SYNC_LOG_SERVICES or ms >= SYNC_LOG_MS
            log.log(
                logging.INFO if big else logging.DEBUG,
                "%s: %d services changed, %d map writes, %d UDP flows flushed in %.1f ms",
                "full sync" if full else "sync", len(report.changed), report.writes, report.ct_flushed, ms,
            )  # fmt: skip
        for svc, why in report.failed.items():
            log.error("service %s not programmed: %s", svc, why)
        assert self.syncer is not None, "ids change only once the sync loop made the syncer"
        self.metadata.changed(self.syncer, at_once=full)
        await self.servers.observe_sync(report, t0, full, store)

    def close(self) -> None:
        """On exit: services.json gets the names of the last ids, when a write is due."""
        if self.metadata.pending and self.syncer is not None:
            self.metadata.write(self.syncer)


class ServiceMetadata:
    """services.json (the names `kproxy services` shows for the service ids in the maps), following
    the syncer's service ids."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        # the service-id version it holds, when it was written, a pending write
        self._version = -1
        self._written = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._entries: dict[int, str] = {}  # svc_id -> its JSON entry (entries)

    @property
    def pending(self) -> bool:
        return self._timer is not None

    def changed(self, syncer: Syncer, at_once: bool = False) -> None:
        """services.json follows the service ids (service_ports()), not every sync: rewritten when an id
        came or went, at most every METADATA_INTERVAL seconds (a stream of new Services costs one
        write per interval, not one per Service); at once after the full sync (the lab and the CLI
        wait for the file)."""
        if self._timer is not None and not at_once:
            return  # a write is due
        if syncer.svc_ids_version == self._version and not at_once:
            return
        wait = self._written + METADATA_INTERVAL - time.monotonic()
        if at_once:
            self.write(syncer)
            self._written = 0.0  # the first change after it is written at once, too
        elif wait <= 0:
            self.write(syncer)
        else:
            self._timer = asyncio.get_running_loop().call_later(wait, self.write, syncer)

    def write(self, syncer: Syncer) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._version = syncer.svc_ids_version
        self._written = time.monotonic()

        try:
            metadata.write_metadata_entries(self.cfg.bpffs, self.cfg.node_name, self.entries(syncer).values())
        except OSError as e:
            log.warning("cannot write the service names for the CLI: %s", e)

    def compact(self) -> int:
        return compact_dicts(self._entries)

    def entries(self, syncer: Syncer) -> dict[int, str]:
        """svc_id -> its services.json entry, JSON-encoded; kept up to date from the syncer's id changes
        (a write joins the strings: no per-Service work for the Services that did not change)."""
        changes = syncer.take_svc_id_changes()
        entries = self._entries
        if changes is None:
            entries.clear()
            changes = list(syncer.service_ports().items())
        for sid, sp in changes:
            if sp is None:
                entries.pop(sid, None)
            else:
                entries[sid] = metadata.metadata_entry(sid, *sp)
        return entries
