"""click options built from the fields of a pydantic config model (kproxy.config.AgentConfig).

Each field is one option (see kproxy.config.Flag for the rules and the per-field hints): a new field is a
new `kproxy agent` flag, with its type, default and help declared once, on the field. `Binding` keeps,
for one field, its options and how their values become config entries.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kproxy.config import Flag, split_list


@dataclass
class Binding:
    """The options of one config field and how their parsed values become config entries."""

    options: list[click.Option]
    to_config: Callable[[Mapping[str, Any]], dict[str, Any]]  # click's values by parameter name -> entries


def flag_of(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def _bounds(field: FieldInfo) -> tuple[float | None, float | None]:
    lo = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
    hi = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    return lo, hi  # type: ignore[return-value]  # numbers here


def _base(annotation: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def param_name(opt: str) -> str:
    return opt.lstrip("-").replace("-", "_")


def make_option(flag: Flag, field: FieldInfo | None = None, opt: str | None = None) -> click.Option:
    """The click option of FLAG (a part, or the flag of FIELD, named OPT)."""
    decls, kw = option_args(flag, field, opt)
    return click.Option(decls, **kw)


def option_args(
    flag: Flag, field: FieldInfo | None = None, opt: str | None = None
) -> tuple[list[str], dict[str, Any]]:
    """The declarations and keywords of the click option of FLAG (see make_option)."""
    opt = flag.name or opt
    assert opt, "an option needs a name"
    name = param_name(opt)
    if flag.default is not None or field is None or field.is_required():
        default: Any = flag.default
    else:
        default = field.get_default(call_default_factory=True)
    annotation = _base(field.annotation) if field is not None else str
    kw: dict[str, Any] = {"metavar": flag.metavar, "envvar": flag.envvar}
    decls = [opt]
    if flag.into is not None or field is None:
        kw["multiple"] = get_origin(annotation) in (list, dict)
    elif annotation is bool:
        if default:
            decls = [f"{opt}/--no-{opt[2:]}"]
        else:
            kw["is_flag"] = True
    elif get_origin(annotation) is Literal:
        kw["type"] = click.Choice([str(a) for a in get_args(annotation)])
    elif get_origin(annotation) is list:
        kw["multiple"] = True
    elif annotation in (int, float):
        lo, hi = _bounds(field)
        lo = flag.min if flag.min is not None else lo
        if annotation is int:
            kw["type"] = click.IntRange(lo, hi) if lo is not None or hi is not None else click.INT  # type: ignore[arg-type]
        else:
            kw["type"] = click.FloatRange(lo, hi) if lo is not None or hi is not None else click.FLOAT
    elif flag.file:
        kw["type"] = click.Path(exists=True, dir_okay=False)
    if isinstance(default, list | dict):
        default = tuple(default)
    kw["default"] = default
    kw["show_default"] = flag.show_default if flag.show_default is not None else bool(default)
    kw["help"] = flag.help or (field.description if field is not None else None)
    return [*decls, name], kw


def bindings(model: type[BaseModel], prefix: str = "--") -> list[Binding]:
    """One Binding per field of MODEL with an option, in field order (the order of --help)."""
    out: list[Binding] = []
    for fname, field in model.model_fields.items():
        flag = flag_of(field)
        if flag.skip:
            continue
        annotation = _base(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.append(
                _nested(fname, bindings(annotation, flag.name or f"{prefix}{fname.replace('_', '-')}-"))
            )
        elif flag.parts:
            out.append(_parts(flag))
        else:
            out.append(_single(fname, field, flag, prefix))
    return out


def _nested(fname: str, subs: list[Binding]) -> Binding:
    def to_config(values: Mapping[str, Any]) -> dict[str, Any]:
        inner: dict[str, Any] = {}
        for b in subs:
            inner.update(b.to_config(values))
        return {fname: inner}

    return Binding([o for b in subs for o in b.options], to_config)


def _parts(flag: Flag) -> Binding:
    opts = [make_option(part) for part in flag.parts]
    into = flag.into
    assert into is not None, "a flag of parts needs `into`"

    def to_config(values: Mapping[str, Any]) -> dict[str, Any]:
        return into(*(values[o.name] for o in opts if o.name))

    return Binding(opts, to_config)


def _single(fname: str, field: FieldInfo, flag: Flag, prefix: str) -> Binding:
    opt = make_option(flag, field, f"{prefix}{fname.replace('_', '-')}")
    key, into = opt.name or fname, flag.into
    is_list = get_origin(_base(field.annotation)) is list

    def to_config(values: Mapping[str, Any]) -> dict[str, Any]:
        value = values[key]
        if into is not None:
            return into(value)
        return {fname: split_list(value) if is_list else value}

    return Binding([opt], to_config)
