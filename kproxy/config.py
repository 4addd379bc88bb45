"""Agent settings, validated once at start-up (the CLI maps its flags onto AgentConfig)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kproxy.bpf import abi
from kproxy.translate import TranslateConfig

DEFAULT_BPFFS = "/sys/fs/bpf/kproxy"


class MapSizes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    svc4: int = Field(default=abi.SVC4_MAX, ge=16, le=1 << 26)
    be4: int = Field(default=abi.BE4_MAX, ge=16, le=1 << 26)
    ct4: int = Field(default=abi.CT4_MAX, ge=16, le=1 << 26)
    aff4: int = Field(default=abi.AFF4_MAX, ge=16, le=1 << 26)

    def by_map_name(self) -> dict[str, int]:
        """Sizes keyed by pinned map name, as kproxy.bpf.loader.Loader(map_sizes=...) takes them."""
        return {
            abi.MAP_SVC4: self.svc4,
            abi.MAP_BE4: self.be4,
            abi.MAP_CT4: self.ct4,
            abi.MAP_AFF4: self.aff4,
        }


class ConntrackTimeouts(BaseModel):
    """Seconds; written to kp_cfg_v1."""

    model_config = ConfigDict(extra="forbid")

    syn: int = Field(default=abi.CT_SYN_TIMEOUT_DEFAULT, ge=1)
    tcp: int = Field(default=abi.CT_TCP_TIMEOUT_DEFAULT, ge=1)
    fin: int = Field(default=abi.CT_FIN_TIMEOUT_DEFAULT, ge=1)
    udp: int = Field(default=abi.CT_UDP_TIMEOUT_DEFAULT, ge=1)


def _check_hostport(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {value!r} must be HOST:PORT, e.g. 127.0.0.1:10249")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"{what} {value!r}: {host!r} is not an IP address") from None
    return value


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_name: str = Field(min_length=1)
    node_ips: list[str] = Field(default_factory=list)
    netdevs: list[str] = Field(default_factory=list)
    pod_iface_glob: str | None = None
    bpffs: str = DEFAULT_BPFFS
    source: str = "kubernetes"
    nodeport_addresses: list[str] = Field(default_factory=list)
    map_sizes: MapSizes = Field(default_factory=MapSizes)
    conntrack: ConntrackTimeouts = Field(default_factory=ConntrackTimeouts)
    metrics_bind: str = "127.0.0.1:10249"
    health_bind: str = "0.0.0.0:10256"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("node_ips")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        for ip in v:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"--node-ip {ip!r} is not an IP address") from None
        return v

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
        return _check_hostport(v, "--healthz-bind-address")

    @property
    def source_dir(self) -> str | None:
        return self.source[5:] if self.source.startswith("file:") else None

    @property
    def primary_ipv4(self) -> str | None:
        return next((ip for ip in self.node_ips if ipaddress.ip_address(ip).version == 4), None)

    def translate_config(self) -> TranslateConfig:
        return TranslateConfig.from_cidrs(self.nodeport_addresses)
