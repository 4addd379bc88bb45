"""The lab: a small cluster as the kernel sees it, built from network namespaces on one machine.

    LAN namespace  : bridge br0, one port per node and one for the external client (192.168.77.0/24,
                     fd00:77::/64)
    node n<i>      : eth0 = 192.168.77.<10+i>/24 and fd00:77::<10+i>/64, pod CIDRs 10.244.<i>.0/24 and
                     fd00:10:244:<i>::/64, forwarding on (both families), routes to the other nodes'
                     pod CIDRs via their LAN addresses
    pod n<i>p<j>   : eth0 = 10.244.<i>.<10+j>/32, default via 169.254.1.1 onlink; the node side of its
                     veth is <prefix>-n<i>p<j> (proxy_arp, a /32 route to the pod);
                     eth0 = fd00:10:244:<i>::<10+j>/128, default via fe80::1, the link-local address of
                     the node side (found by neighbour discovery, as any IPv6 router), a /128 route back
    ext            : eth0 = 192.168.77.100/24 and fd00:77::100/64, LoadBalancer/external IPs
                     (192.168.78.0/24, fd00:78::/64) via node 1
    with ext_link  : a second link, ext's eth1 = 192.168.79.100/24 to node 1's eth1 = 192.168.79.1/24,
                     node 1's second netdev (--netdev eth0,eth1): traffic from outside that enters one
                     netdev and leaves by the other (XDP_REDIRECT with acceleration)

Every pod and node has both families; the IPv6 plan repeats the IPv4 one digit for digit (the IPv4
octets are written as IPv6 hex groups: 10.244.1.11 -> fd00:10:244:1::11). IPv6 addresses are added
with DAD off, so they are usable at once; neighbour discovery itself is left alone. IPv6 Service
addresses of dual-stack manifests come from SERVICE6_CIDR (manifests.py builds those objects).

Every namespace name carries a per-run prefix (kpl<4 hex>-...). Links are created directly inside the
lab's namespaces, so nothing is ever added to the root namespace. A state file under
/run/kproxy-lab/<prefix>/ records every namespace, mount and process before it is created, so
`down()` (or `kproxy lab down`) removes everything also after a crash. One bpffs is mounted per lab,
with one subdirectory per node; one agent per node runs under `nsenter --net` (which keeps the mount
namespace, so the bpffs stays visible) and logs to <state dir>/logs/.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kproxy.bpf import libbpf as lb
from kproxy.lab import manifests as mf
from kproxy.lab.netns import LabError, add_netns, del_netns, in_netns, ip, netns_path, netns_pids, run, sysctl

T = TypeVar("T")

STATE_ROOT = Path(os.environ.get("KPROXY_LAB_ROOT", "/run/kproxy-lab"))
LAN_PREFIX = "192.168.77"
LB_CIDR = "192.168.78.0/24"  # LoadBalancer ingress and external IPs, routed by ext via node 1
GATEWAY = "169.254.1.1"
POD_PORTS = (8080, 9090)
EXT_IP = f"{LAN_PREFIX}.100"
LAN6_PREFIX = "fd00:77::"  # /64: node n<i> is fd00:77::<10+i>
EXT_LINK_PREFIX = "192.168.79"  # ext_link: ext .100, node 1 .1
LB6_CIDR = "fd00:78::/64"  # IPv6 LoadBalancer ingress and external IPs, routed by ext via node 1
GATEWAY6 = "fe80::1"  # every pod's IPv6 gateway: a link-local address of the node side of its veth
EXT_IP6 = f"{LAN6_PREFIX}100"
SERVICE6_CIDR = "fd00:10:96::/108"  # IPv6 ClusterIPs of dual-stack test Services (IPv4: 10.96.0.0/12)
CGROUP2_ROOT = Path(os.environ.get("KPROXY_LAB_CGROUP2", "/sys/fs/cgroup/unified"))


@dataclass
class Host:
    name: str  # short lab name: n1, n1p2, ext
    ns: str  # namespace name, with the run prefix
    ip: str
    ip6: str = ""  # "" only in the state of a lab brought up before the lab was dual-stack


@dataclass
class Node(Host):
    index: int = 0
    pod_cidr: str = ""
    pod_cidr6: str = ""
    bpffs: str = ""
    cgroup: str = ""  # child cgroup v2 of the node's processes under socket LB ("" = no socket LB)


@dataclass
class Pod(Host):
    node: str = ""
    host_if: str = ""


@dataclass
class Proc:
    pid: int
    start: str  # /proc/PID/stat start time, so a re-used pid is never killed
    what: str


@dataclass
class LabState:
    prefix: str
    dir: str
    namespaces: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    processes: dict[str, Proc] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    ext: Host | None = None
    ext_link: bool = False  # node 1's second netdev eth1, linked to ext's eth1

    @classmethod
    def load(cls, path: Path) -> LabState:
        raw = json.loads(path.read_text())
        st = cls(prefix=raw["prefix"], dir=raw["dir"])
        st.namespaces = raw.get("namespaces", [])
        st.mounts = raw.get("mounts", [])
        st.cgroups = raw.get("cgroups", [])
        st.processes = {k: Proc(**v) for k, v in raw.get("processes", {}).items()}
        st.nodes = [Node(**n) for n in raw.get("nodes", [])]
        st.pods = [Pod(**p) for p in raw.get("pods", [])]
        st.ext = Host(**raw["ext"]) if raw.get("ext") else None
        st.ext_link = bool(raw.get("ext_link", False))
        return st

    def save(self) -> None:
        path = Path(self.dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.rename(tmp, path)


def _proc_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(p: Proc) -> bool:
    """Whether the recorded process still runs (a zombie child of ours is reaped and counts as gone)."""
    try:
        stat = Path(f"/proc/{p.pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    if fields[19] != p.start:
        return False
    if fields[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p.pid, os.WNOHANG)
        return False
    return True


def _wait(
    what: str, cond: Callable[[], bool], timeout: float, detail: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            extra = detail()
            raise LabError(
                f"timed out after {timeout:.0f}s waiting for {what}" + (f": {extra}" if extra else "")
            )
        time.sleep(0.05)


class Lab:
    """A netns mini-cluster. Use as a context manager: `with Lab(nodes=2, pods_per_node=2) as lab: ...`."""

    def __init__(
        self,
        nodes: int = 2,
        pods_per_node: int = 2,
        start_agents: bool = True,
        manifests_from: str | Path | None = None,
        agent_args: Sequence[str] = (),
        state_root: Path = STATE_ROOT,
        socket_lb: bool = False,
        agent_node_ip6: bool = True,
        xdp_lan: bool | None = None,
        ext_link: bool = False,
    ) -> None:
        if not 1 <= nodes <= 9 or not 0 <= pods_per_node <= 9:
            raise LabError(
                f"lab size {nodes} nodes x {pods_per_node} pods: use 1..9 nodes and 0..9 pods per node"
            )
        self.n_nodes = nodes
        self.pods_per_node = pods_per_node
        self.start_agents = start_agents
        self.manifests_from = Path(manifests_from) if manifests_from else None
        self.agent_args = list(agent_args)
        # the LAN made ready for XDP_TX from the nodes' netdevs (see _lan_port): XDP_LAN, or by default
        # when the agents start with --acceleration on
        self.xdp_lan = (
            xdp_lan
            if xdp_lan is not None
            else any(
                a == "--acceleration" and i + 1 < len(self.agent_args) and self.agent_args[i + 1] != "off"
                for i, a in enumerate(self.agent_args)
            )
            or any(a.startswith("--acceleration=") and not a.endswith("=off") for a in self.agent_args)
        )
        self.state_root = state_root
        self.ext_link = ext_link
        # One child cgroup per node under the cgroup2 mount (never its root), its agent's --socket-lb-cgroup:
        # processes run in it with run_in(node, ..., cgroup=node.cgroup) are the node's own clients.
        self.socket_lb = socket_lb
        # Pass the node's IPv6 address to the agents too (--node-ip v4,v6); False for an agent that
        # takes IPv4 only.
        self.agent_node_ip6 = agent_node_ip6
        self.st: LabState | None = None

    # ---- naming and state ----
    @property
    def state(self) -> LabState:
        if self.st is None:
            raise LabError("the lab is not up")
        return self.st

    @property
    def dir(self) -> Path:
        return Path(self.state.dir)

    @property
    def prefix(self) -> str:
        return self.state.prefix

    @property
    def manifests_dir(self) -> Path:
        return self.dir / "manifests"

    @property
    def nodes(self) -> list[Node]:
        return self.state.nodes

    @property
    def pods(self) -> list[Pod]:
        return self.state.pods

    @property
    def ext(self) -> Host:
        assert self.state.ext is not None
        return self.state.ext

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"no node {name} in lab {self.prefix}")

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name:
                return p
        raise LabError(f"no pod {name} in lab {self.prefix}")

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.pods if p.node == node]

    @property
    def pod_ifaces_glob(self) -> str:
        return f"{self.prefix}-*"

    def _ns(self, short: str) -> str:
        ns = f"{self.prefix}-{short}"
        self.state.namespaces.append(ns)
        self.state.save()  # recorded before it exists, so a crash in between still cleans it up
        add_netns(ns)
        # IPv6 on, and no duplicate address detection: a new address (the link-local ones of links
        # created later too) is usable at once instead of "tentative" for a second or two.
        for key, value in (
            ("net.ipv6.conf.all.disable_ipv6", 0),
            ("net.ipv6.conf.default.disable_ipv6", 0),
            ("net.ipv6.conf.all.accept_dad", 0),
            ("net.ipv6.conf.default.accept_dad", 0),
        ):
            sysctl(ns, key, value)
        return ns

    # ---- bring up ----
    @classmethod
    def attach(cls, state_dir: Path) -> Lab:
        """A Lab object for a lab already up (from its state directory)."""
        st = LabState.load(state_dir / "state.json")
        lab = cls(nodes=max(1, len(st.nodes)), start_agents=False)
        lab.st = st
        return lab

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Lab:
        self.state_root.mkdir(parents=True, exist_ok=True)
        prefix = f"kpl{secrets.token_hex(2)}"
        d = self.state_root / prefix
        d.mkdir()
        for sub in ("manifests", "logs", "ready", "bpffs"):
            (d / sub).mkdir()
        self.st = LabState(prefix=prefix, dir=str(d))
        self.state.save()
        if self.manifests_from:
            for f in sorted(self.manifests_from.iterdir()):
                if f.suffix in (".yaml", ".yml", ".json"):
                    shutil.copy(f, self.manifests_dir / f.name)

        lan = self._ns("lan")
        # No multicast snooping: with no MLD querier on the LAN, neighbour solicitations (multicast)
        # reach every port whatever the bridge learnt or missed.
        ip(lan, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip(lan, "link", "set", "br0", "up")

        for i in range(1, self.n_nodes + 1):
            name = f"n{i}"
            ns = self._ns(name)
            node = Node(
                name=name,
                ns=ns,
                ip=f"{LAN_PREFIX}.{10 + i}",
                ip6=f"{LAN6_PREFIX}{10 + i}",
                index=i,
                pod_cidr=f"10.244.{i}.0/24",
                pod_cidr6=f"fd00:10:244:{i}::/64",
                bpffs=str(d / "bpffs" / name),
            )
            self._lan_port(lan, name, ns, node.ip, node.ip6)
            for key, value in (
                ("net.ipv4.ip_forward", 1),
                ("net.ipv4.conf.all.rp_filter", 0),
                ("net.ipv4.conf.default.rp_filter", 0),
                # all.forwarding turns every interface into a router's, default the pod veths to
                # come; a router still answers neighbour solicitations.
                ("net.ipv6.conf.all.forwarding", 1),
                ("net.ipv6.conf.default.forwarding", 1),
            ):
                sysctl(ns, key, value)
            self.state.nodes.append(node)
        for node in self.nodes:
            for other in self.nodes:
                if other is not node:
                    ip(node.ns, "route", "add", other.pod_cidr, "via", other.ip)
                    ip(node.ns, "-6", "route", "add", other.pod_cidr6, "via", other.ip6)

        # Every node as a Node object: the agents' node table (backend -> node address, for DSR IPIP).
        self.write_manifest("nodes", [mf.node(n.name, n.ip, n.ip6) for n in self.nodes])
        if self.socket_lb:
            for node in self.nodes:
                cg = CGROUP2_ROOT / f"{prefix}-{node.name}"
                self.state.cgroups.append(str(cg))
                self.state.save()
                cg.mkdir()
                node.cgroup = str(cg)
            self.state.save()

        ext_ns = self._ns("ext")
        self.state.ext = Host(name="ext", ns=ext_ns, ip=EXT_IP, ip6=EXT_IP6)
        self._lan_port(lan, "ext", ext_ns, EXT_IP, EXT_IP6)
        ip(ext_ns, "route", "add", LB_CIDR, "via", self.nodes[0].ip)
        ip(ext_ns, "-6", "route", "add", LB6_CIDR, "via", self.nodes[0].ip6)
        if self.ext_link:
            self._ext_link(ext_ns, self.nodes[0])
        self.state.save()

        for node in self.nodes:
            for _ in range(self.pods_per_node):
                self._make_pod(node)

        bpffs = d / "bpffs"
        self.state.mounts.append(str(bpffs))
        self.state.save()
        run(["mount", "-t", "bpf", "bpf", str(bpffs)])
        for node in self.nodes:
            Path(node.bpffs).mkdir()

        for pod in self.pods:
            self.start_podserver(pod)
        for pod in self.pods:
            self.wait_podserver(pod)
        if self.start_agents:
            for node in self.nodes:
                self.start_agent(node.name)
            for node in self.nodes:
                self.wait_agent(node.name)
        return self

    def _lan_port(self, lan: str, short: str, ns: str, addr: str, addr6: str) -> None:
        port = f"{self.prefix}-{short}"
        ip(lan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip(lan, "link", "set", port, "master", "br0", "up")
        if self.xdp_lan:
            # For agents with --acceleration. As on a real LAN, where a frame's checksums are complete: a
            # veth passes a local socket's packets on with their checksum left to "the hardware"
            # (CHECKSUM_PARTIAL: only the pseudo-header sum in the field), which an XDP program sees as it
            # is. With TX checksumming off the sender's stack completes them, also for packets the node
            # forwards. And an XDP program on the bridge side: a veth takes the frames its peer sends with
            # XDP_TX at once only when it runs one itself (else they wait in its ring for the next
            # ordinary packet). Only then: a veth running XDP takes its traffic through a 256-frame ring
            # that bursts of the other tests overflow.
            run(["nsenter", f"--net={netns_path(ns)}", "ethtool", "-K", "eth0", "tx", "off"], check=False)
            if short != "ext":
                in_netns(lan, lambda: lb.xdp_pass_everywhere(socket.if_nametoindex(port)))
        ip(ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip(ns, "-6", "addr", "add", f"{addr6}/64", "dev", "eth0", "nodad")
        ip(ns, "link", "set", "eth0", "up")

    def _ext_link(self, ext_ns: str, node: Node) -> None:
        """ext's eth1 to NODE's eth1, a second netdev of the node (EXT_LINK_PREFIX.0/24), made ready for
        XDP as the LAN ports are (_lan_port) when the agents accelerate."""
        ip(ext_ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1", "netns", node.ns)
        for ns, host in ((ext_ns, 100), (node.ns, 1)):
            ip(ns, "addr", "add", f"{EXT_LINK_PREFIX}.{host}/24", "dev", "eth1")
            ip(ns, "link", "set", "eth1", "up")
        if self.xdp_lan:
            run(["nsenter", f"--net={netns_path(ext_ns)}", "ethtool", "-K", "eth1", "tx", "off"], check=False)
            in_netns(ext_ns, lambda: lb.xdp_pass_everywhere(socket.if_nametoindex("eth1")))
        self.state.ext_link = True

    def _make_pod(self, node: Node) -> Pod:
        j = 1 + len(self.pods_on(node.name))
        name = f"{node.name}p{j}"
        ns = self._ns(name)
        host_if = f"{self.prefix}-{name}"
        pod = Pod(
            name=name,
            ns=ns,
            ip=f"10.244.{node.index}.{10 + j}",
            ip6=f"fd00:10:244:{node.index}::{10 + j}",
            node=node.name,
            host_if=host_if,
        )
        ip(node.ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sysctl(node.ns, f"net.ipv4.conf.{host_if}.proxy_arp", 1)
        sysctl(node.ns, f"net.ipv4.conf.{host_if}.rp_filter", 0)
        ip(node.ns, "-6", "addr", "add", f"{GATEWAY6}/64", "dev", host_if, "nodad")
        ip(node.ns, "link", "set", host_if, "up")
        ip(node.ns, "route", "add", f"{pod.ip}/32", "dev", host_if)
        ip(node.ns, "-6", "route", "add", f"{pod.ip6}/128", "dev", host_if)
        mac = json.loads(ip(node.ns, "-j", "link", "show", host_if).stdout)[0]["address"]
        ip(ns, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
        ip(ns, "-6", "addr", "add", f"{pod.ip6}/128", "dev", "eth0", "nodad")
        ip(ns, "link", "set", "eth0", "up")
        # A permanent neighbour for the gateway, so the pod never depends on proxy ARP for it.
        ip(ns, "neigh", "replace", GATEWAY, "lladdr", mac, "dev", "eth0", "nud", "permanent")
        ip(ns, "route", "add", "default", "via", GATEWAY, "dev", "eth0", "onlink")
        # IPv6: no permanent neighbour, the pod resolves fe80::1 by neighbour discovery (which the
        # programs on the veth must leave alone).
        ip(ns, "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0")
        self.state.pods.append(pod)
        self.state.save()
        return pod

    def add_pod(self, node: str, start_server: bool = True) -> Pod:
        """A new pod on NODE after the lab is up (its veth appears while the agent runs)."""
        pod = self._make_pod(self.node(node))
        if start_server:
            self.start_podserver(pod)
            self.wait_podserver(pod)
        return pod

    # ---- processes ----
    def _spawn(self, key: str, ns: str, argv: list[str], log: Path) -> Proc:
        old = self.state.processes.get(key)
        if old and _alive(old):
            raise LabError(f"{key} is already running (pid {old.pid}) in lab {self.prefix}")
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["nsenter", f"--net={netns_path(ns)}", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the `kproxy lab up` process that started it
                cwd="/",
            )
        start = None
        for _ in range(100):
            start = _proc_start(proc.pid)
            if start:
                break
            time.sleep(0.01)
        p = Proc(pid=proc.pid, start=start or "", what=key)
        self.state.processes[key] = p
        self.state.save()
        return p

    def start_podserver(self, pod: Pod) -> None:
        ready = self.dir / "ready" / pod.name
        ready.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "kproxy.lab.podserver",
            "--name",
            pod.name,
            "--ip",
            pod.ip,
            *(["--ip6", pod.ip6] if pod.ip6 else []),
            "--ready-file",
            str(ready),
        ]
        for port in POD_PORTS:
            argv += ["--port", str(port)]
        self._spawn(f"pod/{pod.name}", pod.ns, argv, self.dir / "logs" / f"pod-{pod.name}.log")

    def start_node_server(self, node: str, port: int, timeout: float = 20) -> None:
        """A pod server in NODE's own namespace on its address (a hostNetwork backend), on PORT."""
        n = self.node(node)
        name = f"{n.name}host{port}"
        ready = self.dir / "ready" / name
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "kproxy.lab.podserver", "--name", name, "--ip", n.ip,
                *(["--ip6", n.ip6] if n.ip6 else []),
                "--port", str(port), "--ready-file", str(ready)]  # fmt: skip
        self._spawn(f"host/{name}", n.ns, argv, self.dir / "logs" / f"host-{name}.log")
        _wait(f"node server {name}", ready.exists, timeout, lambda: self.log(f"host-{name}"))

    def wait_podserver(self, pod: Pod, timeout: float = 20) -> None:
        ready = self.dir / "ready" / pod.name
        _wait(f"pod server {pod.name}", ready.exists, timeout, lambda: self.log(f"pod-{pod.name}"))

    def agent_argv(self, node: Node) -> list[str]:
        return [
            sys.executable, "-m", "kproxy", "agent",
            "--source", f"file:{self.manifests_dir}",
            "--node-name", node.name,
            "--node-ip", self.node_ips_arg(node),
            "--netdev", "eth0,eth1" if self.state.ext_link and node.index == 1 else "eth0",
            "--pod-ifaces", self.pod_ifaces_glob,
            "--bpffs", node.bpffs,
            "--log-level", "debug",
            *(["--socket-lb-cgroup", node.cgroup] if node.cgroup else []),
            *(["--xdp-veth"] if self.xdp_lan else []),  # its LAN is made ready for XDP (_lan_port)
            *self.agent_args,
        ]  # fmt: skip

    def node_ips_arg(self, node: Node) -> str:
        """The agent's --node-ip: "v4,v6" (IPv4 first, the primary family), or v4 alone without
        agent_node_ip6 or IPv6 in this lab's state."""
        return f"{node.ip},{node.ip6}" if self.agent_node_ip6 and node.ip6 else node.ip

    def start_agent(self, node: str) -> None:
        n = self.node(node)
        from kproxy.observe.metadata import metadata_path

        metadata_path(n.bpffs).unlink(missing_ok=True)  # wait_agent() waits for the new one
        self._spawn(f"agent/{node}", n.ns, self.agent_argv(n), self.dir / "logs" / f"agent-{node}.log")

    def agent_proc(self, node: str) -> Proc | None:
        p = self.state.processes.get(f"agent/{node}")
        return p if p and _alive(p) else None

    def wait_agent(self, node: str, timeout: float = 60) -> None:
        """Wait until the agent of NODE finished its first sync (it wrote its metadata file)."""
        from kproxy.observe.metadata import metadata_path

        n = self.node(node)
        path = metadata_path(n.bpffs)

        def ready() -> bool:
            if self.agent_proc(node) is None:
                raise LabError(
                    f"agent on {node} exited during start-up:\n{self.log('agent-' + node)[-3000:]}"
                )
            return path.exists()

        _wait(f"agent on {node}", ready, timeout, lambda: self.log(f"agent-{node}")[-3000:])

    def stop_agent(self, node: str, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        p = self.agent_proc(node)
        if p is None:
            return
        os.kill(p.pid, sig)
        _wait(f"agent on {node} to exit", lambda: not _alive(p), timeout)

    def log(self, name: str) -> str:
        try:
            return (self.dir / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    # ---- manifests ----
    def write_manifest(self, name: str, objects: Sequence[dict[str, Any]]) -> Path:
        path = self.manifests_dir / f"{name}.yaml"
        mf.write_atomic(path, objects)
        return path

    def remove_manifest(self, name: str) -> None:
        (self.manifests_dir / f"{name}.yaml").unlink(missing_ok=True)

    # ---- what the agents programmed ----
    def frontend_backends(
        self, node: str, addr: str, port: int, protocol: str = "TCP"
    ) -> set[str | None] | None:
        """Backend addresses NODE's maps hold for external-scope frontend addr:port (None: no frontend).
        An IPv6 ADDR is looked up in the IPv6 maps (kp_svc6_v1, kp_be6_v1); a slot or backend that is
        missing shows as None in the set."""
        from kproxy.bpf.maps import KproxyMaps
        from kproxy.observe import inspect as insp

        if is_ip6(addr):
            return self.frontend_backends6(node, addr, port, protocol)
        with KproxyMaps.open(self.node(node).bpffs) as maps:
            rows = insp.services(maps.svc4, maps.be4, {})
        for r in rows:
            if (r["address"], r["port"], r["protocol"], r["scope"]) == (addr, port, protocol, "external"):
                return {b["address"] for b in r["backends"]}
        return None

    def frontend_backends6(
        self, node: str, addr: str, port: int, protocol: str = "TCP"
    ) -> set[str | None] | None:
        """frontend_backends() for an IPv6 frontend: read kp_svc6_v1 and kp_be6_v1 of NODE (None also
        when the maps have no IPv6 twins, as with an agent from before IPv6)."""
        import ctypes

        from kproxy import abi
        from kproxy.bpf.maps import KproxyMaps

        want_addr = socket.inet_pton(socket.AF_INET6, addr)
        want = (want_addr, socket.htons(port), _PROTOCOLS[protocol], int(abi.Scope.EXT))
        with KproxyMaps.open(self.node(node).bpffs) as maps:
            svc6, be6 = getattr(maps, "svc6", None), getattr(maps, "be6", None)
            if svc6 is None or be6 is None:
                return None
            head: abi.Svc4Val | None = None
            slots: dict[int, int] = {}
            for k, v in svc6.items():
                if (bytes(k.addr), k.port, k.proto, k.scope) != want:
                    continue
                if k.slot == 0:
                    head = v
                else:
                    slots[k.slot] = v.backend_id
            if head is None:
                return None
            out: set[str | None] = set()
            for slot in range(1, head.count + 1):
                bid = slots.get(slot)
                be = be6.get(ctypes.c_uint32(bid)) if bid is not None else None
                out.add(socket.inet_ntop(socket.AF_INET6, bytes(be.addr)) if be is not None else None)
            return out

    def wait_programmed(
        self,
        addr: str,
        port: int,
        backends: Iterable[str],
        protocol: str = "TCP",
        nodes: Iterable[str] | None = None,
        timeout: float = 30,
    ) -> None:
        """Wait until every node's maps (or NODES') hold frontend addr:port (either family) with exactly
        these backends.
        The deadline is generous: it is only reached when something is wrong, and a machine whose cores
        are busy with other work may make an agent take seconds."""
        want: set[str | None] = set(backends)
        if is_ip6(addr):  # the maps' addresses come back in the canonical (compressed) form
            addr = ipaddress.IPv6Address(addr).compressed
            want = {ipaddress.IPv6Address(b).compressed for b in backends}
        deadline = time.monotonic() + timeout
        for node in nodes or [n.name for n in self.nodes]:
            while (have := self.frontend_backends(node, addr, port, protocol)) != want:
                if time.monotonic() > deadline:
                    raise LabError(
                        f"{node}: frontend {addr_port(addr, port)}/{protocol} has backends {have}, "
                        f"expected {want}\n"
                        f"agent log tail:\n{self.log('agent-' + node)[-2000:]}"
                    )
                time.sleep(0.05)

    # ---- traffic ----
    def run_in(
        self, host: Host, argv: Sequence[str], cgroup: str | Path | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ARGV in HOST's network namespace; with CGROUP, as a process of that cgroup v2 directory
        (e.g. a node process under `kproxy agent --socket-lb-cgroup`)."""
        argv_ns = ["nsenter", f"--net={netns_path(host.ns)}"]
        if cgroup is not None:
            # The shell moves itself into the cgroup, then becomes the command: nothing runs outside it.
            argv_ns += ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup)]
        return subprocess.run([*argv_ns, *argv], capture_output=True, text=True, timeout=timeout)

    # ---- traffic ----
    def in_ns(self, host: Host, fn: Callable[[], T]) -> T:
        return in_netns(host.ns, fn)

    def upgrade_programs(self, node: str) -> list[tuple[str, int, int]]:
        """A program upgrade on NODE as an agent does it: load the object again (new program ids, the
        same pinned maps) and attach each program where the old one is (a tcx link update). Returns
        (attachment, old program id, new program id) for each."""
        from kproxy.bpf.loader import PROG_FROM_NETDEV, PROG_FROM_POD, PROG_TO_NETDEV, PROG_TO_POD, Loader

        progs = {
            ("ingress", True): PROG_FROM_POD, ("egress", True): PROG_TO_POD,
            ("ingress", False): PROG_FROM_NETDEV, ("egress", False): PROG_TO_NETDEV,
        }  # fmt: skip

        def upgrade() -> list[tuple[str, int, int]]:
            changed = []
            with Loader(self.node(node).bpffs) as loader:
                old = {(a.ifname, a.direction): a.prog_id for a in loader.attached()}
                loader.load()
                for (ifname, direction), old_id in sorted(old.items()):
                    if direction == "xdp":
                        att = loader.attach_xdp(ifname)
                        changed.append((f"{ifname}.xdp", old_id, att.prog_id))
                        continue
                    att = loader.attach(ifname, direction, progs[(direction, ifname != "eth0")])
                    changed.append((f"{ifname}.{direction}", old_id, att.prog_id))
            return changed

        return self.in_ns(self.node(node), upgrade)

    def connect(self, host: Host, addr: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP socket in HOST's namespace connected to addr:port (IPv4 or IPv6)."""

        def do() -> socket.socket:
            s = socket.socket(family_of(addr), socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect((addr, port))
            except BaseException:
                s.close()
                raise
            return s

        return in_netns(host.ns, do)

    def tcp_request(self, host: Host, addr: str, port: int, timeout: float = 10.0) -> dict[str, Any]:
        """Connect from HOST, return the pod server's greeting ({"pod", "ip", "client", ...})."""
        with self.connect(host, addr, port, timeout) as s:
            return json.loads(_readline(s))

    def tcp_requests(self, host: Host, addr: str, port: int, count: int, timeout: float = 10.0) -> list[str]:
        """COUNT separate connections from HOST; the pod name that answered each one."""

        def do() -> list[str]:
            out = []
            for _ in range(count):
                with socket.socket(family_of(addr), socket.SOCK_STREAM) as s:
                    s.settimeout(timeout)
                    s.connect((addr, port))
                    out.append(json.loads(_readline(s))["pod"])
            return out

        return in_netns(host.ns, do)

    def udp_request(
        self, host: Host, addr: str, port: int, payload: str = "ping", timeout: float = 10.0
    ) -> dict[str, Any]:
        """One datagram from HOST to addr:port; the pod server's answer plus "reply_from", the address
        the answer came from ("a.b.c.d:port" or "[v6]:port")."""

        def do() -> dict[str, Any]:
            with socket.socket(family_of(addr), socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.connect((addr, port))
                s.send(payload.encode())
                data = s.recv(65536)
                peer = s.getpeername()
                return dict(json.loads(data), reply_from=addr_port(peer[0], peer[1]))

        return in_netns(host.ns, do)

    @contextlib.contextmanager
    def stream(self, host: Host, addr: str, port: int) -> Iterator[Stream]:
        s = Stream(self.connect(host, addr, port))
        try:
            yield s
        finally:
            s.sock.close()

    # ---- tear down ----
    def down(self) -> None:
        if self.st is not None:
            teardown(self.st)
            self.st = None


class Stream:
    """An open TCP connection to a pod server: `hello` is its greeting, `roundtrip()` checks the echo."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.hello: dict[str, Any] = json.loads(_readline(sock))
        self.n = 0

    def roundtrip(self, size: int = 64) -> None:
        self.n += 1
        msg = (f"{self.n:08d}" + "x" * max(0, size - 9) + "\n").encode()
        self.sock.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = self.sock.recv(len(msg) - len(got))
            if not chunk:
                raise ConnectionError(
                    f"stream to {self.hello.get('pod')} closed after {self.n - 1} round trips"
                )
            got += chunk
        if got != msg:
            raise ConnectionError(f"stream to {self.hello.get('pod')}: echo mismatch on round trip {self.n}")


_PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}


def is_ip6(addr: str) -> bool:
    return ":" in addr


def family_of(addr: str) -> socket.AddressFamily:
    """The socket family for a numeric address of either family."""
    return socket.AF_INET6 if is_ip6(addr) else socket.AF_INET


def addr_port(addr: str, port: int) -> str:
    """ADDR:PORT, "10.0.0.1:80" or "[fd00::1]:80", as the pod server writes "client"."""
    return f"[{addr}]:{port}" if is_ip6(addr) else f"{addr}:{port}"


def client_address(reply: dict[str, Any]) -> str:
    """The address part of a pod server answer's "client" ("a.b.c.d:port" or "[v6]:port")."""
    client: str = reply["client"]
    host = client.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def _readline(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed before a full line (got {buf!r})")
        buf += chunk
    return buf


def teardown(st: LabState) -> list[str]:
    """Remove everything a lab state records; return what could not be removed (empty when clean)."""
    problems: list[str] = []
    # Agents first with SIGTERM (they leave their pins, which go with the bpffs), then anything left.
    procs = sorted(st.processes.values(), key=lambda p: not p.what.startswith("agent/"))
    for p in procs:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    # Anything else still inside our namespaces is ours too (e.g. a helper started by a test).
    for ns in st.namespaces:
        for pid in netns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for ns in reversed(st.namespaces):
        del_netns(ns)
        if os.path.exists(netns_path(ns)):
            problems.append(f"namespace {ns} is still there")
    for cg in st.cgroups:
        problems += _remove_cgroup(Path(cg))
    for m in st.mounts:
        if os.path.ismount(m):
            r = run(["umount", m], check=False)
            if r.returncode != 0:
                r = run(["umount", "-l", m], check=False)
            if r.returncode != 0:
                problems.append(f"cannot unmount {m}: {r.stderr.strip()}")
    if not problems:
        shutil.rmtree(st.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            from kproxy.observe.metadata import metadata_path

            for node in st.nodes:
                shutil.rmtree(metadata_path(node.bpffs).parent, ignore_errors=True)
    return problems


def _remove_cgroup(cg: Path) -> list[str]:
    """Move what is left in a lab cgroup to its parent, then remove it (its BPF links go with it)."""
    if not cg.is_dir():
        return []
    with contextlib.suppress(OSError):
        for pid in (cg / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (cg.parent / "cgroup.procs").write_text(pid)
    try:
        cg.rmdir()
    except OSError as e:
        return [f"cannot remove cgroup {cg}: {e}"]
    return []


def list_labs(state_root: Path = STATE_ROOT) -> list[LabState]:
    out = []
    if state_root.is_dir():
        for d in sorted(state_root.iterdir()):
            f = d / "state.json"
            if f.exists():
                try:
                    out.append(LabState.load(f))
                except (OSError, ValueError, TypeError) as e:
                    print(f"warning: unreadable lab state {f}: {e}", file=sys.stderr)
    return out


def lab_status(st: LabState) -> dict[str, Any]:
    return {
        "prefix": st.prefix,
        "dir": st.dir,
        "namespaces": {ns: os.path.exists(netns_path(ns)) for ns in st.namespaces},
        "mounts": {m: os.path.ismount(m) for m in st.mounts},
        "processes": {k: {"pid": p.pid, "running": _alive(p)} for k, p in st.processes.items()},
        "nodes": [
            {
                "name": n.name,
                "ip": n.ip,
                "ip6": n.ip6,
                "pod_cidr": n.pod_cidr,
                "pod_cidr6": n.pod_cidr6,
                "bpffs": n.bpffs,
            }
            for n in st.nodes
        ],  # fmt: skip
        "pods": [
            {"name": p.name, "ip": p.ip, "ip6": p.ip6, "node": p.node, "host_if": p.host_if} for p in st.pods
        ],
        "ext": asdict(st.ext) if st.ext else None,
    }
