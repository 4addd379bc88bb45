"""Node administration: remove kproxy (`cleanup`) or kube-proxy's rules (`cleanup-kube-proxy`), `version`."""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version

import click

from kproxy.bpf.libbpf import LibbpfError
from kproxy.bpf.loader import default_object_path
from kproxy.bpf.teardown import remove_dataplane
from kproxy.cleanup_kube_proxy import cleanup_kube_proxy
from kproxy.cli.common import EXIT_ERROR, Cli, CliError, inspect_options


@click.command("cleanup-kube-proxy")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
def cleanup_kube_proxy_cmd(dry_run: bool) -> None:
    """Remove kube-proxy's iptables, ip6tables and nftables rules, as `kube-proxy --cleanup` does.

    Works on the current network namespace; delete the kube-proxy DaemonSet first or it puts its rules
    back. Exits 1 when any removal failed.
    """
    report = cleanup_kube_proxy(dry_run=dry_run)
    click.echo(report.summary())
    if not report.ok:
        sys.exit(EXIT_ERROR)


@click.command()
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
    try:
        detached = remove_dataplane(cli.bpffs)
    except (LibbpfError, OSError) as e:
        raise CliError(f"cannot remove kproxy from {cli.bpffs}: {e}") from e
    cli.emit(
        {"bpffs": cli.bpffs, "detached": detached},
        lambda r: f"removed kproxy from {r['bpffs']}; detached: {', '.join(r['detached']) or 'nothing'}",
    )


@click.command()
@inspect_options
@click.pass_obj
def version(cli: Cli) -> None:
    """Print the kproxy version and the BPF object it ships."""
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
