"""Training a small class-conditional generator on a caption table's images: :func:`train_generator`, the function a
protocol stage calls (and caches by its arguments) to get the generator it synthesises pairs with.

The table is parclip's default layout (tab-separated ``filepath``, ``title`` and, as the Fashion-MNIST export writes
it, ``label``: the class index). An image's class is its ``label``; a table without one gets the class its caption
names (:func:`parclip.data.targets.mentions`, a name inside another named one not counted: "a t-shirt" names
t-shirt, not shirt; a caption naming no class or several is an error). Only the table's
images are read: the caller decides which pairs the generator may learn from (for the PAR synthetic experiment: the
foundation's pre-training pairs, never the defender's held-out pairs, never triggered images).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from parclip.data import DataError
from parclip.data.captions import CAPTION_KEY, IMG_KEY, read_table
from parclip.data.targets import mentions

from .classcond import TrainedClassGenerator
from .cvae import train_cvae
from .pca_gauss import fit_pca_gauss

__all__ = ["FAMILIES", "DEFAULT_FAMILY", "read_class_images", "fit_family", "train_generator"]

logger = logging.getLogger("parclip")

# family -> (fit function, its default settings). The settings are those measured in docs/synth_quality.md.
FAMILIES = {
    "pca-gauss": (fit_pca_gauss, dict(clusters=32, components=8, residual_noise=False)),
    "cvae": (train_cvae, dict(epochs=5, batch_size=128, lr=2e-3, latent=16, width=32, temperature=1.0)),
}
DEFAULT_FAMILY = "pca-gauss"  # chosen by measurement (candidate pca-mix32): docs/synth_quality.md


def _class_of(row: dict, classnames: Sequence[str], where: str) -> int:
    """The class index of a table row: its ``label`` column, else the one class its caption names."""
    label = row.get("label", "")
    if label != "":
        try:
            k = int(label)
        except ValueError:
            raise DataError(f"{where}: label {label!r} is not a class index") from None
        if not 0 <= k < len(classnames):
            raise DataError(f"{where}: label {k} outside 0..{len(classnames) - 1}")
        return k
    named = [k for k, c in enumerate(classnames) if mentions(row[CAPTION_KEY], c)]
    # a name inside another named one is not a second class ("shirt" in "a t-shirt")
    named = [k for k in named if not any(j != k and classnames[k] in classnames[j] for j in named)]
    if len(named) != 1:
        raise DataError(f"{where}: caption {row[CAPTION_KEY]!r} names {len(named)} of the classes; a row needs a "
                        f"label column or a caption naming exactly one class")
    return named[0]


def read_class_images(table: str | os.PathLike, classnames: Sequence[str], *, size: int = 28,
                      limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 images [N, size, size], class indices [N])`` of a caption table's rows (greyscale; an image of
    another size is resized). ``limit``: the first rows only. Relative image paths are relative to the table."""
    table = Path(table)
    _, rows = read_table(table, columns=(IMG_KEY, CAPTION_KEY))
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise DataError(f"{table}: no rows to train a generator on")
    images = np.empty((len(rows), size, size), np.uint8)
    labels = np.empty(len(rows), np.int64)
    for i, row in enumerate(rows):
        where = f"{table} row {i + 2}"
        labels[i] = _class_of(row, classnames, where)
        path = Path(row[IMG_KEY]) if os.path.isabs(row[IMG_KEY]) else table.parent / row[IMG_KEY]
        try:
            with Image.open(path) as im:
                im = im.convert("L")
                images[i] = np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC))
        except OSError as e:
            raise DataError(f"{where}: cannot read image {path} ({e})") from e
    return images, labels


def fit_family(family: str, images: np.ndarray, labels: np.ndarray, classnames: Sequence[str], *, seed: int = 0,
               **options) -> TrainedClassGenerator:
    """A generator of ``family`` fitted to the images, with the family's defaults updated by ``options``."""
    if family not in FAMILIES:
        raise ValueError(f"generator family {family!r}; known: {', '.join(FAMILIES)}")
    fit, defaults = FAMILIES[family]
    return fit(images, labels, classnames, seed=seed, **{**defaults, **options})


def train_generator(pairs_table: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 0,
                    family: str = DEFAULT_FAMILY, classnames: Sequence[str] | None = None, size: int = 28,
                    limit: int | None = None, **options) -> Path:
    """Train a ``family`` generator on the images of ``pairs_table`` (classes: its label column or captions) and
    store it in ``out_dir``; returns the folder, loadable as ``load_generator(f"{family}:{folder}")``.
    ``classnames`` default to Fashion-MNIST's; ``options`` override the family's settings (FAMILIES)."""
    if classnames is None:
        from parclip.data.fashion_mnist import FASHION_CLASSES
        classnames = FASHION_CLASSES
    t0 = time.perf_counter()
    images, labels = read_class_images(pairs_table, classnames, size=size, limit=limit)
    gen = fit_family(family, images, labels, classnames, seed=seed, **options)
    gen.config.update(train_table=str(Path(pairs_table).absolute()), train_seconds=round(time.perf_counter() - t0, 1))
    logger.info("trained a %s generator on %d images in %.1f s", family, len(images), time.perf_counter() - t0)
    return gen.store(out_dir)
