"""Decode the kproxy maps into plain rows for `kproxy services|backends|conntrack|affinity|stats`.

Pure functions over MapOps (pinned maps or MemoryMap twins) and the agent's metadata: they never
decode bytes themselves, the typed map layer does that. Each family has its own maps (kp_svc4_v1 and
kp_svc6_v1, ...); a row carries `family` (4 or 6), rows of IPv4 come before those of IPv6 where no
other key orders them, and an address with a port prints as kube-proxy prints it (abi.addr_port:
`10.0.0.1:80`, `[fd00::1]:80`). IPv6 backend and service-port ids are >= abi.ID6_BASE.
"""

from __future__ import annotations

import ctypes
import ipaddress
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from kproxy import abi
from kproxy.abi import BackendFlag, CtDir, CtFlag, CtState, Scope, Stat, SvcFlag, nbo_to_ip, nbo_to_port
from kproxy.bpf.mapapi import MapOps

PROTOCOLS = {
    abi.IPPROTO_TCP: "TCP",
    abi.IPPROTO_UDP: "UDP",
    abi.IPPROTO_SCTP: "SCTP",
    abi.IPPROTO_ICMP: "ICMP",
}


def proto_name(proto: int) -> str:
    return PROTOCOLS.get(proto, str(proto))


def frontend_type(flags: int) -> str:
    if flags & SvcFlag.NODEPORT:
        return "NodePort"
    if flags & SvcFlag.LOADBALANCER:
        return "LoadBalancer"
    if flags & SvcFlag.EXTERNAL_IP:
        return "ExternalIP"
    return "ClusterIP"


def flag_names(flags: int, enum: type[SvcFlag] | type[BackendFlag] | type[CtFlag]) -> list[str]:
    return [f.name.lower() for f in enum if f.name and flags & f]  # type: ignore[union-attr]


def addr_text(addr: int | ctypes.Array[ctypes.c_uint8]) -> str:
    """An address field of either family as text: a u32 in network order (IPv4) or 16 bytes (IPv6)."""
    return nbo_to_ip(addr) if isinstance(addr, int) else abi.bytes_to_ip6(addr)


def is_unset(addr: int | ctypes.Array[ctypes.c_uint8]) -> bool:
    """0.0.0.0 or ::, the "none" of an address field."""
    return addr == 0 if isinstance(addr, int) else not any(addr)


def endpoint(addr: int | ctypes.Array[ctypes.c_uint8], port: int) -> str:
    """An address and NBO port field as `10.0.0.1:80` or `[fd00::1]:80`."""
    return abi.addr_port(addr_text(addr), nbo_to_port(port))


def addr_order(address: str | None) -> tuple[int, int]:
    """Sort key of a textual address: IPv4 before IPv6, then numerically (10.0.0.9 before 10.0.0.10)."""
    if not address:
        return (0, 0)
    ip = ipaddress.ip_address(address)
    return (ip.version, int(ip))


def endpoint_order(text: str) -> tuple[int, int, int]:
    """Sort key of an `addr:port` or `[addr]:port` string made by endpoint()."""
    address, _, port = text.rpartition(":")
    return (*addr_order(address.strip("[]")), int(port))


def id_family(ident: int) -> int:
    """The family of a backend or service-port id (IPv6 ids start at abi.ID6_BASE)."""
    return 6 if ident >= abi.ID6_BASE else 4


def backend_row(backend_id: int, be: abi.Be4Val | abi.Be6Val | None) -> dict[str, Any]:
    if be is None:
        return {
            "id": backend_id, "family": id_family(backend_id), "address": None, "port": None,
            "protocol": None, "state": "missing",
        }  # fmt: skip
    return {
        "id": backend_id,
        "family": 6 if isinstance(be, abi.Be6Val) else 4,
        "address": addr_text(be.addr),
        "port": nbo_to_port(be.port),
        "protocol": proto_name(be.proto),
        "state": "terminating" if be.flags & BackendFlag.TERMINATING else "active",
        "local": bool(be.flags & BackendFlag.LOCAL),
        "node": None if is_unset(be.node_addr) else addr_text(be.node_addr),
    }


