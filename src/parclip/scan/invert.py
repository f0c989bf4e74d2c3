"""Part 2 of the scan: trigger inversion, for triggers nobody told us about.

A trigger is modelled as a mask ``m ∈ [0, 1]^{S x S}`` and a pattern ``p ∈ [0, 1]^{3 x S x S}`` stamped on an image
``x`` (pixels in [0, 1], before the model's normalisation):

    x' = (1 - m) ⊙ x + m ⊙ p,        area(m) = mean(m)      (the normalised L1 norm, 1 = the whole image)

and optimised with Adam on ``m = sigmoid(a)``, ``p = sigmoid(b)`` to minimise ``objective(x') + λ · area(m)``, where
λ adapts as in Neural Cleanse (Wang et al., S&P 2019): after ``patience`` batches in a row that reach the objective's
success criterion λ grows by 1.5, after as many that miss it shrinks by 1.5^1.5. The smallest mask that succeeded on a
batch is kept and re-checked on every image of the pool. A backdoored model admits a much smaller successful mask
than a clean one, because its trigger is a small input pattern that already does the job.

Two objectives:

* encoder level (DECREE, Feng et al., CVPR 2023): make the embeddings of all images alike,
  ``loss = 1 - ||mean_i z_i||²`` (``z`` L2-normalised; ``||mean z||²`` is the mean pairwise cosine, self pairs
  included); success when it reaches the tightness of one clean class, :func:`cluster_tightness`.
* classifier level (Neural Cleanse with CLIP's text classifier, as CLIP-Inspector, arXiv 2604.09101): send every
  image to class ``c``, ``loss = CE(s · z Wᵀ, c)`` with the model's logit scale ``s``; success when at least
  ``success_rate`` of the images are classified ``c``.

:func:`anomaly_index` compares the per-class mask areas (median absolute deviation, Neural Cleanse's rule).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = ["Inversion", "Objective", "invert", "stamp", "collapse_objective", "class_objective", "cluster_tightness",
           "kmeans", "anomaly_index"]


@dataclasses.dataclass
class Inversion:
    """The smallest trigger that succeeded on a batch (`found`; else the last iterate): `mask` [S, S] and `pattern`
    [3, S, S] in [0, 1], its `area`, `success` and `metric` re-checked on the whole pool. :attr:`effective_area` is
    what comparisons use: the area when found, else 1 (no mask smaller than the whole image is known to work)."""
    mask: torch.Tensor
    pattern: torch.Tensor
    area: float
    found: bool
    success: bool
    metric: float
    steps: int

    @property
    def effective_area(self) -> float:
        return self.area if self.found else 1.0

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """This trigger on images ``x`` [B, 3, S, S] in [0, 1] (:func:`stamp`)."""
        return stamp(x, self.mask.to(x.device), self.pattern.to(x.device))

    def summary(self) -> dict:
        return {"area": self.effective_area, "mask_area": self.area, "found": self.found, "success": self.success,
                "metric": self.metric, "steps": self.steps}


def cluster_tightness(z: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean over groups g (with ≥ 2 members) of ``||mean_{i in g} z_i||²``: how alike the embeddings of one class
    are. `z` L2-normalised [N, d], `groups` [N] ints."""
    vals = [z[groups == g].mean(0).pow(2).sum().item() for g in groups.unique() if (groups == g).sum() >= 2]
    if not vals:
        raise ValueError("cluster_tightness needs a group with at least two members")
    return sum(vals) / len(vals)


@dataclasses.dataclass(frozen=True)
class Objective:
    """``loss(z) -> (differentiable loss, metric)`` of L2-normalised embeddings [B, d]; success is
    ``metric >= threshold``."""
    loss: Callable
    threshold: float

    def __call__(self, z: torch.Tensor):
        return self.loss(z)


def kmeans(z: torch.Tensor, k: int, *, seed: int = 0, iters: int = 20) -> torch.Tensor:
    """[N] cluster ids of spherical k-means on L2-normalised `z` [N, d] (assign each point to the centroid of
    highest cosine, centroids = normalised means), started from k points drawn with `seed`; k is capped at N."""
    k = max(1, min(k, len(z)))
    g = torch.Generator().manual_seed(seed)
    centres = z[torch.randperm(len(z), generator=g)[:k].to(z.device)]
    for _ in range(iters):
        ids = (z @ centres.T).argmax(1)
        for j in range(k):
            if (ids == j).any():
                centres[j] = F.normalize(z[ids == j].mean(0), dim=0)
    return (z @ centres.T).argmax(1)


