"""Where the captions of synthetic pairs come from: class names × prompt templates, or a caption file.

* **Class names** (:func:`class_prompts`): image ``i`` shows class ``i mod C`` (so every prefix of the output is
  balanced), its caption a template drawn for it, seeded by ``(seed, i)``, and filled with the class name
  (:func:`parclip.data.templates.fill`). ``per_class`` images of each class, or ``n`` in total.
* **A caption file** (:func:`read_captions`, :func:`caption_prompts`): one caption per line, image ``i`` made from
  line ``i + 1``, so a row of the table leads back to its line. Empty (or blank) lines are an error that names them
  (they would break that correspondence silently), and so is a file without captions. For a class-conditional
  generator each caption must name exactly one of its classes by parclip's rule (:mod:`parclip.data.targets`); where
  one class's name sits inside another's ("shirt" in "t-shirt/top"), the longer match wins.

A prompt list is a sequence of :class:`~parclip.synth.base.Prompt`; a class-name list is computed per index, so a run
of millions of images holds no list of millions of captions.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.captions import DataError
from ..data.folder import read_classnames
from ..data.targets import target_pattern
from ..data.templates import fill, get_templates
from ..utils.files import sha256_file
from .base import Prompt

__all__ = ["ClassPrompts", "class_prompts", "read_captions", "caption_prompts", "class_of", "template_index",
           "make_prompts"]

MAX_EXAMPLES = 5


def template_index(seed: int, i: int, n_templates: int) -> int:
    """The template of image ``i``: a seeded draw from ``(seed, i)`` alone (not from a running random state), so a
    resumed run draws what an uninterrupted one does."""
    return int(np.random.default_rng([seed, i, 0]).integers(n_templates))


class ClassPrompts(Sequence):
    """``n`` prompts over ``classnames``: prompt ``i`` is class ``i mod C`` with a template drawn by
    :func:`template_index`; ``labels[c]`` is the label written for class ``c`` (its index in the generator's class
    list for a class-conditional generator, else ``c``)."""

    def __init__(self, classnames: Sequence[str], templates: Sequence[str], n: int, seed: int,
                 labels: Sequence[int] | None = None):
        self.classnames, self.templates, self.n, self.seed = list(classnames), list(templates), int(n), int(seed)
        self.labels = list(labels) if labels is not None else list(range(len(self.classnames)))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(f"prompt {i} of {self.n}")
        i %= self.n
        c = i % len(self.classnames)
        name = self.classnames[c]
        return Prompt(fill(self.templates[template_index(self.seed, i, len(self.templates))], name),
                      self.labels[c], name)


def class_prompts(classnames: Sequence[str], templates: Sequence[str], *, seed: int, n: int | None = None,
                  per_class: int | None = None, known: Sequence[str] | None = None) -> ClassPrompts:
    """The prompts of ``per_class`` images per class (or ``n`` in total). ``known``: a class-conditional generator's
    classes; every name must be one of them (its label is its index there)."""
    names = [c.strip() for c in classnames]
    if not names or not all(names):
        raise DataError("the class-name list is empty or has an empty name; give one class name per line")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise DataError(f"class names listed twice: {dupes}")
    if (n is None) == (per_class is None):
        raise DataError("with class names, give the number of images: --n N (in total) or --per-class N")
    labels = None
    if known is not None:
        missing = [c for c in names if c not in known]
        if missing:
            raise DataError(f"the generator does not know the classes {missing[:MAX_EXAMPLES]}; its classes: "
                            f"{', '.join(known)}")
        labels = [list(known).index(c) for c in names]
    total = n if n is not None else per_class * len(names)
    return ClassPrompts(names, templates, total, seed, labels)


def read_captions(path: str | os.PathLike) -> list[str]:
    """The captions of a UTF-8 text file, one per line (surrounding spaces stripped; a final newline is fine). A
    DataError for a missing or non-UTF-8 file, for empty lines (their count and first line numbers) and for a file
    without captions."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"caption file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"caption file {path} is not UTF-8 text: {e}") from e
    captions = [line.strip() for line in lines]
    empty = [k + 1 for k, c in enumerate(captions) if not c]
    if len(empty) == len(captions):
        raise DataError(f"caption file {path} has no captions (one caption per line)")
    if empty:
        raise DataError(f"caption file {path} has {len(empty)} empty line(s) (line {', '.join(map(str, empty[:10]))}"
                        f"{', ...' if len(empty) > 10 else ''}); image i is made from line i+1, so remove them "
                        f"(e.g. `grep -v '^[[:space:]]*$' {path.name} > clean.txt`)")
    return captions


