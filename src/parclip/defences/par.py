"""`par`: Perturb and Recover (Singh, Croce, Hein, arXiv 2412.00727): the CLIP loss minus a thresholded term that
pushes the embeddings away from a frozen copy θ0 of the starting (possibly poisoned) model.

    L_PAR = L_CLIP(F, G; s) − w · [ thr_τ(D_img) + thr_τ(D_txt) ],   D = (1/N) Σ_i ||f_i − f0_i||²,   s frozen

Defaults are the reference's (TrainConfig's own defaults): τ 2.15, w 0.5, lr 3e-5 → 3e-6 → 1e-9 (reference schedule),
AdamW (0.9, 0.98), weight decay 1e-4, one-sided noise + CutOut, BatchNorm statistics frozen
(docs/reference_differences.md#par-settings).

The preset `par-no-perturb` is the ablation "PAR's training without the perturbation term" (w = 0: the same data,
augmentation, schedule, frozen scale and BatchNorm), so a matrix shows what the perturbation itself adds.
"""
from __future__ import annotations

from ..objectives import clip_loss, par_loss
from .base import Defence, Preset, register, register_preset


@register
class PerturbAndRecover(Defence):
    name = "par"
    description = "Perturb and Recover: CLIP loss minus the thresholded distance to the frozen starting model"
    paper = "Singh, Croce, Hein: Perturb and Recover (arXiv 2412.00727)"
    defaults: dict = {}  # TrainConfig's defaults are PAR's reference settings
    logit_scale = "frozen"
    bn_mode = "frozen"
    augment = "par"

    def frozen_copy(self) -> bool:
        return self.cfg.par_weight != 0  # w = 0 (the ablation) needs no frozen forward

    def loss(self, batch, logit_scale, *, epoch):
        if batch.img0 is None:  # w = 0: L_PAR is L_CLIP
            return clip_loss(batch.img[0], batch.txt[0], logit_scale), {}
        out = par_loss(batch.img[0], batch.txt[0], batch.img0, batch.txt0, logit_scale, tau=self.cfg.tau,
                       weight=self.cfg.par_weight, per_sample=self.cfg.per_sample_threshold)
        return out.total, dict(clip_loss=out.clip.item(), perturb=out.perturb.item(), dist_img=out.dist_img.item(),
                               dist_txt=out.dist_txt.item())


register_preset(Preset("par-no-perturb", "par", dict(par_weight=0.0),
                       "ablation: PAR's augmentation, schedule and frozen scale without the perturbation term"))
