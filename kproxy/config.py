"""Agent settings, validated once at start-up: `kproxy agent` maps its flags onto AgentConfig.

This is the one configuration object of the agent. Map sizes are keyed by pinned map name (the
chart's --map-size NAME=N); an absent name keeps the size compiled into the BPF object. Conntrack
timeouts are seconds, 0 meaning the datapath default (what kp_cfg_v1 takes).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kproxy import abi

if TYPE_CHECKING:
    from kproxy.translate import TranslateConfig

DEFAULT_BPFFS = "/sys/fs/bpf/kproxy"
DEFAULT_POD_IFACES = ("lxc*",)
DEFAULT_NAMESPACE = "kube-system"
DEFAULT_CONFIGMAP = "kproxy-config"
MAP_SIZE_MIN = 16
MAP_SIZE_MAX = 1 << 26

# SNAT source ports of external flows to remote backends. Below the NodePort range (30000-32767) and the
# kernel's ephemeral ports (net.ipv4.ip_local_port_range, 32768-60999 by default): a reply to a port in
# the NodePort range would be taken for a NodePort connection, and one the node's own sockets use
# (kubelet probes, node processes talking to pods) would be taken for a SNATed flow's reply. Ports
# are per (backend address, backend port): 28,976 concurrent flows per backend and ingress node.
SNAT_PORT_RANGE_DEFAULT = (1024, 29999)

DsrModeName = Literal["off", "opt", "ipip"]
DSR_MODES: dict[str, abi.DsrMode] = {"off": abi.DsrMode.OFF, "opt": abi.DsrMode.OPT, "ipip": abi.DsrMode.IPIP}


class ConntrackTimeouts(BaseModel):
    """Seconds; written to kp_cfg_v1. 0 = the datapath's default (abi.CT_*_TIMEOUT_DEFAULT)."""

    model_config = ConfigDict(extra="forbid")

    syn: int = Field(default=0, ge=0)
    tcp: int = Field(default=0, ge=0)
    fin: int = Field(default=0, ge=0)
    udp: int = Field(default=0, ge=0)


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


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_name: str = Field(min_length=1)
    node_ips: list[str] = Field(default_factory=list)
    netdevs: list[str] = Field(default_factory=list)  # empty: autodetect
    pod_ifaces: list[str] = Field(default_factory=lambda: list(DEFAULT_POD_IFACES))
    bpffs: str = DEFAULT_BPFFS
    source: str = "kubernetes"
    nodeport_addresses: list[str] = Field(default_factory=list)
    service_cidrs: list[str] = Field(default_factory=list)
    external_cluster_ip: bool = True
    map_sizes: dict[str, int] = Field(default_factory=dict)
    conntrack: ConntrackTimeouts = Field(default_factory=ConntrackTimeouts)
    metrics_bind: str = "127.0.0.1:10249"
    health_bind: str = "0.0.0.0:10256"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    dsr_mode: DsrModeName = "off"
    socket_lb_cgroup: str | None = None
    # Production opt-in: attach the socket programs to the root of a cgroup2 hierarchy (every process
    # of the node), as Cilium does; refused without it (tests on a shared machine use a child cgroup).
    socket_lb_allow_root_cgroup: bool = False
    snat_port_min: int = Field(default=SNAT_PORT_RANGE_DEFAULT[0], ge=1, le=65535)
    snat_port_max: int = Field(default=SNAT_PORT_RANGE_DEFAULT[1], ge=1, le=65535)
    lan_mtu: int = Field(default=0, ge=0, le=65535)  # 0: the MTU of the first netdev
    hairpin_address: str | None = None  # None: the datapath default 169.254.42.1
    k8s_api_server: str | None = None
    kubeconfig: str | None = None
    settings_configmap: str | None = f"{DEFAULT_NAMESPACE}/{DEFAULT_CONFIGMAP}"  # "namespace/name"
    sweep_interval: float = Field(default=5.0, gt=0)
    object_path: str | None = None
    # "namespace/name" of the DaemonSet that runs this agent: when it is gone (or being deleted) as the
    # agent gets SIGTERM, the install is being removed and the agent removes its dataplane; on an
    # ordinary restart or upgrade (the DaemonSet still there) everything stays and keeps serving.
    daemonset: str | None = None
    keep_dataplane_on_uninstall: bool = False  # migrations: leave the programs serving the last state

    @field_validator("node_ips")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        for ip in v:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"--node-ip {ip!r} is not an IP address") from None
        return v

    @field_validator("hairpin_address")
    @classmethod
    def _hairpin(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ok = ipaddress.ip_address(v).version == 4
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"--hairpin-address {v!r} is not an IPv4 address (e.g. 169.254.42.1)")
        return v

    @model_validator(mode="after")
    def _snat_range(self) -> AgentConfig:
        if self.snat_port_min > self.snat_port_max:
            raise ValueError(
                f"--snat-port-range {self.snat_port_min}-{self.snat_port_max}: MIN must not exceed MAX"
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
    def dsr_mode_value(self) -> abi.DsrMode:
        return DSR_MODES[self.dsr_mode]

    def translate_config(self) -> TranslateConfig:
        from kproxy.translate import TranslateConfig

        return TranslateConfig.from_cidrs(self.nodeport_addresses)
