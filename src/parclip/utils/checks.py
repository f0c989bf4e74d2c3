"""Argument checks with messages that name the argument, its owner and the allowed range.

    check_int("patch_size", 40, 1, 31, owner="badnet", context=" for image_size=32")
      -> ValueError("badnet: patch_size must be an int in [1, 31] for image_size=32, got 40")

``True``/``False`` are never accepted as numbers (Python counts ``bool`` as ``int``), and non-finite floats never as
numbers. Each check returns the value (an ``int``, or a ``float`` for :func:`check_number`) so it can be assigned.
"""
from __future__ import annotations

import math

__all__ = ["check_int", "check_number", "check_unit", "check_fraction"]


def _bounds(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}" if hi is not None else ""


def _fail(name, value, kind, lo, hi, owner, context, error):
    prefix = f"{owner}: " if owner else ""
    bounds = _bounds(lo, hi)
    raise error(f"{prefix}{name} must be {kind}{' ' + bounds if bounds else ''}{context}, got {value!r}")


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, owner: str | None = None,
              context: str = "", error: type[Exception] = ValueError) -> int:
    """``value`` as an int in [lo, hi] (a bound of None is open), else ``error`` naming owner, name and range."""
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) \
            or (hi is not None and value > hi):
        _fail(name, value, "an int", lo, hi, owner, context, error)
    return value


def check_number(name: str, value, lo: float | None = None, hi: float | None = None, *, owner: str | None = None,
                 context: str = "", error: type[Exception] = ValueError) -> float:
    """``value`` as a finite float in [lo, hi] (a bound of None is open), else ``error`` naming it and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(name, value, "a number", lo, hi, owner, context, error)
    return float(value)


def check_unit(name: str, value, *, owner: str | None = None) -> float:
    """A number in [0, 1] (a blend weight, a probability)."""
    return check_number(name, value, 0, 1, owner=owner)


def check_fraction(name: str, value, *, error: type[Exception] = ValueError) -> float:
    """A fraction in [0, 1] such as ``max_bad_fraction``."""
    return check_number(name, value, 0, 1, error=error)
