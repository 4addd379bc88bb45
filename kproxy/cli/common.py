"""What every command group of the CLI shares: exit codes, errors, opening the maps, printing.

Inspection commands read the maps through kproxy.bpf.maps (never decoding bytes themselves) and the
service names from the agent's metadata file (see kproxy.observe.metadata).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from kproxy.bpf.maps import KproxyMaps, MapLayoutError, MapsNotFoundError, is_bpffs
from kproxy.cli.options import option_args
from kproxy.config import BPFFS_ROOT, CONFIGMAP_FLAG, DEFAULT_BPFFS, DSR_MODES, NAMESPACE_FLAG
from kproxy.observe.metadata import metadata_path, read_metadata

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


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise CliError(
            f"{what} needs root (CAP_BPF and CAP_SYS_ADMIN to open pinned BPF objects): run it with sudo",
            EXIT_NOT_ROOT,
        )


@dataclass
class Cli:
    """The object the root group puts on ctx.obj: where the maps are and how to print."""

    bpffs: str = DEFAULT_BPFFS
    output: str = "table"

    def require_root(self, what: str) -> None:
        require_root(what)

    def check_bpffs(self) -> None:
        bpffs_ok(self.bpffs, f"is the agent running with --bpffs {self.bpffs}?")

    def open_maps(self, what: str) -> KproxyMaps:
        self.require_root(what)
        self.check_bpffs()
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

    def metadata(self, *service_maps: Any) -> dict[int, dict[str, Any]]:
        """The agent's service names (services.json), for the service-port ids of both families (IPv6
        ids, >= abi.ID6_BASE, are named there the same way). Given service maps (kp_svc4_v1,
        kp_svc6_v1), the ids they hold that the file does not name yet are waited for, up to
        METADATA_WAIT_S: the agent writes the names of new ids a moment after the ids (at most every
        few hundred milliseconds: kproxy.agent.syncloop.ServiceMetadata.changed).
        No file (no agent wrote one): no wait. A None map (kp_svc6_v1 on an older agent's bpffs) is
        skipped."""
        meta = read_metadata(self.bpffs)
        service_maps = tuple(m for m in service_maps if m is not None)
        if not service_maps or not metadata_path(self.bpffs).exists():
            return meta
        want = {v.svc_id for svc in service_maps for k, v in svc.items() if k.slot == 0}
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


def configmap_options(fn: F) -> F:
    """--namespace and --configmap: where the agent's ConfigMap (runtime settings) lives; the same
    options `kproxy agent` has (kproxy.config.NAMESPACE_FLAG, CONFIGMAP_FLAG)."""
    for flag in (CONFIGMAP_FLAG, NAMESPACE_FLAG):
        decls, kw = option_args(flag)
        fn = click.option(*decls, **kw)(fn)
    return fn


def bpffs_ok(bpffs: str, hint: str) -> None:
    """Exit 3 unless BPFFS is a directory on a bpf filesystem. Only looks: the commands that call it
    never mount or create anything (the agent does, see kproxy.bpf.loader.prepare_pin_dir)."""
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


def mode_name(value: int) -> str:
    """A kp_cfg_v1 dsr_mode as its name (off, opt, ipip)."""
    return next((name for name, v in DSR_MODES.items() if int(v) == value), f"unknown ({value})")
