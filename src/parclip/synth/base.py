"""The generator interface for synthetic image–caption pairs, and the registry generators are found in by kind.

A *generator* turns prompts into images: ``generate(prompts, seeds) -> [PIL.Image]``, one RGB image per prompt. A
prompt carries the caption that goes into the table and, for class-conditional generators, the class it names (its
index in the generator's class list and its name). Image ``i`` depends only on the generator's weights, its prompt
and ``seeds[i]``, never on the batch it was made in or on a global random state, so a synthesis run that is killed
and resumed writes the same images as one that was not.

Adding a generator: subclass :class:`Generator`, set ``kind`` (how a user names it, e.g. ``"diffusers"``) and
``conditioning`` (``"class"`` or ``"text"``), implement :meth:`Generator.generate`, :meth:`Generator.describe` (what
the synthesis manifest records) and the classmethod :meth:`Generator.load` (build it from a spec string), and decorate
the class with :func:`register_generator`. :func:`load_generator` resolves ``"KIND:ARGUMENT"`` (e.g.
``diffusers:/models/sd-turbo``), the one place a generator name is resolved.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

__all__ = ["CONDITIONINGS", "Prompt", "Generator", "GeneratorError", "image_from_array", "register_generator",
           "generator_class", "list_generators", "load_generator"]

CONDITIONINGS = ("class", "text")


@dataclass(frozen=True)
class Prompt:
    """What one synthetic image is made from: the caption written beside it in the table, and for a
    class-conditional generator the class it shows (`label`: index in the generator's class list, `classname`)."""

    caption: str
    label: int | None = None
    classname: str | None = None


class GeneratorError(RuntimeError):
    """A generator made an unusable image (non-finite or constant pixels, a wrong count or type). ``index``: the
    image's position in the batch passed to :meth:`Generator.generate` (None when unknown); the synthesis loop
    turns it into the prompt's index and caption."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def image_from_array(array, index: int | None = None) -> Image.Image:
    """An RGB PIL image from an ``[H, W, 3]`` (or ``[H, W]``) array of floats in [0, 1] (values outside are clipped)
    or of uint8; a :class:`GeneratorError` with ``index`` when a float value is NaN or infinite (a generator that
    diverged). For generators whose models return floats: check here, before the uint8 conversion hides it."""
    import numpy as np

    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise GeneratorError(f"the generator produced non-finite pixel values ({int((~np.isfinite(a)).sum())} "
                                 f"of {a.size} are NaN or infinite)", index)
        a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise GeneratorError(f"expected an [H, W, 3] image array, got shape {a.shape}", index)
    return Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB")


class Generator(ABC):
    """Makes one RGB image per :class:`Prompt`; image ``i`` is a function of the weights, ``prompts[i]`` and
    ``seeds[i]`` only (no global random state, no dependence on the batch)."""

    kind: ClassVar[str] = ""
    conditioning: ClassVar[str] = "text"  # "class": needs Prompt.label; "text": reads Prompt.caption

    @classmethod
    @abstractmethod
    def load(cls, argument: str, **options) -> Generator:
        """The generator a spec ``KIND:ARGUMENT`` names (``argument``: a path, a config name, ...)."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], seeds: Sequence[int]) -> list[Image.Image]:
        """One RGB image per prompt, image ``i`` made from ``prompts[i]`` under ``seeds[i]``."""

    @abstractmethod
    def describe(self) -> dict:
        """What made the images, for the synthesis manifest: kind, weights (path and checksum), settings."""

    @property
    def classnames(self) -> list[str] | None:
        """A class-conditional generator's classes (``Prompt.label`` indexes them); None for a text generator."""
        return None


_REGISTRY: dict[str, type[Generator]] = {}


def register_generator(cls: type[Generator]) -> type[Generator]:
    """Class decorator: make ``cls`` loadable as ``cls.kind:ARGUMENT``."""
    if not cls.kind or cls.kind in _REGISTRY:
        raise ValueError(f"generator kind {cls.kind!r} is empty or already registered")
    if cls.conditioning not in CONDITIONINGS:
        raise ValueError(f"{cls.__name__}.conditioning must be one of {CONDITIONINGS}, got {cls.conditioning!r}")
    _REGISTRY[cls.kind] = cls
    return cls


def generator_class(kind: str) -> type[Generator]:
    """The registered generator class of ``kind``; a KeyError listing the kinds there are."""
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise KeyError(f"unknown generator kind {kind!r}; known: {', '.join(sorted(_REGISTRY)) or 'none'}") from None


def list_generators() -> list[str]:
    """The registered generator kinds, sorted."""
    return sorted(_REGISTRY)


def load_generator(spec: str, **options) -> Generator:
    """The generator ``spec`` names: ``KIND:ARGUMENT`` (e.g. ``diffusers:/models/tiny-sd``); ``options`` go to the
    kind's :meth:`Generator.load` (device, dtype, ...)."""
    kind, sep, argument = spec.partition(":")
    if not sep:
        raise ValueError(f"generator {spec!r}: expected KIND:ARGUMENT, kinds: {', '.join(list_generators())}")
    return generator_class(kind).load(argument, **options)
