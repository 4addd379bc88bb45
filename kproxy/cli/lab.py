"""`kproxy lab`: the netns mini-cluster (kproxy.lab) for demos and tests."""

from __future__ import annotations

import json
import sys

import click

from kproxy.cli.common import EXIT_ERROR, CliError, require_root
from kproxy.lab.cluster import Lab, lab_status, list_labs, teardown
from kproxy.lab.netns import LabError


@click.group()
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
    require_root("kproxy lab up")

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
    require_root("kproxy lab down")

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
