"""`clip`: plain CLIP-loss fine-tuning on clean pairs (CleanCLIP's "FT" baseline, arXiv 2303.03323), the baseline every
defence must beat.

    L = L_CLIP(F, G; s) = ½ [ CE(s·F Gᵀ, I) + CE(s·G Fᵀ, I) ]        s learned, clamped to ≤ 100

It is also how a backdoor is planted: the same loss on poisoned pairs. Two presets name its recipes: `clip` (the
open_clip-style settings below) and `clip-cleanclip-recipe` (CleanCLIP's cleaning recipe without its in-modal term,
the "FT" baseline of the CleanCLIP and BadCLIP papers).
"""
from __future__ import annotations

from ..objectives import clip_loss
from .base import Defence, Preset, register, register_preset

CLEANCLIP_RECIPE = dict(batch_size=64, lr=1e-5, epochs=10, warmup=50, schedule="cosine", lr_end=0.0, wd=0.1,
                        beta1=0.9, beta2=0.999, eps=1e-8)
"""CleanCLIP's cleaning recipe (its README): batch 64, lr 1e-5, 10 epochs, 50 warm-up steps, cosine to 0, weight
decay 0.1, AdamW (0.9, 0.999, 1e-8); docs/reference_differences.md#cleanclip-recipe."""


@register
class PlainFineTuning(Defence):
    name = "clip"
    description = "plain CLIP-loss fine-tuning on clean pairs (also plants a backdoor on poisoned pairs)"
    paper = "CleanCLIP's FT baseline (Bansal, Singhi et al., arXiv 2303.03323)"
    defaults = dict(lr=5e-4, lr_end=0.0, warmup_fraction=0.05, schedule="cosine", wd=0.1)

    def loss(self, batch, logit_scale, *, epoch):
        return clip_loss(batch.img[0], batch.txt[0], logit_scale), {}


register_preset(Preset("clip-cleanclip-recipe", "clip", CLEANCLIP_RECIPE,
                       "plain fine-tuning with CleanCLIP's recipe (batch 64, lr 1e-5, 10 epochs, 50 warm-up steps)"))
