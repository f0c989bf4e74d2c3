"""Training objectives: the CLIP loss and the Perturb-and-Recover (PAR) loss, as pure functions (and the triplet
loss of the BadCLIP patch optimisation, :func:`triplet_loss`).

All embeddings are L2-normalised, one row per image–caption pair of the *global* batch (in multi-GPU training the
loop gathers them across ranks first, so these functions always see the whole batch):

    f_i = E_img(x_i)/||·||,  g_i = E_txt(t_i)/||·||          trained model θ
    f0_i, g0_i                                               frozen copy θ0 of the starting (possibly poisoned) model

    L_CLIP = ½ [ CE(s·F Gᵀ, I) + CE(s·G Fᵀ, I) ]             s = exp(logit_scale), labels = the diagonal
    D_img  = (1/N) Σ_i ||f_i − f0_i||²  ∈ [0, 4]              D_txt likewise with g
    thr_τ(D) = D if D ≤ τ else 0                              a constant 0 (no gradient) once D exceeds τ
    L_PAR  = L_CLIP − w · [ thr_τ(D_img) + thr_τ(D_txt) ]     w = 0.5, τ = 2.15 in the reference
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["clip_loss", "embedding_distance", "threshold", "par_loss", "PARLoss", "triplet_loss"]


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
) -> PARLoss:
    """L_PAR = L_CLIP(f, g; s) − w · [ thr_τ(D_img) + thr_τ(D_txt) ]   (minimised).

    `img`, `txt`: L2-normalised embeddings of the model being cleaned, [N, d], with gradient.
    `img0`, `txt0`: embeddings of the same inputs under the frozen starting model (no gradient needed).
    `logit_scale`: s, normally the frozen `exp(logit_scale)` of the starting model.
    The threshold acts on the batch-mean distance (the reference's semantics): once D > τ the whole term is 0.
    With `per_sample=True` (not in the reference) each row's distance is thresholded before the mean, so rows that
    are already far from the poisoned model stop being pushed while the others still are.

    Minimising −w·D *maximises* the distance to the poisoned embeddings (the "perturb" part) while the CLIP term
    keeps image and text aligned (the "recover" part).
    """
    lc = clip_loss(img, txt, logit_scale)
    d_img = embedding_distance(img, img0.detach(), per_sample=per_sample)
    d_txt = embedding_distance(txt, txt0.detach(), per_sample=per_sample)
    pert = threshold(d_img, tau).mean() + threshold(d_txt, tau).mean()
    total = lc - weight * pert
    return PARLoss(total, lc, weight * pert, d_img.mean().detach(), d_txt.mean().detach())


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """L_tri = mean_i max(‖a_i − p_i‖ − ‖a_i − n_i‖ + margin, 0)   (Euclidean norms over the embedding dimension).

    `anchor`, `positive`, `negative`: [N, d] (`positive`/`negative` may broadcast against `anchor`). Zero once every
    anchor is closer to its positive than to its negative by at least `margin`; otherwise it pulls a_i towards p_i and
    pushes it from n_i. BadCLIP's patch optimisation uses it with a = patched image, n = the same image unpatched, p = a
    target image or the target's text embedding (docs/badclip_patch.md).
    """
    return F.relu((anchor - positive).norm(dim=-1) - (anchor - negative).norm(dim=-1) + margin).mean()
