"""The kproxy command line: the agent, read-only inspection of the pinned maps, cleanup, and the lab.

Inspection commands read the maps through kproxy.bpf.maps (never decoding bytes themselves) and the
service names from the agent's metadata file (see kproxy.observe.metadata).

Exit codes scripts can test:
  0 success · 1 other error · 2 usage error · 3 the bpffs directory is missing or not a bpf filesystem
  4 not root · 5 no kproxy maps in the bpffs directory · 6 pinned maps of another layout version
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from kproxy.observe import inspect as insp

BPFFS_ROOT = "/sys/fs/bpf"  # kproxy.bpf.loader.BPFFS_ROOT, without importing libbpf for --help
DEFAULT_BPFFS = f"{BPFFS_ROOT}/kproxy"
# how long the inspection commands wait for the names of service ids the agent has not written yet
METADATA_WAIT_S = 1.0

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
        _bpffs_ok(self.bpffs, f"is the agent running with --bpffs {self.bpffs}?")

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

    def metadata(self, svc4: Any = None) -> dict[int, dict[str, Any]]:
        """The agent's service names (services.json). Given the service map, the ids it holds that the
        file does not name yet are waited for, up to METADATA_WAIT_S: the agent writes the names of
        new ids a moment after the ids (at most every few hundred milliseconds, Agent.metadata_changed).
        No file (no agent wrote one): no wait."""
        import time

        from kproxy.observe.metadata import metadata_path, read_metadata

        meta = read_metadata(self.bpffs)
        if svc4 is None or not metadata_path(self.bpffs).exists():
            return meta
        want = {v.svc_id for k, v in svc4.items() if k.slot == 0}
        deadline = time.monotonic() + METADATA_WAIT_S
        while want - meta.keys() and time.monotonic() < deadline:
            time.sleep(0.05)
            meta = read_metadata(self.bpffs)
        return meta

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
        envvar="KPROXY_BPFFS", metavar="DIR", help="The agent's bpffs directory (its --bpffs).",
    )(fn)  # fmt: skip
    return fn


# A fixed width: --help reads the same in every terminal, so docs/cli.md (kproxy.cli_docs) matches it.
@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110, "terminal_width": 110}
)
@click.pass_context
def main(ctx: click.Context) -> None:
    """kproxy: a pure-eBPF replacement for kube-proxy.

    Run `kproxy agent` on each node; inspect what it programmed with `kproxy services`,
    `backends`, `conntrack`, `affinity`, `nat` and `stats`; toggle DSR with `kproxy dsr`.
    """
    ctx.obj = Cli()


# ---------------------------------------------------------------- agent
def _parse_sizes(values: tuple[str, ...]) -> dict[str, int]:
    from kproxy import abi

    sizes = {}
    for v in values:
        name, sep, n = v.partition("=")
        if not sep or not n.isdigit() or int(n) <= 0:
            raise click.BadParameter(
                f"{v!r}: expected NAME=N with N > 0, e.g. {abi.MAP_CT4}=524288", param_hint="--map-size"
            )
        if name not in abi.ALL_MAPS:
            raise click.BadParameter(
                f"{name!r} is not a kproxy map; one of {', '.join(abi.ALL_MAPS)}", param_hint="--map-size"
            )
        sizes[name] = int(n)
    return sizes


def _split_list(values: tuple[str, ...]) -> list[str]:
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def _configmap_ref(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def configmap_options(fn: F) -> F:
    """--namespace and --configmap: where the agent's ConfigMap (runtime settings) lives."""
    from kproxy.config import DEFAULT_CONFIGMAP, DEFAULT_NAMESPACE

    fn = click.option(
        "--configmap", default=DEFAULT_CONFIGMAP, show_default=True, envvar="KPROXY_CONFIGMAP",
        metavar="NAME",
        help="Name of the agent ConfigMap holding runtime settings (key dsr-mode).",
    )(fn)  # fmt: skip
    fn = click.option(
        "--namespace", default=DEFAULT_NAMESPACE, show_default=True, envvar="KPROXY_NAMESPACE", metavar="NS",
        help="Namespace of the agent ConfigMap.",
    )(fn)  # fmt: skip
    return fn