def lookup_backend(
    backend_id: int,
    be4: MapOps[ctypes.c_uint32, abi.Be4Val],
    be6: MapOps[ctypes.c_uint32, abi.Be6Val] | None,
) -> abi.Be4Val | abi.Be6Val | None:
    """The backend an id names, in the map of its family."""
    if backend_id >= abi.ID6_BASE:
        return be6.get(ctypes.c_uint32(backend_id)) if be6 is not None else None
    return be4.get(ctypes.c_uint32(backend_id))


def services(
    svc4: MapOps[abi.Svc4Key, abi.Svc4Val],
    be4: MapOps[ctypes.c_uint32, abi.Be4Val],
    metadata: dict[int, dict[str, Any]],
    svc6: MapOps[abi.Svc6Key, abi.Svc4Val] | None = None,
    be6: MapOps[ctypes.c_uint32, abi.Be6Val] | None = None,
) -> list[dict[str, Any]]:
    """One row per frontend (address, port, protocol, scope) with its active backends in slot order;
    the frontends of kp_svc6_v1 (svc6) beside those of kp_svc4_v1."""
    rows = []
    for family, svc in ((4, svc4), (6, svc6)):
        if svc is None:
            continue
        heads: dict[tuple[Any, int, int, int], abi.Svc4Val] = {}
        slots: dict[tuple[Any, int, int, int], dict[int, int]] = defaultdict(dict)
        for k, v in svc.items():
            fe = (addr_text(k.addr), k.port, k.proto, k.scope)
            if k.slot == 0:
                heads[fe] = v
            else:
                slots[fe][k.slot] = v.backend_id
        for fe, head in heads.items():
            address, port, proto, scope = fe
            meta = metadata.get(head.svc_id, {})
            backends = []
            for slot in range(1, head.count + 1):
                bid = slots[fe].get(slot)
                if bid is None:
                    backends.append({
                        "slot": slot, "id": None, "family": family, "address": None, "port": None,
                        "state": "missing-slot",
                    })  # fmt: skip
                    continue
                backends.append({"slot": slot, **backend_row(bid, lookup_backend(bid, be4, be6))})
            rows.append(
                {
                    "service": meta.get("service", f"?svc#{head.svc_id}"),
                    "port_name": meta.get("port_name", ""),
                    "type": frontend_type(head.flags),
                    "family": family,
                    "address": address,
                    "port": nbo_to_port(port),
                    "protocol": proto_name(proto),
                    "scope": "internal" if scope == Scope.INT else "external",
                    "svc_id": head.svc_id,
                    "flags": flag_names(head.flags, SvcFlag),
                    "affinity_timeout": head.affinity_timeout,
                    "backends": backends,
                }
            )
    type_order = {"ClusterIP": 0, "NodePort": 1, "LoadBalancer": 2, "ExternalIP": 3}
    rows.sort(
        key=lambda r: (
            r["service"],
            r["port_name"],
            type_order[r["type"]],
            addr_order(r["address"]),
            r["port"],
            r["protocol"],
            r["scope"],
        )
    )
    return rows


def backends(
    be4: MapOps[ctypes.c_uint32, abi.Be4Val], be6: MapOps[ctypes.c_uint32, abi.Be6Val] | None = None
) -> list[dict[str, Any]]:
    """Every backend of kp_be4_v1 and kp_be6_v1 by id: IPv4 first (IPv6 ids are >= abi.ID6_BASE)."""
    rows = []
    for be in (be4, be6):
        for k, v in be.items() if be is not None else ():
            row = backend_row(int(k.value), v)
            row["flags"] = flag_names(v.flags, BackendFlag)
            rows.append(row)
    rows.sort(key=lambda r: (r["family"], r["id"]))
    return rows


def ct_state_name(state: int) -> str:
    try:
        return CtState(state).name
    except ValueError:
        return f"?{state}"


