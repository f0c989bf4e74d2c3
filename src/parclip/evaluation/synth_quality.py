"""How good synthetic images are, seen through a CLIP model: recognisability and Fréchet distance.

Recognisability (percent): the model's zero-shot top-1 on generated images labelled by the class they were
generated for,

    top1 = 100 · mean_i [ argmax_c s(x_i, c) = y_i ],

s the cosine between the image embedding and the class embedding (the prompt templates' mean, as in
:mod:`parclip.evaluation.zero_shot`).

Fréchet distance between two sets of image embeddings (here the L2-normalised embeddings of the model's image
encoder), each summarised by its mean μ and covariance Σ:

    FD = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}).

The trace of the matrix square root is computed from a symmetric form, Tr((Σ₁Σ₂)^{1/2}) = Tr((A Σ₂ A)^{1/2}) with
A = Σ₁^{1/2} (Σ₁Σ₂ is similar to AΣ₂A, which is symmetric positive semi-definite), i.e. the sum of the square
roots of the eigenvalues of A Σ₂ A; negative eigenvalues from rounding are clipped to 0. An FD has no absolute scale
and is biased upwards for small samples: compare it with the FD between two disjoint real samples of the same size
(:func:`real_baseline_split`).

Copying: a generator can lower its FD by replaying its training images. The nearest-neighbour distance of an image q
to a set R (pixels in [0, 1], flattened),

    d(q, R) = min_{r ∈ R} ‖q − r‖₂,

of generated images to the generator's training images, compared with the same for real images the generator never
saw (:func:`copy_statistics`), tells a generator that makes new images (distances like unseen real images') from one
that replays (distances near 0).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .encode import Tolerant, encode_images
from .zero_shot import topk_correct, zero_shot_classifier

__all__ = ["nearest_distances", "copy_statistics", "gaussian_stats", "sqrtm_psd", "frechet_distance", "embedding_frechet_distance", "top1_percent",
           "per_class_top1", "real_baseline_split", "embed_images", "recognisability"]


def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of the rows of ``x`` [N, d] in float64: μ = mean, Σ = (1/(N−1)) Σ_i (x_i − μ)(x_i − μ)ᵀ. N ≥ 2."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"gaussian_stats: expected [N >= 2, d] samples, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix: V diag(√max(λ, 0)) Vᵀ from its
    eigen-decomposition a = V diag(λ) Vᵀ (symmetrised first, ½(a + aᵀ), against rounding)."""
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FD = ‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2 Σ_j √λ_j, λ the eigenvalues of A Σ₂ A, A = Σ₁^{1/2} (module docstring).
    Symmetric in its two Gaussians up to rounding; 0 for identical ones; never negative (clipped at 0)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: μ {mu1.shape} / {mu2.shape}, Σ {s1.shape} / {s2.shape}")
    a = sqrtm_psd(s1)
    m = a @ s2 @ a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0, None)).sum()
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)
    return max(fd, 0.0)


