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

import click

from kproxy.cli import admin, agent, dsr, inspect, lab
from kproxy.cli.common import Cli


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


# The package's names are its modules (kproxy.cli.agent is the module; its command is kproxy.cli.agent.agent).
for _command in (agent.agent, *inspect.COMMANDS, dsr.dsr, *admin.COMMANDS, lab.lab):
    main.add_command(_command)

__all__ = ["main"]
