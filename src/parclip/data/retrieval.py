"""Retrieval test sets: images with several captions each (COCO / Flickr30k Karpathy files, or a caption table).

Two layouts are read into one :class:`RetrievalSet` (image paths, captions, and the image each caption belongs to):

* a **Karpathy-style JSON** (BLIP's ``coco_karpathy_test.json``, ``flickr30k_test.json``): a list of
  ``{"image": "val2014/COCO_val2014_….jpg", "caption": ["…", "…", …]}`` (``"captions"`` and a single string are
  accepted too); image paths are relative to ``root`` (default: the JSON's folder), or absolute;
* a **caption table** (CSV/TSV, as for training) with one row per (image, caption): rows with the same image path
  are one image with several captions, in order of first appearance.

Every image path names a local file, decoded as an image, whatever it looks like (``pipe:…``, ``http:…``); one that is
not a non-empty string is a DataError (:func:`~parclip.data.names.local_source`).

Captions are cleaned as the reference's COCO evaluation does (``clean=True``; docs/reference_differences.md#retrieval):
lower-case; each of ``. ! " ( ) * # : ; ~`` becomes a space; runs of white space collapse to one; stripped; the first
30 words kept.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .captions import CAPTION_KEY, IMG_KEY, DataError, open_rgb, read_table
from .names import local_source

__all__ = ["RetrievalSet", "read_retrieval", "group_pairs", "pre_caption"]

_PUNCT = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """The reference's caption cleaning (see the module docstring)."""
    caption = _SPACES.sub(" ", _PUNCT.sub(" ", caption.lower())).strip()
    return " ".join(caption.split(" ")[:max_words])


@dataclass
class RetrievalSet:
    """``images``: one path per image; ``captions``: every caption; ``owner[j]``: the index of caption j's image."""
    images: list[Path]
    captions: list[str]
    owner: list[int]
    source: str = ""
    skipped: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, i: int):
        """Image i as RGB (DataError if it is missing or does not decode)."""
        return open_rgb(self.images[i])

    def __post_init__(self):
        if len(self.captions) != len(self.owner):
            raise ValueError("one owner per caption")


def group_pairs(pairs, root: Path, clean: bool, source: str) -> RetrievalSet:
    """(image path, caption) pairs as a :class:`RetrievalSet`: pairs sharing an image path are one image with several
    captions (in order of first appearance); relative paths under `root`, made absolute; captions cleaned
    (:func:`pre_caption`) when `clean`, else stripped; empty ones counted and left out."""
    index: dict[str, int] = {}
    images, captions, owner, empty = [], [], [], 0
    for image, caption in pairs:
        caption = pre_caption(caption) if clean else caption.strip()
        if not caption:
            empty += 1
            continue
        if not isinstance(image, str) or image not in index:
            try:  # a path of an annotation file: a local image, relative to root or absolute, whatever its name
                path = Path(local_source(root, image, anywhere=True))
            except DataError as e:
                raise DataError(f"{source}: {e}") from None
            index[image] = len(images)
            images.append(path)
        captions.append(caption)
        owner.append(index[image])
    if not images:
        raise DataError(f"{source}: no image with a non-empty caption")
    return RetrievalSet(images, captions, owner, source=source, skipped={"empty_captions": empty} if empty else {})


def read_retrieval(path: str | os.PathLike, *, root: str | os.PathLike | None = None, img_key: str | None = None,
                   caption_key: str | None = None, sep: str | None = None, clean: bool = True) -> RetrievalSet:
    """Read a Karpathy-style ``.json`` or a caption table (any other suffix) into a :class:`RetrievalSet`. The keys
    default to the format's own: ``image`` / ``caption`` in a Karpathy JSON, the table layout's ``filepath`` /
    ``title`` (open_clip_train's) in a table."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"retrieval file not found: {path}")
    root = Path(root) if root is not None else path.parent
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path} is not a JSON file: {e}") from e
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise DataError(f"{path}: expected a list of {{\"image\": …, \"caption\": [...]}} objects (the Karpathy "
                            f"test files' layout)")

        img_key, caption_key = img_key or "image", caption_key or "caption"

        def pairs():
            for n, e in enumerate(entries):
                caps = e.get(caption_key, e.get("captions"))
                if img_key not in e or caps is None:
                    raise DataError(f"{path}: entry {n} has no {img_key!r} or {caption_key!r}/'captions' key "
                                    f"(keys: {sorted(e)})")
                for c in [caps] if isinstance(caps, str) else caps:
                    yield e[img_key], str(c)
        return group_pairs(pairs(), root, clean, str(path))
    img_key, caption_key = img_key or IMG_KEY, caption_key or CAPTION_KEY
    _, rows = read_table(path, sep=sep, columns=(img_key, caption_key))
    return group_pairs(((r[img_key], r[caption_key]) for r in rows), root, clean, str(path))
