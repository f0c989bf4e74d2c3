"""The defence interface: one cleaning method is one small class, found by name, behind one call in the training loop.

    class Defence:
        name, description, paper           what `parclip defences list` shows
        defaults                           the method's recipe (TrainConfig values applied when not set explicitly)
        logit_scale, bn_mode, augment      what "auto" means for this method
        frozen_copy(cfg)                   whether the loop keeps a frozen copy θ0 of the starting model
        image_views(preprocess_cfg, cfg)   extra image views besides the plain one (CleanCLIP: AutoAugment)
        prepare_captions(captions, keys)   (captions to train on, extra caption views): once per table, or per sample
                                           for shards (`keys` name the samples, so a view is the same either way)
        check_data_size(n_samples)         a warning when the data is too small for the method (RoCLIP's pool)
        loss(batch, logit_scale, epoch)    -> (loss, {metric: float}); `batch` holds the *global* embeddings
        state_dict() / load_state_dict()   state that must survive a resume (RoCLIP's pool)
        stateful                           whether loss() changes that state (gradient accumulation then calls it on
                                           a copy in all passes but the last, so the state moves once per step)

A defence sees the global batch (the loop gathers every view across processes first), so any state it keeps is the
same on every process and the update equals a one-process step on the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

__all__ = ["Defence", "Embeddings", "register", "get_defence", "defence_class", "list_defences", "PRESETS",
           "Preset", "register_preset", "resolve_preset"]


@dataclass
class Embeddings:
    """L2-normalised embeddings of one global batch. `img[0]`, `txt[0]` are the plain views; further entries are the
    defence's extra views in the order it declared them. `img0`, `txt0`: the frozen copy's, when it keeps one."""

    img: list[torch.Tensor]
    txt: list[torch.Tensor]
    img0: torch.Tensor | None = None
    txt0: torch.Tensor | None = None


class Defence:
    """Base class: plain CLIP-loss fine-tuning semantics; subclasses override what differs."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    logit_scale: ClassVar[str] = "learned"      # what --logit-scale auto means
    bn_mode: ClassVar[str] = "train"            # what --bn-mode auto means
    augment: ClassVar[str] = "none"             # what --augment auto means (the plain view's augmentation)
    stateful: ClassVar[bool] = False            # whether loss() updates state (see the module docstring)

    def __init__(self, cfg):
        self.cfg = cfg

    def frozen_copy(self) -> bool:
        return False

    def image_views(self, preprocess_cfg: dict) -> list[Callable]:
        """Transforms (PIL -> Tensor) of the extra image views; [] for none."""
        return []

    def prepare_captions(self, captions: list[str], keys: list | None = None) -> tuple[list[str], list[list[str]]]:
        """The captions to train on and the extra caption views (lists aligned with them); `keys` (one per caption,
        default the indices) seed any randomness, so a caption's views depend only on (seed, key, caption)."""
        return captions, []

    def check_data_size(self, n_samples: int) -> None:
        """Warn when `n_samples` pairs per epoch are too few for the method; nothing by default."""

    def loss(self, batch: Embeddings, logit_scale: torch.Tensor, *, epoch: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"defence {self.name!r} keeps no state, but the checkpoint has {sorted(state)}")


_REGISTRY: dict[str, type[Defence]] = {}


def register(cls: type[Defence]) -> type[Defence]:
    """Class decorator: make a defence available by its name (`--objective NAME`)."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"defence name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def list_defences() -> list[type[Defence]]:
    return list(_REGISTRY.values())


def defence_class(name: str) -> type[Defence]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown defence {name!r}; known: {', '.join(_REGISTRY)} (see `parclip defences list`)") \
            from None


def get_defence(cfg) -> Defence:
    """The defence `cfg.objective` names, built for this run."""
    return defence_class(cfg.objective)(cfg)


@dataclass(frozen=True)
class Preset:
    """A named recipe: a defence and the TrainConfig values that make it (applied below explicit flags)."""

    name: str
    objective: str
    values: dict = field(default_factory=dict)
    description: str = ""


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is taken")
    PRESETS[preset.name] = preset
    return preset


def resolve_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} (see `parclip defences list`)") \
            from None
