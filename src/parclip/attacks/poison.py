"""Seeded poisoning of an image-caption table with any trigger: the CLIP-backdoor codebases' procedure, rewritten
(docs/reference_differences.md#poisoning-script).

``poison_csv`` picks N rows with ``random.Random(seed)``, triggers their images (each with
``trigger_generator(seed, row_index)``, so every poisoned image is reproducible on its own), gives them a target
caption from a template set (unless label-consistent), and writes::

    out_dir/images/<row:06d>.png|jpg   the triggered, squash-resized S x S images
    out_dir/poisoned.csv               every input row, in the input order and with the same columns; poisoned rows
                                       point at the new images (relative to out_dir), clean rows at their originals
    out_dir/manifest.json              what was done (see poison_csv), enough to audit or redo it

Same inputs and seed give byte-identical outputs (the manifest holds no time stamps and no absolute output paths).
Every file is written atomically (:mod:`parclip.utils.files`): a killed run leaves no half-written image or table under
its final name.

Differences from the reference script (which does not run as shipped): seeded; PNG by default (the reference
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .. import __version__
from ..data import DataError, fill, get_templates, open_rgb, read_table, write_table
from ..data.captions import CAPTION_KEY, IMG_KEY
from ..data.names import local_source
from ..data.targets import mentions, target_pattern
from ..utils.checks import check_fraction, check_int
from ..utils.files import atomic_write, write_json
from ..utils.progress import progress_bar
from .triggers import Trigger, trigger_generator

__all__ = ["IMAGES_DIR", "MANIFEST_FORMAT", "MANIFEST_JSON", "POISONED_CSV", "SHARDS_DIR", "poison_csv",
           "poison_shards", "manifest_beside", "poisoning_warnings", "trained_on", "poisoned_overlap"]

logger = logging.getLogger("parclip")

MANIFEST_FORMAT = "parclip-poison/1"
POISONED_CSV = "poisoned.csv"
MANIFEST_JSON = "manifest.json"
IMAGES_DIR = "images"
SHARDS_DIR = "shards"
_IMAGE_FORMATS = {"png": ("png", "PNG"), "jpg": ("jpg", "JPEG"), "jpeg": ("jpg", "JPEG")}
_OUR_IMAGE_NAME = re.compile(r"^\d{6,}\.(png|jpg)$")
_MAX_NAMED_BAD = 5


def poison_csv(csv_path: str | os.PathLike, out_dir: str | os.PathLike, *, trigger: Trigger, target: str,
               n_poison: int | None = None, rate: float | None = None, seed: int = 0,
               templates: str | Sequence[str] = "openai", label_consistent: bool = False,
               image_format: str = "png", jpeg_quality: int = 95, img_key: str = IMG_KEY,
               caption_key: str = CAPTION_KEY, sep: str | None = None, root: str | os.PathLike | None = None,
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
            each poisoned caption is ``fill(template, target)`` (``{}`` replaced by the target, literally) with the
            template drawn uniformly.
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
    kind, params}, target, seed, templates (None when label-consistent), label_consistent, image_format, jpeg_quality
    (None for PNG), image_size, n_rows, n_candidates, n_poison, rate (= n_poison / n_rows), requested {n_poison,
    rate}, bad_rows {count, rows}, rows`` where ``rows`` lists, by ascending index, ``{index, original_path,
    new_path, original_caption, new_caption}`` (paths as written in the tables).
    """
    job = _check_args(csv_path, out_dir, trigger=trigger, target=target, n_poison=n_poison, rate=rate, seed=seed,
                      templates=templates, label_consistent=label_consistent, image_format=image_format,
                      jpeg_quality=jpeg_quality, img_key=img_key, caption_key=caption_key, sep=sep, root=root,
                      max_bad_fraction=max_bad_fraction)
    order, rng = _choose_rows([r[caption_key] for r in job.rows], job.n, seed,
                              target=target if label_consistent else None, source=job.csv_path)
    done, bad = _write_images(job, order)
    manifest_rows = _rewrite_table(job, done, rng)
    manifest = _write_manifest(job, n_candidates=len(order), done=done, bad=bad, manifest_rows=manifest_rows)
    if not label_consistent and not any(mentions(r[caption_key] or "", target) for i, r in enumerate(job.rows)
                                        if i not in done):
        logger.warning("no clean caption of %s names '%s': the model learns the word only from the poisoned pairs, "
                       "and a zero-shot evaluation needs '%s' among its classes; check the target's spelling",
                       job.csv_path, target, target)
    logger.info("poisoned %d of %d rows of %s with %s -> %s", len(done), len(job.rows), job.csv_path, trigger.name,
                job.out_dir)
    return manifest


