"""The interface every labelled evaluation set shares (a folder of class sub-folders, clip_benchmark's shards):
``samples`` (``(name, label)`` pairs), a ``transform`` and ``load_image(i)``; the item is ``(transform(image), label)``.

Its own module so that the two formats can both build on it without importing each other; which one a data argument
names is decided by :func:`parclip.data.sources.open_labelled`.
"""
from __future__ import annotations

from typing import Callable

from PIL import Image

__all__ = ["LabelledImages"]


class LabelledImages:
    """What every labelled evaluation set shares: ``samples`` (``(name, label)`` pairs), a ``transform`` and a
    ``load_image(i)``; the dataset item is ``(transform(image), label)``."""

    samples: list[tuple[str, int]]
    transform: Callable | None

    def load_image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img = self.load_image(i)
        return (self.transform(img) if self.transform is not None else img), self.samples[i][1]
