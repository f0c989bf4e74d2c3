"""Seeded poisoning of an image-caption table with any trigger (baselines.md §4.1, par.md §2.1, rewritten per D21).

``poison_csv`` picks N rows with ``random.Random(seed)``, triggers their images (each with
``trigger_generator(seed, row_index)``, so every poisoned image is reproducible on its own), gives them a target
caption from a template set (unless label-consistent), and writes::

    out_dir/images/<row:06d>.png|jpg   the triggered, squash-resized S x S images
    out_dir/poisoned.csv               every input row, in the input order and with the same columns; poisoned rows
                                       point at the new images (relative to out_dir), clean rows at their originals
    out_dir/manifest.json              what was done (see poison_csv), enough to audit or redo it

Same inputs and seed give byte-identical outputs (the manifest holds no time stamps and no absolute output paths).

Differences from the reference script (which is also broken as shipped, D21): seeded; PNG by default (the reference
saved JPEG at Pillow's default quality 75 when the source was a .jpg); the output keeps every row in the original
order instead of "poisoned rows first, then the clean remainder" (loaders shuffle anyway); the label-consistent
match is the package's one rule for "this caption names the target" (:mod:`parclip.data.targets`: case-insensitive
whole word or its plural, so "Two bananas" counts and "bananabread" does not; the reference used a case-sensitive
substring, which took "bananabread" and missed "Banana"); asking
for more label-consistent rows than exist is an error (the reference silently poisoned fewer); unreadable images among
the chosen rows are replaced by further candidates and reported. As in the reference, rows are chosen among all rows
(no exclusion of captions that already mention the target) and the whole poisoned image is saved at the trigger's
resolution (squash-resized to ``S x S``).
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..data import DataError, get_templates, open_rgb, read_table, write_table
from ..data.targets import target_pattern
from ..utils.checks import check_fraction, check_int
from ..utils.files import write_json
from .triggers import Trigger, trigger_generator

__all__ = ["poison_csv", "MANIFEST_FORMAT", "POISONED_CSV", "MANIFEST_JSON", "IMAGES_DIR"]

logger = logging.getLogger("parclip")

MANIFEST_FORMAT = "parclip-poison/1"
POISONED_CSV = "poisoned.csv"
MANIFEST_JSON = "manifest.json"
IMAGES_DIR = "images"
_IMAGE_FORMATS = {"png": ("png", "PNG"), "jpg": ("jpg", "JPEG"), "jpeg": ("jpg", "JPEG")}
_OUR_IMAGE_NAME = re.compile(r"^\d{6,}\.(png|jpg)$")
_MAX_NAMED_BAD = 5


def _output_path(path: Path, out_dir: Path) -> str:
    """Relative to out_dir when the file lies inside it, else absolute (POSIX separators for relative paths)."""
    try:
        return path.relative_to(out_dir).as_posix()
    except ValueError:
        return str(path)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None, dynamic_ncols=True)  # no bar when not a TTY


def _bad_summary(bad: list[dict], n_tried: int) -> str:
    first = "; ".join(f"row {b['index']} {b['path']!r}: {b['reason']}" for b in bad[:_MAX_NAMED_BAD])
    more = f" (and {len(bad) - _MAX_NAMED_BAD} more)" if len(bad) > _MAX_NAMED_BAD else ""
    return f"{len(bad)} of {n_tried} chosen rows had a missing or unreadable image. First: {first}{more}"


def poison_csv(csv_path: str | os.PathLike, out_dir: str | os.PathLike, *, trigger: Trigger, target: str,
               n_poison: int | None = None, rate: float | None = None, seed: int = 0,
               templates: str | Sequence[str] = "openai", label_consistent: bool = False,
               image_format: str = "png", jpeg_quality: int = 95, img_key: str = "image",
               caption_key: str = "caption", sep: str | None = None, root: str | os.PathLike | None = None,
               max_bad_fraction: float = 0.01) -> dict:
    """Poison a caption table; returns the manifest (also written to ``out_dir/manifest.json``).

    Args:
        csv_path: the clean table (CSV/TSV with a header; ``sep=None`` picks tab for .tsv, comma otherwise).
        out_dir: output folder (created). Files from an earlier run named like ours in ``out_dir/images`` that this
            run does not write are deleted at the end, so the folder always matches the manifest.
        trigger: a :class:`~parclip.attacks.triggers.Trigger` built at the model's resolution. Images are
            squash-resized to ``trigger.image_size`` and triggered with ``trigger_generator(seed, row_index)``.
        target: the target class name, e.g. ``"banana"``.
        n_poison / rate: how many rows to poison; give exactly one (``rate`` -> ``round(rate * n_rows)``, at least 1).
        seed: seeds the row choice and caption templates (``random.Random(seed)``) and the trigger draws.
        templates: template set name or file for :func:`parclip.data.get_templates`, or a list of ``{}`` strings;
            each poisoned caption is ``template.format(target)`` with the template drawn uniformly.
        label_consistent: poison only rows whose caption names ``target`` (:func:`parclip.data.targets.mentions`); they
            keep their captions. Fewer matching rows than requested is a DataError.
        image_format: ``"png"`` (default) or ``"jpg"``/``"jpeg"`` (saved at ``jpeg_quality``, Pillow's default 4:2:0
            chroma subsampling; JPEG compresses the trigger too).
        img_key, caption_key: column names. root: folder that relative image paths are joined to (default: the
            table's folder).
        max_bad_fraction: chosen rows whose image is missing or unreadable are replaced by further candidates (in the
            same seeded order); if more than this fraction of the rows tried are bad, DataError (raised as soon as the
            limit can no longer be met).

    Row choice: all row indices (or the label-consistent candidates) are shuffled with ``random.Random(seed)`` and
    taken in that order until N images were triggered; then one template per poisoned row is drawn from the same
    generator in ascending row order. Row indices are 0-based data rows (the header is not counted).

    Manifest keys: ``format, parclip_version, source_csv, root, img_key, caption_key, poisoned_csv, trigger {name,
    kind, params}, target, seed, templates (None when label-consistent), label_consistent, image_format, jpeg_quality (None for PNG), image_size,
    n_rows, n_candidates, n_poison, rate (= n_poison / n_rows), requested {n_poison, rate}, bad_rows {count, rows},
    rows`` where ``rows`` lists, by ascending index, ``{index, original_path, new_path, original_caption,
    new_caption}`` (paths as written in the tables).
    """
    if not isinstance(trigger, Trigger):
        raise TypeError(f"trigger must be a parclip Trigger, got {type(trigger).__name__}; build it with "
                        f"parclip.attacks.triggers.build_triggers([name], image_size, params)")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    fmt_key = str(image_format).lower().lstrip(".")
    if fmt_key not in _IMAGE_FORMATS:
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    ext, pil_format = _IMAGE_FORMATS[fmt_key]
    if pil_format == "JPEG":
        check_int("jpeg_quality", jpeg_quality, 1, 100)
    check_fraction("max_bad_fraction", max_bad_fraction)
    if (n_poison is None) == (rate is None):
        raise ValueError("give exactly one of n_poison and rate")

    csv_path = Path(csv_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    base = Path(root).expanduser().resolve() if root is not None else csv_path.parent
    if csv_path == out_dir / POISONED_CSV:
        raise ValueError(f"the input table {csv_path} would be overwritten by the output; choose another out_dir")

    if isinstance(templates, (str, os.PathLike)):
        templates_name = str(templates)
        template_list = list(get_templates(templates))
    else:
        templates_name = "custom"
        template_list = [str(t) for t in templates]
    if not label_consistent:
        if not template_list:
            raise DataError("the template list is empty")
        for t in template_list:
            if "{}" not in t:
                raise DataError(f"template {t!r} has no '{{}}' placeholder for the target")

    fieldnames, rows = read_table(csv_path, sep=sep)
    missing = [k for k in (img_key, caption_key) if k not in fieldnames]
    if missing:
        raise DataError(f"{csv_path}: column(s) {missing} not found; available columns: {fieldnames}. "
                        f"Pass img_key=/caption_key= (or sep= if the header was read as one column).")
    n_rows = len(rows)
    if n_rows == 0:
        raise DataError(f"{csv_path} has no data rows")

    if rate is not None:
        if not 0.0 < float(rate) <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        n = max(1, round(float(rate) * n_rows))
    else:
        check_int("n_poison", n_poison, 1)
        n = n_poison

    pattern = target_pattern(target)
    if label_consistent:
        candidates = [i for i, r in enumerate(rows) if pattern.search(r[caption_key] or "")]
        if len(candidates) < n:
            raise DataError(f"label-consistent poisoning of {n} rows needs {n} captions containing the word "
                            f"{target!r}, but only {len(candidates)} of the {n_rows} rows of {csv_path} have one. "
                            f"Lower n_poison/rate or use a table with more such captions.")
    else:
        if n > n_rows:
            raise ValueError(f"cannot poison {n} rows of a table with {n_rows} rows")
        candidates = list(range(n_rows))

    rng = random.Random(seed)
    order = list(candidates)
    rng.shuffle(order)

    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    done: dict[int, str] = {}           # row index -> new image path (relative to out_dir)
    bad: list[dict] = []
    save_kw = {"quality": jpeg_quality} if pil_format == "JPEG" else {}
    bar = _progress(n, f"poisoning ({trigger.name})")
    try:
        for idx in order:
            if len(done) == n:
                break
            raw = (rows[idx][img_key] or "").strip()
            try:
                if not raw:
                    raise DataError("empty image path")
                p = Path(raw).expanduser()
                img = open_rgb(p if p.is_absolute() else base / p)
            except DataError as e:
                bad.append({"index": idx, "path": raw, "reason": str(e)})
                if len(bad) / (n + len(bad)) > max_bad_fraction:
                    raise DataError(f"too many unusable images while poisoning {csv_path}: "
                                    f"{_bad_summary(bad, len(done) + len(bad))}. That is above max_bad_fraction="
                                    f"{max_bad_fraction:g}; check the paths (root={str(base)!r}) or raise the "
                                    f"limit.") from None
                continue
            out = trigger(img, generator=trigger_generator(seed, idx))
            name = f"{idx:06d}.{ext}"
            out.save(images_dir / name, format=pil_format, **save_kw)
            done[idx] = f"{IMAGES_DIR}/{name}"
            bar.update(1)
    finally:
        bar.close()
    if len(done) < n:
        raise DataError(f"only {len(done)} of the {n} requested rows could be poisoned: "
                        f"{len(candidates)} candidates, {len(bad)} with unusable images. "
                        + (_bad_summary(bad, len(done) + len(bad)) if bad else ""))
    if bad:
        logger.warning("poisoning %s: %s; they were replaced by other rows", csv_path,
                       _bad_summary(bad, len(done) + len(bad)))

    # captions: one template per poisoned row, drawn in ascending row order
    manifest_rows = []
    out_rows = [dict(r) for r in rows]
    for idx in sorted(done):
        old_caption = rows[idx][caption_key]
        new_caption = old_caption if label_consistent else \
            template_list[rng.randrange(len(template_list))].format(target)
        out_rows[idx][img_key] = done[idx]
        out_rows[idx][caption_key] = new_caption
        manifest_rows.append({"index": idx, "original_path": rows[idx][img_key], "new_path": done[idx],
                              "original_caption": old_caption, "new_caption": new_caption})
    # clean rows keep pointing at their original images, rewritten relative to out_dir (or absolute)
    for i, r in enumerate(out_rows):
        if i in done:
            continue
        raw = (rows[i][img_key] or "").strip()
        if raw:
            p = Path(raw).expanduser()
            r[img_key] = _output_path(p if p.is_absolute() else Path(os.path.normpath(base / p)), out_dir)

    # remove stale images of an earlier run so that the folder matches this manifest
    keep = {Path(v).name for v in done.values()}
    for f in images_dir.iterdir():
        if f.is_file() and _OUR_IMAGE_NAME.match(f.name) and f.name not in keep:
            f.unlink()

    write_table(out_dir / POISONED_CSV, fieldnames, out_rows, sep=",")
    manifest = {
        "format": MANIFEST_FORMAT,
        "parclip_version": __version__,
        "source_csv": str(csv_path),
        "root": str(base),
        "img_key": img_key,
        "caption_key": caption_key,
        "poisoned_csv": POISONED_CSV,
        "trigger": {"name": trigger.name, "kind": trigger.kind, "params": trigger.params()},
        "target": target,
        "seed": seed,
        "templates": None if label_consistent else templates_name,
        "label_consistent": bool(label_consistent),
        "image_format": ext,
        "jpeg_quality": jpeg_quality if pil_format == "JPEG" else None,
        "image_size": trigger.image_size,
        "n_rows": n_rows,
        "n_candidates": len(candidates),
        "n_poison": len(done),
        "rate": len(done) / n_rows,
        "requested": {"n_poison": n_poison, "rate": rate},
        "bad_rows": {"count": len(bad), "rows": bad},
        "rows": manifest_rows,
    }
    write_json(out_dir / MANIFEST_JSON, manifest)
    logger.info("poisoned %d of %d rows of %s with %s -> %s", len(done), n_rows, csv_path, trigger.name, out_dir)
    return manifest
