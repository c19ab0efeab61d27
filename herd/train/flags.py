"""Command-line flags generated from a stage's config dataclass: the default and the help text live
in one place, the field (`field(default=..., metadata={"help": ...})`, as TRL's configs do).

    p = subparsers.add_parser("sft", ...)
    add_dataclass_arguments(p, SFTConfig)            # --max-steps, --lr, --no-bf16, --prune, ...
    cfg = config_from_args(SFTConfig, args)

Mapping: `x_y` → `--x-y`; a bool that defaults to True → `--no-x-y`, False → `--x-y`;
`Literal[...]` → choices; `tuple[float, float]` → two values; `X | None` → type X, default None.
Fields with metadata {"cli": False} (or of a type argparse cannot take, like dict) are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _base_type(tp):
    """(python type, choices or None, nargs or None) of an annotation."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, None, None)
    if origin is typing.Literal:
        choices = list(typing.get_args(tp))
        return type(choices[0]), choices, None
    if origin is tuple:
        args = typing.get_args(tp)
        return args[0], None, len(args)
    if tp in (int, float, str, bool):
        return tp, None, None
    return None, None, None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                            overrides: dict | None = None) -> None:
    """Add one flag per field of dataclass `cls` (see module docstring). `overrides` maps a field
    to extra add_argument keywords (e.g. a custom `type=` parser)."""
    hints = typing.get_type_hints(cls)
    overrides = overrides or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        tp, choices, nargs = _base_type(hints[f.name])
        help_ = f.metadata.get("help")
        flag = "--" + f.name.replace("_", "-")
        kw = dict(overrides.get(f.name, {}))
        if tp is bool and "type" not in kw:
            if default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    help=help_)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=help_)
            continue
        if tp is None and "type" not in kw:
            continue
        kw.setdefault("type", tp)
        if choices:
            kw.setdefault("choices", choices)
        if nargs:
            kw.setdefault("nargs", nargs)
        parser.add_argument(flag, dest=f.name, default=default, help=help_, **kw)


def config_from_args(cls, args: argparse.Namespace):
    """An instance of dataclass `cls` from the parsed flags (fields without a flag keep their default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names}
    return cls(**values)