def class_of(caption: str, patterns: Sequence) -> list[int]:
    """The classes ``caption`` names (indexes into ``patterns``, from :func:`~parclip.data.targets.target_pattern`);
    a class whose every match lies inside another class's match ("shirt" in "t-shirt/top") is left out."""
    spans = {c: [m.span() for m in p.finditer(caption)] for c, p in enumerate(patterns)}
    spans = {c: s for c, s in spans.items() if s}

    def inside(span, other: int) -> bool:
        return any(a <= span[0] and span[1] <= b and (a, b) != span for a, b in spans[other])

    return [c for c, s in spans.items() if not all(any(inside(sp, o) for o in spans if o != c) for sp in s)]


def caption_prompts(captions: Sequence[str], *, n: int | None = None, classnames: Sequence[str] | None = None,
                    where: str = "the caption file") -> list[Prompt]:
    """One prompt per caption (the first ``n`` when given). ``classnames`` (a class-conditional generator's): each
    caption gets the one class it names; captions naming none or several are refused, counted, with examples."""
    if n is not None:
        if n > len(captions):
            raise DataError(f"--n {n} but {where} has only {len(captions)} captions (one image per caption)")
        captions = captions[:n]
    if classnames is None:
        return [Prompt(c) for c in captions]
    patterns = [target_pattern(c) for c in classnames]
    prompts, none, several = [], [], []
    for k, caption in enumerate(captions):
        found = class_of(caption, patterns)
        if len(found) == 1:
            prompts.append(Prompt(caption, found[0], classnames[found[0]]))
        else:
            (none if not found else several).append((k + 1, caption, [classnames[c] for c in found]))
    if none or several:
        parts = []
        if none:
            parts.append(f"{len(none)} name none of its classes (line " + "; ".join(
                f"{line}: {c!r}" for line, c, _ in none[:MAX_EXAMPLES]) + ")")
        if several:
            parts.append(f"{len(several)} name several (line " + "; ".join(
                f"{line}: {c!r} names {found}" for line, c, found in several[:MAX_EXAMPLES]) + ")")
        raise DataError(f"the generator is class-conditional: each caption must name exactly one of its classes "
                        f"({', '.join(classnames)}), but of the {len(captions)} captions of {where} "
                        + " and ".join(parts) + ". Rewrite or drop those captions, or use a text-conditional "
                        "generator.")
    return prompts


def make_prompts(generator_classes: Sequence[str] | None, *, classnames: str | os.PathLike | None = None,
                 captions: str | os.PathLike | None = None, templates: str | os.PathLike = "simple",
                 n: int | None = None, per_class: int | None = None, seed: int = 0) -> tuple[Sequence[Prompt], dict]:
    """The prompts of a run and the description of their source for the manifest (``path`` keys are recorded, not
    compared on resume; checksums are). ``generator_classes``: a class-conditional generator's classes (None for a
    text generator). With ``captions``: one prompt per line. Otherwise class names (from the file ``classnames``,
    or the generator's own) × ``templates`` (a set name or a file), ``n`` in total or ``per_class`` each."""
    if captions is not None:
        if classnames is not None or per_class is not None:
            raise DataError("--captions makes one image per caption: drop --classnames and --per-class")
        lines = read_captions(captions)
        prompts = caption_prompts(lines, n=n, classnames=generator_classes, where=str(captions))
        source = {"kind": "captions", "path": str(Path(captions).resolve()), "sha256": sha256_file(captions),
                  "lines": len(lines), "n": n}
        if generator_classes is not None:
            source["classnames"] = list(generator_classes)
        return prompts, source
    if classnames is not None:
        names, origin = read_classnames(classnames), {"path": str(Path(classnames).resolve()),
                                                      "sha256": sha256_file(classnames)}
    elif generator_classes is not None:
        names, origin = list(generator_classes), {"from": "the generator"}
    else:
        raise DataError("a text-conditional generator needs a caption source: --classnames FILE (one class name per "
                        "line, captions from --templates) or --captions FILE (one caption per line)")
    chosen = get_templates(templates)
    is_file = isinstance(templates, (str, os.PathLike)) and Path(templates).expanduser().is_file()
    spec = {"path": str(Path(templates).expanduser().resolve())} if is_file else str(templates)
    prompts = class_prompts(names, chosen, seed=seed, n=n, per_class=per_class, known=generator_classes)
    source = {"kind": "classnames", "classnames": prompts.classnames, "labels": prompts.labels, **origin,
              "templates": chosen, "templates_from": spec, "n": n, "per_class": per_class}
    return prompts, source
