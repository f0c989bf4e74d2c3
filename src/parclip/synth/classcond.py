"""What the small class-conditional generators trained on a caption table share: class lookup, per-image seeding,
greyscale output as RGB, storage (:mod:`parclip.synth.stored`) and the manifest entry.

A family subclasses :class:`TrainedClassGenerator`, sets ``kind``, implements ``expected_tensors(config)`` (the tensor
names and shapes its files must hold) and ``_sample(label, generator)`` (one image, a float tensor [H, W] in [0, 1],
drawn with the given ``torch.Generator`` only). Images are computed one at a time, so image ``i`` is bit-identical
whether it is made alone or in a batch.
"""
from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import Generator, Prompt
from .stored import CONFIG_FILE, WEIGHTS_FILE, read_generator_files, save_generator_files

__all__ = ["TrainedClassGenerator", "to_image"]


def to_image(x: torch.Tensor) -> Image.Image:
    """A float [H, W] tensor in [0, 1] as an RGB PIL image (grey: R = G = B = round(255 · clamp(x, 0, 1)))."""
    grey = (x.detach().double().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(grey), mode="L").convert("RGB")


class TrainedClassGenerator(Generator):
    """A class-conditional generator held as tensors + a JSON config (``config["classnames"]`` its classes,
    ``config["image_size"]`` its side)."""

    conditioning = "class"

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict, folder: Path | None = None):
        self.tensors, self.config, self.folder = dict(tensors), dict(config), folder
        self._setup()

    def _setup(self) -> None:
        """Build whatever the family samples with from ``self.tensors`` (a module, precomputed factors)."""

    @classmethod
    @abstractmethod
    def expected_tensors(cls, config: dict) -> dict[str, tuple[int, ...]]:
        """{tensor name: shape} the family's weights file must hold for ``config``."""

    @abstractmethod
    def _sample(self, label: int, generator: torch.Generator) -> torch.Tensor:
        """One image of class ``label``: float [H, W] in [0, 1], every random number drawn from ``generator``."""

    @property
    def classnames(self) -> list[str]:
        return list(self.config["classnames"])

    @classmethod
    def load(cls, argument: str, **options) -> TrainedClassGenerator:
        """The generator stored in folder ``argument`` (or its generator.json). ``device`` is accepted and ignored
        (these generators are small and sample on the CPU); any other option is an error."""
        options.pop("device", None)
        if options:
            raise TypeError(f"{cls.kind}: unknown option(s) {', '.join(sorted(options))}")
        tensors, config, folder = read_generator_files(argument, cls.kind, cls.expected_tensors)
        return cls(tensors, config, folder)

    def store(self, out_dir: str | os.PathLike) -> Path:
        """Store the generator in ``out_dir`` (safetensors + JSON); loadable as ``KIND:out_dir``."""
        self.folder = save_generator_files(out_dir, self.kind, self.tensors, self.config)
        return self.folder

    def label_of(self, prompt: Prompt) -> int:
        """The class index ``prompt`` asks for: its label, else its class name; a ValueError if neither fits."""
        names = self.classnames
        if prompt.label is not None:
            if not (isinstance(prompt.label, (int, np.integer)) and 0 <= int(prompt.label) < len(names)):
                raise ValueError(f"{self.kind}: label {prompt.label!r} outside 0..{len(names) - 1} ({names})")
            return int(prompt.label)
        if prompt.classname is not None and prompt.classname in names:
            return names.index(prompt.classname)
        raise ValueError(f"{self.kind} is class-conditional: prompt {prompt.caption!r} needs a label or one of the "
                         f"class names {names}")

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], seeds: Sequence[int]) -> list[Image.Image]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{self.kind}: {len(prompts)} prompts but {len(seeds)} seeds")
        labels = [self.label_of(p) for p in prompts]  # every prompt checked before any image is made
        return [to_image(self._sample(label, torch.Generator().manual_seed(int(seed))))
                for label, seed in zip(labels, seeds)]

    def describe(self) -> dict:
        from parclip.utils.files import sha256_file
        weights = self.folder / WEIGHTS_FILE if self.folder is not None else None
        return {"kind": self.kind, "conditioning": self.conditioning,
                "weights": str(weights) if weights else None,
                "sha256": sha256_file(weights) if weights and weights.is_file() else None,
                "config_file": str(self.folder / CONFIG_FILE) if self.folder is not None else None,
                "settings": self.config}