def embedding_frechet_distance(a, b) -> float:
    """FD between the Gaussians fitted (:func:`gaussian_stats`) to two embedding sets [N₁, d] and [N₂, d]."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def top1_percent(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """100 · mean_i [argmax_c logits_ic = y_i]."""
    if len(labels) == 0:
        raise ValueError("top1_percent: no samples")
    return 100.0 * topk_correct(logits, labels, 1).float().mean().item()


def per_class_top1(logits: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict[str, float]:
    """{class: 100 · share of its samples predicted as it}, classes without samples left out."""
    pred = logits.argmax(dim=1)
    return {name: 100.0 * (pred[labels == c] == c).float().mean().item()
            for c, name in enumerate(classnames) if (labels == c).any()}


def real_baseline_split(labels: Sequence[int], per_class: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint index sets, each with ``per_class`` indices of every class (seeded): the two real samples whose
    FD is the scale a generated sample's FD is read against. A ValueError when a class has fewer than 2·per_class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2 * per_class:
            raise ValueError(f"class {c}: {len(idx)} images, {2 * per_class} needed for two disjoint samples")
        pick = rng.permutation(idx)[:2 * per_class]
        first += sorted(pick[:per_class].tolist())
        second += sorted(pick[per_class:].tolist())
    return first, second


def nearest_distances(queries: np.ndarray, reference: np.ndarray, chunk: int = 512) -> np.ndarray:
    """d_i = min_j ‖q_i − r_j‖₂ for rows q_i of ``queries`` [N, D] and r_j of ``reference`` [M, D], computed as
    sqrt(max(‖q‖² + ‖r‖² − 2 q·r, 0)) in float64, ``chunk`` queries at a time."""
    q, r = np.asarray(queries, np.float64), np.asarray(reference, np.float64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1] or not len(r):
        raise ValueError(f"nearest_distances: shapes {q.shape} and {r.shape}")
    rr = (r ** 2).sum(1)
    out = np.empty(len(q))
    for i in range(0, len(q), chunk):
        qc = q[i:i + chunk]
        d2 = (qc ** 2).sum(1)[:, None] + rr[None, :] - 2 * qc @ r.T
        out[i:i + chunk] = np.sqrt(np.clip(d2.min(1), 0, None))
    return out


def copy_statistics(generated: np.ndarray, unseen: np.ndarray, train: np.ndarray, *, gen_labels, unseen_labels,
                    train_labels, quantile: float = 0.01) -> dict:
    """Nearest-neighbour distances to the same-class training images (:func:`nearest_distances`, images as
    [N, H, W] uint8, scaled to [0, 1]) of generated and of unseen real images: the medians, their ratio
    (generated / unseen; < 1: generated images sit closer to the training set than new real ones do) and the share
    of generated images nearer than the ``quantile`` of the unseen images' distances ("near copies")."""
    def dists(x, labels):
        x = x.reshape(len(x), -1) / 255.0
        labels, out = np.asarray(labels), np.empty(len(x))
        for c in np.unique(labels):
            ref = train.reshape(len(train), -1)[np.asarray(train_labels) == c] / 255.0
            out[labels == c] = nearest_distances(x[labels == c], ref)
        return out
    g, u = dists(generated, gen_labels), dists(unseen, unseen_labels)
    threshold = float(np.quantile(u, quantile))
    return {"median_nn_generated": float(np.median(g)), "median_nn_unseen": float(np.median(u)),
            "ratio": float(np.median(g) / np.median(u)), "near_copy_threshold": threshold,
            "near_copies": float((g < threshold).mean())}


class _Images(Dataset):
    def __init__(self, images: Sequence[Image.Image], transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i].convert("RGB"))


def embed_images(model, preprocess_cfg: dict, images: Sequence[Image.Image], *, batch_size: int = 500,
                 device="cpu") -> torch.Tensor:
    """L2-normalised image embeddings [N, d] (float32, CPU) of PIL images through the model's eval transform."""
    from parclip.models import eval_transform, image_size
    device = torch.device(device)
    model = model.to(device).eval()
    data = Tolerant(_Images(images, eval_transform(preprocess_cfg)), image_size(preprocess_cfg))
    feats, errors = encode_images(model, data, batch_size=batch_size, workers=0, device=device, desc="embed",
                                  progress=False, amp=False)
    assert not any(errors), "in-memory images cannot fail to load"
    return feats


@torch.no_grad()
def recognisability(model, tokenizer, feats: torch.Tensor, labels: Sequence[int], classnames: Sequence[str],
                    templates: Sequence[str], device="cpu") -> dict:
    """Zero-shot top-1 (percent, overall and per class) of image embeddings ``feats`` labelled ``labels`` (indices
    into ``classnames``), with the class embeddings of ``templates``."""
    classifier = zero_shot_classifier(model, tokenizer, list(classnames), list(templates), torch.device(device))
    logits = feats.float() @ classifier.float().cpu()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    return {"top1": top1_percent(logits, y), "per_class": per_class_top1(logits, y, classnames), "n": len(y)}
