"""Dataclasses that are also command-line flags: one field, one flag, one help text.

    @dataclass
    class Cfg:
        lr: float = flag(1e-3, "learning rate")           # -> --lr FLOAT  (default: 0.001)

`add_dataclass_arguments(parser, Cfg)` adds the flags (every default None, so that only explicit flags override lower
layers such as a YAML file), `dataclass_from_args(Cfg, args, base)` builds the instance from defaults < base < flags.
`parclip train` (TrainConfig) and `parclip attack optimize-patch` (PatchConfig) are made this way.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, field
from typing import get_type_hints

__all__ = ["flag", "add_dataclass_arguments", "dataclass_values", "dataclass_from_args", "coerce_fields"]


def flag(default, help: str, choices=None, *, shown: str | None = None, metavar: str | None = None,
         aliases: Sequence[str] = ()):
    """A dataclass field that is also a flag: `help`, `choices` and `metavar` go to argparse; `shown` is how the
    default reads in the help when the value itself would not teach (e.g. None meaning "the model's input size");
    `aliases` are further spellings of the flag (open_clip_train's, e.g. "--logs" for --output-dir).
    `default=MISSING` makes the field (and its flag) required."""
    return field(default=default, metadata={"help": help, "choices": choices, "shown": shown, "metavar": metavar,
                                            "aliases": tuple(aliases)})


def _base_type(tp) -> type:
    args = getattr(tp, "__args__", None)
    if args:  # Optional[X] / X | None / X | Y: the first type
        return next(a for a in args if a is not type(None))
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, required: Sequence[str] = ()) -> None:
    """Add one flag per field of the dataclass `cls` (`lr_start` → `--lr-start`), help and choices from its metadata.

    Every flag defaults to None, so that only explicit flags override lower layers (the dataclass defaults, a YAML
    file); the help shows the field's default. A bool field becomes `--x/--no-x`; `X | None` (or `X | Y`) is parsed as
    the first type X. Fields without a default, and those named in `required`, become required flags.
    """
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flags = ["--" + f.name.replace("_", "-"), *meta_aliases(f)]
        tp = _base_type(hints[f.name])
        meta = f.metadata
        needed = f.default is MISSING or f.name in required
        shown = meta.get("shown") or f.default
        help_ = meta["help"] if needed else f"{meta['help']} (default: {shown})"
        if tp is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                required=needed, help=help_)
        else:
            parser.add_argument(*flags, dest=f.name, type=tp, default=None, choices=meta.get("choices"),
                                required=needed, help=help_,
                                metavar=meta.get("metavar") or (None if meta.get("choices") else tp.__name__.upper()))


def meta_aliases(f: dataclasses.Field) -> tuple[str, ...]:
    """The extra flag spellings of a field."""
    return tuple(f.metadata.get("aliases", ()))


def dataclass_values(cls: type, args: argparse.Namespace) -> dict:
    """The fields of `cls` that were given as flags (not None in `args`)."""
    return {f.name: v for f in dataclasses.fields(cls) if (v := getattr(args, f.name, None)) is not None}


def dataclass_from_args(cls: type, args: argparse.Namespace, base: Mapping | None = None):
    """`cls(**values)` from defaults < `base` (e.g. a YAML file's values) < the flags given in `args`."""
    return cls(**{**(base or {}), **dataclass_values(cls, args)})


def coerce_fields(obj) -> None:
    """Check every field of the dataclass instance `obj` against its annotation, in place: numbers written as strings
    (YAML reads ``1e-4`` as a string) become numbers, an int where a float is expected becomes a float; anything else
    of the wrong type, or outside the field's choices, is a ValueError naming the option. Call it from
    ``__post_init__`` so a YAML file or a Python caller cannot slip a wrong type past the flags' parsing."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        args = getattr(tp, "__args__", None) or (tp,)
        if value is None and type(None) in args:
            continue
        want = _base_type(tp)
        new = _coerce(value, want)
        if new is _BAD:
            raise ValueError(f"option {f.name.replace('_', '-')}: expected {want.__name__}, got {value!r} "
                             f"({type(value).__name__})")
        choices = f.metadata.get("choices")
        if choices and new not in choices:
            raise ValueError(f"option {f.name.replace('_', '-')}: {new!r} is not one of {', '.join(map(str, choices))}")
        setattr(obj, f.name, new)


_BAD = object()


def _coerce(value, want: type):
    if want is bool:
        return value if isinstance(value, bool) else _BAD
    if want in (int, float):
        if isinstance(value, bool):
            return _BAD
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                return _BAD
        if not isinstance(value, (int, float)):
            return _BAD
        if want is int:
            return int(value) if float(value).is_integer() else _BAD
        return float(value)
    if want is str:
        import os

        return os.fspath(value) if isinstance(value, os.PathLike) else value if isinstance(value, str) else _BAD
    return value
