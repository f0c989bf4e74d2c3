"""Fashion-MNIST (Zalando Research, MIT licence) from Debian's ``dataset-fashion-mnist`` package, exported as a caption
table for CLIP training plus a labelled test folder for zero-shot evaluation.

Layout written by :func:`export` under ``out_dir``::

    images/train/00000.png ...      the train split (28x28 greyscale PNG; the loaders convert to RGB)
    train.csv                       filepath<TAB>title<TAB>label (the default table layout, open_clip's) for the first len-holdout train images (paths relative to out_dir)
    holdout.csv                     the same for the last `holdout` train images: the defender's clean set (disjoint)
    test/<class_folder>/00000.png   the test split as a labelled folder (file name = index in the test split)
    retrieval.csv                   filepath, title, label for the first `retrieval_images` test images, `RETRIEVAL_CAPTIONS`
                                    captions each (the same distinct templates for every image): a retrieval test
                                    set in the COCO layout
    fashion_mnist.json              what was exported (counts, classes, templates, seed, source, licence)

Captions are a template drawn at random (seeded) and filled with the class name: "a photo of a sneaker.". The ``label``
column is the Fashion-MNIST label (index into :data:`FASHION_CLASSES`). The test folders are named after the classes
with spaces as ``_`` (``ankle_boot``), so :class:`~parclip.data.LabelledFolder` gives them back their names; note that
its labels follow the *sorted folder* order (``ankle boot, bag, coat, ...``), which the export returns as
``test_classnames``.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..utils.files import write_json
from ..utils.progress import progress_bar
from .captions import CAPTION_KEY, IMG_KEY, DataError, write_table
from .templates import fill, get_templates

__all__ = ["FASHION_CLASSES", "DATA_DIR", "load_arrays", "export", "folder_name"]

logger = logging.getLogger("parclip")

#: where Debian's dataset-fashion-mnist installs the idx files (tests monkeypatch this)
DATA_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
LICENSE = "MIT (Zalando Research, https://github.com/zalandoresearch/fashion-mnist)"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
_FORMATS = {"png": ("PNG", {"compress_level": 1}), "bmp": ("BMP", {}), "jpg": ("JPEG", {"quality": 95})}
_JSON = "fashion_mnist.json"
_FORMAT_VERSION = 4  # 3: retrieval.csv uses the same templates for every image; 4: open_clip's table layout
RETRIEVAL_CAPTIONS = 5  # captions per retrieval image, as COCO has


def folder_name(classname: str) -> str:
    """Test folder name of a class: spaces as ``_`` ("ankle boot" -> "ankle_boot")."""
    return classname.replace(" ", "_")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"Fashion-MNIST file not found: {path}. Install Debian's package: "
                        f"sudo apt-get install dataset-fashion-mnist") from None
    except (OSError, EOFError) as e:
        raise DataError(f"Fashion-MNIST file {path} is not a readable gzip file ({e}); reinstall it: "
                        f"sudo apt-get install --reinstall dataset-fashion-mnist") from e
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"{path} is too short to be an idx file")
    fields = np.frombuffer(raw, ">u4", count=1 + ndim)
    if int(fields[0]) != magic:
        raise DataError(f"{path}: magic number {int(fields[0])}, expected {magic} (not a Fashion-MNIST idx file)")
    shape = tuple(int(d) for d in fields[1:])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path}: {len(raw) - header} bytes of data for shape {shape} (truncated file?)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_arrays(split: str, *, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N,28,28], labels int64 [N])`` of the ``"train"`` (60k) or ``"test"`` (10k) split."""
    if split not in _FILES:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    d = Path(data_dir if data_dir is not None else DATA_DIR)
    if not d.is_dir():
        raise DataError(f"Fashion-MNIST not found: {d} does not exist. Install Debian's package: "
                        f"sudo apt-get install dataset-fashion-mnist")
    img_file, lab_file = _FILES[split]
    images = _read_idx(d / img_file, _IMAGES_MAGIC, 3)
    labels = _read_idx(d / lab_file, _LABELS_MAGIC, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise DataError(f"Fashion-MNIST {split}: {images.shape} images but {labels.shape[0]} labels")
    if labels.size and labels.max() >= len(FASHION_CLASSES):
        raise DataError(f"Fashion-MNIST {split}: label {int(labels.max())} out of range")
    return images, labels


def _paths(root: Path, classnames: list[str], templates: list[str]) -> dict:
    return {"root": root, "train_csv": root / "train.csv", "holdout_csv": root / "holdout.csv",
            "test_dir": root / "test", "retrieval_csv": root / "retrieval.csv", "classnames": list(classnames),
            "templates": list(templates),
            "test_classnames": sorted(classnames, key=folder_name)}


def export(out_dir: str | os.PathLike, *, holdout: int = 10000, n_train: int | None = None,
           n_test: int | None = None, seed: int = 0, templates: str | os.PathLike | Sequence[str] = "fashion",
           image_format: str = "png", data_dir: str | os.PathLike | None = None, retrieval_images: int = 1000) -> dict:
    """Export Fashion-MNIST under ``out_dir`` (see the module docstring for the layout).

    ``n_train``: use only the first n_train train images (the holdout is taken from their end); ``n_test``: the first
    n_test test images. ``templates``: a set name, a template file, or a list of templates (``{}`` for the class
    name). Running it again with the same arguments on a complete export does nothing; otherwise the previous export
    in ``out_dir`` is replaced.

    Returns ``{"root", "train_csv", "holdout_csv", "test_dir", "retrieval_csv"}`` (paths), ``"classnames"``
    (Fashion-MNIST label order, matching the CSVs' ``label`` column), ``"templates"`` and ``"test_classnames"`` (the
    order of ``LabelledFolder(test_dir)`` labels).
    """
    t0 = time.perf_counter()
    root = Path(out_dir).expanduser().absolute()
    fmt = _image_format(image_format)
    template_list = get_templates(templates)
    train_x, train_y = load_arrays("train", data_dir=data_dir)
    test_x, test_y = load_arrays("test", data_dir=data_dir)
    n = _counts(n_train=n_train, n_test=n_test, holdout=holdout, retrieval_images=retrieval_images,
                n_train_full=len(train_y), n_test_full=len(test_y), n_templates=len(template_list))
    config = {"format_version": _FORMAT_VERSION, "n_train_images": n.used, "holdout": n.holdout,
              "n_test": n.test, "retrieval_images": n.retrieval, "seed": int(seed), "templates": template_list,
              "image_format": fmt, "classes": FASHION_CLASSES}
    paths = _paths(root, FASHION_CLASSES, template_list)
    train_names, test_names = _file_names(n, fmt, test_y)
    old = _read_meta(root / _JSON)
    if _up_to_date(old, config, paths, root / train_names[-1], root / test_names[-1]):
        logger.info("Fashion-MNIST export in %s is up to date", root)
        return paths
    _start_export(root, old, config)
    _write_images(root, [(train_x, train_names), (test_x, test_names)], fmt)
    _write_tables(paths, n, train_names, train_y, test_names, test_y, template_list, seed)
    _write_meta(root / _JSON, n, config, paths, test_y, template_list, seed,
                template_set=str(templates) if isinstance(templates, (str, os.PathLike)) else "custom",
                data_dir=data_dir)
    logger.info("exported Fashion-MNIST (%d train, %d holdout, %d test) to %s in %.1f s",
                n.fit, holdout, n.test, root, time.perf_counter() - t0)
    return paths


@dataclass(frozen=True)
class _Counts:
    """How many images an export writes: train images used, of them ``fit`` in train.csv and ``holdout`` in
    holdout.csv; test images; retrieval images and captions per retrieval image."""

    used: int
    holdout: int
    fit: int
    test: int
    retrieval: int
    captions: int


def _image_format(image_format: str) -> str:
    """The export's image format as a key of ``_FORMATS`` (``jpeg`` -> ``jpg``), or a DataError naming the choices."""
    fmt = image_format.lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in _FORMATS:
        raise DataError(f"image_format must be one of {', '.join(_FORMATS)}, got {image_format!r}")
    return fmt


def _counts(*, n_train: int | None, n_test: int | None, holdout: int, retrieval_images: int, n_train_full: int,
            n_test_full: int, n_templates: int) -> _Counts:
    """The checked counts of an export: ``n_train``/``n_test`` within their split, ``holdout`` below ``n_train``."""
    for name, n, full in (("n_train", n_train, n_train_full), ("n_test", n_test, n_test_full)):
        if n is not None and not 0 < n <= full:
            raise DataError(f"{name} must be between 1 and {full}, got {n}")
    n_used = n_train_full if n_train is None else int(n_train)
    n_tst = n_test_full if n_test is None else int(n_test)
    if not 0 <= holdout < n_used:
        raise DataError(f"holdout must be between 0 and {n_used - 1} (the train images used), got {holdout}")
    return _Counts(used=n_used, holdout=int(holdout), fit=n_used - holdout, test=n_tst,
                   retrieval=min(int(retrieval_images), n_tst), captions=min(RETRIEVAL_CAPTIONS, n_templates))


def _file_names(n: _Counts, fmt: str, test_y: np.ndarray) -> tuple[list[str], list[str]]:
    """The train and test image paths relative to the export root (zero-padded indices, test under class folders)."""
    ext = "." + fmt
    width = max(5, len(str(max(n.used, n.test) - 1)))
    train_names = [f"images/train/{i:0{width}d}{ext}" for i in range(n.used)]
    test_names = [f"test/{folder_name(FASHION_CLASSES[int(y)])}/{i:0{width}d}{ext}"
                  for i, y in enumerate(test_y[:n.test])]
    return train_names, test_names


def _read_meta(meta_path: Path) -> dict | None:
    """The previous export's meta JSON: None when there is none, ``{}`` when it cannot be read."""
    if not meta_path.is_file():
        return None
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _up_to_date(old: dict | None, config: dict, paths: dict, last_train: Path, last_test: Path) -> bool:
    """Whether a complete export with the same config is already there (its tables and last images present)."""
    return bool(old and old.get("complete") and old.get("config") == config and paths["train_csv"].is_file()
                and paths["holdout_csv"].is_file() and paths["retrieval_csv"].is_file()
                and last_train.is_file() and last_test.is_file())


def _start_export(root: Path, old: dict | None, config: dict) -> None:
    """Remove what an earlier export of ours wrote (never a folder we did not create) and mark the export incomplete."""
    owned = [root / "images" / "train", root / "test"]
    if old is None and any(p.exists() for p in owned):
        raise DataError(f"{root} already has images/train or test/ but no {_JSON}: refusing to overwrite files that "
                        f"are not a parclip Fashion-MNIST export; choose an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    for p in owned:
        shutil.rmtree(p, ignore_errors=True)
    write_json(root / _JSON, {"complete": False, "config": config})


def _write_images(root: Path, jobs: list[tuple[np.ndarray, list[str]]], fmt: str) -> None:
    """Write ``arrays[k]`` to ``root / names[k]`` for every (arrays, names) job, with one progress bar."""
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    for c in FASHION_CLASSES:
        (root / "test" / folder_name(c)).mkdir(parents=True, exist_ok=True)
    pil_format, save_kw = _FORMATS[fmt]
    total = sum(len(names) for _, names in jobs)
    with progress_bar(total=total, desc="writing Fashion-MNIST", unit="img", mininterval=0.5) as bar:
        for arrays, names in jobs:
            for k, name in enumerate(names):
                # not-atomic: the export is one transaction, marked complete only at its end
                Image.fromarray(arrays[k]).save(root / name, pil_format, **save_kw)  # not-atomic: as above
                if k % 1000 == 999 or k == len(names) - 1:
                    bar.update(k % 1000 + 1)


def _write_tables(paths: dict, n: _Counts, train_names: list[str], train_y: np.ndarray, test_names: list[str],
                  test_y: np.ndarray, template_list: list[str], seed: int) -> None:
    """train.csv and holdout.csv (one seeded random template per image) and retrieval.csv (the same templates for all)."""
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(template_list), size=n.used)
    rows = [{IMG_KEY: train_names[i], CAPTION_KEY: fill(template_list[choice[i]], FASHION_CLASSES[int(train_y[i])]),
             "label": int(train_y[i])} for i in range(n.used)]
    write_table(paths["train_csv"], [IMG_KEY, CAPTION_KEY, "label"], rows[:n.fit])
    write_table(paths["holdout_csv"], [IMG_KEY, CAPTION_KEY, "label"], rows[n.fit:])
    # the same RETRIEVAL_CAPTIONS templates (drawn once, on their own stream) for every image: with identical captions
    # merged, retrieval is then class-level (i2t R@1: the best caption names the image's class)
    ret_templates = np.random.default_rng([seed, 1]).choice(len(template_list), n.captions, replace=False)
    write_table(paths["retrieval_csv"], [IMG_KEY, CAPTION_KEY, "label"],
                [{IMG_KEY: test_names[i], CAPTION_KEY: fill(template_list[t], FASHION_CLASSES[int(test_y[i])]),
                  "label": int(test_y[i])} for i in range(n.retrieval) for t in ret_templates])


def _write_meta(meta_path: Path, n: _Counts, config: dict, paths: dict, test_y: np.ndarray, template_list: list[str],
                seed: int, *, template_set: str, data_dir: str | os.PathLike | None) -> None:
    """The meta JSON of a complete export: config, counts, classes and folders, templates, source and licence."""
    counts = {"train_images": n.used, "train_csv": n.fit, "holdout_csv": n.holdout, "test": n.test,
              "retrieval_images": n.retrieval, "retrieval_captions": n.retrieval * n.captions,
              "test_per_class": {c: int((test_y[:n.test] == k).sum()) for k, c in enumerate(FASHION_CLASSES)}}
    write_json(meta_path, {
        "complete": True,
        "config": config,
        "counts": counts,
        "classes": FASHION_CLASSES,
        "test_folders": [folder_name(c) for c in paths["test_classnames"]],
        "test_classnames": paths["test_classnames"],
        "template_set": template_set,
        "templates": template_list,
        "seed": int(seed),
        "caption": "random template (numpy default_rng(seed)) filled with the class name",
        "source": {"package": "dataset-fashion-mnist (Debian)",
                   "dir": str(Path(data_dir if data_dir is not None else DATA_DIR)),
                   "files": [f for pair in _FILES.values() for f in pair]},
        "license": LICENSE,
    })
