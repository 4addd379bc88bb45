"""The node agent: one asyncio loop wiring source -> store -> sync -> maps, plus attach and sweeping.

Start-up order matters for restarts without packet loss:
  1. load the object with maps pinned under --bpffs (existing pins, and so services and conntrack, are
     re-used), write kp_cfg_v1 (node address, conntrack timeouts, initial DSR mode);
  2. attach to the netdevs and to every pod interface matching --pod-ifaces (a pinned tcx link that
     exists already is updated in place: an atomic program swap, never detach-then-attach), then the
     socket programs to --socket-lb-cgroup when given (their cgroup links are updated in place too);
  3. start the health and metrics servers and the source, wait until the source reports its initial
     listing complete, adopt the pinned maps and apply the whole view once (only the diff is
     written), then apply dirty Services as they come, all dirty ones in one batch.
Pod interfaces are followed through netlink link events; a conntrack sweeper deletes expired entries.
The Kubernetes source also reports the agent ConfigMap: its `dsr-mode` key is written into kp_cfg_v1
live (flows keep the mode they began with; the datapath records it in conntrack).
SIGTERM/SIGINT stop the agent and leave pins and links: the programs keep running until the next agent
adopts them (`kproxy cleanup` removes everything).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import fnmatch
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from kproxy import abi
from kproxy.bpf import teardown, upkeep
from kproxy.bpf.libbpf import LibbpfError
from kproxy.bpf.loader import (
    PROG_FROM_NETDEV,
    PROG_FROM_POD,
    PROG_TO_NETDEV,
    PROG_TO_POD,
    Loader,
    LoaderError,
)
from kproxy.bpf.maps import KproxyMaps
from kproxy.bpf.netlink import follow, ipv4_addresses
from kproxy.bpf.socklb import SocketLB, find_cgroup2
from kproxy.config import DSR_MODES, AgentConfig, split_hostport
from kproxy.model import NodeInfo
from kproxy.observe import metadata
from kproxy.observe.health import HealthServer, ServiceHealthServers, health_check_services
from kproxy.observe.metrics import Metrics
from kproxy.pipeline import sync_dirty
from kproxy.sources.files import FileSource
from kproxy.sources.nodes import follow_local_node
from kproxy.store import ClusterStore
from kproxy.sync import ApplyReport, Syncer

if TYPE_CHECKING:
    # kproxy.sources.kube is imported when the agent starts its Kubernetes source (make_kube_source):
    # kopf costs the file source (the lab, the benchmarks) ~0.25 s at start for nothing.
    import kopf

    from kproxy.sources.kube import KubeSource, WatchStatus

log = logging.getLogger("kproxy.agent")

SIOCGIFADDR = 0x8915
# services.json is rewritten at most this often (seconds) while service ids change
METADATA_INTERVAL = 0.25
# a sync is logged at INFO when it changed this many Services or took this long (ms); else DEBUG
SYNC_LOG_SERVICES = 100
SYNC_LOG_MS = 100.0


class AgentError(RuntimeError):
    """The agent cannot start; the message says what to fix."""


# ---- netdev autodetection ----
def default_route_ifaces(route_table: str) -> list[str]:
    """Interfaces of IPv4 default routes in a /proc/net/route text."""
    out = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000" and fields[0] not in out:
            out.append(fields[0])
    return out


def _iface_ipv4(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(res[20:24])


def detect_netdevs(node_ips: Iterable[str], pod_globs: Iterable[str]) -> list[str]:
    """Interfaces with a default route or holding a node IP, minus loopback and pod interfaces.

    Only the primary IPv4 address of each interface is checked (SIOCGIFADDR): the node IP the
    kubelet reports is that address on every common setup.
    """
    try:
        with open("/proc/net/route") as f:
            found = default_route_ifaces(f.read())
    except OSError:
        found = []
    ips = set(node_ips)
    for _, name in socket.if_nameindex():
        if name not in found and _iface_ipv4(name) in ips:
            found.append(name)
    globs = list(pod_globs)
    return [n for n in found if n != "lo" and not any(fnmatch.fnmatchcase(n, g) for g in globs)]


class Agent:
    def __init__(self, cfg: AgentConfig, *, connection: kopf.ConnectionInfo | None = None) -> None:
        self.cfg = cfg
        self.connection = connection  # explicit Kubernetes credentials (tests)
        self.loader: Loader | None = None
        self.maps: KproxyMaps | None = None
        self.socklb: SocketLB | None = None
        self.forwarding_off: list[str] = []  # netdevs with IPv4 forwarding off, as last checked
        self.socket_lb_cgroup: str | None = None  # the cgroup socket LB is (to be) attached to
        self.socket_lb_problem: str | None = None  # why socket LB is not attached, when wanted
        self.store: ClusterStore | None = None
        self.syncer: Syncer | None = None
        self.source: KubeSource | FileSource | None = None
        self.health: HealthServer | None = None
        self.service_health: ServiceHealthServers | None = None
        self.metrics: Metrics | None = None
        self.netdevs: list[str] = list(cfg.netdevs)
        self.dsr_mode: str = cfg.dsr_mode
        self.stop = asyncio.Event()
        # CLOCK_MONOTONIC ns until which connections of deleted TCP frontends may still be alive
        self.orphan_until_ns = 0
        self.synced = asyncio.Event()  # first full apply done
        # services.json: the service-id version it holds, when it was written, a pending write
        self._metadata_version = -1
        self._metadata_written = 0.0
        self._metadata_timer: asyncio.TimerHandle | None = None
        self._metadata_entries: dict[int, str] = {}  # svc_id -> its JSON entry (service_metadata)
        self.attached_pods: set[str] = set()

    @property
    def node_ip(self) -> str:
        ip = self.cfg.primary_ipv4
        if ip is None:
            raise AgentError("the agent needs this node's IPv4 address: pass --node-ip")
        return ip

    # ---- data plane set-up ----
    def write_config(self) -> None:
        cfg = self.cfg
        t = cfg.conntrack
        maps = self.maps
        assert maps is not None, "write_config before setup_dataplane"
        # Every field of kp_cfg_v1 comes from here: the map is rewritten whole, nothing is kept.
        upkeep.write_config(
            maps, self.node_ip, syn_timeout=t.syn, tcp_timeout=t.tcp, fin_timeout=t.fin,
            udp_timeout=t.udp, dsr_mode=DSR_MODES[self.dsr_mode], hairpin_addr=cfg.hairpin_address,
            snat_port_min=cfg.snat_port_min, snat_port_max=cfg.snat_port_max, lan_mtu=self.lan_mtu,
            external_cluster_ip=cfg.external_cluster_ip, orphan_until_ns=self.orphan_until_ns,
        )  # fmt: skip
        # a predecessor's window (write_config keeps the later one) is this agent's to keep open
        self.orphan_until_ns = maps.read_config().orphan_until_ns

    def frontends_removed(self) -> None:
        """TCP frontends were deleted: their established connections continue (as kube-proxy's conntrack
        keeps them) while one could still be alive, the established TCP conntrack timeout. Until then
        kp_from_netdev looks up TCP packets that match no frontend in conntrack."""
        tcp = self.cfg.conntrack.tcp or abi.CT_TCP_TIMEOUT_DEFAULT
        self.orphan_until_ns = time.monotonic_ns() + tcp * 1_000_000_000
        self.write_config()

    @property
    def lan_mtu(self) -> int:
        """--lan-mtu, else the MTU of the first netdev (0, the datapath default 1500, if unknown)."""
        if self.cfg.lan_mtu:
            return self.cfg.lan_mtu
        for dev in self.netdevs[:1]:
            with contextlib.suppress(OSError, ValueError), open(f"/sys/class/net/{dev}/mtu") as f:
                return int(f.read())
        return 0

    def check_forwarding(self) -> list[str]:
        """Netdevs on which IPv4 forwarding is off, logged when that changes (checked at start and at
        every sweep: a CNI often turns forwarding on after the agent started): traffic the kernel
        forwards between netdevs and pods (NodePort to a local backend, replies the kernel routes)
        would be dropped. Host sysctls are the admin's: the agent only warns."""
        off = self._forwarding_off()
        back = [dev for dev in self.forwarding_off if dev not in off]
        if back:
            log.info("IPv4 forwarding is on now on %s", ",".join(back))
        self.forwarding_off = off
        return off

    def _forwarding_off(self) -> list[str]:
        off: list[str] = []
        for dev in self.netdevs:
            for path in ("/proc/sys/net/ipv4/ip_forward", f"/proc/sys/net/ipv4/conf/{dev}/forwarding"):
                try:
                    with open(path) as f:
                        on = f.read().strip() != "0"
                except OSError:
                    continue
                if not on:
                    off.append(dev)
                    if dev in self.forwarding_off:
                        break  # said already
                    log.warning(
                        "IPv4 forwarding is off (%s = 0): external traffic through %s to pods will be "
                        "dropped; enable it (sysctl -w net.ipv4.ip_forward=1 net.ipv4.conf.all.forwarding=1)",
                        path, dev,
                    )  # fmt: skip
                    break
        return off

    def setup_dataplane(self) -> None:
        cfg = self.cfg
        loader = self.loader = Loader(cfg.bpffs, cfg.object_path, cfg.map_sizes)
        try:
            loader.load()
            self.maps = loader.open_maps()
        except (LoaderError, LibbpfError, FileNotFoundError) as e:
            raise AgentError(f"cannot load the BPF object into {cfg.bpffs}: {e}") from e
        for pin in loader.reconcile():
            log.info("removed stale link %s", pin)
        if not self.netdevs:
            self.netdevs = detect_netdevs(cfg.node_ips, cfg.pod_ifaces)
            if not self.netdevs:
                log.warning(
                    "no netdev found (no default route, no interface with %s): NodePort and LoadBalancer "
                    "traffic from outside is not served; pass --netdev IFACE", ",".join(cfg.node_ips) or "-",
                )  # fmt: skip
            else:
                log.info("autodetected netdevs: %s", ",".join(self.netdevs))
        # Before any attach: the lan MTU comes from the netdevs, and the programs read the config.
        self.write_config()
        self.check_forwarding()
        for dev in self.netdevs:
            try:
                loader.attach(dev, "ingress", PROG_FROM_NETDEV)
                loader.attach(dev, "egress", PROG_TO_NETDEV)
            except (LoaderError, LibbpfError, OSError) as e:
                raise AgentError(f"cannot attach to netdev {dev}: {e}") from e
            log.info("attached %s/%s to netdev %s", PROG_FROM_NETDEV, PROG_TO_NETDEV, dev)
        if cfg.socket_lb_cgroup:
            self.setup_socket_lb(cfg.socket_lb_cgroup)

    def setup_socket_lb(self, cgroup: str) -> None:
        """Attach socket load balancing to CGROUP, or to the cgroup2 mount below it (hybrid cgroup
        hosts). When that fails the agent runs without it: an error in the log, the metric
        kproxy_socket_lb_attached 0 and `kproxy status` say so; pod traffic is not affected."""
        found = find_cgroup2(cgroup)
        if found != os.path.realpath(cgroup):
            log.info("%s is not a cgroup v2 directory: using the cgroup2 mount below it, %s", cgroup, found)
        self.socket_lb_cgroup = found
        try:
            self.socklb = SocketLB(self.cfg.bpffs, found, allow_root=self.cfg.socket_lb_allow_root_cgroup)
            attached = self.socklb.attach()
        except (LoaderError, LibbpfError, OSError) as e:
            if self.socklb is not None:
                with contextlib.suppress(Exception):
                    self.socklb.close()
            self.socklb = None
            self.socket_lb_problem = str(e)
            log.error(
                "socket load balancing is OFF: %s. Processes of the node and hostNetwork pods do not reach "
                "Services through kproxy (pod traffic is not affected). Give the host's cgroup v2 directory "
                "with --socket-lb-cgroup (Helm value socketLB.cgroupPath; /sys/fs/cgroup/unified on hybrid "
                "cgroup v1/v2 hosts), or turn it off (socketLB.enabled=false)", e,
            )  # fmt: skip
            return
        self.socket_lb_problem = None
        log.info("socket load balancing on cgroup %s: %s", found, ", ".join(a.hook for a in attached))

    async def uninstalling(self) -> bool:
        """On SIGTERM: is this install being removed (--daemonset gone or being deleted)? Then the
        dataplane goes with the agent, unless --keep-dataplane-on-uninstall. Anything unclear (no
        --daemonset, the API server not answering) keeps it: a frozen dataplane is better than none."""
        ref = self.cfg.daemonset
        if not ref or self.source is None or not hasattr(self.source, "daemonset_gone"):
            return False
        gone = await self.source.daemonset_gone(ref)
        if gone is None:
            log.warning("cannot tell whether DaemonSet %s is being removed: the dataplane stays", ref)
            return False
        if not gone:
            log.info(
                "DaemonSet %s is still there (a restart or an upgrade): the dataplane keeps serving", ref
            )
            return False
        if self.cfg.keep_dataplane_on_uninstall:
            log.warning(
                "DaemonSet %s is gone, and --keep-dataplane-on-uninstall: the programs stay, serving the "
                "last state; `kproxy cleanup` on the node removes them", ref,
            )  # fmt: skip
            return False
        return True

    def remove_dataplane(self) -> None:
        try:
            detached = teardown.remove_dataplane(self.cfg.bpffs, self.loader)
        except OSError as e:
            log.error("removing the dataplane from %s failed: %s; run `kproxy cleanup`", self.cfg.bpffs, e)
            return
        log.info(
            "DaemonSet %s is gone (an uninstall): removed the programs (%s) and every pin under %s",
            self.cfg.daemonset, ", ".join(detached) or "none attached", self.cfg.bpffs,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        """What `kproxy status` shows of this agent (written to the state directory, see write_status)."""
        return {
            "node": self.cfg.node_name,
            "pid": os.getpid(),
            "netdevs": list(self.netdevs),
            "socket_lb": {
                "wanted": bool(self.cfg.socket_lb_cgroup),
                "attached": self.socklb is not None,
                "cgroup": self.socket_lb_cgroup,
                "problem": self.socket_lb_problem,
            },
        }

    def write_status(self) -> None:
        try:
            metadata.write_status(self.cfg.bpffs, self.status())
        except OSError as e:
            log.warning("cannot write the agent status file: %s", e)

    def attach_pod(self, ifname: str) -> None:
        t0 = time.monotonic()
        try:
            # No accept_local: replies whose restored source is this node's address (NodePort) or that
            # belong to flows from outside are forwarded by kp_from_pod itself (FIB lookup + redirect),
            # so the kernel's input path never sees a local source arriving on a pod veth.
            assert self.loader is not None, "pods are followed after setup_dataplane"
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
            assert self.loader is not None, "pods are followed after setup_dataplane"
            self.loader.detach(ifname)
        except Exception as e:
            log.warning("cannot remove the link pins of %s: %s", ifname, e)
        else:
            log.info("pod interface %s is gone: removed its link pins", ifname)

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
        self.write_config()
        log.info("DSR mode %s -> %s (new flows only; flows in progress keep their mode)", old, mode)

    # ---- tasks ----
    async def follow_pods(self) -> None:
        async for ev in follow(self.cfg.pod_ifaces, self.stop):
            if ev.kind == "added":
                self.attach_pod(ev.ifname)
            else:
                self.detach_pod(ev.ifname)

    async def sync_loop(self) -> None:
        store, maps = self.store, self.maps
        assert store is not None and maps is not None, "sync_loop runs after setup_dataplane (see run)"
        tcfg = self.cfg.translate_config()
        syncer = self.syncer = Syncer(maps)
        while not store.initial_sync_done:
            store.event.clear()
            if store.initial_sync_done:
                break
            await store.event.wait()
        t0 = time.monotonic()
        syncer.adopt()
        store.event.clear()
        report = sync_dirty(store, syncer, tcfg, full=True)
        await self.after_apply(report, t0, full=True)
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
            await self.after_apply(report, t0)

    async def after_apply(self, report: ApplyReport, t0: float, full: bool = False) -> None:
        ms = (time.monotonic() - t0) * 1000
        if report.tcp_frontends_removed:
            self.frontends_removed()
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
        self.metadata_changed(at_once=full)
        if self.metrics is not None:
            self.metrics.observe_sync(report, t0, getattr(report, "first_change", None), full=full)
        if self.health is not None:
            # Services that cannot be programmed (a conflict, a full map) are logged and counted; the
            # proxy itself is working, so they do not fail /healthz (and restart the agent for nothing).
            self.health.update(True)
        if self.service_health is not None and self.store is not None:
            await self.service_health.sync(health_check_services(self.store))

    def metadata_changed(self, at_once: bool = False) -> None:
        """services.json follows the service ids (service_ports()), not every sync: rewritten when an id
        came or went, at most every METADATA_INTERVAL seconds (a stream of new Services costs one
        write per interval, not one per Service); at once after the full sync (the lab and the CLI
        wait for the file)."""
        if self._metadata_timer is not None and not at_once:
            return  # a write is due
        assert self.syncer is not None, "ids change only once sync_loop made the syncer"
        if self.syncer.svc_ids_version == self._metadata_version and not at_once:
            return
        wait = self._metadata_written + METADATA_INTERVAL - time.monotonic()
        if at_once:
            self.write_metadata()
            self._metadata_written = 0.0  # the first change after it is written at once, too
        elif wait <= 0:
            self.write_metadata()
        else:
            self._metadata_timer = asyncio.get_running_loop().call_later(wait, self.write_metadata)

    def write_metadata(self) -> None:
        if self._metadata_timer is not None:
            self._metadata_timer.cancel()
            self._metadata_timer = None
        assert self.syncer is not None, "ids change only once sync_loop made the syncer"
        self._metadata_version = self.syncer.svc_ids_version
        self._metadata_written = time.monotonic()

        try:
            metadata.write_metadata_entries(
                self.cfg.bpffs, self.cfg.node_name, self.service_metadata().values()
            )
        except OSError as e:
            log.warning("cannot write the service names for the CLI: %s", e)

    def service_metadata(self) -> dict[int, str]:
        """svc_id -> its services.json entry, JSON-encoded; kept up to date from the syncer's id changes
        (a write joins the strings: no per-Service work for the Services that did not change)."""
        syncer = self.syncer
        assert syncer is not None, "ids change only once sync_loop made the syncer"
        changes = syncer.take_svc_id_changes()
        entries = self._metadata_entries
        if changes is None:
            entries.clear()
            changes = list(syncer.service_ports().items())
        for sid, sp in changes:
            if sp is None:
                entries.pop(sid, None)
            else:
                entries[sid] = metadata.metadata_entry(sid, *sp)
        return entries

    async def read_host_addresses(self) -> None:
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
        assert self.store is not None, "the store is made before the addresses are read (see run)"
        if self.store.set_host_addresses(addrs):
            log.info("node addresses: %s", ", ".join(sorted(addrs)) or "none")

    def keep_orphan_window(self) -> None:
        """Connections of deleted TCP frontends live as long as they send (their conntrack entries are
        refreshed): as the window closes, it stays open while any of them is alive."""
        left = self.orphan_until_ns - time.monotonic_ns()
        if not self.orphan_until_ns or left > 2 * self.cfg.sweep_interval * 1e9 or self.syncer is None:
            return
        assert self.maps is not None, "the syncer is made from the maps"
        alive = upkeep.orphaned_tcp_flows(self.maps.ct4, set(self.syncer.service_ports()))
        if alive:
            log.info("%d connections of deleted Service ports still live: kept translating them", alive)
            self.frontends_removed()
        elif left <= 0:
            self.orphan_until_ns = 0

    async def sweep_loop(self) -> None:
        maps = self.maps
        assert maps is not None, "sweep_loop runs after setup_dataplane (see run)"
        while True:
            await asyncio.sleep(self.cfg.sweep_interval)
            await self.read_host_addresses()
            self.check_forwarding()
            try:
                n = upkeep.sweep_conntrack(maps.ct4)
                snat4 = getattr(maps, "snat4", None)
                ns = upkeep.sweep_snat(snat4) if snat4 is not None else 0
                self.keep_orphan_window()
            except OSError as e:
                log.warning("conntrack sweep failed: %s", e)
                continue
            if n or ns:
                log.debug("swept %d expired conntrack and %d SNAT entries", n, ns)

    async def run_source(self) -> None:
        source_dir = self.cfg.source_dir
        if source_dir is not None:
            await self.make_file_source(source_dir).run()
            return
        await self.make_kube_source().run()

    def make_file_source(self, source_dir: str) -> FileSource:
        assert self.store is not None, "the sources run after the store is made (see run)"
        # The file source also reads Node manifests into the store's node table; this node's manifest,
        # if there is one, decides /healthz's nodeEligible (deletionTimestamp, autoscaler taint).
        if self.health is not None:
            follow_local_node(self.store, self.cfg.node_name, self.health.set_node_eligible)
        self.source = FileSource(source_dir, self.store)
        return self.source

    def make_kube_source(self) -> KubeSource:
        try:  # deferred: kopf, only for --source kubernetes (see the TYPE_CHECKING import above)
            from kproxy.sources.kube import KubeSource, KubeSourceConfig
        except ImportError as e:
            raise AgentError(
                f"--source kubernetes is not available: {e}; install kproxy with its Kubernetes "
                "dependencies (kopf, aiohttp) or use --source file:DIR"
            ) from e
        assert self.store is not None, "the sources run after the store is made (see run)"
        kcfg = KubeSourceConfig(
            node_name=self.cfg.node_name,
            kubeconfig=self.cfg.kubeconfig,
            api_server=self.cfg.k8s_api_server,
            settings_configmap=self.cfg.settings_configmap,
            daemonset=self.cfg.daemonset,
        )
        if self.health is not None:
            self.health.set_node_eligible(False)  # as kube-proxy: not eligible until its Node is seen
        self.source = KubeSource(
            self.store,
            kcfg,
            on_settings=self.apply_settings,
            on_node_eligible=self.health.set_node_eligible if self.health is not None else None,
            on_watch_status=self.watch_status_changed,
            metrics=self.metrics,
            connection=self.connection,
            # kopf's own listing waits for our first full sync: the two peaks of memory never meet.
            kopf_gate=self.synced,
        )
        return self.source

    def watch_status_changed(self, _status: WatchStatus) -> None:
        """A watch went up or down: /readyz fails while one the Service view needs is down."""
        if self.health is not None and self.source is not None and not isinstance(self.source, FileSource):
            self.health.set_stale_watches(self.source.stale_watches())

    async def start_servers(self) -> None:
        assert self.store is not None, "the servers start after the store is made (see run)"
        host, port = split_hostport(self.cfg.health_bind)
        self.health = HealthServer(host, port)
        self.store.add_listener(self.health.queued)
        try:
            await self.health.start()
        except OSError as e:
            raise AgentError(
                f"cannot serve /healthz on {self.cfg.health_bind}: {e}; pass --health-bind-address"
            ) from e
        self.service_health = ServiceHealthServers(self.health.is_healthy)
        self.metrics = Metrics()
        self.metrics.bind(maps=self.maps, store=self.store)
        if self.cfg.socket_lb_cgroup:
            self.metrics.socket_lb_attached.set(1 if self.socklb is not None else 0)
        self.write_status()
        host, port = split_hostport(self.cfg.metrics_bind)
        try:
            await self.metrics.start(host, port)
        except OSError as e:
            raise AgentError(
                f"cannot serve metrics on {self.cfg.metrics_bind}: {e}; pass --metrics-bind-address"
            ) from e

    async def stop_servers(self) -> None:
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

    # ---- main ----
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        tasks: set[asyncio.Task[Any]] = set()
        stopper = asyncio.create_task(self.stop.wait())
        failed: list[asyncio.Task[Any]] = []
        try:
            _ = self.node_ip
            self.setup_dataplane()
            self.store = ClusterStore(NodeInfo(name=self.cfg.node_name, addresses=tuple(self.cfg.node_ips)))
            if self.cfg.service_cidrs:
                self.store.set_service_cidrs("flag", self.cfg.service_cidrs)
            await self.read_host_addresses()
            await self.start_servers()
            tasks = {
                asyncio.create_task(self._guard("pod follower", self.follow_pods)),
                asyncio.create_task(self._guard("source", self.run_source)),
                asyncio.create_task(self._guard("sync", self.sync_loop)),
                asyncio.create_task(self._guard("conntrack sweeper", self.sweep_loop)),
            }
            log.info(
                "agent %s up: node %s, bpffs %s, netdevs %s, pod interfaces %s, source %s, dsr %s, "
                "socket LB %s", self.cfg.node_name, self.node_ip, self.cfg.bpffs,
                ",".join(self.netdevs) or "-", ",".join(self.cfg.pod_ifaces), self.cfg.source, self.dsr_mode,
                self.cfg.socket_lb_cgroup or "off",
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
            uninstall = signalled and not failed and await self.uninstalling()
            if self._metadata_timer is not None:
                self.write_metadata()  # the names of the last ids
            if self.source is not None and hasattr(self.source, "close"):
                with contextlib.suppress(Exception):
                    self.source.close()
            await self.stop_servers()
            if self.socklb is not None:
                self.socklb.close()  # links stay pinned: local clients keep their Services
            if self.maps is not None:
                self.maps.close()
            if uninstall:
                self.remove_dataplane()  # with the loader, which knows its cls_bpf filters
            elif self.loader is not None:
                self.loader.close()  # pins stay: the programs keep running
        if failed:
            exc = failed[0].exception()
            if isinstance(exc, AgentError):
                raise exc
            raise AgentError(f"agent task failed: {exc}")
        log.info("agent stopped; programs stay attached (pins under %s)", self.cfg.bpffs)

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