def _bpffs_ok(bpffs: str, hint: str) -> None:
    """Exit 3 unless BPFFS is a directory on a bpf filesystem. Only looks: the commands that call it
    never mount or create anything (the agent does, see kproxy.bpf.loader.prepare_pin_dir)."""
    from kproxy.bpf.maps import is_bpffs

    if not os.path.isdir(bpffs):
        why = ""
        with contextlib.suppress(OSError):
            if os.path.abspath(bpffs).startswith(BPFFS_ROOT + "/") and not is_bpffs(BPFFS_ROOT):
                why = f" (no bpf filesystem is mounted at {BPFFS_ROOT})"
        raise CliError(f"bpffs directory {bpffs} does not exist{why}: {hint}", EXIT_NO_BPFFS)
    try:
        ok = is_bpffs(bpffs)
    except OSError as e:
        raise CliError(f"cannot inspect {bpffs}: {e.strerror}", EXIT_NO_BPFFS) from e
    if not ok:
        raise CliError(
            f"{bpffs} is not on a bpf filesystem (mount -t bpf bpf {bpffs}); {hint}", EXIT_NO_BPFFS
        )


@main.command()
@click.option(
    "--source", default="kubernetes", show_default=True, metavar="kubernetes|file:DIR",
    help="Where Services and EndpointSlices come from: the API server (kubernetes), or file:DIR, "
    "YAML/JSON manifests in DIR followed live.",
)  # fmt: skip
@click.option(
    "--node-name", default=lambda: os.uname().nodename, show_default="host name", metavar="NAME",
    help="This node's name, as in EndpointSlice nodeName (marks local backends).",
)  # fmt: skip
@click.option(
    "--node-ip", "node_ips", multiple=True, metavar="IP[,IP]",
    help="This node's addresses (one IPv4 at least): NodePort frontends listen on them. Required.",
)  # fmt: skip
@click.option(
    "--netdev", "netdevs", multiple=True, metavar="IF[,IF]",
    help="External interfaces where NodePort/LoadBalancer/externalIP traffic enters. Absent: the "
    "interfaces with a default route or the node IP, minus loopback and pod interfaces.",
)  # fmt: skip
@click.option(
    "--pod-ifaces", "pod_ifaces", multiple=True, default=("lxc*",), show_default=True, metavar="GLOB[,GLOB]",
    help="Host-side pod interfaces, followed live as they come and go.",
)  # fmt: skip
@click.option(
    "--bpffs", default=DEFAULT_BPFFS, show_default=True, envvar="KPROXY_BPFFS", metavar="DIR",
    help=f"Directory on a bpf filesystem for the pinned maps and links; created if missing. Under "
    f"{BPFFS_ROOT} (the default), a bpf filesystem is first mounted at {BPFFS_ROOT} when none is.",
)  # fmt: skip
@click.option(
    "--map-size", "map_sizes", multiple=True, metavar="NAME=N",
    help="Capacity of a map at first load, by pinned name, e.g. kp_ct4_v1=524288 (repeatable; must match "
    "existing pins).",
)  # fmt: skip
@click.option("--ct-timeout-syn", type=click.IntRange(0), default=0, metavar="SECONDS",
              help="TCP before a reply; 0: the datapath default (60).")  # fmt: skip
@click.option("--ct-timeout-tcp", type=click.IntRange(0), default=0, metavar="SECONDS",
              help="Established TCP; 0: default (21600).")  # fmt: skip
@click.option("--ct-timeout-fin", type=click.IntRange(0), default=0, metavar="SECONDS",
              help="TCP after FIN/RST; 0: default (10).")  # fmt: skip
@click.option("--ct-timeout-udp", type=click.IntRange(0), default=0, metavar="SECONDS",
              help="UDP; 0: default (60).")  # fmt: skip
