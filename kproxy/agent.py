"""The node agent: one asyncio loop wiring source -> store -> sync -> maps, plus attach and sweeping.

Start-up order matters for restarts without packet loss:
  1. load the object with maps pinned under --bpffs (existing pins, and so services and conntrack, are
     re-used), write kp_cfg_v1;
  2. attach to the netdevs and to every pod interface matching --pod-ifaces (a pinned tcx link that
     exists already is updated in place: an atomic program swap, never detach-then-attach);
  3. start the source, wait until it reports its initial listing complete, adopt the pinned maps and
     apply the whole view once (only the diff is written), then apply dirty Services as they come,
     all dirty ones in one batch.
Pod interfaces are followed through netlink link events; a conntrack sweeper deletes expired entries.
SIGTERM/SIGINT stop the agent and leave pins and links: the programs keep running until the next agent
adopts them (`kproxy cleanup` removes everything).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kproxy.agent")


class AgentError(RuntimeError):
    """The agent cannot start; the message says what to fix."""


@dataclass
class AgentConfig:
    source_dir: str
    node_name: str
    node_ip: str
    netdevs: list[str] = field(default_factory=list)
    pod_ifaces: list[str] = field(default_factory=lambda: ["lxc*"])
    bpffs: str = "/sys/fs/bpf/kproxy"
    map_sizes: dict[str, int] = field(default_factory=dict)
    ct_timeouts: tuple[int, int, int, int] = (0, 0, 0, 0)  # syn, tcp, fin, udp seconds; 0 = default
    sweep_interval: float = 5.0
    object_path: str | None = None
    nodeport_cidrs: list[str] = field(default_factory=list)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.loader: Any = None
        self.maps: Any = None
        self.store: Any = None
        self.syncer: Any = None
        self.source: Any = None
        self.stop = asyncio.Event()
        self.synced = asyncio.Event()  # first full apply done
        self.attached_pods: set[str] = set()

    # ---- data plane set-up ----
    def setup_dataplane(self) -> None:
        from kproxy.bpf.libbpf import LibbpfError
        from kproxy.bpf.loader import PROG_FROM_NETDEV, PROG_TO_NETDEV, Loader, LoaderError
        from kproxy.sync import write_config

        cfg = self.cfg
        self.loader = Loader(cfg.bpffs, cfg.object_path, cfg.map_sizes)
        try:
            self.loader.load()
            self.maps = self.loader.open_maps()
        except (LoaderError, LibbpfError, FileNotFoundError) as e:
            raise AgentError(f"cannot load the BPF object into {cfg.bpffs}: {e}") from e
        syn, tcp, fin, udp = cfg.ct_timeouts
        write_config(
            self.maps, cfg.node_ip, syn_timeout=syn, tcp_timeout=tcp, fin_timeout=fin, udp_timeout=udp
        )
        for pin in self.loader.reconcile():
            log.info("removed stale link %s", pin)
        for dev in cfg.netdevs:
            try:
                self.loader.attach(dev, "ingress", PROG_FROM_NETDEV)
                self.loader.attach(dev, "egress", PROG_TO_NETDEV)
            except (LoaderError, LibbpfError, OSError) as e:
                raise AgentError(f"cannot attach to netdev {dev}: {e}") from e
            log.info("attached %s/%s to netdev %s", PROG_FROM_NETDEV, PROG_TO_NETDEV, dev)

    def attach_pod(self, ifname: str) -> None:
        from kproxy.bpf.loader import PROG_FROM_POD, PROG_TO_POD

        t0 = time.monotonic()
        try:
            # Replies of a NodePort frontend are reverse-NATed at this ingress to the node's own address;
            # without accept_local the routing that follows drops them as martians.
            with open(f"/proc/sys/net/ipv4/conf/{ifname}/accept_local", "w") as f:
                f.write("1")
            self.loader.attach(ifname, "ingress", PROG_FROM_POD)
            self.loader.attach(ifname, "egress", PROG_TO_POD)
        except Exception as e:  # the interface may vanish between the event and the attach
            log.warning("cannot attach to pod interface %s: %s", ifname, e)
            return
        self.attached_pods.add(ifname)
        log.info("attached pod interface %s in %.1f ms", ifname, (time.monotonic() - t0) * 1000)

    def detach_pod(self, ifname: str) -> None:
        self.attached_pods.discard(ifname)
        try:
            self.loader.detach(ifname)
        except Exception as e:
            log.warning("cannot remove the link pins of %s: %s", ifname, e)
        else:
            log.info("pod interface %s is gone: removed its link pins", ifname)

    # ---- tasks ----
    async def follow_pods(self) -> None:
        from kproxy.bpf.netlink import follow

        async for ev in follow(self.cfg.pod_ifaces, self.stop):
            if ev.kind == "added":
                self.attach_pod(ev.ifname)
            else:
                self.detach_pod(ev.ifname)

    async def sync_loop(self) -> None:
        from kproxy.sync import Syncer, sync_dirty
        from kproxy.translate import TranslateConfig

        store = self.store
        tcfg = TranslateConfig.from_cidrs(self.cfg.nodeport_cidrs)
        self.syncer = Syncer(self.maps)
        while not store.initial_sync_done:
            store.event.clear()
            if store.initial_sync_done:
                break
            await store.event.wait()
        t0 = time.monotonic()
        self.syncer.adopt()
        store.event.clear()
        report = sync_dirty(store, self.syncer, tcfg, full=True)
        self.after_apply(report, t0, full=True)
        self.synced.set()
        while True:
            await store.event.wait()
            # Coalesce a burst of events (a file rewritten object by object) into one batch.
            await asyncio.sleep(0.01)
            store.event.clear()
            if not store.dirty_count:
                continue
            t0 = time.monotonic()
            report = sync_dirty(store, self.syncer, tcfg)
            self.after_apply(report, t0)

    def after_apply(self, report: Any, t0: float, full: bool = False) -> None:
        from kproxy.observe.metadata import write_metadata

        ms = (time.monotonic() - t0) * 1000
        if report.changed or full:
            log.info(
                "%s: %d services changed, %d map writes, %d UDP flows flushed in %.1f ms",
                "full sync" if full else "sync", len(report.changed), report.writes, report.ct_flushed, ms,
            )  # fmt: skip
        for svc, why in report.failed.items():
            log.error("service %s not programmed: %s", svc, why)
        write_metadata(self.cfg.bpffs, self.cfg.node_name, self.service_metadata())

    def service_metadata(self) -> dict[int, dict[str, Any]]:
        from kproxy.observe.inspect import proto_name

        ids: dict[tuple[str, str, int], int] = getattr(self.syncer, "_svc_ids", {})
        return {
            sid: {"service": svc, "port_name": port, "protocol": proto_name(proto)}
            for (svc, port, proto), sid in ids.items()
        }

    async def sweep_loop(self) -> None:
        from kproxy.sync import sweep_conntrack

        while True:
            await asyncio.sleep(self.cfg.sweep_interval)
            try:
                n = sweep_conntrack(self.maps.ct4)
            except OSError as e:
                log.warning("conntrack sweep failed: %s", e)
                continue
            if n:
                log.debug("swept %d expired conntrack entries", n)

    async def run_source(self) -> None:
        from kproxy.sources.files import FileSource

        self.source = FileSource(self.cfg.source_dir, self.store)
        await self.source.run()

    # ---- main ----
    async def run(self) -> None:
        from kproxy.model import NodeInfo
        from kproxy.store import ClusterStore

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        self.setup_dataplane()
        self.store = ClusterStore(NodeInfo(name=self.cfg.node_name, addresses=(self.cfg.node_ip,)))
        tasks = {
            asyncio.create_task(self._guard("pod follower", self.follow_pods)),
            asyncio.create_task(self._guard("source", self.run_source)),
            asyncio.create_task(self._guard("sync", self.sync_loop)),
            asyncio.create_task(self._guard("conntrack sweeper", self.sweep_loop)),
        }
        log.info(
            "agent %s up: node %s, bpffs %s, netdevs %s, pod interfaces %s, source file:%s",
            self.cfg.node_name, self.cfg.node_ip, self.cfg.bpffs, ",".join(self.cfg.netdevs) or "-",
            ",".join(self.cfg.pod_ifaces), self.cfg.source_dir,
        )  # fmt: skip
        stopper = asyncio.create_task(self.stop.wait())
        failed: list[asyncio.Task[Any]] = []
        pending: set[asyncio.Task[Any]] = set(tasks)
        try:
            while not failed and not stopper.done():
                done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopper)
                failed = [t for t in done if t is not stopper and t.exception() is not None]
        finally:
            for t in tasks | {stopper}:
                t.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            if self.source is not None and hasattr(self.source, "close"):
                with contextlib.suppress(Exception):
                    self.source.close()
            if self.maps is not None:
                self.maps.close()
            if self.loader is not None:
                self.loader.close()  # pins stay: the programs keep running
        if failed:
            raise AgentError(f"agent task failed: {failed[0].exception()}")
        log.info("agent stopped; programs stay attached (pins under %s)", self.cfg.bpffs)

    async def _guard(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", name)
            raise


def run_agent(cfg: AgentConfig) -> None:
    asyncio.run(Agent(cfg).run())
