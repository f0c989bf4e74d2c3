"""Training objectives as pure functions: the CLIP loss, Perturb and Recover (PAR), CleanCLIP and RoCLIP (the
defences in :mod:`parclip.defences` wire them into training), and the triplet loss of the BadCLIP patch optimisation.

All embeddings are L2-normalised, one row per image–caption pair of the *global* batch (in multi-GPU training the
loop gathers them across ranks first, so these functions always see the whole batch):

    f_i = E_img(x_i)/||·||,  g_i = E_txt(t_i)/||·||          trained model θ
    f0_i, g0_i                                               frozen copy θ0 of the starting (possibly poisoned) model

    L_CLIP = ½ [ CE(s·F Gᵀ, I) + CE(s·G Fᵀ, I) ]             s = exp(logit_scale), labels = the diagonal
    D_img  = (1/N) Σ_i ||f_i − f0_i||²  ∈ [0, 4]              D_txt likewise with g
    thr_τ(D) = D if D ≤ τ else 0                              a constant 0 (no gradient) once D exceeds τ
    L_PAR  = L_CLIP − w · [ thr_τ(D_img) + thr_τ(D_txt) ]     w = 0.5, τ = 2.15 in the reference

    L_CleanCLIP = λ1·L_CLIP(F, G) + λ2·½ [ CE(s·F F̃ᵀ, I) + CE(s·G G̃ᵀ, I) ]    F̃, G̃: augmented views of the same pairs
    L_RoCLIP    = ½ [ CE(s·F Ĝᵀ, I) + CE(s·Ĝ Fᵀ, I) ]        Ĝ_i = the pooled caption nearest to f_i (no gradient)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["clip_loss", "embedding_distance", "threshold", "par_loss", "PARLoss", "inmodal_loss", "cleanclip_loss",
           "CleanCLIPLoss", "roclip_loss", "triplet_loss"]


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE:  L = ½ [ CE(s·F Gᵀ, I) + CE(s·G Fᵀ, I) ],  labels i ↔ i.

    `img`, `txt`: [N, d] L2-normalised embeddings. `logit_scale`: the multiplier s (already exponentiated). Pass
    `model.logit_scale.exp().detach()` to keep it frozen (PAR), or the live tensor to learn it (CLIP training).
    """
    img, txt = img.float(), txt.float()
    logits = logit_scale * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def embedding_distance(a: torch.Tensor, b: torch.Tensor, *, per_sample: bool = False) -> torch.Tensor:
    """D = (1/N) Σ_i Σ_d (a_i,d − b_i,d)²: squared L2 summed over the embedding, mean over the batch.

    For unit vectors this is mean_i (2 − 2·cos(a_i, b_i)), in [0, 4]. With `per_sample=True` returns the [N] vector
    of per-row distances instead of their mean.
    """
    d = (a.float() - b.float()).pow(2).sum(dim=-1)
    return d if per_sample else d.mean()


def threshold(d: torch.Tensor, tau: float) -> torch.Tensor:
    """thr_τ(D) = D if D ≤ τ else 0, element-wise; the comparison is strict '>' against float32(τ) as in the reference.

    Beyond τ the result is a constant zero, so it contributes no gradient; at D = τ exactly the term is kept.
    """
    tau32 = torch.tensor(tau, dtype=torch.float32, device=d.device)
    return torch.where(d.float() > tau32, torch.zeros_like(d), d)


class PARLoss(NamedTuple):
    """The PAR loss and its parts (all scalars). `dist_img`/`dist_txt` are the raw distances, before thresholding."""

    total: torch.Tensor
    clip: torch.Tensor
    perturb: torch.Tensor
    dist_img: torch.Tensor
    dist_txt: torch.Tensor


def par_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    img0: torch.Tensor,
    txt0: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    tau: float = 2.15,
    weight: float = 0.5,
    per_sample: bool = False,
    tau_txt: float | None = None,
    weight_txt: float | None = None,
) -> PARLoss:
    """L_PAR = L_CLIP(f, g; s) − w · [ thr_τ(D_img) + thr_τ(D_txt) ]   (minimised).

    `img`, `txt`: L2-normalised embeddings of the model being cleaned, [N, d], with gradient.
    `img0`, `txt0`: embeddings of the same inputs under the frozen starting model (no gradient needed).
    `logit_scale`: s, normally the frozen `exp(logit_scale)` of the starting model.
    The threshold acts on the batch-mean distance (the reference's semantics): once D > τ the whole term is 0.
    With `per_sample=True` (not in the reference) each row's distance is thresholded before the mean, so rows that
    are already far from the poisoned model stop being pushed while the others still are.
    `tau_txt`, `weight_txt` (not in the reference; default τ and w) give the text term its own threshold and weight,

        L = L_CLIP − w_img · thr_τimg(D_img) − w_txt · thr_τtxt(D_txt),

    so a tower can be pushed less or, with weight 0, not at all (the latch of :class:`parclip.defences.par` sets a
    weight to 0 for the rest of a run).

    Minimising −w·D *maximises* the distance to the poisoned embeddings (the "perturb" part) while the CLIP term
    keeps image and text aligned (the "recover" part).
    """
    tau_txt = tau if tau_txt is None else tau_txt
    weight_txt = weight if weight_txt is None else weight_txt
    lc = clip_loss(img, txt, logit_scale)
    d_img = embedding_distance(img, img0.detach(), per_sample=per_sample)
    d_txt = embedding_distance(txt, txt0.detach(), per_sample=per_sample)
    pert = weight * threshold(d_img, tau).mean() + weight_txt * threshold(d_txt, tau_txt).mean()
    total = lc - pert
    return PARLoss(total, lc, pert, d_img.mean().detach(), d_txt.mean().detach())


