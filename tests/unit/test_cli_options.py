"""`kproxy agent`'s options are built from AgentConfig's fields (kproxy.cli.options)."""

from __future__ import annotations

import os

import click
import pytest
from pydantic import Field

from kproxy.cli.agent import AGENT_BINDINGS, agent, config_values
from kproxy.cli.options import bindings
from kproxy.config import AgentConfig


def parse(*args: str) -> AgentConfig:
    ctx = agent.make_context("agent", list(args))
    return AgentConfig.model_validate(config_values(ctx.params))


def test_every_field_is_an_option() -> None:
    opts = {o for b in AGENT_BINDINGS for p in b.options for o in p.opts + p.secondary_opts}
    assert {"--node-ip", "--ct-timeout-syn", "--ct-sweep-interval", "--namespace", "--configmap"} <= opts
    assert {"--snat-port-range", "--object", "--no-external-cluster-ip", "--libbpf-log-level"} <= opts
    covered = set(AgentConfig.model_fields) - {"snat_port_max", "node_port_max"}  # set by the *-range flags
    assert len(AGENT_BINDINGS) == len(covered)


def test_option_defaults_are_the_config_defaults() -> None:
    node = os.uname().nodename
    assert parse("--node-ip", "192.0.2.1") == AgentConfig(node_name=node, node_ips=["192.0.2.1"])


def test_values_map_onto_the_config() -> None:
    cfg = parse(
        "--node-ip", "192.0.2.1,fd00::1", "--node-ip", "192.0.2.2", "--map-size", "kp_ct4_v1=1024",
        "--ct-timeout-tcp", "7", "--namespace", "ns", "--configmap", "cm", "--snat-port-range", "2000-3000",
        "--no-external-cluster-ip", "--keep-dataplane-on-uninstall",
    )  # fmt: skip
    assert cfg.node_ips == ["192.0.2.1", "fd00::1", "192.0.2.2"] and cfg.map_sizes == {"kp_ct4_v1": 1024}
    assert cfg.conntrack.tcp == 7 and cfg.settings_configmap == "ns/cm"
    assert (cfg.snat_port_min, cfg.snat_port_max) == (2000, 3000)
    assert cfg.external_cluster_ip is False and cfg.keep_dataplane_on_uninstall is True


def test_bad_values_are_usage_errors() -> None:
    with pytest.raises(click.UsageError, match="must be MIN-MAX"):
        parse("--snat-port-range", "1-2-3")
    with pytest.raises(click.BadParameter, match="expected NAME=N"):
        parse("--map-size", "kp_ct4_v1")


def test_a_new_field_is_a_new_flag() -> None:
    class More(AgentConfig):
        probe_interval: float = Field(default=2.5, ge=1, description="Seconds between probes.")

    (opt,) = bindings(More)[-1].options
    assert opt.opts == ["--probe-interval"] and opt.default == 2.5 and opt.help == "Seconds between probes."
    assert isinstance(opt.type, click.FloatRange) and opt.type.min == 1


def test_every_command_module_command_is_listed_and_loads_lazily() -> None:
    import importlib
    import subprocess
    import sys

    import click

    from kproxy.cli import COMMANDS, main

    ctx = click.Context(main)
    assert all(main.get_command(ctx, name) is not None for name in COMMANDS)
    listed = set(COMMANDS.values())
    for module in {m for m, _ in COMMANDS.values()}:
        mod = importlib.import_module(f"kproxy.cli.{module}")
        commands = {a: v for a, v in vars(mod).items() if isinstance(v, click.Command)}
        sub = {id(c) for g in commands.values() if isinstance(g, click.Group) for c in g.commands.values()}
        for attr, command in commands.items():
            if id(command) not in sub and not attr.startswith("_"):
                # a new top-level command must be listed in kproxy.cli.COMMANDS
                assert (module, attr) in listed, f"kproxy.cli.{module}.{attr} is not in COMMANDS"
    # `kproxy services` imports neither the lab nor the cleanup code
    code = (
        "import sys, kproxy.cli as c; c.main(['services', '-h'], standalone_mode=False); print(*sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "kproxy.cli.inspect" in out
    assert "kproxy.lab.cluster" not in out and "kproxy.bpf.teardown" not in out
