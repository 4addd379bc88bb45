"""Decode the kproxy maps into plain rows for `kproxy services|backends|conntrack|affinity|stats`.

Pure functions over MapOps (pinned maps or MemoryMap twins) and the agent's metadata: they never
decode bytes themselves, the typed map layer does that.
"""

from __future__ import annotations

import ctypes
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from kproxy import abi
from kproxy.abi import BackendFlag, CtDir, CtFlag, CtState, Scope, Stat, SvcFlag, nbo_to_ip, nbo_to_port
from kproxy.bpf.mapapi import MapOps

PROTOCOLS = {abi.IPPROTO_TCP: "TCP", abi.IPPROTO_UDP: "UDP", abi.IPPROTO_ICMP: "ICMP"}


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


def backend_row(backend_id: int, be: abi.Be4Val | None) -> dict[str, Any]:
    if be is None:
        return {"id": backend_id, "address": None, "port": None, "protocol": None, "state": "missing"}
    return {
        "id": backend_id,
        "address": nbo_to_ip(be.addr),
        "port": nbo_to_port(be.port),
        "protocol": proto_name(be.proto),
        "state": "terminating" if be.flags & BackendFlag.TERMINATING else "active",
        "local": bool(be.flags & BackendFlag.LOCAL),
        "node": nbo_to_ip(be.node_addr) if be.node_addr else None,
    }


def services(
    svc4: MapOps[abi.Svc4Key, abi.Svc4Val],
    be4: MapOps[ctypes.c_uint32, abi.Be4Val],
    metadata: dict[int, dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per frontend (address, port, protocol, scope) with its active backends in slot order."""
    heads: dict[tuple[int, int, int, int], abi.Svc4Val] = {}
    slots: dict[tuple[int, int, int, int], dict[int, int]] = defaultdict(dict)
    for k, v in svc4.items():
        fe = (k.addr, k.port, k.proto, k.scope)
        if k.slot == 0:
            heads[fe] = v
        else:
            slots[fe][k.slot] = v.backend_id
    rows = []
    for fe, head in heads.items():
        addr, port, proto, scope = fe
        meta = metadata.get(head.svc_id, {})
        backends = []
        for slot in range(1, head.count + 1):
            bid = slots[fe].get(slot)
            if bid is None:
                backends.append(
                    {"slot": slot, "id": None, "address": None, "port": None, "state": "missing-slot"}
                )
                continue
            backends.append({"slot": slot, **backend_row(bid, be4.get(ctypes.c_uint32(bid)))})
        rows.append(
            {
                "service": meta.get("service", f"?svc#{head.svc_id}"),
                "port_name": meta.get("port_name", ""),
                "type": frontend_type(head.flags),
                "address": nbo_to_ip(addr),
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
            r["address"],
            r["port"],
            r["protocol"],
            r["scope"],
        )
    )
    return rows


def backends(be4: MapOps[ctypes.c_uint32, abi.Be4Val]) -> list[dict[str, Any]]:
    rows = []
    for k, v in be4.items():
        row = backend_row(int(k.value), v)
        row["flags"] = flag_names(v.flags, BackendFlag)
        rows.append(row)
    rows.sort(key=lambda r: r["id"])
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
) -> list[dict[str, Any]]:
    """FWD entries (and REPLY ones if asked): the tuple as sent, where it is NATed to, seconds left."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    rows = []
    for k, v in ct4.items():
        if k.dir != CtDir.FWD and not include_reply:
            continue
        rows.append(
            {
                "direction": "forward" if k.dir == CtDir.FWD else "reply",
                "protocol": proto_name(k.proto),
                "src": f"{nbo_to_ip(k.saddr)}:{nbo_to_port(k.sport)}",
                "dst": f"{nbo_to_ip(k.daddr)}:{nbo_to_port(k.dport)}",
                "nat": f"{nbo_to_ip(v.nat_addr)}:{nbo_to_port(v.nat_port)}",
                "backend_id": v.backend_id,
                "service": metadata.get(v.svc_id, {}).get("service", f"?svc#{v.svc_id}"),
                "svc_id": v.svc_id,
                "state": ct_state_name(v.state),
                "flags": flag_names(v.flags, CtFlag),
                "seconds_left": round((v.expires_ns - now) / 1e9, 1),
            }
        )
    rows.sort(key=lambda r: (r["direction"], r["protocol"], r["src"], r["dst"]))
    return rows


def affinity(
    aff4: MapOps[abi.Aff4Key, abi.Aff4Val],
    svc4: MapOps[abi.Svc4Key, abi.Svc4Val],
    be4: MapOps[ctypes.c_uint32, abi.Be4Val],
    metadata: dict[int, dict[str, Any]],
    now_ns: int | None = None,
) -> list[dict[str, Any]]:
    now = time.monotonic_ns() if now_ns is None else now_ns
    timeouts: dict[int, int] = {}
    for sk, sv in svc4.items():
        if sk.slot == 0 and sv.flags & SvcFlag.AFFINITY:
            timeouts[sv.svc_id] = sv.affinity_timeout
    rows = []
    for k, v in aff4.items():
        be = be4.get(ctypes.c_uint32(v.backend_id))
        age = (now - v.last_used_ns) / 1e9
        timeout = timeouts.get(k.svc_id)
        rows.append(
            {
                "client": nbo_to_ip(k.client_addr),
                "service": metadata.get(k.svc_id, {}).get("service", f"?svc#{k.svc_id}"),
                "svc_id": k.svc_id,
                "backend_id": v.backend_id,
                "backend": f"{nbo_to_ip(be.addr)}:{nbo_to_port(be.port)}" if be else None,
                "age_seconds": round(age, 1),
                "seconds_left": round(timeout - age, 1) if timeout is not None else None,
            }
        )
    rows.sort(key=lambda r: (r["service"], r["client"]))
    return rows


def stats(totals: dict[int, tuple[int, ...]], include_zero: bool = False) -> list[dict[str, Any]]:
    rows = []
    for stat in Stat:
        packets, nbytes = (totals.get(int(stat)) or (0, 0))[:2]
        if packets or nbytes or include_zero:
            kind = "drop" if stat.name.startswith("DROP_") else ("program" if stat < 8 else "decision")
            rows.append({"counter": stat.name.lower(), "kind": kind, "packets": packets, "bytes": nbytes})
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