def conntrack(
    ct4: MapOps[abi.Ct4Key, abi.Ct4Val],
    metadata: dict[int, dict[str, Any]],
    include_reply: bool = False,
    now_ns: int | None = None,
    ct6: MapOps[abi.Ct6Key, abi.Ct6Val] | None = None,
) -> list[dict[str, Any]]:
    """FWD entries (and REPLY ones if asked) of kp_ct4_v1 and kp_ct6_v1: the tuple as sent, where it
    is NATed to, seconds left."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    rows = []
    for family, ct in ((4, ct4), (6, ct6)):
        for k, v in ct.items() if ct is not None else ():
            if k.dir != CtDir.FWD and not include_reply:
                continue
            rows.append(
                {
                    "direction": "forward" if k.dir == CtDir.FWD else "reply",
                    "family": family,
                    "protocol": proto_name(k.proto),
                    "src": endpoint(k.saddr, k.sport),
                    "dst": endpoint(k.daddr, k.dport),
                    "nat": endpoint(v.nat_addr, v.nat_port),
                    "backend_id": v.backend_id,
                    "service": metadata.get(v.svc_id, {}).get("service", f"?svc#{v.svc_id}"),
                    "svc_id": v.svc_id,
                    "state": ct_state_name(v.state),
                    "flags": flag_names(v.flags, CtFlag),
                    "seconds_left": round((v.expires_ns - now) / 1e9, 1),
                }
            )
    rows.sort(
        key=lambda r: (
            r["direction"], r["family"], r["protocol"], endpoint_order(r["src"]), endpoint_order(r["dst"])
        )
    )  # fmt: skip
    return rows


def affinity(
    aff4: MapOps[abi.Aff4Key, abi.Aff4Val],
    svc4: MapOps[abi.Svc4Key, abi.Svc4Val],
    be4: MapOps[ctypes.c_uint32, abi.Be4Val],
    metadata: dict[int, dict[str, Any]],
    now_ns: int | None = None,
    aff6: MapOps[abi.Aff6Key, abi.Aff4Val] | None = None,
    svc6: MapOps[abi.Svc6Key, abi.Svc4Val] | None = None,
    be6: MapOps[ctypes.c_uint32, abi.Be6Val] | None = None,
) -> list[dict[str, Any]]:
    """Entries of kp_aff4_v1 and kp_aff6_v1: client address, service, backend, age and seconds left
    (the timeout is the one of the service's frontends, in the service map of the same family)."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    timeouts: dict[int, int] = {}
    for svc in (svc4, svc6):
        for sk, sv in svc.items() if svc is not None else ():
            if sk.slot == 0 and sv.flags & SvcFlag.AFFINITY:
                timeouts[sv.svc_id] = sv.affinity_timeout
    rows = []
    for family, aff in ((4, aff4), (6, aff6)):
        for k, v in aff.items() if aff is not None else ():
            be = lookup_backend(v.backend_id, be4, be6)
            age = (now - v.last_used_ns) / 1e9
            timeout = timeouts.get(k.svc_id)
            rows.append(
                {
                    "family": family,
                    "client": addr_text(k.client_addr),
                    "service": metadata.get(k.svc_id, {}).get("service", f"?svc#{k.svc_id}"),
                    "svc_id": k.svc_id,
                    "backend_id": v.backend_id,
                    "backend": endpoint(be.addr, be.port) if be else None,
                    "age_seconds": round(age, 1),
                    "seconds_left": round(timeout - age, 1) if timeout is not None else None,
                }
            )
    rows.sort(key=lambda r: (r["service"], addr_order(r["client"])))
    return rows


def stats(
    by_family: Mapping[str, Mapping[int, tuple[int, ...]]], include_zero: bool = False
) -> list[dict[str, Any]]:
    """One row per counter: packets and bytes of both families, and each family's ("ipv4_packets",
    "ipv6_packets", ...; None when the maps do not tell the families apart: an older agent's, BY_FAMILY
    {"all": ...})."""
    rows = []
    for stat in Stat:
        row: dict[str, Any] = {"counter": stat.name.lower()}
        row["kind"] = "drop" if stat.name.startswith("DROP_") else ("program" if stat < 8 else "decision")
        row["packets"] = row["bytes"] = 0
        for family in ("IPv4", "IPv6", "all"):
            totals = by_family.get(family)
            p, b = (totals.get(int(stat)) or (0, 0))[:2] if totals is not None else (None, None)
            if family != "all":
                row[f"{family.lower()}_packets"], row[f"{family.lower()}_bytes"] = p, b
            row["packets"] += p or 0
            row["bytes"] += b or 0
        if row["packets"] or row["bytes"] or include_zero:
            rows.append(row)
    return rows


def table(rows: Iterable[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain aligned text table; columns are (header, key)."""
    cells = [[h for h, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else str(r.get(k)) for _, k in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )
