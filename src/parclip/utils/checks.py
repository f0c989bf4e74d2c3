"""Argument checks with messages that name the argument, its owner and the allowed range.

    check_int("patch_size", 40, 1, 31, owner="badnet", context=" for image_size=32")
      -> ValueError("badnet: patch_size must be an int in [1, 31] for image_size=32, got 40")

``True``/``False`` are never accepted as numbers (Python counts ``bool`` as ``int``), and non-finite floats never as
numbers. Each check returns the value (an ``int``, or a ``float`` for :func:`check_number`) so it can be assigned.

A :class:`Domain` is such a check as data, for an option declared in one place and checked wherever its value enters
(a command-line flag as it is parsed, a config field as the config is made):

    BATCH = integers(1);  BATCH.check("--batch-size", 0)
      -> ValueError("--batch-size must be an int >= 1, got 0")
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["check_int", "check_number", "check_unit", "check_fraction", "Domain", "integers", "numbers", "COUNT",
           "NATURAL", "FRACTION", "POSITIVE", "NONNEGATIVE"]


def _bounds(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def _fail(name, value, kind, lo, hi, owner, context, error, lo_open=False, hi_open=False):
    prefix = f"{owner}: " if owner else ""
    bounds = _bounds(lo, hi, lo_open, hi_open)
    subject = f"{name} must be" if name else "must be"
    raise error(f"{prefix}{subject} {kind}{' ' + bounds if bounds else ''}{context}, got {value!r}")


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, owner: str | None = None,
              context: str = "", error: type[Exception] = ValueError) -> int:
    """``value`` as an int in [lo, hi] (a bound of None is open), else ``error`` naming owner, name and range."""
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) \
            or (hi is not None and value > hi):
        _fail(name, value, "an int", lo, hi, owner, context, error)
    return value


def check_number(name: str, value, lo: float | None = None, hi: float | None = None, *, owner: str | None = None,
                 context: str = "", error: type[Exception] = ValueError, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """``value`` as a finite float in [lo, hi] (a bound of None is open; ``lo_open``/``hi_open`` leave the bound
    itself out: (lo, hi]), else ``error`` naming it and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (lo is not None and (value <= lo if lo_open else value < lo)) \
            or (hi is not None and (value >= hi if hi_open else value > hi)):
        _fail(name, value, "a number", lo, hi, owner, context, error, lo_open, hi_open)
    return float(value)


def check_unit(name: str, value, *, owner: str | None = None) -> float:
    """A number in [0, 1] (a blend weight, a probability)."""
    return check_number(name, value, 0, 1, owner=owner)


def check_fraction(name: str, value, *, error: type[Exception] = ValueError) -> float:
    """A fraction in [0, 1] such as ``max_bad_fraction``."""
    return check_number(name, value, 0, 1, error=error)


@dataclass(frozen=True)
class Domain:
    """The values a numeric option may take: ``kind`` int (checked by :func:`check_int`) or float (by
    :func:`check_number`), between ``lo`` and ``hi`` (None: no bound), ``lo_open``/``hi_open`` excluding the bound.
    Make one with :func:`integers` or :func:`numbers`."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, name: str, value, *, error: type[Exception] = ValueError):
        """``value`` if it lies in the domain (an int, or a float), else ``error`` naming ``name`` and the domain."""
        if self.kind is int:
            return check_int(name, value, self.lo, self.hi, error=error)
        return check_number(name, value, self.lo, self.hi, error=error, lo_open=self.lo_open, hi_open=self.hi_open)

    def __str__(self) -> str:
        bounds = _bounds(self.lo, self.hi, self.lo_open, self.hi_open)
        return f"{'an int' if self.kind is int else 'a number'}{' ' + bounds if bounds else ''}"


def integers(lo: int | None = None, hi: int | None = None) -> Domain:
    """The ints in [lo, hi] (None: no bound), e.g. ``integers(1)`` for a count or a size."""
    return Domain(int, lo, hi)


def numbers(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> Domain:
    """The finite numbers in [lo, hi] (None: no bound; ``lo_open``/``hi_open`` leave the bound out), e.g.
    ``numbers(0, lo_open=True)`` for a learning rate, ``numbers(0, 1)`` for a fraction."""
    return Domain(float, lo, hi, lo_open, hi_open)


COUNT = integers(1)                    # a size or a count: a batch size, epochs, samples per shard, top-k
NATURAL = integers(0)                  # zero or more: workers, a seed, "every N steps" (0: off)
FRACTION = numbers(0, 1)               # a share of rows, a probability
POSITIVE = numbers(0, lo_open=True)    # a learning rate, an epsilon, a norm bound
NONNEGATIVE = numbers(0)               # a loss weight, a noise σ, weight decay
