"""The agent's data plane: the BPF object loaded with its maps pinned, the programs attached to the
netdevs and followed onto pod interfaces, socket load balancing, and what happens to all of it on exit.

Start-up order matters for restarts without packet loss (Agent.setup_dataplane runs these steps):
  1. load the object with maps pinned under --bpffs (existing pins, and so services and conntrack, are
     re-used), write kp_cfg_v1 (see kproxy.agent.upkeep.DatapathConfig);
  2. attach to the netdevs and to every pod interface matching --pod-ifaces (a pinned tcx link that
     exists already is updated in place: an atomic program swap, never detach-then-attach), then the
     socket programs to --socket-lb-cgroup when given (their cgroup links are updated in place too).
On exit pins and links stay (the programs keep running until the next agent adopts them), unless the
install is being removed (see kproxy.agent.sources.Sources.uninstalling).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import time
from typing import Any

from kproxy import abi
from kproxy.bpf import reserved_ports, teardown
from kproxy.bpf.libbpf import LibbpfError
from kproxy.bpf.loader import (
    PROG_FROM_NETDEV,
    PROG_FROM_POD,
    PROG_TO_NETDEV,
    PROG_TO_POD,
    PROG_XDP,
    Loader,
    LoaderError,
    XdpUnsupported,
)
from kproxy.bpf.maps import KproxyMaps
from kproxy.bpf.netlink import XDP_ACT_NDO_XMIT, XDP_ACT_REDIRECT, follow, xdp_features
from kproxy.bpf.socklb import SocketLB, find_cgroup2
from kproxy.config import AgentConfig
from kproxy.observe import metadata

from .errors import AgentError
from .netdevs import detect_netdevs, forwarding_off

# what a netdev's driver must do for kp_xdp to redirect packets from it and to it (kp_xdevs_v1)
XDP_REDIRECT_BOTH = XDP_ACT_REDIRECT | XDP_ACT_NDO_XMIT

log = logging.getLogger("kproxy.agent")


class Dataplane:
    """The loader, the maps and the links of one agent; the netdevs and pod interfaces they are on."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.loader: Loader | None = None
        self.maps: KproxyMaps | None = None
        self.socklb: SocketLB | None = None
        self.forwarding_off: list[str] = []  # "FAMILY DEV" with forwarding off, as last checked
        self.socket_lb_cgroup: str | None = None  # the cgroup socket LB is (to be) attached to
        self.socket_lb_problem: str | None = None  # why socket LB is not attached, when wanted
        self.node_ports_problem: str | None = None  # why the NodePort range is not reserved, when wanted
        self.netdevs: list[str] = list(cfg.netdevs)
        self.attached_pods: set[str] = set()
        self.xdevs_said: set[int] | None = None  # the redirect set last logged
        self.redirect_netdevs: list[str] = []  # the netdevs in kp_xdevs_v1, for `kproxy status`
        self.acceleration: dict[str, str] = {}  # netdev -> "xdp", "off", "tc (best-effort: why)"

    @property
    def node_ip(self) -> str:
        """This node's primary address: the first IPv4 --node-ip, else (an IPv6-only node) the first IPv6."""
        ip = self.cfg.primary_ipv4 or self.cfg.primary_ipv6
        if ip is None:
            raise AgentError("the agent needs this node's address: pass --node-ip")
        return ip

    @property
    def lan_mtu(self) -> int:
        """--lan-mtu, else the MTU of the first netdev (0, the datapath default 1500, if unknown)."""
        if self.cfg.lan_mtu:
            return self.cfg.lan_mtu
        for dev in self.netdevs[:1]:
            with contextlib.suppress(OSError, ValueError), open(f"/sys/class/net/{dev}/mtu") as f:
                return int(f.read())
        return 0

    # ---- set-up ----
    def load(self) -> None:
        """Load the object (re-using the pinned maps), drop stale links, find the netdevs."""
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

    def attach(self) -> None:
        """Attach to the netdevs, then socket load balancing when --socket-lb-cgroup is given."""
        loader = self.loader
        assert loader is not None, "attach after load"
        for dev in self.netdevs:
            try:
                loader.attach(dev, "ingress", PROG_FROM_NETDEV)
                loader.attach(dev, "egress", PROG_TO_NETDEV)
            except (LoaderError, LibbpfError, OSError) as e:
                raise AgentError(f"cannot attach to netdev {dev}: {e}") from e
            log.info("attached %s/%s to netdev %s", PROG_FROM_NETDEV, PROG_TO_NETDEV, dev)
            self.accelerate(dev)
        self.sync_xdevs()
        if self.cfg.socket_lb_cgroup:
            self.setup_socket_lb(self.cfg.socket_lb_cgroup)

    def accelerate(self, dev: str) -> None:
        """XDP on netdev DEV as --acceleration says (after its TC programs: XDP leaves them every packet
        it does not finish). native: refuse a netdev without native XDP; best-effort: TC alone there,
        said once; off: remove the XDP program an earlier agent attached. Recorded for `kproxy status`."""
        loader = self.loader
        assert loader is not None, "accelerate after load"
        mode = self.cfg.acceleration
        if mode == "off":
            self.acceleration[dev] = "off"
            self.sync_xdevs()  # no redirect to it before its XDP program goes
            try:
                if loader.detach_xdp(dev):
                    log.info("acceleration off: removed the XDP program of netdev %s", dev)
            except (LibbpfError, OSError) as e:
                log.warning("cannot remove the XDP program of netdev %s: %s", dev, e)
            self.acceleration[dev] = "off"
            return
        try:
            loader.attach_xdp(dev, PROG_XDP, allow_veth=self.cfg.xdp_veth)
        except XdpUnsupported as e:
            if mode == "native":
                raise AgentError(
                    f"--acceleration native: {e}; use --acceleration best-effort to run TC alone there"
                ) from e
            log.warning("acceleration best-effort: netdev %s runs TC alone: %s", dev, e)
            self.acceleration[dev] = f"tc (best-effort: {e})"
            return
        except (LoaderError, LibbpfError, OSError) as e:
            raise AgentError(f"cannot attach XDP to netdev {dev}: {e}") from e
        self.acceleration[dev] = "xdp"
        log.info("netdev %s accelerated: %s runs as native XDP", dev, PROG_XDP)

    def sync_xdevs(self) -> None:
        """kp_xdevs_v1: the netdevs kp_xdp may redirect packets between (XDP_REDIRECT), those where its
        native XDP link runs now and whose driver the kernel says carries out XDP_REDIRECT and takes
        redirected frames at this moment (netdev netlink xdp-features REDIRECT and NDO_XMIT: a veth takes
        them only while its peer runs XDP, mlx5 or i40e only with their XDP queues). A kernel without
        that report (before 6.3) gets none: XDP_TX only. Entries of netdevs no longer so (acceleration
        off, a netdev gone or re-created under its name, an earlier agent's) are removed. At start, before
        a netdev's XDP program is removed, and every sweep."""
        xdevs = self.maps.xdevs if self.maps is not None else None
        loader = self.loader
        if xdevs is None or loader is None:
            return
        want: set[int] = set()
        names: list[str] = []
        for dev, how in sorted(self.acceleration.items()):
            if how != "xdp":
                continue
            ifindex = loader.xdp_ifindex(dev)
            try:
                features = xdp_features(ifindex) if ifindex else None
            except OSError as e:
                log.debug("xdp-features of %s: %s", dev, e)
                features = None
            if ifindex and features is not None and features & XDP_REDIRECT_BOTH == XDP_REDIRECT_BOTH:
                want.add(ifindex)
                names.append(dev)
        self.redirect_netdevs = names
        if want != self.xdevs_said:
            log.info("XDP_REDIRECT between netdevs: %s", ", ".join(names) or "none")
            if self.xdevs_said is not None:
                self.write_status()  # a change after start (a peer or driver ready, a netdev gone)
            self.xdevs_said = want
        try:
            have = {k.value for k, _ in xdevs.items()}
            stale = sorted(have - want)
            if stale:
                xdevs.delete_many([ctypes.c_uint32(i) for i in stale])
            new = sorted(want - have)
            if new:
                xdevs.put_many([(ctypes.c_uint32(i), abi.XdevVal(0)) for i in new])
        except (LibbpfError, OSError) as e:
            log.warning("cannot update %s (XDP redirect targets): %s", xdevs.name, e)

    def check_forwarding(self) -> list[str]:
        """Netdevs on which forwarding is off, as "FAMILY DEV" ("IPv4 eth0", "IPv6 eth0"), logged when
        that changes (checked at start and at every sweep: a CNI often turns forwarding on after the
        agent started): traffic the kernel forwards between netdevs and pods (NodePort to a local
        backend, replies the kernel routes) would be dropped, and for IPv6 bpf_fib_lookup fails, so
        SNATed flows are dropped too. Checked for the families of --node-ip (IPv4 also with none).
        Host sysctls are the admin's: the agent only warns."""
        families = [f for f, ip in (("IPv4", self.cfg.primary_ipv4), ("IPv6", self.cfg.primary_ipv6)) if ip]
        off = forwarding_off(self.netdevs, said=self.forwarding_off, families=families or ["IPv4"])
        back = [which for which in self.forwarding_off if which not in off]
        for family in ("IPv4", "IPv6"):
            devs = [which.split(" ", 1)[1] for which in back if which.startswith(family + " ")]
            if devs:
                log.info("%s forwarding is on now on %s", family, ",".join(devs))
        self.forwarding_off = off
        return off

    def protect_node_ports(self) -> None:
        """--protect-node-port-range: the NodePort range in ip_local_reserved_ports of this network
        namespace (kproxy.bpf.reserved_ports); off: what an earlier agent recorded adding is taken out.
        A failure is a warning: Services work without it, an unlucky ephemeral port aside."""
        cfg = self.cfg
        want = (cfg.node_port_min, cfg.node_port_max)
        state = metadata.state_dir(cfg.bpffs)
        try:
            if not cfg.protect_node_port_range:
                removed = reserved_ports.release(state)
                if removed:
                    log.info(
                        "NodePort range protection off: removed %s from net.ipv4.ip_local_reserved_ports",
                        reserved_ports.render(removed),
                    )
                return
            added = reserved_ports.reserve(want, state)
        except (OSError, ValueError) as e:
            if not cfg.protect_node_port_range:
                log.warning(
                    "--no-protect-node-port-range: cannot take the ports an earlier agent added out of "
                    "net.ipv4.ip_local_reserved_ports at %s: %s. They stay reserved (only ephemeral port "
                    "selection skips them); the next start tries again",
                    reserved_ports.sysctl_path(), e,
                )  # fmt: skip
                return
            self.node_ports_problem = str(e)
            log.warning(
                "cannot keep the NodePort range %d-%d out of ephemeral ports "
                "(net.ipv4.ip_local_reserved_ports at %s): %s. A node process may get a NodePort as its "
                "source port; fix that, or pass --no-protect-node-port-range",
                *want, reserved_ports.sysctl_path(), e,
            )  # fmt: skip
            return
        self.node_ports_problem = None
        if added:
            log.info(
                "net.ipv4.ip_local_reserved_ports: added %s (the NodePort range)",
                reserved_ports.render(added),
            )

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

    # ---- pod interfaces ----
    async def follow_pods(self, stop: asyncio.Event) -> None:
        """Attach to pod interfaces as netlink reports them (and those there at start), until STOP."""
        async for ev in follow(self.cfg.pod_ifaces, stop):
            if ev.kind == "added":
                self.attach_pod(ev.ifname)
            else:
                self.detach_pod(ev.ifname)

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

    # ---- `kproxy status` ----
    def status(self) -> dict[str, Any]:
        """What `kproxy status` shows of this agent (written to the state directory, see write_status)."""
        return {
            "node": self.cfg.node_name,
            "pid": os.getpid(),
            "netdevs": list(self.netdevs),
            # netdev -> "xdp", "off" or "tc (best-effort: why)" (--acceleration)
            "acceleration": {
                "mode": self.cfg.acceleration,
                "netdevs": dict(self.acceleration),
                "redirect": list(self.redirect_netdevs),  # netdevs kp_xdp redirects between (kp_xdevs_v1)
            },
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

    # ---- exit ----
    def close(self, *, remove: bool) -> None:
        """Close the links and maps; pins stay (the programs keep running) unless REMOVE (an uninstall)."""
        if self.socklb is not None:
            self.socklb.close()  # links stay pinned: local clients keep their Services
        if self.maps is not None:
            self.maps.close()
        if remove:
            self.remove()  # with the loader, which knows its cls_bpf filters
        elif self.loader is not None:
            self.loader.close()  # pins stay: the programs keep running

    def remove(self) -> None:
        try:
            detached = teardown.remove_dataplane(self.cfg.bpffs, self.loader)
        except OSError as e:
            log.error("removing the dataplane from %s failed: %s; run `kproxy cleanup`", self.cfg.bpffs, e)
            return
        log.info(
            "DaemonSet %s is gone (an uninstall): removed the programs (%s) and every pin under %s",
            self.cfg.daemonset, ", ".join(detached) or "none attached", self.cfg.bpffs,
        )  # fmt: skip
