"""Command-line options declared once, as data: dataclass fields that are also flags, and command specs.

    @dataclass
    class Cfg:
        lr: float = flag(1e-3, "learning rate", domain=numbers(0, lo_open=True))  # -> --lr FLOAT  (default: 0.001)

`add_dataclass_arguments(parser, Cfg)` adds the flags (every default None, so that only explicit flags override lower
layers such as a YAML file), `dataclass_from_args(Cfg, args, base)` builds the instance from defaults < base < flags,
and `check_domains(cfg)` (from the dataclass's ``__post_init__``) checks every numeric field against its domain.

A command is a :class:`Command`: its name, help, description, its arguments (:func:`arg`, :class:`OneOf` for mutually
exclusive ones, :class:`Fields` for a dataclass's flags, or tuples of these shared between commands), and either the
handler it runs or its sub-actions. :func:`add_commands` turns a tuple of them into argparse subcommands.

Every numeric option carries a :class:`~parclip.utils.checks.Domain`: a flag's value is checked as it is parsed (an
argparse usage error naming the flag and the domain), a field's when the dataclass is made. Declaring an int or float
option without one is a TypeError, so that no option slips in unchecked.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any, Union, get_type_hints

from .checks import Domain

__all__ = ["flag", "add_dataclass_arguments", "dataclass_values", "dataclass_from_args", "coerce_fields",
           "check_domains", "option_name", "Parsed", "Arg", "arg", "refused", "OneOf", "Fields", "Refused", "Command",
           "add_args", "add_commands"]


def flag(default, help: str, choices=None, *, shown: str | None = None, metavar: str | None = None,
         aliases: Sequence[str] = (), domain: Domain | None = None):
    """A dataclass field that is also a flag: `help`, `choices` and `metavar` go to argparse; `shown` is how the
    default reads in the help when the value itself would not teach (e.g. None meaning "the model's input size");
    `aliases` are further spellings of the flag (open_clip_train's, e.g. "--logs" for --output-dir); `domain` the
    values a numeric field may take (required for an int or float field; None always passes where the type allows
    it). `default=MISSING` makes the field (and its flag) required."""
    return field(default=default, metadata={"help": help, "choices": choices, "shown": shown, "metavar": metavar,
                                            "aliases": tuple(aliases), "domain": domain})


def option_name(name: str) -> str:
    """The flag of a field: ``lr_start`` -> ``--lr-start``."""
    return "--" + name.replace("_", "-")


class Parsed:
    """argparse ``type=`` of a numeric option: the text as ``kind``, then checked against ``domain``; a value outside
    it is an argparse usage error ("argument --batch-size: must be an int >= 1, got 0", exit status 2)."""

    def __init__(self, kind: type, domain: Domain):
        self.kind, self.domain = kind, domain
        self.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"

    def __call__(self, text: str):
        value = self.kind(text)
        self.domain.check("", value, error=argparse.ArgumentTypeError)
        return value

    def __repr__(self) -> str:
        return f"{self.kind.__name__} ({self.domain})"


def _numeric_type(tp, domain: Domain | None, where: str):
    """``tp`` itself, or for int/float a :class:`Parsed` with ``domain`` (a TypeError when there is none)."""
    if tp not in (int, float):
        return tp
    if domain is None:
        raise TypeError(f"{where}: a numeric option needs a domain (e.g. domain=integers(1)), so that a value "
                        f"outside it is refused as it is parsed")
    return Parsed(tp, domain)


def _base_type(tp) -> type:
    args = getattr(tp, "__args__", None)
    if args:  # Optional[X] / X | None / X | Y: the first type
        return next(a for a in args if a is not type(None))
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, required: Sequence[str] = ()) -> None:
    """Add one flag per field of the dataclass `cls` (`lr_start` → `--lr-start`), help and choices from its metadata.

    Every flag defaults to None, so that only explicit flags override lower layers (the dataclass defaults, a YAML
    file); the help shows the field's default. A bool field becomes `--x/--no-x`; `X | None` (or `X | Y`) is parsed as
    the first type X. Fields without a default, and those named in `required`, become required flags. An int or
    float field is parsed and checked against its domain (a field without one is a TypeError).
    """
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flags = [option_name(f.name), *meta_aliases(f)]
        tp = _base_type(hints[f.name])
        meta = f.metadata
        needed = f.default is MISSING or f.name in required
        shown = meta.get("shown") or f.default
        help_ = meta["help"] if needed else f"{meta['help']} (default: {shown})"
        if tp is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                required=needed, help=help_)
        else:
            kind = _numeric_type(tp, meta.get("domain"), f"{cls.__name__}.{f.name}")
            parser.add_argument(*flags, dest=f.name, type=kind, default=None, choices=meta.get("choices"),
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


def check_domains(obj) -> None:
    """Check every field of the dataclass instance `obj` that has a domain (None passes: the annotation says whether
    None is allowed, :func:`coerce_fields` checks that): a ValueError naming the flag and the domain, e.g.
    "--batch-size must be an int >= 1, got 0"."""
    for f in dataclasses.fields(obj):
        value, domain = getattr(obj, f.name), f.metadata.get("domain")
        if domain is not None and value is not None:
            domain.check(option_name(f.name), value)


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


# ---------------------------------------------------------------------------------------------- commands as data
@dataclass(frozen=True)
class Arg:
    """One argument of a command: argparse's ``add_argument(*names, **options)``, and for a number its domain (the
    value is checked as it is parsed). Declare it with :func:`arg`; one Arg may serve many commands."""

    names: tuple[str, ...]
    options: Mapping[str, Any]
    domain: Domain | None = None

    def add_to(self, parser) -> None:
        options = dict(self.options)
        if "type" in options:
            options["type"] = _numeric_type(options["type"], self.domain, self.names[0])
        parser.add_argument(*self.names, **options)


def arg(*names: str, domain: Domain | None = None, **options) -> Arg:
    """An :class:`Arg`: ``arg("--batch-size", type=int, default=256, domain=integers(1))``. An int or float ``type``
    without a ``domain`` is a TypeError."""
    _numeric_type(options.get("type"), domain, names[0])
    return Arg(tuple(names), options, domain)


class _Refuse(argparse.Action):
    """An option another tool has and parclip does not (or one parclip removed): giving it is a usage error that says
    why. A use whose values are one of the lists in `accept` (what parclip does anyway, e.g. open_clip_train's
    ``--opt adamw``: ``[["adamw"]]``, or a switch that is always on: ``[[]]``) passes silently."""

    def __init__(self, option_strings, dest, reason: str, accept: Sequence[Sequence[str]] = (), **kw):
        kw.setdefault("nargs", "*")
        kw.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kw)
        self.reason, self.accept = reason, [list(a) for a in accept]

    def __call__(self, parser, namespace, values, option_string=None):
        if list(values or []) in self.accept:
            return
        parser.error(f"{option_string} is not supported: {self.reason}")


def refused(*names: str, reason: str) -> Arg:
    """An option parclip recognises but refuses (a flag of a tool it mirrors, e.g. clip_benchmark's ``--distributed``):
    any use, with or without values, is an argparse usage error "NAME is not supported: `reason`", instead of being
    mistaken for another flag or reported as unknown. Shown in the help as such."""
    return Arg(tuple(names), {"action": _Refuse, "reason": reason, "metavar": "…",
                              "help": f"not supported: {reason}"})


@dataclass(frozen=True)
class OneOf:
    """Mutually exclusive arguments (argparse's mutually exclusive group); ``required``: exactly one must be given."""

    args: tuple[Arg, ...]
    required: bool = False

    def add_to(self, parser) -> None:
        group = parser.add_mutually_exclusive_group(required=self.required)
        for a in self.args:
            a.add_to(group)


@dataclass(frozen=True)
class Fields:
    """The flags of a dataclass whose fields are :func:`flag`s (see :func:`add_dataclass_arguments`)."""

    cls: type
    required: tuple[str, ...] = ()

    def add_to(self, parser) -> None:
        add_dataclass_arguments(parser, self.cls, required=self.required)


@dataclass(frozen=True)
class Refused:
    """Flags that parse but are refused, each with its reason: the flags of another tool that a user may copy
    (open_clip_train's) or flags that were removed, many at once (:func:`refused` declares one, shown in the help).
    Given, the parse stops with a usage error "--flag is not supported: reason" (exit status 2), whatever values
    follow it; ``accept`` maps a flag to the uses that are what this command does
    anyway (``{"--opt": [["adamw"]], "--gather-with-grad": [[]]}``), which pass silently. They stay out of the help (``title`` says what they are, for the
    reader of the code); the command's documentation lists them."""

    title: str
    reasons: Mapping[str, str]
    accept: Mapping[str, tuple] = dataclasses.field(default_factory=dict)

    def add_to(self, parser) -> None:
        for name, reason in self.reasons.items():
            parser.add_argument(name, action=_Refuse, reason=reason, accept=self.accept.get(name, ()),
                                dest=argparse.SUPPRESS, help=argparse.SUPPRESS)


Spec = Union[Arg, OneOf, Fields, Refused, tuple]  # a tuple: a shared group of specs, added in order


@dataclass(frozen=True)
class Command:
    """A (sub)command as data: ``name``, the one-line ``help`` of the command list, the ``description`` and
    ``epilog`` of its own ``--help`` (a command with an epilog keeps its line breaks), its arguments ``args`` in help
    order, and either ``run`` (the handler, called with the parsed namespace) or ``actions``: sub-actions
    (``parclip NAME ACTION``), recorded in the namespace as ``<name>_command``."""

    name: str
    help: str
    args: tuple = ()
    run: Callable[[argparse.Namespace], int] | None = None
    description: str | None = None
    epilog: str | None = None
    actions: tuple[Command, ...] = ()

    def specs(self):
        """Every :class:`Arg`, :class:`OneOf` and :class:`Fields` of this command (shared groups flattened)."""
        return _flatten(self.args)


def _flatten(specs):
    for s in specs:
        if isinstance(s, tuple):
            yield from _flatten(s)
        else:
            yield s


def add_args(parser, specs: Sequence[Spec]) -> None:
    """Add the arguments `specs` (Arg, OneOf, Fields, Refused, or tuples of them) to `parser`, in order."""
    for s in _flatten(specs):
        s.add_to(parser)


def add_commands(parser: argparse.ArgumentParser, commands: Sequence[Command], *, dest: str,
                 metavar: str = "ACTION") -> None:
    """A required choice among `commands` under `parser`, recorded as ``dest``; each leaf's parser sets ``handler``
    to its ``run``. No parser takes abbreviations (``allow_abbrev=False``): a prefix of a flag is an unknown flag,
    never silently another one (``--dataset`` is not ``--dataset-name``)."""
    sub = parser.add_subparsers(dest=dest, metavar=metavar)
    sub.required = True
    for c in commands:
        p = sub.add_parser(c.name, help=c.help, description=c.description, epilog=c.epilog, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter if c.epilog
                           else argparse.HelpFormatter)
        add_args(p, c.args)
        if c.actions:
            add_commands(p, c.actions, dest=f"{c.name.replace('-', '_')}_command")
        else:
            p.set_defaults(handler=c.run)
