"""The kproxy command line: the agent, read-only inspection of the pinned maps, cleanup, and the lab.

Inspection commands read the maps through kproxy.bpf.maps (never decoding bytes themselves) and the
service names from the agent's metadata file (see kproxy.observe.metadata).

Exit codes scripts can test:
  0 success · 1 other error · 2 usage error · 3 the bpffs directory is missing or not a bpf filesystem
  4 not root · 5 no kproxy maps in the bpffs directory · 6 pinned maps of another layout version
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from kproxy.observe import inspect as insp

DEFAULT_BPFFS = "/sys/fs/bpf/kproxy"

EXIT_ERROR = 1
EXIT_NO_BPFFS = 3
EXIT_NOT_ROOT = 4
EXIT_NO_MAPS = 5
EXIT_LAYOUT = 6

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A one-line error with a specific exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance


@dataclass
class Cli:
    """The object the root group puts on ctx.obj: where the maps are and how to print."""

    bpffs: str = DEFAULT_BPFFS
    output: str = "table"

    def require_root(self, what: str) -> None:
        if os.geteuid() != 0:
            raise CliError(
                f"{what} needs root (CAP_BPF and CAP_SYS_ADMIN to open pinned BPF objects): run it with sudo",
                EXIT_NOT_ROOT,
            )

    def check_bpffs(self) -> None:
        from kproxy.bpf.maps import is_bpffs

        if not os.path.isdir(self.bpffs):
            raise CliError(
                f"bpffs directory {self.bpffs} does not exist: "
                f"is the agent running with --bpffs {self.bpffs}?",
                EXIT_NO_BPFFS,
            )
        try:
            ok = is_bpffs(self.bpffs)
        except OSError as e:
            raise CliError(f"cannot inspect {self.bpffs}: {e.strerror}", EXIT_NO_BPFFS) from e
        if not ok:
            raise CliError(
                f"{self.bpffs} is not on a bpf filesystem (mount -t bpf bpf {self.bpffs}); "
                "pass the agent's --bpffs",
                EXIT_NO_BPFFS,
            )

    def open_maps(self, what: str) -> Any:
        self.require_root(what)
        self.check_bpffs()
        from kproxy.bpf.maps import KproxyMaps, MapLayoutError, MapsNotFoundError

        try:
            return KproxyMaps.open(self.bpffs)
        except MapsNotFoundError as e:
            raise CliError(e.strerror or str(e), EXIT_NO_MAPS) from e
        except MapLayoutError as e:
            raise CliError(str(e), EXIT_LAYOUT) from e
        except PermissionError as e:
            raise CliError(
                f"cannot open the maps in {self.bpffs}: {e.strerror}; run as root", EXIT_NOT_ROOT
            ) from e

    def metadata(self) -> dict[int, dict[str, Any]]:
        from kproxy.observe.metadata import read_metadata

        return read_metadata(self.bpffs)

    def emit(self, rows: Any, render: Callable[[Any], str]) -> None:
        if self.output == "json":
            click.echo(json.dumps(rows, indent=2))
        else:
            click.echo(render(rows))


def inspect_options(fn: F) -> F:
    """--bpffs and -o, shared by every command that reads the maps; stored on ctx.obj."""

    def set_bpffs(ctx: click.Context, _p: click.Parameter, value: str) -> str:
        ctx.ensure_object(Cli).bpffs = value
        return value

    def set_output(ctx: click.Context, _p: click.Parameter, value: str) -> str:
        ctx.ensure_object(Cli).output = value
        return value

    fn = click.option(
        "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
        expose_value=False, callback=set_output, help="Output format.",
    )(fn)  # fmt: skip
    fn = click.option(
        "--bpffs", default=DEFAULT_BPFFS, show_default=True, expose_value=False, callback=set_bpffs,
        envvar="KPROXY_BPFFS", help="The agent's bpffs directory (its --bpffs).",
    )(fn)  # fmt: skip
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.pass_context
def main(ctx: click.Context) -> None:
    """kproxy: a pure-eBPF replacement for kube-proxy.

    Run `kproxy agent` on each node; inspect what it programmed with `kproxy services`,
    `backends`, `conntrack`, `affinity` and `stats`.
    """
    ctx.obj = Cli()


# ---------------------------------------------------------------- agent
def _parse_sizes(values: tuple[str, ...]) -> dict[str, int]:
    from kproxy.bpf import abi

    sizes = {}
    for v in values:
        name, sep, n = v.partition("=")
        if not sep or not n.isdigit() or int(n) <= 0:
            raise click.BadParameter(f"{v!r}: expected NAME=N with N > 0, e.g. {abi.MAP_CT4}=524288")
        if name not in abi.ALL_MAPS:
            raise click.BadParameter(f"{name!r} is not a kproxy map; one of {', '.join(abi.ALL_MAPS)}")
        sizes[name] = int(n)
    return sizes


def _split_list(values: tuple[str, ...]) -> list[str]:
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


@main.command()
@click.option(
    "--source",
    required=True,
    metavar="file:DIR",
    help="Where Services and EndpointSlices come from: file:DIR reads YAML/JSON manifests in DIR.",
)
@click.option(
    "--node-name",
    default=lambda: os.uname().nodename,
    show_default="host name",
    help="This node's name, as in EndpointSlice nodeName (marks local backends).",
)
@click.option("--node-ip", required=True, help="This node's address: NodePort frontends listen on it.")
@click.option(
    "--netdev",
    "netdevs",
    multiple=True,
    metavar="IFACE[,IFACE]",
    help="External interfaces: NodePort/LoadBalancer/externalIP traffic enters here.",
)
@click.option(
    "--pod-ifaces",
    "pod_ifaces",
    multiple=True,
    default=("lxc*",),
    show_default=True,
    metavar="GLOB[,GLOB]",
    help="Host-side pod interfaces, followed live as they come and go.",
)
@click.option(
    "--bpffs",
    default=DEFAULT_BPFFS,
    show_default=True,
    envvar="KPROXY_BPFFS",
    help="Directory on a bpf filesystem for the pinned maps and links.",
)
@click.option(
    "--map-size",
    "map_sizes",
    multiple=True,
    metavar="NAME=N",
    help="Capacity of a map at first load, e.g. kp_ct4_v1=524288 (must match existing pins).",
)
@click.option("--ct-timeout-syn", type=click.IntRange(0), default=0, help="Seconds, TCP before a reply [60].")
@click.option("--ct-timeout-tcp", type=click.IntRange(0), default=0, help="Seconds, established TCP [21600].")
@click.option("--ct-timeout-fin", type=click.IntRange(0), default=0, help="Seconds, TCP after FIN/RST [10].")
@click.option("--ct-timeout-udp", type=click.IntRange(0), default=0, help="Seconds, UDP [60].")
@click.option(
    "--ct-sweep-interval",
    type=click.FloatRange(0.1),
    default=5.0,
    show_default=True,
    help="Seconds between sweeps of expired conntrack entries.",
)
@click.option(
    "--object",
    "object_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="BPF object to load instead of the packaged one (upgrades are atomic).",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
def agent(
    source: str,
    node_name: str,
    node_ip: str,
    netdevs: tuple[str, ...],
    pod_ifaces: tuple[str, ...],
    bpffs: str,
    map_sizes: tuple[str, ...],
    ct_timeout_syn: int,
    ct_timeout_tcp: int,
    ct_timeout_fin: int,
    ct_timeout_udp: int,
    ct_sweep_interval: float,
    object_path: str | None,
    log_level: str,
) -> None:
    """Run the node agent: load and attach the BPF programs and keep the maps equal to the Services.

    The agent pins maps and tcx links under --bpffs, so the programs keep running while the agent
    restarts; a restarted agent re-adopts the pins and changes only what differs. SIGTERM stops it
    cleanly and leaves everything attached (use `kproxy cleanup` to remove it). Service and port
    names for the inspection commands go to /run/kproxy/<hash of the bpffs path>/services.json.
    """
    import ipaddress

    from kproxy.agent import AgentConfig, AgentError, run_agent

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kind, _, where = source.partition(":")
    if kind != "file" or not where:
        raise click.BadParameter(f"{source!r}: only file:DIR is supported", param_hint="--source")
    try:
        ipaddress.IPv4Address(node_ip)
    except ValueError:
        raise click.BadParameter(f"{node_ip!r} is not an IPv4 address", param_hint="--node-ip") from None
    cfg = AgentConfig(
        source_dir=where,
        node_name=node_name,
        node_ip=node_ip,
        netdevs=_split_list(netdevs),
        pod_ifaces=_split_list(pod_ifaces),
        bpffs=bpffs,
        map_sizes=_parse_sizes(map_sizes),
        ct_timeouts=(ct_timeout_syn, ct_timeout_tcp, ct_timeout_fin, ct_timeout_udp),
        sweep_interval=ct_sweep_interval,
        object_path=object_path,
    )
    Cli().require_root("kproxy agent")
    try:
        run_agent(cfg)
    except AgentError as e:
        raise CliError(str(e)) from e


# ---------------------------------------------------------------- inspection
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


@main.command()
@inspect_options
@click.pass_obj
def services(cli: Cli) -> None:
    """List every frontend (ClusterIP, NodePort, LoadBalancer, ExternalIP) with its backends.

    -o json prints a list of frontends: service ("namespace/name"), port_name, type, address, port,
    protocol, scope, flags and backends (each with address, port, state).
    """
    with cli.open_maps("kproxy services") as maps:
        rows = insp.services(maps.svc4, maps.be4, cli.metadata())
    cli.emit(rows, _render_services)


@main.command()
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


@main.command()
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
        rows = insp.conntrack(maps.ct4, cli.metadata(), include_reply=include_reply)
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


@main.command()
@inspect_options
@click.pass_obj
def affinity(cli: Cli) -> None:
    """List sessionAffinity entries: client, service, backend and seconds left."""
    with cli.open_maps("kproxy affinity") as maps:
        rows = insp.affinity(maps.aff4, maps.svc4, maps.be4, cli.metadata())
    cli.emit(rows, lambda rs: insp.table(rs, [
        ("CLIENT", "client"), ("SERVICE", "service"), ("BACKEND", "backend"), ("AGE(s)", "age_seconds"),
        ("LEFT(s)", "seconds_left")]))  # fmt: skip


@main.command()
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


@main.command()
@inspect_options
@click.pass_obj
def cleanup(cli: Cli) -> None:
    """Detach every kproxy program and unpin every map and link under --bpffs.

    Run it in the network namespace of the interfaces (cls_bpf fallback filters live there). Stop
    the agent first, or it attaches again. Service traffic then falls back to whatever else handles it.
    """
    cli.require_root("kproxy cleanup")
    cli.check_bpffs()
    import shutil

    from kproxy.bpf.loader import Loader
    from kproxy.observe.metadata import state_dir

    loader = Loader(cli.bpffs)
    detached = [f"{a.ifname}.{a.direction}" for a in loader.attached()]
    loader.cleanup()
    shutil.rmtree(state_dir(cli.bpffs), ignore_errors=True)
    cli.emit(
        {"bpffs": cli.bpffs, "detached": detached},
        lambda r: f"removed kproxy from {r['bpffs']}; detached: {', '.join(r['detached']) or 'nothing'}",
    )


@main.command()
@inspect_options
@click.pass_obj
def version(cli: Cli) -> None:
    """Print the kproxy version and the BPF object it ships."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    from kproxy.bpf.loader import default_object_path

    try:
        v = pkg_version("kproxy")
    except PackageNotFoundError:
        v = "unknown"
    obj = default_object_path()
    info = {
        "version": v,
        "bpf_object": obj,
        "bpf_object_present": os.path.exists(obj),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }
    cli.emit(info, lambda i: "\n".join(f"{k}: {val}" for k, val in i.items()))


