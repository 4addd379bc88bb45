"""Agent settings, validated once at start-up, and every default the agent and the CLI share.

This is the one configuration object of the agent, and the one declaration of `kproxy agent`'s flags:
kproxy.cli.agent makes an option of every field (name, type, default, help from its description; Flag
says the rest), so a new field is a new flag. Defaults live here once (DEFAULT_*: the bpffs directory,
the settings ConfigMap the chart creates, the bind addresses); the chart's and the CLI's must match them.

Map sizes are keyed by pinned map name (the chart's --map-size NAME=N); an absent name keeps the size
compiled into the BPF object. Conntrack timeouts are seconds, 0 meaning the datapath default (what
kp_cfg_v1 takes).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kproxy import abi
from kproxy.bpf import BPFFS_ROOT, DEFAULT_BPFFS

if TYPE_CHECKING:
    from kproxy.translate import TranslateConfig

DEFAULT_POD_IFACES = ("lxc*",)
DEFAULT_NAMESPACE = "kube-system"
DEFAULT_CONFIGMAP = "kproxy-config"  # what the chart creates: kproxy.configMapName, "<release>-config"
DEFAULT_SETTINGS_CONFIGMAP = f"{DEFAULT_NAMESPACE}/{DEFAULT_CONFIGMAP}"
DEFAULT_METRICS_BIND = "127.0.0.1:10249"  # kube-proxy's
DEFAULT_HEALTH_BIND = "0.0.0.0:10256"  # kube-proxy's
MAP_SIZE_MIN = 16
MAP_SIZE_MAX = 1 << 26

# SNAT source ports of external flows to remote backends. Below the NodePort range (30000-32767) and the
# kernel's ephemeral ports (net.ipv4.ip_local_port_range, 32768-60999 by default): a reply to a port in
# the NodePort range would be taken for a NodePort connection, and one the node's own sockets use
# (kubelet probes, node processes talking to pods) would be taken for a SNATed flow's reply. Ports
# are per (backend address, backend port): 28,976 concurrent flows per backend and ingress node.
SNAT_PORT_RANGE_DEFAULT = (1024, 29999)
# The API server's --service-node-port-range default: the ports NodePorts are allocated from.
NODE_PORT_RANGE_DEFAULT = (30000, 32767)

DsrModeName = Literal["off", "opt", "ipip"]
LbAlgorithmName = Literal["random", "maglev"]
AccelerationName = Literal["off", "native", "best-effort"]
# kproxy.sync.maglev's PRIMES and DEFAULT_SIZE (this module is read by the CLI: no sync import here;
# tests/unit/test_maglev.py checks they agree)
MAGLEV_PRIMES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
MAGLEV_DEFAULT_SIZE = 16381
DSR_MODES: dict[str, abi.DsrMode] = {"off": abi.DsrMode.OFF, "opt": abi.DsrMode.OPT, "ipip": abi.DsrMode.IPIP}


# ---- `kproxy agent` flags: declared here, on the fields, and built into click options by kproxy.cli.agent
@dataclass(frozen=True)
class Flag:
    """How a field of AgentConfig is a `kproxy agent` option, beyond what the field says itself.

    kproxy.cli.agent makes one click option per field: its name `--field-name`, its type from the
    annotation (a Literal is a choice, a list a repeatable comma-separated option, a bool an on/off
    flag, ge/le bounds a range), its default from the field's, its help from Field(description=...).
    The default is shown unless it is empty, 0, False or None.
    """

    name: str | None = None  # the option; absent: --field-name (for a nested model: its fields' prefix)
    metavar: str | None = None
    envvar: str | None = None
    show_default: bool | str | None = None  # None: shown when the default is not empty
    default: Any = None  # the option's default when not the field's (a callable: computed at parse time)
    min: float | None = None  # the option's lower bound when not the field's ge
    file: bool = False  # the path of an existing file
    # The option's value (or, with parts, the parts' values in order) -> config entries; a ValueError is
    # a usage error. Absent: {field: value}, a list's values split at commas.
    into: Callable[..., dict[str, Any]] | None = None
    parts: tuple[Flag, ...] = ()  # one value made of several options
    help: str | None = None  # for parts (a field's help is its description)
    skip: bool = False  # no option: set by another field's (see into)


SECONDS = Flag(metavar="SECONDS")


class ConntrackTimeouts(BaseModel):
    """Seconds; written to kp_cfg_v1. 0 = the datapath's default (abi.CT_*_TIMEOUT_DEFAULT)."""

    model_config = ConfigDict(extra="forbid")

    syn: Annotated[int, SECONDS] = Field(
        default=0, ge=0, description="TCP before a reply; 0: the datapath default (60)."
    )
    tcp: Annotated[int, SECONDS] = Field(default=0, ge=0, description="Established TCP; 0: default (21600).")
    fin: Annotated[int, SECONDS] = Field(default=0, ge=0, description="TCP after FIN/RST; 0: default (10).")
    udp: Annotated[int, SECONDS] = Field(default=0, ge=0, description="UDP; 0: default (60).")
    sctp_init: Annotated[int, SECONDS] = Field(
        default=0, ge=0, le=65535, description="SCTP before a reply (INIT sent); 0: default (3)."
    )
    sctp: Annotated[int, SECONDS] = Field(default=0, ge=0, description="Established SCTP; 0: default (210).")
    sctp_close: Annotated[int, SECONDS] = Field(
        default=0,
        ge=0,
        le=65535,
        description="SCTP after SHUTDOWN, ABORT or SHUTDOWN COMPLETE; 0: default (10).",
    )