@click.option(
    "--ct-sweep-interval", type=click.FloatRange(0.1), default=5.0, show_default=True, metavar="SECONDS",
    help="Seconds between sweeps of expired conntrack entries.",
)  # fmt: skip
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@click.option(
    "--libbpf-log-level",
    type=click.Choice(["debug", "info", "warning"]),
    default="warning",
    show_default=True,
    help="Verbosity of libbpf's own messages (logger kproxy.libbpf), apart from --log-level: its debug "
    "output is about a thousand lines per program load.",
)
@click.option("--k8s-api-server", metavar="URL", help="API server to use instead of the in-cluster address.")
@click.option("--kubeconfig", metavar="PATH", help="kubeconfig file (default: in-cluster service account).")
@configmap_options
@click.option(
    "--nodeport-addresses", "nodeport_addresses", multiple=True, metavar="CIDR[,CIDR]",
    help="Only node addresses in these CIDRs accept NodePort traffic (default: all node addresses).",
)  # fmt: skip
@click.option(
    "--service-cidr", "service_cidrs", multiple=True, metavar="CIDR[,CIDR]",
    help="The cluster's service CIDRs (the API server's --service-cluster-ip-range), added to those of "
    "ServiceCIDR objects: packets to addresses no Service has there are dropped, as kube-proxy does.",
)  # fmt: skip
@click.option(
    "--external-cluster-ip/--no-external-cluster-ip", default=True, show_default=True,
    help="Serve ClusterIPs to clients outside the node whose packets are routed to it (a service CIDR "
    "advertised by BGP, a static route), as kube-proxy does; off: such packets are dropped.",
)  # fmt: skip
@click.option(
    "--metrics-bind-address", default="127.0.0.1:10249", show_default=True, metavar="ADDR:PORT",
    help="Where /metrics (Prometheus) is served.",
)  # fmt: skip
@click.option(
    "--health-bind-address", default="0.0.0.0:10256", show_default=True, metavar="ADDR:PORT",
    help="Where /healthz and /livez are served.",
)  # fmt: skip
@click.option(
    "--dsr-mode", type=click.Choice(["off", "opt", "ipip"]), default="off", show_default=True,
    help="Initial DSR mode, written to kp_cfg_v1; with --source kubernetes the agent then follows the "
    "ConfigMap key dsr-mode.",
)  # fmt: skip
@click.option(
    "--socket-lb-cgroup", metavar="PATH",
    help="cgroup v2 directory (never a hierarchy root) whose processes get socket-level load balancing; "
    "absent: off.",
)  # fmt: skip
@click.option(
    "--socket-lb-allow-root-cgroup", is_flag=True,
    help="Allow --socket-lb-cgroup to be the root of a cgroup2 hierarchy: every process of the node gets "
    "socket-level load balancing (what a cluster install wants; refused without this flag).",
)  # fmt: skip
@click.option(
    "--daemonset", metavar="NAMESPACE/NAME", envvar="KPROXY_DAEMONSET",
    help="The DaemonSet running this agent (the chart sets it). On SIGTERM the agent asks the API server "
    "for it: gone or being deleted means an uninstall, and the agent removes its programs and pins; "
    "there means a restart or upgrade, and the dataplane keeps serving. Absent: always kept.",
)  # fmt: skip
@click.option(
    "--keep-dataplane-on-uninstall", is_flag=True,
    help="Even when --daemonset is gone, leave the programs and pins serving the last state (to migrate "
    "to another install without a gap); `kproxy cleanup` removes them later.",
)  # fmt: skip
@click.option(
    "--snat-port-range", default="1024-29999", show_default=True, metavar="MIN-MAX",
    help="Source ports for SNAT of external traffic to remote backends; keep it clear of the NodePort "
    "range and of net.ipv4.ip_local_port_range.",
)  # fmt: skip
@click.option(
    "--lan-mtu", type=click.IntRange(0, 65535), default=0, metavar="BYTES",
    help="MTU between nodes, for the DSR IPIP MSS clamp; 0: the MTU of the first netdev.",
)  # fmt: skip
@click.option(
    "--hairpin-address", metavar="IPv4",
    help="Source address of a pod's packets balanced back to itself (default 169.254.42.1).",
)  # fmt: skip
@click.option(
    "--object", "object_path", type=click.Path(exists=True, dir_okay=False), default=None,
    help="BPF object to load instead of the packaged one (upgrades are atomic).",
)  # fmt: skip
def agent(
    source: str,
    node_name: str,
    node_ips: tuple[str, ...],
    netdevs: tuple[str, ...],
    pod_ifaces: tuple[str, ...],
    bpffs: str,
    map_sizes: tuple[str, ...],
    ct_timeout_syn: int,
    ct_timeout_tcp: int,
    ct_timeout_fin: int,
    ct_timeout_udp: int,
    ct_sweep_interval: float,
    log_level: str,
    libbpf_log_level: str,
    k8s_api_server: str | None,
    kubeconfig: str | None,
    namespace: str,
    configmap: str,
    nodeport_addresses: tuple[str, ...],
    service_cidrs: tuple[str, ...],
    external_cluster_ip: bool,
    metrics_bind_address: str,
    health_bind_address: str,
    dsr_mode: str,
    socket_lb_cgroup: str | None,
    socket_lb_allow_root_cgroup: bool,
    daemonset: str | None,
    keep_dataplane_on_uninstall: bool,
    snat_port_range: str,
    lan_mtu: int,
    hairpin_address: str | None,
    object_path: str | None,
) -> None:
    """Run the node agent: load and attach the BPF programs and keep the maps equal to the Services.

    The agent pins maps and tcx links under --bpffs, so the programs keep running while the agent
    restarts; a restarted agent re-adopts the pins and changes only what differs. SIGTERM stops it
    cleanly and leaves everything attached (use `kproxy cleanup` to remove it). Service and port
    names for the inspection commands go to /run/kproxy/<hash of the bpffs path>/services.json.
    """
    from pydantic import ValidationError

    from kproxy.agent import AgentError, run_agent
    from kproxy.config import AgentConfig

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kproxy.libbpf").setLevel(libbpf_log_level.upper())
    lo, sep, hi = snat_port_range.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise click.UsageError(f"--snat-port-range {snat_port_range!r} must be MIN-MAX, e.g. 1024-29999")
    snat_min, snat_max = int(lo), int(hi)
    try:
        cfg = AgentConfig.model_validate(
            {
                "source": source,
                "node_name": node_name,
                "node_ips": _split_list(node_ips),
                "netdevs": _split_list(netdevs),
                "pod_ifaces": _split_list(pod_ifaces),
                "bpffs": bpffs,
                "map_sizes": _parse_sizes(map_sizes),
                "conntrack": {
                    "syn": ct_timeout_syn,
                    "tcp": ct_timeout_tcp,
                    "fin": ct_timeout_fin,
                    "udp": ct_timeout_udp,
                },
                "sweep_interval": ct_sweep_interval,
                "log_level": log_level,
                "k8s_api_server": k8s_api_server,
                "kubeconfig": kubeconfig,
                "settings_configmap": _configmap_ref(namespace, configmap),
                "nodeport_addresses": _split_list(nodeport_addresses),
                "service_cidrs": _split_list(service_cidrs),
                "external_cluster_ip": external_cluster_ip,
                "metrics_bind": metrics_bind_address,
                "health_bind": health_bind_address,
                "dsr_mode": dsr_mode,
                "socket_lb_cgroup": socket_lb_cgroup,
                "socket_lb_allow_root_cgroup": socket_lb_allow_root_cgroup,
                "daemonset": daemonset,
                "keep_dataplane_on_uninstall": keep_dataplane_on_uninstall,
                "snat_port_min": snat_min,
                "snat_port_max": snat_max,
                "lan_mtu": lan_mtu,
                "hairpin_address": hairpin_address,
                "object_path": object_path,
            }
        )
    except ValidationError as e:
        raise click.UsageError(
            "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        ) from None
    if cfg.primary_ipv4 is None:
        raise click.UsageError("--node-ip: pass this node's IPv4 address (NodePorts and SNAT use it)")
    Cli().require_root("kproxy agent")
    from kproxy.bpf.loader import BpffsError, prepare_pin_dir

    try:
        prepare_pin_dir(bpffs)
    except BpffsError as e:
        raise CliError(str(e), EXIT_NO_BPFFS) from e
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
        rows = insp.services(maps.svc4, maps.be4, cli.metadata(maps.svc4))
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


@main.command()
@inspect_options
@click.pass_obj
def affinity(cli: Cli) -> None:
    """List sessionAffinity entries: client, service, backend and seconds left."""
    with cli.open_maps("kproxy affinity") as maps:
        rows = insp.affinity(maps.aff4, maps.svc4, maps.be4, cli.metadata(maps.svc4))
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
def status(cli: Cli) -> None:
    """The agent's state on this node: its process, DSR mode, netdevs and socket load balancing."""
    from kproxy.bpf.libbpf import LibbpfError
    from kproxy.bpf.socklb import SocketLB
    from kproxy.observe.metadata import read_status

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
        "dsr_mode": _mode_name(cfg.dsr_mode),
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


@main.command()
@inspect_options
@click.pass_obj
def nat(cli: Cli) -> None:
    """List SNAT entries: external flows to remote backends, SNATed to this node's address.

    Each row: protocol, the backend and the node address:port its replies come back to, the client
    and the frontend it connected to, state and seconds left.
    """
    from kproxy import abi

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
    import time

    from kproxy.abi import CtState, nbo_to_ip, nbo_to_port

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


# ---------------------------------------------------------------- dsr
DSR_KEY = "dsr-mode"


@dataclass
class DsrTarget:
    """Where `kproxy dsr` reads and writes the mode: one node's kp_cfg_v1, or the agent ConfigMap."""

    bpffs: str
    cluster: bool
    kubeconfig: str | None
    api_server: str | None
    namespace: str
    configmap: str
    output: str

    @property
    def configmap_ref(self) -> str:
        return f"{self.namespace}/{self.configmap}"


def _in_cluster() -> bool:
    try:
        from kproxy.sources.kube import SA_DIR
    except ImportError:  # no Kubernetes dependencies: standalone only
        return False
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(os.path.join(SA_DIR, "token"))


def dsr_options(fn: F) -> F:
    """Where `kproxy dsr` acts: one node (--bpffs) or the cluster (--kubeconfig, in-cluster)."""

    def target(ctx: click.Context, kw: dict[str, Any]) -> DsrTarget:
        explicit_bpffs = ctx.get_parameter_source("bpffs") in (
            click.core.ParameterSource.COMMANDLINE,
            click.core.ParameterSource.ENVIRONMENT,
        )
        cluster = bool(kw["kubeconfig"] or kw["k8s_api_server"]) or (not explicit_bpffs and _in_cluster())
        return DsrTarget(
            kw.pop("bpffs"), cluster, kw.pop("kubeconfig"), kw.pop("k8s_api_server"), kw.pop("namespace"),
            kw.pop("configmap"), kw.pop("output"),
        )  # fmt: skip

    @functools.wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> Any:
        return fn(target(click.get_current_context(), kw), *args, **kw)

    wrapped: Any = wrapper
    for opt in reversed([
        click.option(
            "--bpffs", default=DEFAULT_BPFFS, show_default=True, envvar="KPROXY_BPFFS", metavar="DIR",
            help="Standalone mode: the agent's bpffs directory, whose kp_cfg_v1 holds the mode.",
        ),
        click.option(
            "--kubeconfig", metavar="PATH",
            help="Cluster mode: patch the agent ConfigMap with these credentials.",
        ),
        click.option(
            "--k8s-api-server", metavar="URL",
            help="Cluster mode: the API server (with the in-cluster token).",
        ),
        configmap_options,
        click.option(
            "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
            help="Output format.",
        ),
    ]):  # fmt: skip
        wrapped = opt(wrapped)
    return wrapped  # type: ignore[no-any-return]


@main.group()
def dsr() -> None:
    """Direct server return for external traffic: enable, disable, status.

    Cluster mode (--kubeconfig, --k8s-api-server, or running in a pod): patch the key dsr-mode of the
    agent ConfigMap; every agent follows it live. Standalone mode (the default otherwise, or when
    --bpffs is given): write dsr_mode in kp_cfg_v1 of the node whose agent uses --bpffs (a restarted
    agent goes back to its --dsr-mode). Flows in progress keep the mode they began with.
    """


def _dsr_set(t: DsrTarget, mode: str) -> dict[str, Any]:
    if t.cluster:
        _configmap_call(t, "PATCH", {"data": {DSR_KEY: mode}})
        return {"where": f"configmap {t.configmap_ref}", "dsr_mode": mode}
    from kproxy.config import DSR_MODES

    cli = Cli(bpffs=t.bpffs, output=t.output)
    with cli.open_maps("kproxy dsr") as maps:
        cfg = maps.read_config()
        cfg.dsr_mode = int(DSR_MODES[mode])
        maps.write_config(cfg)
        got = _mode_name(maps.read_config().dsr_mode)
    return {"where": f"bpffs {t.bpffs}", "dsr_mode": got}


def _mode_name(value: int) -> str:
    from kproxy.config import DSR_MODES

    return next((name for name, v in DSR_MODES.items() if int(v) == value), f"unknown ({value})")


def _dsr_emit(t: DsrTarget, result: dict[str, Any]) -> None:
    Cli(output=t.output).emit(result, lambda r: f"dsr {r['dsr_mode']} ({r['where']})")


@dsr.command("enable")
@click.option(
    "--mode", type=click.Choice(["opt", "ipip"]), default="opt", show_default=True,
    help="opt: an IPv4 option carries the service address; ipip: IPv4-in-IPv4 encapsulation.",
)  # fmt: skip
@dsr_options
def dsr_enable(t: DsrTarget, mode: str) -> None:
    """Turn DSR on (new flows only)."""
    _dsr_emit(t, _dsr_set(t, mode))


@dsr.command("disable")
@dsr_options
def dsr_disable(t: DsrTarget) -> None:
    """Turn DSR off: new flows to remote backends are SNATed again."""
    _dsr_emit(t, _dsr_set(t, "off"))


@dsr.command("status")
@dsr_options
def dsr_status(t: DsrTarget) -> None:
    """Print the DSR mode (off, opt or ipip)."""
    if t.cluster:
        cm = _configmap_call(t, "GET", None)
        mode = ((cm.get("data") or {}).get(DSR_KEY) or "off").strip()
        result = {"where": f"configmap {t.configmap_ref}", "dsr_mode": mode}
    else:
        cli = Cli(bpffs=t.bpffs, output=t.output)
        with cli.open_maps("kproxy dsr status") as maps:
            result = {"where": f"bpffs {t.bpffs}", "dsr_mode": _mode_name(maps.read_config().dsr_mode)}
    _dsr_emit(t, result)


def _configmap_call(t: DsrTarget, method: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """GET or merge-PATCH the agent ConfigMap with the resolved credentials."""
    import asyncio

    import aiohttp

    from kproxy.sources.kube import CredentialsError, resolve_connection

    try:
        info = resolve_connection(t.kubeconfig, t.api_server)
    except CredentialsError as e:
        raise CliError(str(e)) from e
    path = f"/api/v1/namespaces/{t.namespace}/configmaps/{t.configmap}"

    async def call() -> dict[str, Any]:
        headers = dict(info.as_http_headers())
        if info.username and info.password and "Authorization" not in headers:
            import base64

            raw = f"{info.username}:{info.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        headers["User-Agent"] = "kproxy-cli"
        ssl = info.as_ssl_context() if info.server.startswith("https") else False
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl), headers=headers) as s:
            kw: dict[str, Any] = {"timeout": aiohttp.ClientTimeout(total=30)}
            if body is not None:
                kw["data"] = json.dumps(body)
                kw["headers"] = {"Content-Type": "application/merge-patch+json"}
            async with s.request(method, info.server.rstrip("/") + path, **kw) as resp:
                text = await resp.text()
                if resp.status == 404:
                    raise CliError(
                        f"ConfigMap {t.configmap_ref} not found: is kproxy installed there? "
                        "(pass --namespace/--configmap)"
                    )
                if resp.status >= 400:
                    raise CliError(f"{method} ConfigMap {t.configmap_ref}: HTTP {resp.status} {text[:200]}")
                result: dict[str, Any] = json.loads(text or "{}")
                return result

    try:
        return asyncio.run(call())
    except aiohttp.ClientError as e:
        raise CliError(f"cannot reach the API server {info.server}: {e}") from e


