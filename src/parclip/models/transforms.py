"""The model's preprocessing: its open_clip preprocess config, input size and eval transform.

``preprocess_cfg`` is open_clip's dict (``size, mode, mean, std, interpolation, resize_mode, fill_color``), as
:func:`parclip.models.create_model` returns it and ``open_clip_config.json`` stores it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import PreprocessCfg, image_transform_v2

__all__ = ["image_size", "eval_transform", "normalize", "denormalize", "full_preprocess_cfg", "jsonable_preprocess"]


def image_size(preprocess_cfg: Mapping) -> int:
    """The model's square input side from its preprocess config (`size` is an int or an (h, w) pair)."""
    size = preprocess_cfg["size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)



def jsonable_preprocess(cfg: Mapping) -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, (tuple, list)):
            v = list(v)
            if k == "size" and len(v) == 2 and v[0] == v[1]:
                v = int(v[0])
        out[k] = v
    return out



def full_preprocess_cfg(preprocess_cfg: Mapping) -> dict:
    fields = {f.name for f in dataclasses.fields(PreprocessCfg)}
    unknown = set(preprocess_cfg) - fields
    if unknown:
        raise ValueError(f"unknown preprocess_cfg keys {sorted(unknown)}; allowed: {sorted(fields)}")
    merged = dataclasses.asdict(PreprocessCfg())
    merged.update({k: v for k, v in preprocess_cfg.items() if v is not None})
    PreprocessCfg(**merged)  # validates mode
    return jsonable_preprocess(merged)



def eval_transform(preprocess_cfg: dict):
    """The model's eval transform (resize, centre crop, to tensor, normalise): ``PIL image -> FloatTensor[3,S,S]``."""
    cfg = full_preprocess_cfg(preprocess_cfg)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)



def _statistics(x: torch.Tensor, preprocess_cfg: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's per-channel mean and std ([3, 1, 1], OpenAI's when the config has none) on x's device and dtype."""
    mean = torch.tensor(preprocess_cfg.get("mean") or OPENAI_DATASET_MEAN, device=x.device, dtype=x.dtype)
    std = torch.tensor(preprocess_cfg.get("std") or OPENAI_DATASET_STD, device=x.device, dtype=x.dtype)
    return mean[:, None, None], std[:, None, None]


def normalize(x: torch.Tensor, preprocess_cfg: Mapping) -> torch.Tensor:
    """``(x - mean) / std`` per channel with the model's statistics (OpenAI's when the config has none);
    ``x`` float ``[B, 3, H, W]`` in [0, 1]."""
    mean, std = _statistics(x, preprocess_cfg)
    return (x - mean) / std


def denormalize(x: torch.Tensor, preprocess_cfg: Mapping) -> torch.Tensor:
    """The inverse of :func:`normalize`: ``x * std + mean`` (the eval transform's output back to [0, 1] pixels)."""
    mean, std = _statistics(x, preprocess_cfg)
    return x * std + mean