def _check_hostport(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what} {value!r} must be HOST:PORT, e.g. 127.0.0.1:10249")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"{what} {value!r}: {host!r} is not an IP address") from None
    return value


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def split_list(values: Iterable[str]) -> list[str]:
    """Repeated options, each possibly comma-separated, as one list (`--node-ip a,b --node-ip c`)."""
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def parse_map_sizes(values: Iterable[str]) -> dict[str, int]:
    """--map-size NAME=N values as {pinned map name: entries}."""
    sizes = {}
    for v in values:
        name, sep, n = v.partition("=")
        if not sep or not n.isdigit() or int(n) <= 0:
            raise ValueError(f"{v!r}: expected NAME=N with N > 0, e.g. {abi.MAP_CT4}=524288")
        if name not in abi.ALL_MAPS:
            raise ValueError(f"{name!r} is not a kproxy map; one of {', '.join(abi.ALL_MAPS)}")
        sizes[name] = int(n)
    return sizes


def parse_snat_port_range(value: str) -> dict[str, Any]:
    """--snat-port-range MIN-MAX as the config's snat_port_min and snat_port_max."""
    lo, sep, hi = value.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError(f"--snat-port-range {value!r} must be MIN-MAX, e.g. 1024-29999")
    return {"snat_port_min": int(lo), "snat_port_max": int(hi)}


def parse_node_port_range(value: str) -> dict[str, Any]:
    """--node-port-range MIN-MAX as the config's node_port_min and node_port_max."""
    lo, sep, hi = value.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError(f"--node-port-range {value!r} must be MIN-MAX, e.g. 30000-32767")
    return {"node_port_min": int(lo), "node_port_max": int(hi)}


def configmap_ref(namespace: str, name: str) -> dict[str, Any]:
    return {"settings_configmap": f"{namespace}/{name}"}


def _host_name() -> str:
    return os.uname().nodename


# --namespace and --configmap: where the agent's ConfigMap is (`kproxy agent`, and `kproxy dsr` too).
NAMESPACE_FLAG = Flag(
    "--namespace", envvar="KPROXY_NAMESPACE", metavar="NS", default=DEFAULT_NAMESPACE,
    help="Namespace of the agent ConfigMap.",
)  # fmt: skip
CONFIGMAP_FLAG = Flag(
    "--configmap", envvar="KPROXY_CONFIGMAP", metavar="NAME", default=DEFAULT_CONFIGMAP,
    help="Name of the agent ConfigMap holding runtime settings (key dsr-mode).",
)  # fmt: skip