# ---------------------------------------------------------------- cleanup
@main.command("cleanup-kube-proxy")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
def cleanup_kube_proxy_cmd(dry_run: bool) -> None:
    """Remove kube-proxy's iptables, ip6tables and nftables rules, as `kube-proxy --cleanup` does.

    Works on the current network namespace; delete the kube-proxy DaemonSet first or it puts its rules
    back. Exits 1 when any removal failed.
    """
    from kproxy.cleanup_kube_proxy import cleanup_kube_proxy

    report = cleanup_kube_proxy(dry_run=dry_run)
    click.echo(report.summary())
    if not report.ok:
        sys.exit(EXIT_ERROR)


@main.command()
@inspect_options
@click.pass_obj
def cleanup(cli: Cli) -> None:
    """Detach every kproxy program and unpin every map and link under --bpffs.

    This includes the socket load balancing cgroup links (`kproxy agent --socket-lb-cgroup`).

    Run it in the network namespace of the interfaces (cls_bpf fallback filters live there). Stop
    the agent first, or it attaches again. Service traffic then falls back to whatever else handles it.
    """
    cli.require_root("kproxy cleanup")
    cli.check_bpffs()
    from kproxy.bpf.libbpf import LibbpfError
    from kproxy.bpf.teardown import remove_dataplane

    try:
        detached = remove_dataplane(cli.bpffs)
    except (LibbpfError, OSError) as e:
        raise CliError(f"cannot remove kproxy from {cli.bpffs}: {e}") from e
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
