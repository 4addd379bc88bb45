"""Read-only inspection of the pinned maps: services, backends, conntrack, affinity, stats, status, nat.

Every command reads the maps through kproxy.bpf.maps and the service names from the agent's metadata
file (kproxy.observe.metadata); --bpffs and -o come from kproxy.cli.common.inspect_options.
"""

from __future__ import annotations

import os
import time
from typing import Any

import click

from kproxy import abi
from kproxy.abi import CtState, nbo_to_ip, nbo_to_port
from kproxy.bpf.libbpf import LibbpfError
from kproxy.bpf.socklb import SocketLB
from kproxy.cli.common import Cli, CliError, inspect_options, mode_name
from kproxy.observe import inspect as insp
from kproxy.observe.metadata import read_status


def _render_services(rows: list[dict[str, Any]]) -> str:
    flat = []
    for r in rows:
        bes = ", ".join(
            f"{b['address']}:{b['port']}" + ("" if b["state"] == "active" else f" ({b['state']})")
            for b in r["backends"]
        )
        flat.append(
            {
                **r,
                "frontend": f"{r['address']}:{r['port']}/{r['protocol']}",
                "scope": "" if r["scope"] == "external" else "internal",
                "affinity": f"{r['affinity_timeout']}s" if "affinity" in r["flags"] else "",
                "backend_list": bes or "(none: rejects)",
            }
        )
    return insp.table(
        flat,
        [
            ("SERVICE", "service"),
            ("PORT", "port_name"),
            ("TYPE", "type"),
            ("FRONTEND", "frontend"),
            ("SCOPE", "scope"),
            ("AFFINITY", "affinity"),
            ("BACKENDS", "backend_list"),
        ],
    )


@click.command()
@inspect_options
@click.pass_obj
def services(cli: Cli) -> None:
    """List every frontend (ClusterIP, NodePort, LoadBalancer, ExternalIP) with its backends.

    -o json prints a list of frontends: service ("namespace/name"), port_name, type, address, port,
    protocol, scope, flags and backends (each with address, port, state).
    """
    with cli.open_maps("kproxy services") as maps:
        rows = insp.services(maps.svc4, maps.be4, cli.metadata(maps.svc4))
    cli.emit(rows, _render_services)


@click.command()
@inspect_options
@click.pass_obj
def backends(cli: Cli) -> None:
    """List the backend table: id, address, port, protocol, local/terminating."""
    with cli.open_maps("kproxy backends") as maps:
        rows = insp.backends(maps.be4)
    cli.emit(rows, lambda rs: insp.table(
        [{**r, "flag_list": ",".join(r["flags"])} for r in rs],
        [("ID", "id"), ("ADDRESS", "address"), ("PORT", "port"), ("PROTO", "protocol"), ("STATE", "state"),
         ("FLAGS", "flag_list"), ("NODE", "node")]))  # fmt: skip


@click.command()
@click.option("--flush", is_flag=True, help="Delete every conntrack entry (breaks NATed flows in progress).")
@click.option("-a", "--all", "include_reply", is_flag=True, help="Also list the reply-direction entries.")
@inspect_options
@click.pass_obj
def conntrack(cli: Cli, flush: bool, include_reply: bool) -> None:
    """List NATed flows: the tuple the client sent, the backend, state and seconds left.

    With --flush, delete all entries instead and print how many were removed.
    """
    with cli.open_maps("kproxy conntrack") as maps:
        if flush:
            n = maps.ct4.delete_many([k for k, _ in maps.ct4.items()])
            cli.emit({"flushed": n}, lambda r: f"flushed {r['flushed']} conntrack entries")
            return
        rows = insp.conntrack(maps.ct4, cli.metadata(maps.svc4), include_reply=include_reply)
    cols = [
        ("PROTO", "protocol"),
        ("SOURCE", "src"),
        ("DESTINATION", "dst"),
        ("NAT TO", "nat"),
        ("BACKEND", "backend_id"),
        ("SERVICE", "service"),
        ("STATE", "state"),
        ("LEFT(s)", "seconds_left"),
    ]
    if include_reply:
        cols.insert(0, ("DIR", "direction"))
    cli.emit(rows, lambda rs: insp.table(rs, cols))


@click.command()
@inspect_options
@click.pass_obj
def affinity(cli: Cli) -> None:
    """List sessionAffinity entries: client, service, backend and seconds left."""
    with cli.open_maps("kproxy affinity") as maps:
        rows = insp.affinity(maps.aff4, maps.svc4, maps.be4, cli.metadata(maps.svc4))
    cli.emit(rows, lambda rs: insp.table(rs, [
        ("CLIENT", "client"), ("SERVICE", "service"), ("BACKEND", "backend"), ("AGE(s)", "age_seconds"),
        ("LEFT(s)", "seconds_left")]))  # fmt: skip


