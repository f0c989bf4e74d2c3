"""``pca-gauss``: per class, a mixture of M Gaussians each in its own low-rank PCA basis, fitted in seconds (M = 1:
one Gaussian per class, the baseline).

The fit splits class c's training images x (flattened, pixel values in [0, 1], D pixels) into M clusters by k-means
(seeded; M = 1: one cluster) and keeps per cluster m

    π_cm = the cluster's share of the class's images,
    μ_cm = the cluster's mean image,
    U_cm = its top-k principal directions (rows, orthonormal), λ_cm their variances (eigenvalues of the covariance),
    σ_cm² = (1/D) Σ_{j>k} λ_cmj (the variance the k directions leave out, averaged over the D pixels).

A sample of class c under a seeded generator picks a cluster m ~ Categorical(π_c) and draws

    x = μ_cm + Σ_j sqrt(λ_cmj) z_j U_cmj + r · σ_cm ε,   z ~ N(0, I_k), ε ~ N(0, I_D),

clipped to [0, 1] (``r`` = 1 with ``residual_noise``, else 0: the residual is pixel noise, which a smooth image
lacks). Use :func:`fit_pca_gauss`; load a stored one with ``load_generator("pca-gauss:FOLDER")``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import register_generator
from .classcond import TrainedClassGenerator

__all__ = ["PCAGaussGenerator", "fit_pca_gauss", "fit_gaussian"]


@register_generator
class PCAGaussGenerator(TrainedClassGenerator):
    """Per class a mixture of Gaussians, each a mean + k principal directions (+ optional isotropic residual)."""

    kind = "pca-gauss"

    @classmethod
    def expected_tensors(cls, config: dict) -> dict[str, tuple[int, ...]]:
        c, k, d = len(config["classnames"]), int(config["components"]), int(config["image_size"]) ** 2
        m = int(config.get("clusters", 1))
        return {"weight": (c, m), "mean": (c, m, d), "basis": (c, m, k, d), "scale": (c, m, k),
                "residual_std": (c, m)}

    def _setup(self) -> None:
        self._t = {k: v.double() for k, v in self.tensors.items()}
        w = self._t["weight"]
        if (w < 0).any() or not torch.allclose(w.sum(1), torch.ones(len(w), dtype=w.dtype), atol=1e-4):
            raise ValueError("pca-gauss: mixture weights must be non-negative and sum to 1 per class")
        self._cum = w.cumsum(1)

    def _sample(self, label: int, generator: torch.Generator) -> torch.Tensor:
        t, size = self._t, int(self.config["image_size"])
        k, d = t["basis"].shape[2:]
        u = torch.rand(1, generator=generator, dtype=torch.float64)
        m = min(int(torch.searchsorted(self._cum[label], u).item()), self._cum.shape[1] - 1)
        z = torch.randn(k, generator=generator, dtype=torch.float64)
        x = t["mean"][label, m] + (z * t["scale"][label, m]) @ t["basis"][label, m]
        if self.config.get("residual_noise"):
            x = x + t["residual_std"][label, m] * torch.randn(d, generator=generator, dtype=torch.float64)
        return x.clamp(0, 1).reshape(size, size)


def fit_gaussian(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(μ, U [k, D], sqrt(λ) [k], σ) of samples x [N, D] (module docstring); directions beyond N − 1 are zero."""
    d = x.shape[1]
    mean = x.mean(axis=0)
    basis, scale = np.zeros((k, d)), np.zeros(k)
    if len(x) < 2:
        return mean, basis, scale, 0.0
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2 / (len(x) - 1)  # eigenvalues of the covariance, descending
    m = min(k, len(var))
    basis[:m], scale[:m] = vt[:m], np.sqrt(var[:m])
    return mean, basis, scale, float(np.sqrt(var[m:].sum() / d)) if len(var) > m else 0.0


def _clusters(x: np.ndarray, m: int, seed: int) -> np.ndarray:
    """k-means cluster index of every row (seeded); all 0 for m = 1."""
    if m == 1:
        return np.zeros(len(x), np.int64)
    from sklearn.cluster import KMeans
    return KMeans(n_clusters=m, n_init=3, random_state=seed).fit_predict(x)


def fit_pca_gauss(images: np.ndarray, labels: np.ndarray, classnames: Sequence[str], *, components: int = 32,
                  clusters: int = 1, residual_noise: bool = False, seed: int = 0) -> PCAGaussGenerator:
    """Fit the per-class mixtures (module docstring) to uint8 images [N, S, S] with labels in
    0..len(classnames)-1. Deterministic for a seed (the k-means initialisation). Every class needs at least
    max(2, clusters) images."""
    n, size, size2 = images.shape
    if size != size2 or len(labels) != n:
        raise ValueError(f"pca-gauss: images {images.shape} (square expected) and {len(labels)} labels")
    c, d, k, m = len(classnames), size * size, int(components), int(clusters)
    if not 1 <= k <= d or m < 1:
        raise ValueError(f"pca-gauss: components {k} outside 1..{d} or clusters {m} < 1")
    weight, mean, basis = np.zeros((c, m)), np.zeros((c, m, d)), np.zeros((c, m, k, d))
    scale, residual = np.zeros((c, m, k)), np.zeros((c, m))
    x_all = images.reshape(n, d).astype(np.float64) / 255.0
    for cls in range(c):
        x = x_all[labels == cls]
        if len(x) < max(2, m):
            raise ValueError(f"pca-gauss: class {classnames[cls]!r} has {len(x)} training images; at least "
                             f"{max(2, m)} needed")
        assign = _clusters(x, m, seed)
        for j in range(m):
            xj = x[assign == j]
            weight[cls, j] = len(xj) / len(x)
            if len(xj):
                mean[cls, j], basis[cls, j], scale[cls, j], residual[cls, j] = fit_gaussian(xj, k)
    tensors = {name: torch.from_numpy(a).float() for name, a in
               dict(weight=weight, mean=mean, basis=basis, scale=scale, residual_std=residual).items()}
    tensors["weight"] = torch.from_numpy(weight / weight.sum(1, keepdims=True)).float()
    config = {"classnames": list(classnames), "image_size": size, "components": k, "clusters": m,
              "residual_noise": bool(residual_noise), "seed": int(seed), "n_train": int(n)}
    return PCAGaussGenerator(tensors, config)
