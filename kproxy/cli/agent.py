"""`kproxy agent`: its options are the fields of kproxy.config.AgentConfig (see kproxy.cli.options)."""

from __future__ import annotations

import logging
from typing import Any

import click
from pydantic import ValidationError

from kproxy.bpf.loader import BpffsError, prepare_pin_dir
from kproxy.cli.common import EXIT_NO_BPFFS, CliError, require_root
from kproxy.cli.options import Binding, bindings
from kproxy.config import AgentConfig

AGENT_BINDINGS: list[Binding] = bindings(AgentConfig)


def config_values(values: dict[str, Any]) -> dict[str, Any]:
    """click's parsed option values -> the input of AgentConfig. A bad value is a usage error (exit 2)."""
    data: dict[str, Any] = {}
    for b in AGENT_BINDINGS:
        try:
            data.update(b.to_config(values))
        except ValueError as e:
            # messages naming their flag stand alone; the others get click's "Invalid value for"
            if str(e).startswith("--"):
                raise click.UsageError(str(e)) from None
            raise click.BadParameter(str(e), param_hint=b.options[0].opts[0]) from None
    return data


@click.command("agent", params=[o for b in AGENT_BINDINGS for o in b.options])
def agent(**values: Any) -> None:
    """Run the node agent: load and attach the BPF programs and keep the maps equal to the Services.

    The agent pins maps and tcx links under --bpffs, so the programs keep running while the agent
    restarts; a restarted agent re-adopts the pins and changes only what differs. SIGTERM stops it
    cleanly and leaves everything attached (use `kproxy cleanup` to remove it). Service and port
    names for the inspection commands go to /run/kproxy/<hash of the bpffs path>/services.json.
    """
    data = config_values(values)
    logging.basicConfig(
        level=data["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kproxy.libbpf").setLevel(data["libbpf_log_level"].upper())
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as e:
        raise click.UsageError(
            "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        ) from None
    if cfg.primary_ipv4 is None and cfg.primary_ipv6 is None:
        raise click.UsageError("--node-ip: pass this node's addresses (NodePorts and SNAT use them)")
    require_root("kproxy agent")
    # Deferred: the agent's own imports (aiohttp, prometheus-client, kopf) cost every other command
    # about 0.3 s, for nothing.
    from kproxy.agent import AgentError, run_agent

    try:
        prepare_pin_dir(cfg.bpffs, mount=cfg.bpffs_mount)
    except BpffsError as e:
        raise CliError(str(e), EXIT_NO_BPFFS) from e
    try:
        run_agent(cfg)
    except AgentError as e:
        raise CliError(str(e)) from e
