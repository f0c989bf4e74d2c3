"""`cleanclip`: CleanCLIP (Bansal, Singhi et al., ICCV 2023, arXiv 2303.03323): fine-tune on clean pairs with the CLIP
loss plus a self-supervised in-modal term, so that each modality learns features on its own and the poisoned
image–text shortcut weakens.

    L = λ1 · L_CLIP(F, G) + λ2 · ½ [ CE(s·F F̃ᵀ, I) + CE(s·G G̃ᵀ, I) ]        one learned, clamped scale s

F̃: AutoAugment (ImageNet policy) of the raw image, before preprocessing, drawn afresh each time; G̃: EDA of the
caption (exactly one of synonym replacement, random insertion, random swap, random deletion), computed once per data
set under the run's seed. Defaults: CleanCLIP's recipe (batch 64, lr 1e-5, 10 epochs, 50 warm-up steps, cosine,
weight decay 0.1, AdamW (0.9, 0.999, 1e-8)), λ1 = λ2 = 1 (docs/reference_differences.md#cleanclip-recipe).
"""
from __future__ import annotations

from ..objectives import cleanclip_loss
from ..utils.checks import check_number
from .augment import autoaugment_view
from .base import Defence, register
from .clip import CLEANCLIP_RECIPE


@register
class CleanCLIP(Defence):
    name = "cleanclip"
    description = "CLIP loss + in-modal self-supervision (AutoAugment images, EDA captions)"
    paper = "Bansal, Singhi et al.: CleanCLIP (ICCV 2023, arXiv 2303.03323)"
    defaults = CLEANCLIP_RECIPE

    def __init__(self, cfg):
        super().__init__(cfg)
        check_number("cleanclip_clip_weight", cfg.cleanclip_clip_weight, 0)
        check_number("cleanclip_inmodal_weight", cfg.cleanclip_inmodal_weight, 0)
        if cfg.batch_size < 2:
            raise ValueError(f"CleanCLIP's in-modal term needs other images of the batch as negatives: --batch-size "
                             f"{cfg.batch_size} is too small (CleanCLIP uses 64)")

    def image_views(self, preprocess_cfg):
        return [autoaugment_view(preprocess_cfg)]

    def prepare_captions(self, captions, keys=None):
        from .eda import eda_captions

        return captions, [eda_captions(captions, seed=self.cfg.seed, keys=keys)]

    def loss(self, batch, logit_scale, *, epoch):
        out = cleanclip_loss(batch.img[0], batch.txt[0], batch.img[1], batch.txt[1], logit_scale,
                             clip_weight=self.cfg.cleanclip_clip_weight,
                             inmodal_weight=self.cfg.cleanclip_inmodal_weight)
        return out.total, dict(clip_loss=out.clip.item(), inmodal=out.inmodal.item())