# ---------------------------------------------------------------- lab
@main.group()
def lab() -> None:
    """The netns mini-cluster: `up` builds it and starts one agent per node, `down` removes it."""


@lab.command("up")
@click.option("--nodes", type=click.IntRange(1, 9), default=2, show_default=True)
@click.option("--pods-per-node", type=click.IntRange(0, 9), default=2, show_default=True)
@click.option(
    "--manifests",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Copy the YAML/JSON manifests of this directory into the lab's manifests directory.",
)
@click.option("--no-agents", is_flag=True, help="Build the network only.")
def lab_up(nodes: int, pods_per_node: int, manifests: str | None, no_agents: bool) -> None:
    """Build the lab and leave it running; prints its prefix and state directory."""
    Cli().require_root("kproxy lab up")
    from kproxy.lab.cluster import Lab, lab_status
    from kproxy.lab.netns import LabError

    lb = Lab(nodes=nodes, pods_per_node=pods_per_node, start_agents=not no_agents, manifests_from=manifests)
    try:
        lb.up()
    except (LabError, OSError) as e:
        lb.down()
        raise CliError(f"lab up failed (everything removed again): {e}") from e
    st = lab_status(lb.state)
    click.echo(f"lab {lb.prefix} is up; state in {lb.dir}")
    click.echo(f"manifests: {lb.manifests_dir} (the agents follow changes)")
    for n in st["nodes"]:
        click.echo(f"node {n['name']}: {n['ip']} pods {n['pod_cidr']} bpffs {n['bpffs']}")
    for p in st["pods"]:
        click.echo(f"pod {p['name']}: {p['ip']} on {p['node']} (echo server on tcp+udp 8080, 9090)")
    click.echo(f"external client: {lb.ext.ip} (namespace {lb.ext.ns})")
    click.echo(f"e.g. nsenter --net=/run/netns/{lb.nodes[0].ns} kproxy services --bpffs {lb.nodes[0].bpffs}")