@click.command()
@click.option("--all", "include_zero", is_flag=True, help="Also list counters that are zero.")
@inspect_options
@click.pass_obj
def stats(cli: Cli, include_zero: bool) -> None:
    """Per-program packet counts, decisions and drops by reason (summed over CPUs)."""
    with cli.open_maps("kproxy stats") as maps:
        rows = insp.stats(maps.stats.totals(), include_zero=include_zero)
    cli.emit(
        rows,
        lambda rs: insp.table(
            rs, [("COUNTER", "counter"), ("KIND", "kind"), ("PACKETS", "packets"), ("BYTES", "bytes")]
        ),
    )


@click.command()
@inspect_options
@click.pass_obj
def status(cli: Cli) -> None:
    """The agent's state on this node: its process, DSR mode, netdevs and socket load balancing."""
    with cli.open_maps("kproxy status") as maps:
        cfg = maps.read_config()
    agent = read_status(cli.bpffs) or {}
    pid = agent.get("pid")
    try:
        links = SocketLB(cli.bpffs, None).attached()
    except (LibbpfError, OSError):
        links = []
    want = agent.get("socket_lb") or {}
    info = {
        "agent": {
            "node": agent.get("node"),
            "pid": pid,
            "running": bool(pid) and os.path.exists(f"/proc/{pid}"),
            "netdevs": agent.get("netdevs", []),
        },
        "dsr_mode": mode_name(cfg.dsr_mode),
        "socket_lb": {
            "wanted": want.get("wanted"),
            "attached": [a.hook for a in links if a.alive],
            "cgroup": want.get("cgroup"),
            "problem": want.get("problem"),
        },
    }

    def text(i: dict[str, Any]) -> str:
        a, slb = i["agent"], i["socket_lb"]
        lines = [
            f"agent: node {a['node'] or '?'}, pid {a['pid'] or '?'} "
            f"({'running' if a['running'] else 'not running'}), netdevs {','.join(a['netdevs']) or '-'}",
            f"dsr mode: {i['dsr_mode']}",
        ]
        if slb["attached"]:
            lines.append(f"socket LB: on, cgroup {slb['cgroup'] or '?'} ({', '.join(slb['attached'])})")
        elif slb["wanted"]:
            lines.append(f"socket LB: OFF (wanted, not attached): {slb['problem'] or 'links missing'}")
        else:
            lines.append("socket LB: off")
        return "\n".join(lines)

    cli.emit(info, text)


@click.command()
@inspect_options
@click.pass_obj
def nat(cli: Cli) -> None:
    """List SNAT entries: external flows to remote backends, SNATed to this node's address.

    Each row: protocol, the backend and the node address:port its replies come back to, the client
    and the frontend it connected to, state and seconds left.
    """
    if getattr(abi, "MAP_SNAT4", None) is None:
        raise CliError("SNAT map not present in this layout: this kproxy build has no SNAT")
    with cli.open_maps("kproxy nat") as maps:
        snat4 = getattr(maps, "snat4", None)
        if snat4 is None:
            raise CliError(f"SNAT map {abi.MAP_SNAT4} not present in {cli.bpffs}")
        rows = snat_rows(snat4.items())
    cli.emit(rows, lambda rs: insp.table(rs, [
        ("PROTO", "protocol"), ("BACKEND", "backend"), ("NODE", "snat"), ("CLIENT", "client"),
        ("FRONTEND", "frontend"), ("STATE", "state"), ("LEFT(s)", "seconds_left")]))  # fmt: skip


def snat_rows(items: Any, now_ns: int | None = None) -> list[dict[str, Any]]:
    """kp_snat4_v1 entries as rows, live ones only, sorted by backend."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    rows = []
    for k, v in items:
        if v.expires_ns <= now:
            continue  # expired: ignored by the datapath, swept by the agent
        try:
            state = CtState(v.state).name
        except ValueError:
            state = str(v.state)
        rows.append({
            "protocol": insp.proto_name(k.proto),
            "backend": f"{nbo_to_ip(k.saddr)}:{nbo_to_port(k.sport)}",
            "snat": f"{nbo_to_ip(k.daddr)}:{nbo_to_port(k.dport)}",
            "client": f"{nbo_to_ip(v.client_addr)}:{nbo_to_port(v.client_port)}",
            "frontend": f"{nbo_to_ip(v.front_addr)}:{nbo_to_port(v.front_port)}",
            "state": state,
            "seconds_left": round((v.expires_ns - now) / 1e9, 1),
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["backend"], r["snat"]))