def collapse_objective(target: float) -> Objective:
    """Encoder level: loss ``1 - ||mean z||²``, metric ``||mean z||²``, success at `target`."""
    def loss(z):
        s = z.mean(0).pow(2).sum()
        return 1 - s, s.item()
    return Objective(loss, target)


def class_objective(classifier: torch.Tensor, scale: float, c: int, success_rate: float) -> Objective:
    """Classifier level toward class `c`: loss ``CE(scale · z classifier, c)``, metric the share classified c,
    success at `success_rate`; `classifier` [d, C]."""
    def loss(z):
        logits = scale * z @ classifier
        share = (logits.argmax(1) == c).float().mean().item()
        return F.cross_entropy(logits, torch.full((len(z),), c, device=z.device)), share
    return Objective(loss, success_rate)


def stamp(x: torch.Tensor, m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``x' = (1 - m) ⊙ x + m ⊙ p``: a mask and pattern stamped on images in [0, 1]."""
    return (1 - m) * x + m * p


def _stamp(x, a, b):
    """:func:`stamp` with the mask and pattern given by their logits; returns (x', m)."""
    m = torch.sigmoid(a)
    return stamp(x, m, torch.sigmoid(b)), m


def invert(embed, images: torch.Tensor, objective: Objective, *, steps: int = 200, batch_size: int = 64,
           lr: float = 0.1, init_lambda: float = 1.0, patience: int = 5, seed: int = 0, progress: bool = False,
           desc: str = "invert") -> Inversion:
    """Optimise a mask and pattern (module docstring) for `objective` over `images` [N, 3, S, S] in [0, 1].
    `embed(x)` returns L2-normalised embeddings of images in [0, 1] (the model's normalisation inside) and must be
    differentiable in x; the model's own weights are not touched. Batches are drawn from `seed`, so a run repeats."""
    g = torch.Generator().manual_seed(seed)
    n, S = len(images), images.shape[-1]
    a = torch.full((1, 1, S, S), -3.0, device=images.device, requires_grad=True)
    b = (0.5 * torch.randn(1, 3, S, S, generator=g)).to(images.device).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr)
    lam, up, down, best = init_lambda, 0, 0, None
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        x = images[torch.randint(n, (min(batch_size, n),), generator=g).to(images.device)]
        xt, m = _stamp(x, a, b)
        loss, metric = objective(embed(xt))
        ok = metric >= objective.threshold
        area = m.mean()
        if ok and (best is None or area.item() < best[0]):
            best = (area.item(), a.detach().clone(), b.detach().clone())
        opt.zero_grad(set_to_none=True)
        (loss + lam * area).backward()
        opt.step()
        up, down = (up + 1, 0) if ok else (0, down + 1)
        if up >= patience:
            lam, up = lam * 1.5, 0
        elif down >= patience:
            lam, down = lam / 1.5 ** 1.5, 0
    a_best, b_best = (best[1], best[2]) if best is not None else (a.detach(), b.detach())
    with torch.no_grad():
        metrics = [objective(embed(_stamp(images[i:i + 256], a_best, b_best)[0])) for i in range(0, n, 256)]
    weights = [min(256, n - i) for i in range(0, n, 256)]
    metric = sum(w * mt[1] for w, mt in zip(weights, metrics)) / n
    ok = metric >= objective.threshold
    m = torch.sigmoid(a_best)[0, 0].cpu()
    return Inversion(mask=m, pattern=torch.sigmoid(b_best)[0].cpu(), area=m.mean().item(), found=best is not None,
                     success=ok, metric=metric, steps=steps)


def anomaly_index(areas: list[float]) -> list[float]:
    """Neural Cleanse's anomaly index of each class's mask area: ``(median - a_c) / (1.4826 · MAD)`` with
    ``MAD = median |a - median|``; large positive = a suspiciously small trigger (≥ 2 is NC's flag). 0 when the
    deviation is 0."""
    t = torch.tensor(areas, dtype=torch.float64)
    med = t.median()
    mad = 1.4826 * (t - med).abs().median()
    return [0.0 if mad == 0 else float((med - v) / mad) for v in t]
