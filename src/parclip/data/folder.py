"""Labelled image folders: ``root/<class folder>/**/<image>``, the layout of ImageNet val, torchvision's ImageFolder and
our Fashion-MNIST export.

* Classes are the sub-folders of ``root`` in sorted order; label = position in that order. Folders named by numbers
  only (ImageNet-V2's ``0`` … ``999``) are sorted as numbers, not as strings (``2`` before ``10``).
* Class names: the folder names with ``_`` shown as a space (``ankle_boot`` -> "ankle boot"), except for the ImageNet
  layouts, which get the standard ImageNet names of open_clip (``open_clip.IMAGENET_CLASSNAMES``):
  - folders named by WordNet ids (``n01440764``) that are ImageNet-1k classes: ImageNet val and ImageNet-Sketch (all
    1000) and ImageNet-A / ImageNet-R (200 of them); each folder is mapped through the shipped list of the 1000 ids
    (``parclip/assets/imagenet_wnids.txt``), so a 200-class subset gets the right names, and ``imagenet_indices``
    holds each label's ImageNet-1k index;
  - 1000 folders named ``0`` … ``999`` (ImageNet-V2): folder ``k`` is ImageNet-1k class ``k``.
  An explicit list, or a text file with one name per line, overrides them.
* Image files are recognised by extension, case-insensitively. Empty (0-byte) files are reported like bad rows of a
  caption table (see :class:`parclip.data.captions.BadRows`); with ``verify_images=True`` every image is also decoded
  up front. Evaluation must not silently swap images, so an image that fails to decode in ``__getitem__`` raises a
  :class:`DataError` naming the file.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from ..utils.checks import check_fraction
from ..utils.progress import progress_bar
from .captions import UNREADABLE, BadRows, DataError, open_rgb
from .labelled import LabelledImages

__all__ = ["LabelledFolder", "ImageFiles", "IMAGE_EXTENSIONS", "read_classnames", "walk_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_WNID = re.compile(r"n\d{8}")
WNID_FILE = Path(__file__).resolve().parent.parent / "assets" / "imagenet_wnids.txt"
EMPTY_FILE = "empty file"


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (the shipped ``assets/imagenet_wnids.txt``)."""
    return tuple(WNID_FILE.read_text().split())


