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

__all__ = ["CONDITIONINGS", "Prompt", "Generator", "register_generator", "generator_class", "list_generators",
           "load_generator"]

CONDITIONINGS = ("class", "text")


@dataclass(frozen=True)
class Prompt:
    """What one synthetic image is made from: the caption written beside it in the table, and for a
    class-conditional generator the class it shows (`label`: index in the generator's class list, `classname`)."""

    caption: str
    label: int | None = None
    classname: str | None = None


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