@lab.command("down")
@click.argument("prefixes", nargs=-1)
def lab_down(prefixes: tuple[str, ...]) -> None:
    """Remove labs (all recorded ones, or the given prefixes): processes, namespaces, bpffs mounts."""
    Cli().require_root("kproxy lab down")
    from kproxy.lab.cluster import list_labs, teardown

    failed = False
    labs = [s for s in list_labs() if not prefixes or s.prefix in prefixes]
    missing = set(prefixes) - {s.prefix for s in labs}
    for p in sorted(missing):
        click.echo(f"no lab {p} recorded", err=True)
    for st in labs:
        problems = teardown(st)
        if problems:
            failed = True
            click.echo(f"lab {st.prefix}: " + "; ".join(problems), err=True)
        else:
            click.echo(f"lab {st.prefix} removed")
    if not labs and not prefixes:
        click.echo("no lab is up")
    if failed or missing:
        sys.exit(EXIT_ERROR)


@lab.command("status")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def lab_status_cmd(output: str) -> None:
    """Show each recorded lab: namespaces, mounts and processes and whether they are still there."""
    from kproxy.lab.cluster import lab_status, list_labs

    sts = [lab_status(s) for s in list_labs()]
    if output == "json":
        click.echo(json.dumps(sts, indent=2))
        return
    if not sts:
        click.echo("no lab is up")
    for s in sts:
        ns_up = sum(s["namespaces"].values())
        procs = sum(p["running"] for p in s["processes"].values())
        click.echo(
            f"lab {s['prefix']} ({s['dir']}): {ns_up}/{len(s['namespaces'])} namespaces, "
            f"{procs}/{len(s['processes'])} processes running, bpffs mounted: {all(s['mounts'].values())}"
        )
        for k, p in sorted(s["processes"].items()):
            click.echo(f"  {k}: pid {p['pid']} {'running' if p['running'] else 'exited'}")


if __name__ == "__main__":
    main()