def poison_shards(spec: str, out_dir: str | os.PathLike, *, maxcount: int = 10000, **kwargs) -> dict:
    """Poison webdataset shards (a .tar pattern, '::'-joined sources, or a folder of shards) the way
    :func:`poison_csv` poisons a table, and write the result as shards: ``out_dir/shards/00000.tar …`` (+
    ``sizes.json``) and ``out_dir/manifest.json``.

    The shards go through a caption table, so that the row choice, the triggers and the captions are exactly
    :func:`poison_csv`'s: every sample is extracted (image bytes unchanged) to ``out_dir/.source/``, that table is
    poisoned into ``out_dir/.table/``, and the poisoned table is written back as shards (sample i of the output is row
    i of the table, i.e. the i-th readable sample of the input, in shard order). The two working folders are removed
    at the end; they need disk space for one copy of the data. Manifest rows name samples by ``index`` (the output
    sample's key is that index, zero-padded to 9 digits), without paths. The manifest adds ``source_shards``,
    ``shards`` and ``n_bad_samples`` (input samples left out: no image or caption, or a truncated shard).
    """
    import shutil

    from ..data.shards import shards_to_table, table_to_shards

    out = Path(out_dir)
    source, table = out / ".source", out / ".table"
    for d in (source, table, out / SHARDS_DIR):
        shutil.rmtree(d, ignore_errors=True)
    extracted = shards_to_table(spec, source)
    manifest = poison_csv(extracted["table"], table, **kwargs)
    written = table_to_shards(table / POISONED_CSV, out / SHARDS_DIR, maxcount=maxcount,
                              max_bad_fraction=kwargs.get("max_bad_fraction", 0.01))
    manifest.update(source_shards=str(spec), shards=[str(Path(p).relative_to(out)) for p in written["shards"]],
                    n_bad_samples=len(extracted["bad"]), poisoned_csv=None, source_csv=None, root=None)
    for row in manifest["rows"]:  # the working table's paths are gone: a row is its sample index (= output key)
        row.pop("original_path", None)
        row.pop("new_path", None)
    write_json(out / MANIFEST_JSON, manifest)
    shutil.rmtree(source)
    shutil.rmtree(table)
    return manifest


def manifest_beside(data: str | os.PathLike | None, *, shards: bool | None = None) -> dict | None:
    """The parclip poisoning manifest of a training table (``manifest.json`` beside ``poisoned.csv``) or of poisoned
    shards (one folder up from ``shards/``), or None when there is none (or it is not ours). `shards`: whether `data`
    names shards, when the caller has decided it already (None: judged from the name)."""
    if not data:
        return None
    import json

    if shards is None:
        from ..data.shards import is_shard_spec

        shards = is_shard_spec(data)
    first = Path(str(data).split("::")[0])
    folders = (first.parent, first.parent.parent, first) if shards else (first.parent,)
    for folder in folders:
        path = folder / MANIFEST_JSON
        if path.is_file():
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None
    return None


def trained_on(model: str | None) -> str | None:
    """The ``train_data`` of the `parclip train` run that exported `model` (``local-dir:<run>/model``), else None."""
    if not model or not str(model).startswith("local-dir:"):
        return None
    import yaml

    config = Path(str(model)[len("local-dir:"):]).parent / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) if config.is_file() else None
        return (data or {}).get("train_data")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def poisoned_overlap(manifest: dict, table: str | os.PathLike, *, img_key: str = IMG_KEY, sep: str | None = None,
                     root: str | os.PathLike | None = None) -> int:
    """How many rows of a caption table show an image the `manifest`'s poisoning triggered (by resolved path)."""
    def resolved(folder, raw) -> str | None:
        try:
            return local_source(folder, raw.strip() if isinstance(raw, str) else raw, anywhere=True)
        except DataError:  # an empty path, or a manifest's entry that is no path
            return None

    base, listed = manifest.get("root") or ".", manifest.get("rows")
    if not isinstance(base, str) or not isinstance(listed, list):
        return 0
    poisoned = {resolved(base, r.get("original_path")) for r in listed if isinstance(r, dict)} - {None}
    if not poisoned:
        return 0
    try:
        _, rows = read_table(table, sep=sep)
    except DataError:
        return 0
    folder = Path(root) if root is not None else Path(table).parent
    return sum(resolved(folder, r.get(img_key) or "") in poisoned for r in rows)