def walk_images(top: str | os.PathLike) -> list[str]:
    """The image files under ``top`` (by extension, case-insensitive; names starting with ``.`` left out), depth first
    with folders and files in name order. Symbolic links are followed, but each real folder is entered once, and a link
    to ``top`` itself or to a folder above it (a loop) is not entered: every image is listed once, however the links
    run. A link to a file, or to a folder elsewhere, is listed like the real thing."""
    top_real = os.path.realpath(top)
    seen = {top_real}
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen and not top_real.startswith(real.rstrip(os.sep) + os.sep):  # not an ancestor of top
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        found += [os.path.join(dirpath, n) for n in sorted(filenames)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    return found


def imagenet_layout(folders: Sequence[str]) -> tuple[str, list[int]] | None:
    """("wnid" | "v2", the ImageNet-1k index of each folder) for the ImageNet layouts, None for any other folder set."""
    if folders and all(_WNID.fullmatch(f) for f in folders):
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        if all(f in index for f in folders):
            return "wnid", [index[f] for f in folders]
    if len(folders) == 1000 and set(folders) == {str(i) for i in range(1000)}:
        return "v2", [int(f) for f in folders]
    return None


def read_classnames(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class-name file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class LabelledFolder(LabelledImages):
    """Map-style dataset ``(transform(image), label)`` over ``root/<class>/...``.

    Attributes: ``classnames`` (one per label), ``folders`` (the class folder names, sorted), ``samples``
    (list of ``(path, label)``), ``targets`` (labels), ``bad_rows`` (empty or undecodable files that were dropped).
    """

    def __init__(self, root: str | os.PathLike, *, transform: Callable | None = None,
                 classnames: Sequence[str] | str | os.PathLike | None = None, max_bad_fraction: float = 0.01,
                 verify_images: bool = False):
        self.root = Path(root).expanduser()
        self.transform = transform
        max_bad_fraction = check_fraction("max_bad_fraction", max_bad_fraction, error=DataError)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root} (expected root/<class>/<images>)")
        folders = [e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")]
        if not folders:
            raise DataError(f"{self.root} has no class sub-folders (expected root/<class>/<images>)")
        self.folders = sorted(folders, key=int) if all(f.isdigit() for f in folders) else sorted(folders)
        layout = imagenet_layout(self.folders)
        self.layout = layout[0] if layout else "folders"
        self.imagenet_indices = layout[1] if layout else None

        if classnames is None:
            self.classnames = self._default_classnames(self.folders, self.imagenet_indices)
        else:
            names = read_classnames(classnames) if isinstance(classnames, (str, os.PathLike)) else list(classnames)
            if len(names) != len(self.folders):
                raise DataError(f"{len(names)} class names given but {self.root} has {len(self.folders)} class "
                                f"folders (first folders: {', '.join(self.folders[:5])})")
            self.classnames = [str(n) for n in names]

        self.bad_rows = BadRows(str(self.root), unit="images")
        samples: list[tuple[str, int]] = []
        for label, folder in enumerate(self.folders):
            samples += [(path, label) for path in walk_images(self.root / folder)]
        if not samples:
            raise DataError(f"no images found under {self.root} (extensions: {' '.join(IMAGE_EXTENSIONS)})")

        good: list[tuple[str, int]] = []
        for path, label in (progress_bar(samples, desc="verifying images", unit="img") if verify_images else samples):
            self.bad_rows.examined += 1
            rel = os.path.relpath(path, self.root)
            if os.path.getsize(path) == 0:
                self.bad_rows.add(None, rel, EMPTY_FILE)
                continue
            if verify_images:
                try:
                    open_rgb(path)
                except DataError as e:
                    self.bad_rows.add(None, rel, UNREADABLE, str(e.__cause__ or e))
                    continue
            good.append((path, label))
        if not good:
            raise DataError(f"no usable images under {self.root}: {self.bad_rows}")
        self.bad_rows.check(max_bad_fraction)
        self.samples = good
        self.targets = [label for _, label in good]

    @staticmethod
    def _default_classnames(folders: list[str], imagenet_indices: list[int] | None) -> list[str]:
        if imagenet_indices is not None:
            import open_clip  # slow import, only needed here

            return [open_clip.IMAGENET_CLASSNAMES[i] for i in imagenet_indices]
        return [f.replace("_", " ") for f in folders]

    def load_image(self, i: int) -> Image.Image:
        """Image i as PIL RGB; DataError naming the file if it cannot be decoded."""
        return open_rgb(self.samples[i][0])

    def describe(self, i: int) -> str:
        """Image i for a message: its path under the root."""
        return os.path.relpath(self.samples[i][0], self.root)

    def __repr__(self) -> str:
        return f"LabelledFolder({str(self.root)!r}, {len(self)} images, {len(self.classnames)} classes)"



class ImageFiles:
    """The images under a folder without labels (every image file at any depth, :func:`walk_images`' order):
    ``len``, ``load_image(i)`` (PIL RGB, DataError naming the file), ``describe(i)``; ``targets`` is None.
    Empty files are left out and counted in ``bad_rows``."""

    targets = None

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self.bad_rows = BadRows(str(self.root), unit="images")
        self.paths = []
        for path in walk_images(self.root):
            self.bad_rows.examined += 1
            if os.path.getsize(path) == 0:
                self.bad_rows.add(None, os.path.relpath(path, self.root), EMPTY_FILE)
            else:
                self.paths.append(path)

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self.paths[i])

    def describe(self, i: int) -> str:
        return os.path.relpath(self.paths[i], self.root)

    def __repr__(self) -> str:
        return f"ImageFiles({str(self.root)!r}, {len(self)} images)"
