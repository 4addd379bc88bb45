"""The kproxy command line: the agent, read-only inspection of the pinned maps, cleanup, and the lab.

One module per command group: agent (`kproxy agent`, its options built from kproxy.config.AgentConfig
by options), inspect (services, backends, conntrack, affinity, stats, status, nat), dsr (`kproxy dsr`),
admin (cleanup, cleanup-kube-proxy, version) and lab (`kproxy lab`); common holds what they share.
This module only assembles them under `main` (the `kproxy` console script and `python -m kproxy`).

Exit codes scripts can test:
  0 success · 1 other error · 2 usage error · 3 the bpffs directory is missing or not a bpf filesystem
  4 not root · 5 no kproxy maps in the bpffs directory · 6 pinned maps of another layout version
"""

from __future__ import annotations

import importlib

import click

from kproxy.cli.common import Cli

# command -> (its module in kproxy.cli, the attribute). A command's module is imported when that
# command runs (or --help lists them all): `kproxy services` does not load the lab, libbpf's loader
# or the cleanup code, each command pays for what it uses.
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("agent", "agent"),
    **{
        c: ("inspect", c) for c in ("services", "backends", "conntrack", "affinity", "stats", "status", "nat")
    },
    "dsr": ("dsr", "dsr"),
    "cleanup": ("admin", "cleanup"),
    "cleanup-kube-proxy": ("admin", "cleanup_kube_proxy_cmd"),
    "version": ("admin", "version"),
    "lab": ("lab", "lab"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        command = getattr(importlib.import_module(f"kproxy.cli.{where[0]}"), where[1])
        assert isinstance(command, click.Command) and command.name == cmd_name, cmd_name
        return command


# A fixed width: --help reads the same in every terminal, so docs/cli.md (kproxy.cli_docs) matches it.
@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110, "terminal_width": 110},
)
@click.pass_context
def main(ctx: click.Context) -> None:
    """kproxy: a pure-eBPF replacement for kube-proxy.

    Run `kproxy agent` on each node; inspect what it programmed with `kproxy services`,
    `backends`, `conntrack`, `affinity`, `nat` and `stats`; toggle DSR with `kproxy dsr`.
    """
    ctx.obj = Cli()


# The package's names are its modules (kproxy.cli.agent is the module; its command is kproxy.cli.agent.agent).
__all__ = ["COMMANDS", "main"]
