"""`par`: Perturb and Recover (Singh, Croce, Hein, arXiv 2412.00727): the CLIP loss minus a thresholded term that
pushes the embeddings away from a frozen copy θ0 of the starting (possibly poisoned) model.

    L_PAR = L_CLIP(F, G; s) − w · [ thr_τ(D_img) + thr_τ(D_txt) ],   D = (1/N) Σ_i ||f_i − f0_i||²,   s frozen

Defaults are the reference's (TrainConfig's own defaults): τ 2.15, w 0.5, lr 3e-5 → 3e-6 → 1e-9 (reference schedule),
AdamW (0.9, 0.98), weight decay 1e-4, one-sided noise + CutOut, BatchNorm statistics frozen
(docs/reference_differences.md#par-settings).

Options not in the reference, each off by default (docs/par_recovery.md measures them):
  --tau-text          the text term's own threshold (the image term keeps --tau);
  --par-latch         a tower's term is switched off for the rest of the run once its distance first exceeds its τ,
                      so the run has a perturb phase, then a recover phase with the CLIP loss alone;
  --perturb-epochs N  the term acts in the first N epochs only.
A term switched off has weight 0: L = L_CLIP − w_img·thr(D_img) − w_txt·thr(D_txt) with w_img or w_txt = 0.

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

    def __init__(self, cfg):
        super().__init__(cfg)
        self.latched = {"img": False, "txt": False}  # with --par-latch: terms switched off for the rest of the run

    @property
    def stateful(self) -> bool:  # the latch changes in loss()
        return bool(self.cfg.par_latch)

    def frozen_copy(self) -> bool:
        return self.cfg.par_weight != 0  # w = 0 (the ablation) needs no frozen forward

    def taus(self) -> tuple[float, float]:
        """(τ_img, τ_txt)."""
        return self.cfg.tau, self.cfg.tau if self.cfg.tau_text is None else self.cfg.tau_text

    def weights(self, epoch: int) -> tuple[float, float]:
        """(w_img, w_txt) at `epoch` (0-based): w, or 0 for a latched term and after --perturb-epochs."""
        w = self.cfg.par_weight
        if self.cfg.perturb_epochs is not None and epoch >= self.cfg.perturb_epochs:
            return 0.0, 0.0
        return (0.0 if self.latched["img"] else w), (0.0 if self.latched["txt"] else w)

    def loss(self, batch, logit_scale, *, epoch):
        if batch.img0 is None:  # w = 0: L_PAR is L_CLIP
            return clip_loss(batch.img[0], batch.txt[0], logit_scale), {}
        (tau_img, tau_txt), (w_img, w_txt) = self.taus(), self.weights(epoch)
        out = par_loss(batch.img[0], batch.txt[0], batch.img0, batch.txt0, logit_scale, tau=tau_img,
                       weight=w_img, tau_txt=tau_txt, weight_txt=w_txt, per_sample=self.cfg.per_sample_threshold)
        d_img, d_txt = out.dist_img.item(), out.dist_txt.item()
        # "on": the term pushed in this step (weight > 0 and the batch-mean distance within τ; with the per-sample
        # threshold some rows may still push when the mean is beyond τ)
        parts = dict(clip_loss=out.clip.item(), perturb=out.perturb.item(), dist_img=d_img, dist_txt=d_txt,
                     on_img=float(w_img > 0 and d_img <= tau_img), on_txt=float(w_txt > 0 and d_txt <= tau_txt))
        if self.cfg.par_latch:
            self.latched["img"] |= d_img > tau_img
            self.latched["txt"] |= d_txt > tau_txt
        return out.total, parts

    def state_dict(self) -> dict:
        return {"latched": dict(self.latched)} if self.cfg.par_latch else {}

    def load_state_dict(self, state: dict) -> None:
        if state and not self.cfg.par_latch:
            raise ValueError(f"the checkpoint holds PAR's latch {state}, but this run has no --par-latch")
        if state:
            self.latched = {"img": bool(state["latched"]["img"]), "txt": bool(state["latched"]["txt"])}


register_preset(Preset("par-no-perturb", "par", dict(par_weight=0.0),
                       "ablation: PAR's augmentation, schedule and frozen scale without the perturbation term"))
