"""click options generated from the settings dataclasses (imported by featx.cli only)."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Callable, Literal, Union

import click

from .settings import Settings, field_types


def _click_type(hint: Any, path: str | None) -> Any:
    if typing.get_origin(hint) in (Union, types.UnionType):  # Optional[int] or int | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return click.Choice(list(typing.get_args(hint)))
    if path == "file":
        return click.Path(dir_okay=False)
    if path == "dir":
        return click.Path(file_okay=False)
    return {int: click.INT, float: click.FLOAT, str: click.STRING}[hint]


def click_option(f: dataclasses.Field, hint: Any) -> Callable:
    """The ``click.option`` decorator of one dataclass field."""
    meta = f.metadata
    decls = list(meta.get("flags") or (f"--{f.name.replace('_', '-')}",))
    kwargs: dict[str, Any] = {"help": meta.get("help") or None}
    if hint is bool:
        kwargs["default"] = f.default
        if "/" in decls[0]:
            kwargs["show_default"] = True
        else:
            kwargs["is_flag"] = True
    elif typing.get_origin(hint) is tuple:  # repeatable: --storage-option A=1 --storage-option B=2
        kwargs.update(type=click.STRING, multiple=True, default=f.default)
    else:
        kwargs["type"] = _click_type(hint, meta.get("path"))
        kwargs["show_default"] = True  # nothing shown for None, unless --config sets a value
        if meta.get("required"):
            kwargs["required"] = True  # and no default: click 8.3 counts an explicit None as given
        else:
            kwargs["default"] = f.default
    return click.option(*decls, f.name, **kwargs)


def settings_options(cls: type[Settings]) -> Callable:
    """Decorator: one option per field of ``cls``; the command receives them as ``s: cls``.

    Put it directly above the function (arguments go above it)::

        @cli.command()
        @click.argument("data", required=False)
        @settings_options(EmbedSettings)
        def embed(data, s: EmbedSettings): ...
    """
    types = field_types(cls)
    fields = dataclasses.fields(cls)

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def callback(**kwargs: Any) -> Any:
            s = cls(**{f.name: kwargs.pop(f.name) for f in fields})
            return func(**kwargs, s=s)

        for f in reversed(fields):
            callback = click_option(f, types[f.name])(callback)
        return callback

    return decorate


def command_line_values(cmd: click.Command, args: list[str], parent: click.Context) -> dict[str, Any]:
    """The options that ``args`` give ``cmd``, converted by their types (what the command line
    changes); an unknown option or a bad value is click's usual error.  Required parameters may be
    missing: this only reads what is there."""
    ctx = click.Context(cmd, info_name=cmd.name, parent=parent)
    given, _, _ = cmd.make_parser(ctx).parse_args(list(args))
    out = {}
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name in given:
            try:
                out[p.name] = p.type_cast_value(ctx, given[p.name])
            except click.BadParameter as exc:
                exc.ctx, exc.param = ctx, p
                raise
    return out
