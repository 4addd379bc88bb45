"""Read-only inspection of the pinned maps: services, backends, conntrack, affinity, stats, status, nat.

Every command reads the maps through kproxy.bpf.maps and the service names from the agent's metadata
file (kproxy.observe.metadata); --bpffs and -o come from kproxy.cli.common.inspect_options. The
commands list both families (the *4 and *6 maps) in one table; kproxy.observe.inspect decodes them.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

import click

from kproxy import abi
from kproxy.abi import CtState
from kproxy.bpf.libbpf import LibbpfError
from kproxy.bpf.socklb import SocketLB
from kproxy.cli.common import Cli, CliError, inspect_options, mode_name
from kproxy.observe import inspect as insp
from kproxy.observe.metadata import read_status


def _backend_text(b: dict[str, Any]) -> str:
    where = "?" if b["address"] is None else abi.addr_port(b["address"], b["port"])
    return where + ("" if b["state"] == "active" else f" ({b['state']})")


def render_services(rows: list[dict[str, Any]]) -> str:
    """The table of `kproxy services`."""
    flat = []
    for r in rows:
        bes = ", ".join(_backend_text(b) for b in r["backends"])
        flat.append(
            {
                **r,
                "frontend": f"{abi.addr_port(r['address'], r['port'])}/{r['protocol']}",
                "scope": "" if r["scope"] == "external" else "internal",
                "affinity": f"{r['affinity_timeout']}s" if "affinity" in r["flags"] else "",
                "lb": "maglev" if "maglev" in r["flags"] else "",
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
            ("LB", "lb"),
            ("BACKENDS", "backend_list"),
        ],
    )


@click.command()
@inspect_options
@click.pass_obj
def services(cli: Cli) -> None:
    """List every frontend (ClusterIP, NodePort, LoadBalancer, ExternalIP) with its backends.

    IPv4 and IPv6 frontends are listed together (a dual-stack Service has one of each), sorted by
    service, port name, type and address (IPv4 first); IPv6 ones print as [fd00::1]:80/TCP.

    LB says "maglev" for a frontend whose new flows take the backend of its Maglev table (docs/maglev.md),
    nothing for random selection.

    -o json prints a list of frontends: service ("namespace/name"), port_name, type, family (4 or 6),
    address, port, protocol, scope, flags (maglev among them) and backends (each with family, address,
    port, state).
    """
    with cli.open_maps("kproxy services") as maps:
        meta = cli.metadata(maps.svc4, maps.svc6)
        rows = insp.services(maps.svc4, maps.be4, meta, svc6=maps.svc6, be6=maps.be6)
    cli.emit(rows, render_services)


@click.command()
@inspect_options
@click.pass_obj
def backends(cli: Cli) -> None:
    """List the backend table: id, address, port, protocol, local/terminating.

    IPv4 backends first, then IPv6 ones (their ids start at 2147483648); -o json adds family (4 or 6).
    """
    with cli.open_maps("kproxy backends") as maps:
        rows = insp.backends(maps.be4, maps.be6)
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

    IPv4 flows first, then IPv6 ones, whose addresses print as [fd00::1]:80 (also in -o json, which
    adds family, 4 or 6). With --flush, delete all entries of both families instead and print how
    many were removed.
    """
    with cli.open_maps("kproxy conntrack") as maps:
        if flush:
            n = maps.ct4.delete_many([k for k, _ in maps.ct4.items()])
            if maps.ct6 is not None:  # None: an older agent's bpffs, without the IPv6 maps
                n += maps.ct6.delete_many([k for k, _ in maps.ct6.items()])
            cli.emit({"flushed": n}, lambda r: f"flushed {r['flushed']} conntrack entries")
            return
        meta = cli.metadata(maps.svc4, maps.svc6)
        rows = insp.conntrack(maps.ct4, meta, include_reply=include_reply, ct6=maps.ct6)
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
    """List sessionAffinity entries: client, service, backend and seconds left.

    IPv4 and IPv6 clients together, by service then client address (IPv4 first); -o json adds family.
    """
    with cli.open_maps("kproxy affinity") as maps:
        meta = cli.metadata(maps.svc4, maps.svc6)
        rows = insp.affinity(
            maps.aff4, maps.svc4, maps.be4, meta, aff6=maps.aff6, svc6=maps.svc6, be6=maps.be6
        )
    cli.emit(rows, lambda rs: insp.table(rs, [
        ("CLIENT", "client"), ("SERVICE", "service"), ("BACKEND", "backend"), ("AGE(s)", "age_seconds"),
        ("LEFT(s)", "seconds_left")]))  # fmt: skip


@click.command()
@click.option("--all", "include_zero", is_flag=True, help="Also list counters that are zero.")
@inspect_options
@click.pass_obj
def stats(cli: Cli, include_zero: bool) -> None:
    """Per-program packet counts, decisions and drops by reason (summed over CPUs), of both families and
    each (IPV4, IPV6 columns)."""
    with cli.open_maps("kproxy stats") as maps:
        rows = insp.stats(maps.stat_totals_by_family(), include_zero=include_zero)
    cli.emit(
        rows,
        lambda rs: insp.table(
            rs,
            [("COUNTER", "counter"), ("KIND", "kind"), ("PACKETS", "packets"), ("BYTES", "bytes"),
             ("IPV4", "ipv4_packets"), ("IPV6", "ipv6_packets")],
        ),
    )  # fmt: skip