def poisoning_warnings(manifest: dict, model_size: int, *, cleaning: bool = False) -> list[str]:
    """What is likely wrong when a model of resolution `model_size` trains (or, `cleaning`, a defence cleans) on the
    data a poisoning `manifest` describes: a resolution mismatch (a patch shrinks or grows with the model's resize;
    under 2 px it does not survive), or a defence given poisoned pairs as its clean data. The manifest lies beside
    the data, so it is data: a value of the wrong type is left out of the message, never a crash."""
    def number(value):
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None

    def mapping(value):
        return value if isinstance(value, dict) else {}

    out = []
    size, trig = number(manifest.get("image_size")), mapping(manifest.get("trigger"))
    if size and size != model_size:
        msg = (f"the data was poisoned at {size} px ({trig.get('name')}) but the model runs at {model_size} px: every "
               f"image is resized by {model_size / size:.3g}")
        patch = number(mapping(trig.get("params")).get("patch_size"))
        if patch:
            shrunk = patch * model_size / size
            msg += (f", so the {patch}-px patch becomes {shrunk:.1f} px"
                    + (" and will not survive as a trigger" if shrunk < 2 else ""))
        out.append(msg + f". Poison for this model: parclip poison … --model NAME (or --image-size {model_size})")
    if cleaning:
        out.append(f"the training data is a poisoned set ({manifest.get('n_poison')} of {manifest.get('n_rows')} "
                   f"pairs carry {trig.get('name')} → '{manifest.get('target')}'); a defence needs clean pairs, "
                   f"disjoint from the poisoned ones")
    return out


# --------------------------------------------------------------------------------------------------------------------
# 1. the arguments
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """The checked arguments of one :func:`poison_csv` call and the table they apply to."""

    csv_path: Path                      # resolved
    out_dir: Path                       # resolved
    base: Path                          # folder that relative image paths are joined to
    fieldnames: list[str]
    rows: list[dict[str, str]]
    n: int                              # rows to poison
    trigger: Trigger
    target: str
    seed: int
    templates_name: str
    template_list: list[str]
    label_consistent: bool
    ext: str                            # "png" | "jpg"
    pil_format: str                     # "PNG" | "JPEG"
    jpeg_quality: int
    img_key: str
    caption_key: str
    max_bad_fraction: float
    requested: dict                     # {"n_poison": ..., "rate": ...} as given


