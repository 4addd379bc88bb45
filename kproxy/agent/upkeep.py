"""The agent's map upkeep: kp_cfg_v1 (written whole at start, on a DSR mode change from the agent
ConfigMap, and while connections of deleted TCP frontends live on) and kp_cfg6_v1 (this node's IPv6
address, at start), and the periodic chores of the sweeper (expired conntrack entries of both families
and SNAT entries, node addresses, forwarding of both families, the orphaned-flow window).

The Kubernetes source reports the agent ConfigMap: its `dsr-mode` key is written into kp_cfg_v1 live
(flows keep the mode they began with; the datapath records it in conntrack).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kproxy import abi
from kproxy.bpf import socklb, upkeep
from kproxy.bpf.netlink import ipv4_addresses
from kproxy.config import DSR_MODES, AgentConfig
from kproxy.store import ClusterStore
from kproxy.sync import Syncer

from .dataplane import Dataplane
from .errors import AgentError

log = logging.getLogger("kproxy.agent")


class DatapathConfig:
    """kp_cfg_v1: what the agent keeps in it besides its flags (the DSR mode, the orphan window)."""

    def __init__(self, cfg: AgentConfig, dataplane: Dataplane) -> None:
        self.cfg = cfg
        self.dataplane = dataplane
        self.dsr_mode: str = cfg.dsr_mode
        # CLOCK_MONOTONIC ns until which connections of deleted TCP frontends may still be alive
        self.orphan_until_ns = 0
        self._netns_cookie: int | None = None  # the agent's network namespace's, once read
        if cfg.localhost_nodeports and not cfg.localhost_nodeports_served:
            log.info("localhost NodePorts are off: %s", cfg.localhost_nodeports_off)

    def host_netns_cookie(self) -> int:
        """This agent's network namespace cookie (the node's), which the socket programs compare each
        socket's with: for --socket-lb-host-netns-only, and for localhost NodePorts (a pod's loopback
        is its own). 0 when neither is wanted or the kernel cannot say (before 5.14: SO_NETNS_COOKIE)."""
        cfg = self.cfg
        if not cfg.socket_lb_host_netns_only and not cfg.localhost_nodeports_served:
            return 0
        if self._netns_cookie is None:
            try:
                self._netns_cookie = socklb.netns_cookie()
            except OSError as e:
                if cfg.socket_lb_host_netns_only:
                    raise AgentError(
                        f"--socket-lb-host-netns-only needs the network namespace cookie (SO_NETNS_COOKIE, "
                        f"kernel >= 5.14): {e}. Run without it (socketLB.hostNamespaceOnly=false)"
                    ) from e
                log.warning(
                    "localhost NodePorts are off: this kernel does not give the network namespace cookie "
                    "(SO_NETNS_COOKIE, kernel >= 5.14) that tells node sockets from pods': %s", e,
                )  # fmt: skip
                self._netns_cookie = 0
            if cfg.socket_lb_host_netns_only:
                log.info("socket LB for this network namespace only (cookie %d)", self._netns_cookie)
        return self._netns_cookie

    def write(self) -> None:
        cfg = self.cfg
        t = cfg.conntrack
        maps = self.dataplane.maps
        assert maps is not None, "write_config before setup_dataplane"
        # Every field of kp_cfg_v1 comes from here: the map is rewritten whole, nothing is kept.
        upkeep.write_config(
            maps, cfg.primary_ipv4, syn_timeout=t.syn, tcp_timeout=t.tcp, fin_timeout=t.fin,
            udp_timeout=t.udp, sctp_init_timeout=t.sctp_init, sctp_timeout=t.sctp,
            sctp_close_timeout=t.sctp_close, dsr_mode=DSR_MODES[self.dsr_mode], hairpin_addr=cfg.hairpin_ipv4,
            snat_port_min=cfg.snat_port_min, snat_port_max=cfg.snat_port_max, lan_mtu=self.dataplane.lan_mtu,
            external_cluster_ip=cfg.external_cluster_ip, orphan_until_ns=self.orphan_until_ns,
            localhost_nodeports=cfg.localhost_nodeports_served and self.host_netns_cookie() != 0,
            host_netns_only=cfg.socket_lb_host_netns_only, host_netns_cookie=self.host_netns_cookie(),
        )  # fmt: skip
        # a predecessor's window (write_config keeps the later one) is this agent's to keep open
        self.orphan_until_ns = maps.read_config().orphan_until_ns
        # the IPv6 datapath's node address (NodePort on it, SNAT from it, DSR's tunnel) and hairpin source
        if upkeep.write_config6(maps.cfg6, cfg.primary_ipv6, cfg.hairpin_ipv6):
            log.info("kp_cfg6_v1: node address %s", cfg.primary_ipv6 or "none (no IPv6 --node-ip)")

    # ---- runtime settings (the agent ConfigMap, through the Kubernetes source) ----
    def apply_settings(self, settings: dict[str, str]) -> None:
        # A deleted key (or ConfigMap) means the mode the agent was started with.
        mode = settings.get("dsr-mode", self.cfg.dsr_mode).strip().lower() or "off"
        if mode not in DSR_MODES:
            log.error(
                "ConfigMap key dsr-mode=%r is not one of off, opt, ipip: keeping %s", mode, self.dsr_mode
            )
            return
        if mode == self.dsr_mode:
            return
        old, self.dsr_mode = self.dsr_mode, mode
        self.write()
        log.info("DSR mode %s -> %s (new flows only; flows in progress keep their mode)", old, mode)

    # ---- connections of deleted TCP frontends ----
    def frontends_removed(self) -> None:
        """TCP frontends were deleted: their established connections continue (as kube-proxy's conntrack
        keeps them) while one could still be alive, the established TCP conntrack timeout. Until then
        kp_from_netdev looks up TCP packets that match no frontend in conntrack."""
        tcp = self.cfg.conntrack.tcp or abi.CT_TCP_TIMEOUT_DEFAULT
        self.orphan_until_ns = time.monotonic_ns() + tcp * 1_000_000_000
        self.write()

    def keep_orphan_window(self, syncer: Syncer | None) -> None:
        """Connections of deleted TCP frontends live as long as they send (their conntrack entries are
        refreshed): as the window closes, it stays open while any of them is alive."""
        left = self.orphan_until_ns - time.monotonic_ns()
        if not self.orphan_until_ns or left > 2 * self.cfg.sweep_interval * 1e9 or syncer is None:
            return
        maps = self.dataplane.maps
        assert maps is not None, "the syncer is made from the maps"
        live = set(syncer.service_ports())
        alive = upkeep.orphaned_tcp_flows(maps.ct4, live) + upkeep.orphaned_tcp_flows(maps.ct6, live)
        if alive:
            log.info("%d connections of deleted Service ports still live: kept translating them", alive)
            self.frontends_removed()
        elif left <= 0:
            self.orphan_until_ns = 0


class Sweeper:
    """The periodic chores, every --sweep-interval seconds."""

    def __init__(self, cfg: AgentConfig, dataplane: Dataplane, config: DatapathConfig) -> None:
        self.cfg = cfg
        self.dataplane = dataplane
        self.config = config

    async def read_host_addresses(self, store: ClusterStore) -> None:
        """With --nodeport-addresses, NodePorts are served on every interface address in those CIDRs:
        read them (at start and every sweep interval, so an address added later is picked up). In a
        thread: pyroute2 runs an event loop of its own."""
        if not self.cfg.nodeport_addresses:
            return
        try:
            addrs = await asyncio.to_thread(ipv4_addresses)
        except OSError as e:
            log.warning("cannot read this node's addresses for --nodeport-addresses: %s", e)
            return
        if store.set_host_addresses(addrs):
            log.info("node addresses: %s", ", ".join(sorted(addrs)) or "none")

    async def run(
        self,
        store: ClusterStore,
        syncer: Callable[[], Syncer | None],
        tidy: Callable[[], object] | None = None,
    ) -> None:
        """Sweep forever; SYNCER gives the sync loop's syncer (None until it made it); TIDY, the
        agent's memory chores, runs after each sweep."""
        maps = self.dataplane.maps
        assert maps is not None, "the sweeper runs after the dataplane is set up (see Agent.run)"
        while True:
            await asyncio.sleep(self.cfg.sweep_interval)
            await self.read_host_addresses(store)
            self.dataplane.check_forwarding()
            self.dataplane.sync_xdevs()
            try:
                n = upkeep.sweep_conntrack(maps.ct4) + upkeep.sweep_conntrack(maps.ct6)
                ns = upkeep.sweep_snat(maps.snat4) + upkeep.sweep_snat(maps.snat6)
                self.config.keep_orphan_window(syncer())
            except OSError as e:
                log.warning("conntrack sweep failed: %s", e)
            else:
                if n or ns:
                    log.debug("swept %d expired conntrack and %d SNAT entries", n, ns)
            if tidy is not None:
                try:
                    tidy()
                except Exception:  # memory chores must never stop the sweeps
                    log.exception("tidying the agent's memory failed")
