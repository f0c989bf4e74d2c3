"""Prompt templates for zero-shot classification and for captions: format strings with one ``{}`` for the class name.

Sets: ``"openai"`` (the 80 OpenAI ImageNet templates, as shipped by open_clip), ``"simple"`` (open_clip's short set),
``"fashion"`` (ours, for small grey product photos such as Fashion-MNIST), or a path to a text file with one template
per line (blank lines and lines starting with ``#`` are ignored).
"""
from __future__ import annotations

import os
from pathlib import Path

from .captions import DataError

__all__ = ["get_templates", "fill", "TEMPLATE_SETS", "FASHION_TEMPLATES"]

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


def _check(template: str, where: str) -> str:
    if "{}" not in template:
        raise DataError(f"{where}: template {template!r} has no '{{}}' placeholder for the class name")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise DataError(f"{where}: template {template!r} is not a format string with one '{{}}' "
                        f"(write literal braces as '{{{{' and '}}}}'): {e}") from e
    return template


def get_templates(name_or_path: str | os.PathLike) -> list[str]:
    """Templates by set name (``openai``, ``simple``, ``fashion``; case-insensitive) or from a text file."""
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
            templates.append(_check(line, f"{path}, line {n}"))
    if not templates:
        raise DataError(f"template file {path} has no templates (one per line, each with '{{}}')")
    return templates


def fill(template: str, classname: str) -> str:
    """``fill("a photo of a {}.", "sneaker") == "a photo of a sneaker."``"""
    return template.format(classname)
