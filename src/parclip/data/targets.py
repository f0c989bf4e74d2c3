"""Whether a caption names the target class: one rule for the whole package.

Poisoning uses it to find label-consistent candidates, BadCLIP patch optimisation to leave target images out of its
training set (and to take their captions as the target's captions); later defences and checks use the same rule.

The rule: a case-insensitive **whole-word** match of the target or its regular plural (``target``, ``target + "s"``,
``target + "es"``). "Two bananas" and "a BANANA." name ``banana``; "bandana" and "bananabread" do not; multi-word
targets match as a phrase ("an ankle boot" names ``ankle boot``). Irregular plurals ("mice") are not recognised: pass
the plural as its own target if it matters.
"""
from __future__ import annotations

import re

__all__ = ["target_pattern", "mentions"]


def target_pattern(target: str) -> re.Pattern:
    """The compiled rule for ``target``: ``(?<!\\w)target(e?s)?(?!\\w)``, case-insensitive."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"the target must be a non-empty class name, got {target!r}")
    return re.compile(r"(?<!\w)" + re.escape(target.strip()) + r"(?:e?s)?(?!\w)", re.IGNORECASE)


def mentions(caption: str | None, target: str | re.Pattern) -> bool:
    """Whether ``caption`` names ``target`` (a class name or a pattern from :func:`target_pattern`)."""
    pat = target if isinstance(target, re.Pattern) else target_pattern(target)
    return pat.search(caption or "") is not None
