"""`kproxy dsr`: direct server return on or off, on one node (kp_cfg_v1) or cluster-wide (the ConfigMap)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import click

from kproxy.cli.common import Cli, CliError, F, configmap_options, mode_name
from kproxy.config import DEFAULT_BPFFS, DSR_MODES

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
    try:  # deferred, as in _configmap_call
        from kproxy.sources.kube.credentials import SA_DIR
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


@click.group()
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
    cli = Cli(bpffs=t.bpffs, output=t.output)
    with cli.open_maps("kproxy dsr") as maps:
        cfg = maps.read_config()
        cfg.dsr_mode = int(DSR_MODES[mode])
        maps.write_config(cfg)
        got = mode_name(maps.read_config().dsr_mode)
    return {"where": f"bpffs {t.bpffs}", "dsr_mode": got}


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
            result = {"where": f"bpffs {t.bpffs}", "dsr_mode": mode_name(maps.read_config().dsr_mode)}
    _dsr_emit(t, result)


def _configmap_call(t: DsrTarget, method: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """GET or merge-PATCH the agent ConfigMap with the credentials and HTTP client of the Kubernetes
    source (kproxy.sources.kube: resolve_connection, http_session)."""
    # Deferred: kopf and aiohttp cost every other command about 0.25 s at start.
    import aiohttp

    from kproxy.sources.kube.credentials import CredentialsError, http_session, resolve_connection

    try:
        info = resolve_connection(t.kubeconfig, t.api_server)
    except CredentialsError as e:
        raise CliError(str(e)) from e
    path = f"/api/v1/namespaces/{t.namespace}/configmaps/{t.configmap}"

    async def call() -> dict[str, Any]:
        async with http_session(info, user_agent="kproxy-cli") as s:
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
