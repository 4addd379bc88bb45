"""The Agent: owns the parts of the node agent and runs them, one asyncio loop wiring
source -> store -> sync -> maps, plus attach and sweeping (see kproxy.agent for the map of the parts).

Start-up order matters for restarts without packet loss:
  1. load the object with maps pinned under --bpffs (existing pins, and so services and conntrack, are
     re-used), write kp_cfg_v1 (node address, conntrack timeouts, initial DSR mode);
  2. attach to the netdevs and to every pod interface matching --pod-ifaces, then the socket programs
     to --socket-lb-cgroup when given (kproxy.agent.dataplane);
  3. start the health and metrics servers and the source, wait until the source reports its initial
     listing complete, adopt the pinned maps and apply the whole view once (only the diff is
     written), then apply dirty Services as they come, all dirty ones in one batch (kproxy.agent.syncloop).
SIGTERM/SIGINT stop the agent and leave pins and links: the programs keep running until the next agent
adopts them (`kproxy cleanup` removes everything).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from kproxy.bpf.maps import KproxyMaps
from kproxy.config import AgentConfig
from kproxy.heap import trim_heap
from kproxy.model import NodeInfo
from kproxy.observe.health import HealthServer
from kproxy.sources.files import FileSource
from kproxy.store import ClusterStore
from kproxy.sync import Syncer

from .dataplane import Dataplane
from .errors import AgentError
from .serve import Servers
from .sources import Sources
from .syncloop import SyncLoop
from .udpsockets import ConnectedUdp
from .upkeep import DatapathConfig, Sweeper

if TYPE_CHECKING:
    import kopf

    from kproxy.sources.kube import KubeSource

log = logging.getLogger("kproxy.agent")


class Agent:
    """The node agent: its parts (made here, idle until run) and the order they run in."""

    def __init__(self, cfg: AgentConfig, *, connection: kopf.ConnectionInfo | None = None) -> None:
        self.cfg = cfg
        self.stop = asyncio.Event()
        self.store: ClusterStore | None = None  # made by run, after the dataplane is set up
        self._tidied_at = 0  # Services applied (Syncer.applied) at the last tidy_memory
        self.dataplane = Dataplane(cfg)
        self.datapath_config = DatapathConfig(cfg, self.dataplane)
        self.sweeper = Sweeper(cfg, self.dataplane, self.datapath_config)
        self.servers = Servers(cfg)
        self.connected_udp = ConnectedUdp(
            self.dataplane,
            lambda: self.servers.metrics,
            cfg.socket_lb_iter_object,
            self._slot_backends,
            enabled=cfg.socket_lb_destroy_connected_udp,
        )
        self.syncloop = SyncLoop(
            cfg,
            self.servers,
            on_frontends_removed=self.datapath_config.frontends_removed,
            on_udp_left=self.connected_udp.removed,
        )
        self.sources = Sources(
            cfg,
            self.servers,
            on_settings=self.apply_settings,
            synced=self.syncloop.synced,
            connection=connection,
        )

    # ---- the parts' state, under the names the tests (and older callers) use ----
    @property
    def node_ip(self) -> str:
        return self.dataplane.node_ip

    @property
    def maps(self) -> KproxyMaps | None:
        return self.dataplane.maps

    @maps.setter
    def maps(self, maps: KproxyMaps | None) -> None:
        self.dataplane.maps = maps

    @property
    def syncer(self) -> Syncer | None:
        return self.syncloop.syncer

    @syncer.setter
    def syncer(self, syncer: Syncer | None) -> None:
        self.syncloop.syncer = syncer

    def _slot_backends(self, family: int, svc_id: int) -> set[tuple[bytes, int]]:
        syncer = self.syncer
        return syncer.slot_backends(family, svc_id) if syncer is not None else set()

    @property
    def health(self) -> HealthServer | None:
        return self.servers.health

    @health.setter
    def health(self, health: HealthServer | None) -> None:
        self.servers.health = health

    @property
    def orphan_until_ns(self) -> int:
        return self.datapath_config.orphan_until_ns

    @orphan_until_ns.setter
    def orphan_until_ns(self, until_ns: int) -> None:
        self.datapath_config.orphan_until_ns = until_ns

    @property
    def synced(self) -> asyncio.Event:
        return self.syncloop.synced

    # ---- what the parts do, called by the agent (and by tests, on a partly set up agent) ----
    def setup_dataplane(self) -> None:
        self.dataplane.load()
        self.dataplane.protect_node_ports()
        # Before any attach: the lan MTU comes from the netdevs, and the programs read the config.
        self.datapath_config.write()
        self.dataplane.check_forwarding()
        self.dataplane.attach()
        self.connected_udp.setup()  # after socket LB: its kp_sknat maps are pinned

    def apply_settings(self, settings: dict[str, str]) -> None:
        self.datapath_config.apply_settings(settings)

    def check_forwarding(self) -> list[str]:
        return self.dataplane.check_forwarding()

    def tidy_memory(self) -> int:
        """When Services were applied since the last time (checked every sweep interval): rebuild the
        tables deletions left oversized, then give the C heap's free pages back. Deleting never
        shrinks a dict and adding after deletions grows it to three times its entries: at 10,000
        Services, 1,000 deleted and created again doubled a dozen tables (~3 MB). A few ms."""
        syncer = self.syncer
        applied = syncer.applied if syncer is not None else 0
        if applied == self._tidied_at:
            return 0
        self._tidied_at = applied
        saved = self.syncloop.compact() + self.sources.compact()
        if self.store is not None:
            saved += self.store.compact()
        trim_heap()
        return saved

    def keep_orphan_window(self) -> None:
        self.datapath_config.keep_orphan_window(self.syncer)

    def write_metadata(self) -> None:
        assert self.syncer is not None, "ids change only once the sync loop made the syncer"
        self.syncloop.metadata.write(self.syncer)

    def make_file_source(self, source_dir: str) -> FileSource:
        assert self.store is not None, "the sources run after the store is made (see run)"
        return self.sources.file_source(source_dir, self.store)

    def make_kube_source(self) -> KubeSource:
        assert self.store is not None, "the sources run after the store is made (see run)"
        return self.sources.kube_source(self.store)

    # ---- main ----
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        tasks: set[asyncio.Task[Any]] = set()
        stopper = asyncio.create_task(self.stop.wait())
        failed: list[asyncio.Task[Any]] = []
        try:
            store = await self._start()
            tasks = self._spawn(store)
            log.info(
                "agent %s up: node %s, bpffs %s, netdevs %s, pod interfaces %s, source %s, dsr %s, "
                "socket LB %s", self.cfg.node_name, self.node_ip, self.cfg.bpffs,
                ",".join(self.dataplane.netdevs) or "-", ",".join(self.cfg.pod_ifaces), self.cfg.source,
                self.datapath_config.dsr_mode, self.cfg.socket_lb_cgroup or "off",
            )  # fmt: skip
            pending: set[asyncio.Task[Any]] = set(tasks)
            while not failed and not stopper.done():
                done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopper)
                failed = [t for t in done if t is not stopper and t.exception() is not None]
        finally:
            signalled = stopper.done() and not stopper.cancelled()
            for t in tasks | {stopper}:
                t.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            uninstall = signalled and not failed and await self.sources.uninstalling()
            await self._shutdown(uninstall)
        if failed:
            exc = failed[0].exception()
            if isinstance(exc, AgentError):
                raise exc
            raise AgentError(f"agent task failed: {exc}")
        log.info("agent stopped; programs stay attached (pins under %s)", self.cfg.bpffs)

    async def _start(self) -> ClusterStore:
        """The dataplane, the store and the servers, in this order (see the module docstring)."""
        _ = self.node_ip
        self.setup_dataplane()
        store = self.store = ClusterStore(
            NodeInfo(name=self.cfg.node_name, addresses=tuple(self.cfg.node_ips))
        )
        if self.cfg.service_cidrs:
            store.set_service_cidrs("flag", self.cfg.service_cidrs)
        await self.sweeper.read_host_addresses(store)
        await self.servers.start(store, self.dataplane)
        # libbpf's loads (vmlinux BTF, relocations, verifier) freed megabytes the C heap would keep
        trim_heap()
        return store

    def _spawn(self, store: ClusterStore) -> set[asyncio.Task[Any]]:
        maps = self.dataplane.maps
        assert maps is not None, "the tasks run after setup_dataplane"
        return {
            asyncio.create_task(self._guard("pod follower", lambda: self.dataplane.follow_pods(self.stop))),
            asyncio.create_task(self._guard("source", lambda: self.sources.run(store))),
            asyncio.create_task(self._guard("sync", lambda: self.syncloop.run(store, maps))),
            asyncio.create_task(self._guard("connected UDP sockets", self.connected_udp.run)),
            asyncio.create_task(
                self._guard(
                    "conntrack sweeper",
                    lambda: self.sweeper.run(store, lambda: self.syncer, self.tidy_memory),
                )
            ),
        }

    async def _shutdown(self, uninstall: bool) -> None:
        """Stop the parts; the dataplane stays unless UNINSTALL (see Sources.uninstalling)."""
        self.syncloop.close()
        self.sources.close()
        await self.servers.stop()
        self.connected_udp.close()
        self.dataplane.close(remove=uninstall)

    async def _guard(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except AgentError:
            raise
        except Exception:
            log.exception("%s failed", name)
            raise


def run_agent(cfg: AgentConfig) -> None:
    asyncio.run(Agent(cfg).run())