def inmodal_loss(a: torch.Tensor, a_aug: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """One-directional in-modal InfoNCE:  L = CE(s·A Ãᵀ, I): each plain view must pick its own augmented view among
    the batch's augmented views. `a`, `a_aug`: [N, d] L2-normalised; CleanCLIP uses the transpose direction nowhere."""
    logits = logit_scale * a.float() @ a_aug.float().t()
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


class CleanCLIPLoss(NamedTuple):
    """The CleanCLIP loss and its parts (scalars): `clip` = L_CLIP on the plain views, `inmodal` = L_SS."""

    total: torch.Tensor
    clip: torch.Tensor
    inmodal: torch.Tensor


def cleanclip_loss(img: torch.Tensor, txt: torch.Tensor, img_aug: torch.Tensor, txt_aug: torch.Tensor,
                   logit_scale: torch.Tensor | float, *, clip_weight: float = 1.0,
                   inmodal_weight: float = 1.0) -> CleanCLIPLoss:
    """L = λ1 · L_CLIP(F, G) + λ2 · L_SS,   L_SS = ½ [ CE(s·F F̃ᵀ, I) + CE(s·G G̃ᵀ, I) ]   (Bansal et al., 2023).

    `img`, `txt`: the plain views F, G; `img_aug`, `txt_aug`: the augmented views F̃ (AutoAugment), G̃ (EDA) of the
    same pairs; all [N, d], L2-normalised. One learned scale s serves every term; the augmented views never enter the
    cross-modal term, and the in-modal term is one-directional (plain → augmented), as the reference computes it.
    λ1 = `clip_weight`, λ2 = `inmodal_weight` (both 1 in the paper).
    """
    lc = clip_loss(img, txt, logit_scale)
    ss = 0.5 * (inmodal_loss(img, img_aug, logit_scale) + inmodal_loss(txt, txt_aug, logit_scale))
    return CleanCLIPLoss(clip_weight * lc + inmodal_weight * ss, lc, ss)


def roclip_loss(img: torch.Tensor, nn_txt: torch.Tensor, logit_scale: torch.Tensor | float,
                txt: torch.Tensor | None = None, nn_img: torch.Tensor | None = None) -> torch.Tensor:
    """L = ½ [ CE(s·F Ĝᵀ, I) + CE(s·Ĝ Fᵀ, I) ]  with Ĝ_i the pooled caption embedding nearest to f_i (Yang et al.,
    2023): each image is matched with its nearest pooled caption instead of its own, so a poisoned image–caption link
    cannot be learned. `nn_txt` carries no gradient, so the text tower gets none from this term.

    Bidirectional variant (arXiv v1), when `txt` and `nn_img` (the pooled image embedding nearest to each caption g_i)
    are given:  L = ½ [ L_CLIP(F, Ĝ) + L_CLIP(F̂, G) ].
    """
    loss = clip_loss(img, nn_txt.detach(), logit_scale)
    if nn_img is not None:
        if txt is None:
            raise ValueError("the bidirectional RoCLIP loss needs the caption embeddings `txt` with `nn_img`")
        loss = 0.5 * (loss + clip_loss(nn_img.detach(), txt, logit_scale))
    return loss


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """L_tri = mean_i max(‖a_i − p_i‖ − ‖a_i − n_i‖ + margin, 0)   (Euclidean norms over the embedding dimension).

    `anchor`, `positive`, `negative`: [N, d] (`positive`/`negative` may broadcast against `anchor`). Zero once every
    anchor is closer to its positive than to its negative by at least `margin`; otherwise it pulls a_i towards p_i and
    pushes it from n_i. BadCLIP's patch optimisation uses it with a = patched image, n = the same image unpatched, p = a
    target image or the target's text embedding (docs/badclip_patch.md).
    """
    return F.relu((anchor - positive).norm(dim=-1) - (anchor - negative).norm(dim=-1) + margin).mean()