@click.command()
@inspect_options
@click.pass_obj
def status(cli: Cli) -> None:
    """The agent's state on this node: its process, DSR mode, netdevs and socket load balancing."""
    with cli.open_maps("kproxy status") as maps:
        cfg = maps.read_config()
        cfg6 = maps.cfg6.get(ctypes.c_uint32(0)) if maps.cfg6 is not None else None
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
        # --acceleration: its mode and, per netdev, "xdp", "off" or "tc (best-effort: why)"; "redirect":
        # the netdevs kp_xdp redirects packets between (an older agent's status has no such key)
        "acceleration": agent.get("acceleration") or {"mode": None, "netdevs": {}},
        "dsr_mode": mode_name(cfg.dsr_mode),
        # the datapath's node address of each family (SNAT source, NodePorts, DSR's tunnel); None: none
        "node_addresses": {
            "ipv4": None if insp.is_unset(cfg.node_addr) else insp.addr_text(cfg.node_addr),
            "ipv6": None if cfg6 is None or insp.is_unset(cfg6.node_addr) else insp.addr_text(cfg6.node_addr),
        },
        "socket_lb": {
            "wanted": want.get("wanted"),
            "attached": [a.hook for a in links if a.alive],
            "cgroup": want.get("cgroup"),
            "problem": want.get("problem"),
            # kp_cfg_v1's bits: what the socket programs do now
            "host_netns_only": bool(cfg.flags & abi.ConfigFlag.SOCK_HOST_NETNS_ONLY),
            "localhost_nodeports": bool(cfg.flags & abi.ConfigFlag.LOCALHOST_NODEPORTS),
        },
    }

    def text(i: dict[str, Any]) -> str:
        a, slb = i["agent"], i["socket_lb"]
        lines = [
            f"agent: node {a['node'] or '?'}, pid {a['pid'] or '?'} "
            f"({'running' if a['running'] else 'not running'}), netdevs {','.join(a['netdevs']) or '-'}",
            f"dsr mode: {i['dsr_mode']}",
            "acceleration: "
            + (i["acceleration"]["mode"] or "?")
            + "".join(f", {dev} {how}" for dev, how in sorted(i["acceleration"]["netdevs"].items()))
            + (
                f"; XDP_REDIRECT between {', '.join(i['acceleration']['redirect'])}"
                if len(i["acceleration"].get("redirect") or []) > 1
                else ""
            ),
            "node addresses: "
            + (", ".join(a for a in i["node_addresses"].values() if a) or "none (no --node-ip)"),
        ]
        if slb["attached"]:
            lines.append(
                f"socket LB: on, cgroup {slb['cgroup'] or '?'} ({', '.join(slb['attached'])}); "
                + ("node network namespace only" if slb["host_netns_only"] else "every network namespace")
                + ("; localhost NodePorts" if slb["localhost_nodeports"] else "")
            )
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
    and the frontend it connected to, state and seconds left. IPv4 entries first, then IPv6 ones
    (kp_snat6_v1), whose endpoints print as [fd00::1]:80; -o json adds family (4 or 6).
    """
    with cli.open_maps("kproxy nat") as maps:
        snat4 = getattr(maps, "snat4", None)
        if snat4 is None:
            raise CliError(f"SNAT map {abi.MAP_SNAT4} not present in {cli.bpffs}")
        snat6 = getattr(maps, "snat6", None)
        rows = snat_rows(snat4.items())
        if snat6 is not None:
            rows += snat_rows(snat6.items(), family=6)
    cli.emit(rows, lambda rs: insp.table(rs, [
        ("PROTO", "protocol"), ("BACKEND", "backend"), ("NODE", "snat"), ("CLIENT", "client"),
        ("FRONTEND", "frontend"), ("STATE", "state"), ("LEFT(s)", "seconds_left")]))  # fmt: skip


def snat_rows(items: Any, now_ns: int | None = None, family: int = 4) -> list[dict[str, Any]]:
    """kp_snat4_v1 (or kp_snat6_v1) entries as rows, live ones only, sorted by backend address and port."""
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
            "family": family,
            "protocol": insp.proto_name(k.proto),
            "backend": insp.endpoint(k.saddr, k.sport),
            "snat": insp.endpoint(k.daddr, k.dport),
            "client": insp.endpoint(v.client_addr, v.client_port),
            "frontend": insp.endpoint(v.front_addr, v.front_port),
            "state": state,
            "seconds_left": round((v.expires_ns - now) / 1e9, 1),
        })  # fmt: skip
    return sorted(rows, key=lambda r: (insp.endpoint_order(r["backend"]), insp.endpoint_order(r["snat"])))
