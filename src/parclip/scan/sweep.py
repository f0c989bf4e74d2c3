"""Part 1 of the scan: every trigger of the library, over a few sizes and strengths, against matched controls.

For a trigger variant ``T`` and its control ``K`` (:mod:`parclip.scan.controls`), with ``y_i`` the model's own
zero-shot class of clean image ``i`` (so unlabelled folders work) and ``pred(.)`` the class of a perturbed image:

    flip_T(c) = 100 · #{i : y_i ≠ c, pred(T(x_i)) = c} / #{i : y_i ≠ c}     (the ASR toward c, :func:`flip_rates`)
    lift(c)   = flip_T(c) - flip_K(c)                                        (percentage points)

The variant's suspected target is ``argmax_c lift(c)``; the sweep fires when a variant's lift reaches the calibrated
threshold (:data:`parclip.scan.verdict.THRESHOLDS`). Patch sizes are fractions of the model's side (1/14, 1/7, 1/4:
16, 32, 56 px at 224, 2, 5, 8 px at 32); blend strengths are 1/2, 3/4 and 1 times each trigger's default. Patch triggers
land at random per-image locations (``badnet``, ``badnet_rs``) or the centre (``badclip``, only with its patch file).
"""
from __future__ import annotations

import torch

from parclip.attacks.triggers import get_trigger

__all__ = ["PATCH_FRACTIONS", "STRENGTHS", "LIBRARY", "variants", "flip_rates", "lift"]

PATCH_FRACTIONS = (1 / 14, 1 / 7, 1 / 4)
# (trigger, its strength parameter, the values): a half, three quarters and once the library default (the attacks'
# published strengths; stronger blends move a clean model's predictions too, docs/scan.md#controls)
STRENGTHS = {"blended_rs": ("alpha", (0.015, 0.0225, 0.03)), "blended": ("alpha", (0.1, 0.15, 0.2)),
             "tri_patt": ("alpha", (0.075, 0.1125, 0.15)), "water_patt": ("alpha", (0.25, 0.375, 0.5)),
             "sig": ("delta", (30.0, 45.0, 60.0)), "warped": ("s", (0.25, 0.375, 0.5))}
PATCH_TRIGGERS = ("badnet_rs", "badnet", "badclip")
LIBRARY = (*PATCH_TRIGGERS, *STRENGTHS)  # the triggers a default sweep tries


def _patch_sizes(image_size: int) -> list[int]:
    return sorted({max(1, round(f * image_size)) for f in PATCH_FRACTIONS})


def variants(image_size: int, params: dict | None = None, names: list[str] | None = None) -> list:
    """[(label, Trigger)] of the sweep at the model's side. `params` ({trigger: {key: value}}, as ``--trigger-param``)
    are added to every variant of that trigger; ``badclip`` takes part only when ``params["badclip"]["patch"]`` names
    its patch file. `names`: only these triggers (default: the whole library)."""
    params = params or {}
    names = names or list(LIBRARY)
    out = []
    for name in names:
        own = dict(params.get(name, {}))
        if name in PATCH_TRIGGERS:
            if name == "badclip" and "patch" not in own:
                continue
            for p in _patch_sizes(image_size):
                out.append((f"{name} {p}px", get_trigger(name, image_size, **{**own, "patch_size": p})))
        elif name in STRENGTHS:
            key, values = STRENGTHS[name]
            for v in values:
                out.append((f"{name} {key}={v:g}", get_trigger(name, image_size, **{**own, key: v})))
        else:  # a trigger outside the grids: once, as given
            out.append((name, get_trigger(name, image_size, **own)))
    return out


def flip_rates(pred: torch.Tensor, reference: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[C] percent: ``flip(c) = 100 · #{i : ref_i ≠ c, pred_i = c} / #{i : ref_i ≠ c}`` (NaN where every reference
    is c)."""
    hits = torch.bincount(pred[pred != reference], minlength=n_classes).float()
    others = len(reference) - torch.bincount(reference, minlength=n_classes).float()
    return torch.where(others > 0, 100.0 * hits / others.clamp(min=1), torch.full_like(hits, float("nan")))


def lift(trigger_flip: torch.Tensor, control_flip: torch.Tensor) -> tuple[int, float]:
    """(argmax_c lift, its value in points) of ``lift = trigger_flip - control_flip`` (NaN classes ignored)."""
    gap = torch.nan_to_num(trigger_flip - control_flip, nan=float("-inf"))
    c = int(gap.argmax())
    return c, float(gap[c])
