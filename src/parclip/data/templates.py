"""Prompt templates for zero-shot classification and for captions: text with a ``{}`` where the class name goes.

Sets: ``"openai"`` (the 80 OpenAI ImageNet templates, as shipped by open_clip), ``"simple"`` (open_clip's short set),
``"fashion"`` (ours, for small grey product photos such as Fashion-MNIST), or a path to a text file with one template
per line (blank lines and lines starting with ``#`` are ignored).

A template is filled by literal substitution (:func:`fill`), never by Python's ``str.format`` (which would let a
template file reach object attributes, ``{0.__class__}``): ``{}`` and ``{c}`` become the class name, ``{{`` and ``}}``
a literal brace (as in ``str.format``, so every template ``str.format`` filled gives the same text), and any other
brace is refused with a :class:`DataError` when the template is read (:func:`get_templates`, :func:`check_template`).
Every template needs at least one placeholder.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from .captions import DataError

__all__ = ["get_templates", "check_template", "fill", "TEMPLATE_SETS", "FASHION_TEMPLATES"]

FASHION_TEMPLATES = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a black and white photo of the {}.",
    "a grayscale photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of the {}.",
    "a photo of the small {}.",
    "itap of a {}.",
    "a cropped photo of a {}.",
    "a product photo of a {}.",
]

#: names accepted by get_templates
TEMPLATE_SETS = ("openai", "simple", "fashion")


def _from_open_clip(attr: str) -> list[str]:
    import open_clip  # slow import, only when asked

    return [t("{}") for t in getattr(open_clip, attr)]


# the tokens of a template: an escaped brace, a placeholder, or a brace that is neither (refused)
_TOKEN = re.compile(r"\{\{|\}\}|\{c?\}|[{}]")
_PLACEHOLDERS = ("{}", "{c}")


def _substitute(template: str, classname: str, where: str = "") -> tuple[str, int]:
    """(the template with each placeholder replaced by ``classname`` and each ``{{`` / ``}}`` by one brace, the number
    of placeholders); DataError at the first other brace."""
    parts, pos, n = [], 0, 0
    for m in _TOKEN.finditer(template):
        parts.append(template[pos:m.start()])
        token = m.group()
        if token in _PLACEHOLDERS:
            parts.append(classname)
            n += 1
        elif len(token) == 2:
            parts.append(token[0])
        else:
            close = template.find("}", m.start() + 1)
            field = template[m.start():close + 1] if token == "{" and close >= 0 else token
            raise DataError(f"{where + ': ' if where else ''}template {template!r} has {field!r}: only '{{}}' and "
                            f"'{{c}}' (the class name) are replaced, nothing else is interpreted; write a literal "
                            f"brace as '{{{{' or '}}}}'")
        pos = m.end()
    parts.append(template[pos:])
    return "".join(parts), n


def check_template(template: str, where: str = "") -> str:
    """``template`` itself if :func:`fill` accepts it: a string with at least one ``{}`` or ``{c}``, and no other
    brace than ``{{`` / ``}}``; else a DataError naming ``where`` (a file and line) and what is wrong."""
    if not isinstance(template, str):
        raise DataError(f"{where + ': ' if where else ''}template {template!r} is a {type(template).__name__}, not "
                        f"text")
    if _substitute(template, "", where)[1] == 0:
        raise DataError(f"{where + ': ' if where else ''}template {template!r} has no '{{}}' or '{{c}}' placeholder "
                        f"for the class name")
    return template


def get_templates(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Templates by set name (``openai``, ``simple``, ``fashion``; case-insensitive), from a text file, or a list of
    template strings; each is checked (:func:`check_template`), so a bad one is refused before any is filled."""
    if not isinstance(spec, (str, os.PathLike)):
        templates = [check_template(str(t), f"template {i + 1} of the list") for i, t in enumerate(spec)]
        if not templates:
            raise DataError("the template list is empty; give at least one template with '{}' or '{c}'")
        return templates
    name_or_path = spec
    key = str(name_or_path).strip().lower()
    if key == "openai":
        return _from_open_clip("OPENAI_IMAGENET_TEMPLATES")
    if key == "simple":
        return _from_open_clip("SIMPLE_IMAGENET_TEMPLATES")
    if key == "fashion":
        return list(FASHION_TEMPLATES)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise DataError(f"unknown template set {str(name_or_path)!r}: use one of {', '.join(TEMPLATE_SETS)} "
                        f"or the path of a text file with one template per line")
    templates = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            templates.append(check_template(line, f"{path}, line {n}"))
    if not templates:
        raise DataError(f"template file {path} has no templates (one per line, each with '{{}}' or '{{c}}')")
    return templates


def fill(template: str, classname: str) -> str:
    """The template with ``{}`` and ``{c}`` replaced by ``classname``, literally (see the module docstring):
    ``fill("a photo of a {}.", "sneaker") == "a photo of a sneaker."``. Nothing of the template or the name is
    interpreted; a brace other than a placeholder or ``{{`` / ``}}`` is a DataError."""
    return _substitute(template, str(classname))[0]
