"""Map chores the agent runs beside the applies: kp_cfg_v1 and kp_cfg6_v1 (write_config,
write_config6), sweeping expired conntrack (kp_ct4, kp_ct6) and SNAT entries, and counting the TCP
flows whose frontend is gone (orphan_until_ns)."""

from __future__ import annotations

import ctypes
import time
from typing import Any, Protocol

from kproxy import abi
from kproxy.bpf.mapapi import MapOps


class ConfigMaps(Protocol):
    """The maps' access to kp_cfg_v1 (kproxy.bpf.maps.KproxyMaps, kproxy.bpf.mapapi.MemoryMapSet)."""

    def read_config(self) -> abi.Config: ...

    def write_config(self, config: abi.Config) -> None: ...


def sweep_conntrack(ct4: MapOps[Any, Any], now_ns: int | None = None) -> int:
    """Delete expired conntrack entries of kp_ct4 or kp_ct6 (the same fields); return how many.
    `now_ns`: CLOCK_MONOTONIC, as bpf_ktime_get_ns."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    doomed = [k for k, v in ct4.items() if v.expires_ns <= now]
    return ct4.delete_many(doomed) if doomed else 0


def orphaned_tcp_flows(ct4: MapOps[Any, Any], live_svc_ids: set[int], now_ns: int | None = None) -> int:
    """Live TCP flows (of kp_ct4 or kp_ct6) from outside the node whose Service port is gone (their
    svc_id is programmed no more): while there are any, kp_from_netdev must keep looking them up
    (kp_config.orphan_until_ns). Flows a DSR backend node tracks carry no svc_id and do not count."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    external = int(abi.CtFlag.EXTERNAL)
    return sum(
        1
        for k, v in ct4.items()
        if k.dir == abi.CtDir.FWD
        and k.proto == abi.IPPROTO_TCP
        and v.flags & external
        and v.svc_id
        and v.svc_id not in live_svc_ids
        and v.expires_ns > now
    )


def sweep_snat(snat4: MapOps[Any, Any], now_ns: int | None = None) -> int:
    """Delete expired SNAT entries (their expiry follows their flow's conntrack entry); return how many.
    The datapath ignores them already and takes their ports over; sweeping frees the map's room."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    doomed = [k for k, v in snat4.items() if v.expires_ns <= now]
    return snat4.delete_many(doomed) if doomed else 0


def write_config(
    maps: ConfigMaps,
    node_addr: str | None,
    *,
    syn_timeout: int = 0,
    tcp_timeout: int = 0,
    fin_timeout: int = 0,
    udp_timeout: int = 0,
    sctp_init_timeout: int = 0,
    sctp_timeout: int = 0,
    sctp_close_timeout: int = 0,
    dsr_mode: int = abi.DsrMode.OFF,
    hairpin_addr: str | None = None,
    snat_port_min: int = 0,
    snat_port_max: int = 0,
    lan_mtu: int = 0,
    external_cluster_ip: bool = True,
    orphan_until_ns: int = 0,
    localhost_nodeports: bool = False,
    host_netns_only: bool = False,
    host_netns_cookie: int = 0,
) -> bool:
    """Write kp_cfg_v1 whole from these settings (0 / None = the datapath default). Of the previous
    contents only a later orphan_until_ns is kept (CLOCK_MONOTONIC: until then kp_from_netdev looks
    up connections whose frontend was deleted), so a restarted agent does not forget the flows its
    predecessor's deletions left. Return whether it changed."""
    if not 0 <= snat_port_min <= snat_port_max <= 65535:
        raise ValueError(f"SNAT port range {snat_port_min}-{snat_port_max}: need 0 <= MIN <= MAX <= 65535")
    # kp_cfg_v1's fields are u32 but for SCTP's INIT and close timeouts (u16): ctypes would keep the low bits
    timeouts = {"syn": (syn_timeout, 32), "tcp": (tcp_timeout, 32), "fin": (fin_timeout, 32),
                "udp": (udp_timeout, 32), "sctp init": (sctp_init_timeout, 16), "sctp": (sctp_timeout, 32),
                "sctp close": (sctp_close_timeout, 16)}  # fmt: skip
    for what, (secs, bits) in timeouts.items():
        if not 0 <= secs < 1 << bits:
            raise ValueError(f"{what} conntrack timeout {secs} s: need 0 <= SECONDS <= {(1 << bits) - 1}")
    cfg = abi.Config()
    cfg.node_addr = abi.ip_to_nbo(node_addr) if node_addr else 0
    cfg.dsr_mode = int(dsr_mode)
    cfg.ct_syn_timeout = syn_timeout
    cfg.ct_tcp_timeout = tcp_timeout
    cfg.ct_fin_timeout = fin_timeout
    cfg.ct_udp_timeout = udp_timeout
    cfg.ct_sctp_init_timeout = sctp_init_timeout
    cfg.ct_sctp_timeout = sctp_timeout
    cfg.ct_sctp_close_timeout = sctp_close_timeout
    cfg.hairpin_addr = abi.ip_to_nbo(hairpin_addr) if hairpin_addr else 0
    cfg.snat_port_min = snat_port_min
    cfg.snat_port_max = snat_port_max
    cfg.lan_mtu = lan_mtu
    cfg.flags = (
        (0 if external_cluster_ip else abi.ConfigFlag.NO_EXTERNAL_CLUSTER_IP)
        | (abi.ConfigFlag.LOCALHOST_NODEPORTS if localhost_nodeports else 0)
        | (abi.ConfigFlag.SOCK_HOST_NETNS_ONLY if host_netns_only else 0)
    )
    cfg.host_netns_cookie = host_netns_cookie
    old = maps.read_config()
    cfg.orphan_until_ns = max(orphan_until_ns, old.orphan_until_ns)
    if bytes(old) == bytes(cfg):
        return False
    maps.write_config(cfg)
    return True


def write_config6(cfg6: MapOps[Any, Any], node_addr: str | None, hairpin_addr: str | None = None) -> bool:
    """Write kp_cfg6_v1 whole: this node's IPv6 address (:: if none) and the IPv6 hairpin source
    (None: ::, the datapath default abi.HAIRPIN6_ADDR_DEFAULT). Return whether it changed."""
    cfg = abi.Config6()
    if node_addr:
        cfg.node_addr[:] = list(abi.ip6_to_bytes(node_addr))
    if hairpin_addr:
        cfg.hairpin_addr[:] = list(abi.ip6_to_bytes(hairpin_addr))
    key = ctypes.c_uint32(0)
    old = cfg6.get(key)
    if old is not None and bytes(old) == bytes(cfg):
        return False
    cfg6.put_many([(key, cfg)])
    return True