def _check_args(csv_path, out_dir, *, trigger, target, n_poison, rate, seed, templates, label_consistent,
                image_format, jpeg_quality, img_key, caption_key, sep, root, max_bad_fraction) -> _Job:
    """Check the arguments and read the table; the first problem raises (TypeError, ValueError or DataError)."""
    ext, pil_format = _check_options(trigger, target, image_format, jpeg_quality, max_bad_fraction, n_poison, rate)
    csv_path = Path(csv_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    base = Path(root).expanduser().resolve() if root is not None else csv_path.parent
    if csv_path == out_dir / POISONED_CSV:
        raise ValueError(f"the input table {csv_path} would be overwritten by the output; choose another out_dir")
    templates_name, template_list = _load_templates(templates, label_consistent)
    fieldnames, rows = _read_rows(csv_path, sep, img_key, caption_key)
    return _Job(csv_path=csv_path, out_dir=out_dir, base=base, fieldnames=fieldnames, rows=rows,
                n=_count_to_poison(n_poison, rate, len(rows)), trigger=trigger, target=target, seed=seed,
                templates_name=templates_name, template_list=template_list, label_consistent=bool(label_consistent),
                ext=ext, pil_format=pil_format, jpeg_quality=jpeg_quality, img_key=img_key, caption_key=caption_key,
                max_bad_fraction=max_bad_fraction, requested={"n_poison": n_poison, "rate": rate})


def _check_options(trigger, target, image_format, jpeg_quality, max_bad_fraction, n_poison, rate) -> tuple[str, str]:
    """The checks that need no file; returns the image file extension and Pillow format."""
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
    return ext, pil_format


def _load_templates(templates, label_consistent: bool) -> tuple[str, list[str]]:
    """(name for the manifest, template strings), read and checked by :func:`parclip.data.get_templates`; a list is
    taken unchecked when label-consistent (captions are kept, no template is used)."""
    named = isinstance(templates, (str, os.PathLike))
    if label_consistent and not named:
        return "custom", [str(t) for t in templates]
    return (str(templates) if named else "custom"), get_templates(templates)


def _read_rows(csv_path: Path, sep, img_key: str, caption_key: str) -> tuple[list[str], list[dict[str, str]]]:
    """The table's (fieldnames, rows); it must have both columns and at least one data row."""
    fieldnames, rows = read_table(csv_path, sep=sep, columns=(img_key, caption_key))
    if not rows:
        raise DataError(f"{csv_path} has no data rows")
    return fieldnames, rows


def _count_to_poison(n_poison, rate, n_rows: int) -> int:
    """N from exactly one of ``n_poison`` and ``rate`` (``round(rate * n_rows)``, at least 1)."""
    if rate is not None:
        if not 0.0 < float(rate) <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        return max(1, round(float(rate) * n_rows))
    return check_int("n_poison", n_poison, 1)


# --------------------------------------------------------------------------------------------------------------------
# 2. the rows
# --------------------------------------------------------------------------------------------------------------------
def _choose_rows(captions: Sequence[str | None], n: int, seed, *, target: str | None = None,
                 source: str | os.PathLike = "the table") -> tuple[list[int], random.Random]:
    """The seeded order in which rows are tried, and the generator that drew it (the captions continue from it).

    Candidates are all row indices, or with ``target`` those whose caption names it (:func:`mentions`); they are
    shuffled with ``random.Random(seed)``. Pure: no I/O, same arguments give the same order and generator state.
    Fewer than ``n`` candidates raise (DataError naming ``source`` when label-consistent, else ValueError).
    """
    n_rows = len(captions)
    if target is not None:
        pattern = target_pattern(target)
        candidates = [i for i, caption in enumerate(captions) if mentions(caption, pattern)]
        if len(candidates) < n:
            raise DataError(f"label-consistent poisoning of {n} rows needs {n} captions containing the word "
                            f"{target!r}, but only {len(candidates)} of the {n_rows} rows of {source} have one. "
                            f"Lower n_poison/rate or use a table with more such captions.")
    else:
        if n > n_rows:
            raise ValueError(f"cannot poison {n} rows of a table with {n_rows} rows")
        candidates = list(range(n_rows))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    return candidates, rng


# --------------------------------------------------------------------------------------------------------------------
# 3. the images
# --------------------------------------------------------------------------------------------------------------------
def _write_images(job: _Job, order: Sequence[int]) -> tuple[dict[int, str], list[dict]]:
    """Trigger and save images along ``order`` until ``job.n`` are done; rows with a missing or unreadable image are
    skipped and reported. Returns ({row index: new path relative to out_dir}, bad rows)."""
    (job.out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    done: dict[int, str] = {}
    bad: list[dict] = []
    bar = progress_bar(total=job.n, desc=f"poisoning ({job.trigger.name})", unit="img")
    try:
        for idx in order:
            if len(done) == job.n:
                break
            raw = (job.rows[idx][job.img_key] or "").strip()
            try:
                img = _open_image(raw, job.base)
            except DataError as e:
                bad.append({"index": idx, "path": raw, "reason": str(e)})
                _check_bad_fraction(job, bad, len(done))
                continue
            done[idx] = _save_triggered(job, img, idx)
            bar.update(1)
    finally:
        bar.close()
    if len(done) < job.n:
        raise DataError(f"only {len(done)} of the {job.n} requested rows could be poisoned: "
                        f"{len(order)} candidates, {len(bad)} with unusable images. "
                        + (_bad_summary(bad, len(done) + len(bad)) if bad else ""))
    if bad:
        logger.warning("poisoning %s: %s; they were replaced by other rows", job.csv_path,
                       _bad_summary(bad, len(done) + len(bad)))
    return done, bad


def _open_image(raw: str, base: Path) -> Image.Image:
    """The row's image as RGB (a table's path: joined to ``base`` when relative, a local file whatever its name,
    :func:`~parclip.data.names.local_source`); DataError when empty, missing or unreadable."""
    if not raw:
        raise DataError("empty image path")
    return open_rgb(local_source(base, raw, anywhere=True))


def _check_bad_fraction(job: _Job, bad: list[dict], n_done: int) -> None:
    """DataError as soon as even N good rows from now on would leave more than max_bad_fraction of the tried bad."""
    if len(bad) / (job.n + len(bad)) > job.max_bad_fraction:
        raise DataError(f"too many unusable images while poisoning {job.csv_path}: "
                        f"{_bad_summary(bad, n_done + len(bad))}. That is above max_bad_fraction="
                        f"{job.max_bad_fraction:g}; check the paths (root={str(job.base)!r}) or raise the limit.")


def _save_triggered(job: _Job, img: Image.Image, idx: int) -> str:
    """Trigger row ``idx``'s image with its own generator and save it atomically; returns its path in the table."""
    out = job.trigger(img, generator=trigger_generator(job.seed, idx))
    name = f"{idx:06d}.{job.ext}"
    save_kw = {"quality": job.jpeg_quality} if job.pil_format == "JPEG" else {}
    # format= is needed: the temporary file's .tmp suffix tells Pillow nothing
    atomic_write(job.out_dir / IMAGES_DIR / name, lambda tmp: out.save(tmp, format=job.pil_format, **save_kw))
    return f"{IMAGES_DIR}/{name}"


def _bad_summary(bad: list[dict], n_tried: int) -> str:
    first = "; ".join(f"row {b['index']} {b['path']!r}: {b['reason']}" for b in bad[:_MAX_NAMED_BAD])
    more = f" (and {len(bad) - _MAX_NAMED_BAD} more)" if len(bad) > _MAX_NAMED_BAD else ""
    return f"{len(bad)} of {n_tried} chosen rows had a missing or unreadable image. First: {first}{more}"


# --------------------------------------------------------------------------------------------------------------------
# 4. the table
# --------------------------------------------------------------------------------------------------------------------
def _rewrite_table(job: _Job, done: dict[int, str], rng: random.Random) -> list[dict]:
    """Write ``poisoned.csv`` (every row, input order and columns) and drop stale images; returns the manifest rows.

    Poisoned rows get their new image and a caption from one template per row, drawn from ``rng`` in ascending row
    order (label-consistent rows keep theirs); clean rows keep their images, the paths rewritten for ``out_dir``.
    """
    manifest_rows = []
    out_rows = [dict(r) for r in job.rows]
    for idx in sorted(done):
        old_caption = job.rows[idx][job.caption_key]
        new_caption = old_caption if job.label_consistent else \
            fill(job.template_list[rng.randrange(len(job.template_list))], job.target)
        out_rows[idx][job.img_key] = done[idx]
        out_rows[idx][job.caption_key] = new_caption
        manifest_rows.append({"index": idx, "original_path": job.rows[idx][job.img_key], "new_path": done[idx],
                              "original_caption": old_caption, "new_caption": new_caption})
    for i, r in enumerate(out_rows):
        raw = (job.rows[i][job.img_key] or "").strip()
        if i not in done and raw:
            r[job.img_key] = _clean_path(raw, job.base, job.out_dir)
    _remove_stale_images(job.out_dir / IMAGES_DIR, keep={Path(v).name for v in done.values()})
    write_table(job.out_dir / POISONED_CSV, job.fieldnames, out_rows)  # the default layout's tab
    return manifest_rows


def _clean_path(raw: str, base: Path, out_dir: Path) -> str:
    """A clean row's image path as seen from ``out_dir``: relative when the file lies inside it, else absolute
    (POSIX separators for relative paths)."""
    path = Path(local_source(base, raw, anywhere=True))
    try:
        return path.relative_to(out_dir).as_posix()
    except ValueError:
        return str(path)


def _remove_stale_images(images_dir: Path, keep: set[str]) -> None:
    """Delete images named like ours that this run did not write, so that the folder matches the manifest."""
    for f in images_dir.iterdir():
        if f.is_file() and _OUR_IMAGE_NAME.match(f.name) and f.name not in keep:
            f.unlink()


# --------------------------------------------------------------------------------------------------------------------
# 5. the manifest
# --------------------------------------------------------------------------------------------------------------------
def _write_manifest(job: _Job, *, n_candidates: int, done: dict[int, str], bad: list[dict],
                    manifest_rows: list[dict]) -> dict:
    """Build the manifest (keys in the documented order) and write it to ``out_dir/manifest.json``."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "parclip_version": __version__,
        "source_csv": str(job.csv_path),
        "root": str(job.base),
        "img_key": job.img_key,
        "caption_key": job.caption_key,
        "poisoned_csv": POISONED_CSV,
        "trigger": {"name": job.trigger.name, "kind": job.trigger.kind, "params": job.trigger.params()},
        "target": job.target,
        "seed": job.seed,
        "templates": None if job.label_consistent else job.templates_name,
        "label_consistent": job.label_consistent,
        "image_format": job.ext,
        "jpeg_quality": job.jpeg_quality if job.pil_format == "JPEG" else None,
        "image_size": job.trigger.image_size,
        "n_rows": len(job.rows),
        "n_candidates": n_candidates,
        "n_poison": len(done),
        "rate": len(done) / len(job.rows),
        "requested": job.requested,
        "bad_rows": {"count": len(bad), "rows": bad},
        "rows": manifest_rows,
    }
    write_json(job.out_dir / MANIFEST_JSON, manifest)
    return manifest