LogLevel = Literal["debug", "info", "warning", "error"]
LibbpfLogLevel = Literal["debug", "info", "warning"]


class AgentConfig(BaseModel):
    """The agent's settings; each field is a `kproxy agent` option (see Flag), in this order."""

    model_config = ConfigDict(extra="forbid")

    source: Annotated[str, Flag(metavar="kubernetes|file:DIR")] = Field(
        default="kubernetes",
        description="Where Services and EndpointSlices come from: the API server (kubernetes), or file:DIR, "
        "YAML/JSON manifests in DIR followed live.",
    )
    node_name: Annotated[str, Flag(metavar="NAME", default=_host_name, show_default="host name")] = Field(
        min_length=1, description="This node's name, as in EndpointSlice nodeName (marks local backends)."
    )
    node_ips: Annotated[list[str], Flag("--node-ip", metavar="IP[,IP]")] = Field(
        default_factory=list,
        description="This node's addresses, of one family or both: the first of each family is its primary "
        "(SNAT source, NodePorts). Required.",
    )
    netdevs: Annotated[list[str], Flag("--netdev", metavar="IF[,IF]")] = Field(
        default_factory=list,  # empty: autodetect
        description="External interfaces where NodePort/LoadBalancer/externalIP traffic enters. Absent: the "
        "interfaces with a default route or the node IP, minus loopback and pod interfaces.",
    )
    pod_ifaces: Annotated[list[str], Flag(metavar="GLOB[,GLOB]")] = Field(
        default_factory=lambda: list(DEFAULT_POD_IFACES),
        description="Host-side pod interfaces, followed live as they come and go.",
    )
    bpffs: Annotated[str, Flag(envvar="KPROXY_BPFFS", metavar="DIR")] = Field(
        default=DEFAULT_BPFFS,
        description=f"Directory on a bpf filesystem for the pinned maps and links; created if missing. Under "
        f"{BPFFS_ROOT} (the default), a bpf filesystem is first mounted at {BPFFS_ROOT} when none is.",
    )
    bpffs_mount: bool = Field(
        default=True,
        description=f"Mount a bpf filesystem at {BPFFS_ROOT} when --bpffs is under it and none is. Off: exit "
        "instead (a containerised agent's mount would be its container's, and its pins would go with it; "
        "the chart mounts in the host's mount namespace and passes --no-bpffs-mount).",
    )
    map_sizes: Annotated[
        dict[str, int], Flag("--map-size", metavar="NAME=N", into=lambda v: {"map_sizes": parse_map_sizes(v)})
    ] = Field(
        default_factory=dict,
        description="Capacity of a map at first load, by pinned name, e.g. kp_ct4_v1=524288 (repeatable; "
        "must match existing pins).",
    )
    conntrack: Annotated[ConntrackTimeouts, Flag("--ct-timeout-")] = Field(default_factory=ConntrackTimeouts)
    sweep_interval: Annotated[float, Flag("--ct-sweep-interval", metavar="SECONDS", min=0.1)] = Field(
        default=5.0, gt=0, description="Seconds between sweeps of expired conntrack entries."
    )
    log_level: LogLevel = "info"
    libbpf_log_level: LibbpfLogLevel = Field(
        default="warning",
        description="Verbosity of libbpf's own messages (logger kproxy.libbpf), apart from --log-level: its "
        "debug output is about a thousand lines per program load.",
    )
    k8s_api_server: Annotated[str | None, Flag(metavar="URL")] = Field(
        default=None, description="API server to use instead of the in-cluster address."
    )
    kubeconfig: Annotated[str | None, Flag(metavar="PATH")] = Field(
        default=None, description="kubeconfig file (default: in-cluster service account)."
    )
    # "namespace/name" of the agent ConfigMap with runtime settings; None: none is watched
    settings_configmap: Annotated[
        str | None, Flag(parts=(NAMESPACE_FLAG, CONFIGMAP_FLAG), into=configmap_ref)
    ] = DEFAULT_SETTINGS_CONFIGMAP
    nodeport_addresses: Annotated[list[str], Flag(metavar="CIDR[,CIDR]")] = Field(
        default_factory=list,
        description="Only node addresses in these CIDRs accept NodePort traffic (default: all node "
        "addresses).",
    )
    service_cidrs: Annotated[list[str], Flag("--service-cidr", metavar="CIDR[,CIDR]")] = Field(
        default_factory=list,
        description="The cluster's service CIDRs (the API server's --service-cluster-ip-range), added to "
        "those of ServiceCIDR objects: packets to addresses no Service has there are dropped, as kube-proxy "
        "does.",
    )
    external_cluster_ip: bool = Field(
        default=True,
        description="Serve ClusterIPs to clients outside the node whose packets are routed to it (a service "
        "CIDR advertised by BGP, a static route), as kube-proxy does; off: such packets are dropped.",
    )
    metrics_bind: Annotated[str, Flag("--metrics-bind-address", metavar="ADDR:PORT")] = Field(
        default=DEFAULT_METRICS_BIND, description="Where /metrics (Prometheus) is served."
    )
    health_bind: Annotated[str, Flag("--health-bind-address", metavar="ADDR:PORT")] = Field(
        default=DEFAULT_HEALTH_BIND, description="Where /healthz and /livez are served."
    )
    dsr_mode: DsrModeName = Field(
        default="off",
        description="Initial DSR mode, written to kp_cfg_v1; with --source kubernetes the agent then follows "
        "the ConfigMap key dsr-mode.",
    )
    acceleration: AccelerationName = Field(
        default="off",
        description="XDP acceleration of traffic from outside on the netdevs: native (refuse to start on a "
        "netdev whose driver has no native XDP), best-effort (there, TC alone, said in the log and `kproxy "
        "status`), or off (an XDP program an earlier agent attached is removed). Both paths share conntrack: "
        "turning it on or off breaks no connection.",
    )
    xdp_veth: bool = Field(
        default=False,
        description="Let --acceleration run on veth netdevs (refused without it: XDP_TX from a veth reaches "
        "nothing unless its peer runs XDP, and same-host senders leave their checksums unfinished; a lab "
        "that takes care of both sets it).",
    )
    lb_algorithm: LbAlgorithmName = Field(
        default="random",
        description="How NodePort, LoadBalancer and externalIP frontends pick a backend for a new flow: "
        "random, or maglev (consistent hashing: every node picks the same backend for a flow, and a "
        "backend's removal moves ~1/N of flows). A Service's kproxy.io/lb-algorithm annotation overrides it; "
        "ClusterIPs stay random.",
    )
    maglev_table_size: Annotated[int, Flag(metavar="PRIME")] = Field(
        default=MAGLEV_DEFAULT_SIZE,
        description="Entries of each Maglev table, a prime of "
        + ", ".join(map(str, MAGLEV_PRIMES))
        + ": keep it above 100 x the most backends a Maglev Service has (each takes 1-2 bytes of it).",
    )
    socket_lb_cgroup: Annotated[str | None, Flag(metavar="PATH")] = Field(
        default=None,
        description="cgroup v2 directory (never a hierarchy root) whose processes get socket-level load "
        "balancing; absent: off.",
    )
    socket_lb_host_netns_only: bool = Field(
        default=False,
        description="Socket-level load balancing for sockets of the agent's own network namespace only (the "
        "node's: node processes, hostNetwork pods), as Cilium's socketLB.hostNamespaceOnly: pods' sockets "
        "are left to the TC programs on their veth, which translate after the pod's own iptables, so a "
        "service mesh sidecar that redirects outbound traffic sees the Service address. Kernel >= 5.14.",
    )
    localhost_nodeports: bool = Field(
        default=True,
        description="Serve NodePorts on 127.0.0.0/8 to the node's own processes, as kube-proxy's "
        "--iptables-localhost-nodeports (IPv4 only; needs socket-level load balancing). Off as well when "
        "--nodeport-addresses has IPv4 CIDRs none of which holds 127.0.0.0, as kube-proxy does.",
    )
    # Production opt-in: attach the socket programs to the root of a cgroup2 hierarchy (every process
    # of the node), as Cilium does; refused without it (tests on a shared machine use a child cgroup).
    socket_lb_allow_root_cgroup: bool = Field(
        default=False,
        description="Allow --socket-lb-cgroup to be the root of a cgroup2 hierarchy: every process of the "
        "node gets socket-level load balancing (what a cluster install wants; refused without this flag).",
    )
    # "namespace/name" of the DaemonSet that runs this agent: when it is gone (or being deleted) as the
    # agent gets SIGTERM, the install is being removed and the agent removes its dataplane; on an
    # ordinary restart or upgrade (the DaemonSet still there) everything stays and keeps serving.
    daemonset: Annotated[str | None, Flag(envvar="KPROXY_DAEMONSET", metavar="NAMESPACE/NAME")] = Field(
        default=None,
        description="The DaemonSet running this agent (the chart sets it). On SIGTERM the agent asks the API "
        "server for it: gone or being deleted means an uninstall, and the agent removes its programs and "
        "pins; there means a restart or upgrade, and the dataplane keeps serving. Absent: always kept.",
    )
    keep_dataplane_on_uninstall: bool = Field(  # migrations: leave the programs serving the last state
        default=False,
        description="Even when --daemonset is gone, leave the programs and pins serving the last state (to "
        "migrate to another install without a gap); `kproxy cleanup` removes them later.",
    )
    snat_port_min: Annotated[
        int,
        Flag(
            "--snat-port-range", metavar="MIN-MAX", into=parse_snat_port_range,
            default=f"{SNAT_PORT_RANGE_DEFAULT[0]}-{SNAT_PORT_RANGE_DEFAULT[1]}",
        ),
    ] = Field(
        default=SNAT_PORT_RANGE_DEFAULT[0], ge=1, le=65535,
        description="Source ports for SNAT of external traffic to remote backends; keep it clear of the "
        "NodePort range and of net.ipv4.ip_local_port_range.",
    )  # fmt: skip
    snat_port_max: Annotated[int, Flag(skip=True)] = Field(default=SNAT_PORT_RANGE_DEFAULT[1], ge=1, le=65535)
    node_port_min: Annotated[
        int,
        Flag(
            "--node-port-range", metavar="MIN-MAX", into=parse_node_port_range,
            default=f"{NODE_PORT_RANGE_DEFAULT[0]}-{NODE_PORT_RANGE_DEFAULT[1]}",
        ),
    ] = Field(
        default=NODE_PORT_RANGE_DEFAULT[0], ge=1, le=65535,
        description="The cluster's NodePort range (the API server's --service-node-port-range), kept out "
        "of this node's ephemeral ports by --protect-node-port-range.",
    )  # fmt: skip
    node_port_max: Annotated[int, Flag(skip=True)] = Field(default=NODE_PORT_RANGE_DEFAULT[1], ge=1, le=65535)
    protect_node_port_range: bool = Field(
        default=True,
        description="Add --node-port-range to net.ipv4.ip_local_reserved_ports of the agent's network "
        "namespace (merged with what is there; IPv6 sockets too), so no node process gets a NodePort as its "
        "ephemeral port and takes a Service's traffic.",
    )
    lan_mtu: Annotated[int, Flag(metavar="BYTES")] = Field(
        default=0, ge=0, le=65535,  # 0: the MTU of the first netdev
        description="MTU between nodes, for the DSR IPIP MSS clamp; 0: the MTU of the first netdev.",
    )  # fmt: skip
    hairpin_addresses: Annotated[list[str], Flag("--hairpin-address", metavar="IP[,IP]")] = Field(
        default_factory=list,  # a family without one: the datapath default
        description="Source address of a pod's packets balanced back to itself, one per family (default "
        "169.254.42.1 and 100::a9fe:2a01).",
    )
    object_path: Annotated[str | None, Flag("--object", file=True)] = Field(
        default=None, description="BPF object to load instead of the packaged one (upgrades are atomic)."
    )
    socket_lb_destroy_connected_udp: bool = Field(
        default=True,
        description="With socket LB, destroy the connected UDP sockets it sent to a backend that left the "
        "Service (ECONNABORTED: the application connects again and gets a live backend; Linux >= 6.5), in "
        "every network namespace of the socket-LB cgroup's processes: other namespaces than the agent's "
        "need CAP_SYS_ADMIN (setns), CAP_SYS_PTRACE and the host's PID namespace. Off: such sockets keep "
        "their backend, and no namespace is entered.",
    )
    socket_lb_iter_object: Annotated[str | None, Flag(file=True)] = Field(
        default=None,
        description="BPF object of the socket iterators (connected UDP sockets follow their backend's "
        "removal) to load instead of the packaged kproxy_iter.bpf.o.",
    )

    @field_validator("node_ips")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        for ip in v:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"--node-ip {ip!r} is not an IP address") from None
        return v

    @field_validator("hairpin_addresses")
    @classmethod
    def _hairpin(cls, v: list[str]) -> list[str]:
        seen: dict[int, str] = {}
        for a in v:
            try:
                ip = ipaddress.ip_address(a)
            except ValueError:
                raise ValueError(
                    f"--hairpin-address {a!r} is not an IP address (e.g. 169.254.42.1 or 100::a9fe:2a01)"
                ) from None
            if ip.version in seen:
                raise ValueError(f"--hairpin-address {seen[ip.version]} and {a}: one address per family")
            seen[ip.version] = a
        return v

    @model_validator(mode="after")
    def _snat_range(self) -> AgentConfig:
        if self.snat_port_min > self.snat_port_max:
            raise ValueError(
                f"--snat-port-range {self.snat_port_min}-{self.snat_port_max}: MIN must not exceed MAX"
            )
        if self.node_port_min > self.node_port_max:
            raise ValueError(
                f"--node-port-range {self.node_port_min}-{self.node_port_max}: MIN must not exceed MAX"
            )
        return self

    @field_validator("nodeport_addresses")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(
                    f"--nodeport-addresses entry {cidr!r} is not a CIDR (e.g. 10.0.0.0/8)"
                ) from None
        return v

    @field_validator("service_cidrs")
    @classmethod
    def _service_cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"--service-cidr entry {cidr!r} is not a CIDR (e.g. 10.96.0.0/12)") from None
        return v

    @field_validator("maglev_table_size")
    @classmethod
    def _maglev_size(cls, v: int) -> int:
        if v not in MAGLEV_PRIMES:
            raise ValueError(
                f"--maglev-table-size {v} must be one of the primes {', '.join(map(str, MAGLEV_PRIMES))}"
            )
        return v

    @field_validator("map_sizes")
    @classmethod
    def _sizes(cls, v: dict[str, int]) -> dict[str, int]:
        for name, n in v.items():
            if name not in abi.ALL_MAPS:
                raise ValueError(f"--map-size {name!r} is not a kproxy map; one of {', '.join(abi.ALL_MAPS)}")
            if not MAP_SIZE_MIN <= n <= MAP_SIZE_MAX:
                raise ValueError(f"--map-size {name}={n}: use {MAP_SIZE_MIN}..{MAP_SIZE_MAX} entries")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v == "kubernetes" or (v.startswith("file:") and len(v) > 5):
            return v
        raise ValueError(f"--source {v!r} must be 'kubernetes' or 'file:DIR'")

    @field_validator("metrics_bind")
    @classmethod
    def _metrics(cls, v: str) -> str:
        return _check_hostport(v, "--metrics-bind-address")

    @field_validator("health_bind")
    @classmethod
    def _health(cls, v: str) -> str:
        return _check_hostport(v, "--health-bind-address")

    @field_validator("pod_ifaces")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("--pod-ifaces needs at least one glob, e.g. 'veth*'")
        return v

    @property
    def source_dir(self) -> str | None:
        return self.source[5:] if self.source.startswith("file:") else None

    @property
    def primary_ipv4(self) -> str | None:
        return next((ip for ip in self.node_ips if ipaddress.ip_address(ip).version == 4), None)

    @property
    def primary_ipv6(self) -> str | None:
        """The first IPv6 --node-ip (kp_cfg6_v1.node_addr), canonical; None on a node without one."""
        return next(
            (str(ipaddress.ip_address(ip)) for ip in self.node_ips if ipaddress.ip_address(ip).version == 6),
            None,
        )

    @property
    def hairpin_ipv4(self) -> str | None:
        """The IPv4 --hairpin-address (kp_cfg_v1.hairpin_addr); None: the datapath default."""
        return next((a for a in self.hairpin_addresses if ipaddress.ip_address(a).version == 4), None)

    @property
    def hairpin_ipv6(self) -> str | None:
        """The IPv6 --hairpin-address (kp_cfg6_v1.hairpin_addr), canonical; None: the datapath default."""
        return next(
            (
                str(ipaddress.ip_address(a))
                for a in self.hairpin_addresses
                if ipaddress.ip_address(a).version == 6
            ),
            None,
        )

    @property
    def localhost_nodeports_off(self) -> str | None:
        """Why --localhost-nodeports serves nothing on this node (None: it serves). As kube-proxy applies
        it: --nodeport-addresses with IPv4 CIDRs must have one holding 127.0.0.0 or starting in 127.0.0.0/8
        (its NodePortAddresses.ContainsIPv4Loopback; no CIDR of the family matches everything). And as
        kproxy serves it: a loopback NodePort is the primary IPv4 address's (kp_cfg_v1.node_addr), so that
        address must carry NodePorts, i.e. be in an IPv4 CIDR of --nodeport-addresses when there are any."""
        if not self.localhost_nodeports:
            return "--no-localhost-nodeports"
        nets = [ipaddress.ip_network(c, strict=False) for c in self.nodeport_addresses]
        nets4 = [n for n in nets if n.version == 4]
        cidrs = ",".join(self.nodeport_addresses)
        if nets4 and not any(
            n.network_address.is_loopback or ipaddress.ip_address("127.0.0.0") in n for n in nets4
        ):
            return f"--nodeport-addresses {cidrs} holds no 127.0.0.0 (as kube-proxy)"
        primary = self.primary_ipv4
        if primary is None:
            return "no IPv4 --node-ip (a loopback NodePort is served as on the primary IPv4 address)"
        if nets4 and not any(ipaddress.ip_address(primary) in n for n in nets4):
            return (
                f"the primary node address {primary} is outside --nodeport-addresses {cidrs}, so it has no "
                "NodePorts, and a loopback NodePort is served as on it (kube-proxy would serve 127.0.0.1)"
            )
        return None

    @property
    def localhost_nodeports_served(self) -> bool:
        """--localhost-nodeports in effect (localhost_nodeports_off says why not)."""
        return self.localhost_nodeports_off is None

    @property
    def dsr_mode_value(self) -> abi.DsrMode:
        return DSR_MODES[self.dsr_mode]

    def translate_config(self) -> TranslateConfig:
        # Deferred: the pure core (kproxy.translate, kproxy.model) is the agent's; the CLI reads this
        # module for its defaults and option declarations only.
        from kproxy.translate import TranslateConfig

        return TranslateConfig.from_cidrs(self.nodeport_addresses, self.lb_algorithm)
