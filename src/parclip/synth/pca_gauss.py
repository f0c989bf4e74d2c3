"""``pca-gauss``: a per-class Gaussian in a low-rank PCA basis, fitted in seconds (the baseline family).

For class c with training images x (flattened, pixel values in [0, 1]) the fit keeps

    μ_c = mean of the class's images,
    U_c = its top-k principal directions (rows, orthonormal), λ_c their variances (eigenvalues of the covariance),
    σ_c² = (1/D) Σ_{j>k} λ_cj (the variance the k directions leave out, averaged over the D pixels),

and a sample of class c under a seeded generator is

    x = μ_c + Σ_j sqrt(λ_cj) z_j U_cj + r · σ_c ε,   z ~ N(0, I_k), ε ~ N(0, I_D),

clipped to [0, 1] (``r`` = 1 with ``residual_noise``, else 0: the residual is pixel noise, which a smooth image
lacks). Use :func:`fit_pca_gauss`; load a stored one with ``load_generator("pca-gauss:FOLDER")``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import register_generator
from .classcond import TrainedClassGenerator

__all__ = ["PCAGaussGenerator", "fit_pca_gauss"]


@register_generator
class PCAGaussGenerator(TrainedClassGenerator):
    """Per-class Gaussian, mean + k principal directions (+ optional isotropic residual)."""

    kind = "pca-gauss"

    @classmethod
    def expected_tensors(cls, config: dict) -> dict[str, tuple[int, ...]]:
        c, k, d = len(config["classnames"]), int(config["components"]), int(config["image_size"]) ** 2
        return {"mean": (c, d), "basis": (c, k, d), "scale": (c, k), "residual_std": (c,)}

    def _setup(self) -> None:
        self._t = {k: v.double() for k, v in self.tensors.items()}

    def _sample(self, label: int, generator: torch.Generator) -> torch.Tensor:
        t, size = self._t, int(self.config["image_size"])
        k, d = t["basis"].shape[1:]
        z = torch.randn(k, generator=generator, dtype=torch.float64)
        x = t["mean"][label] + (z * t["scale"][label]) @ t["basis"][label]
        if self.config.get("residual_noise"):
            x = x + t["residual_std"][label] * torch.randn(d, generator=generator, dtype=torch.float64)
        return x.clamp(0, 1).reshape(size, size)


def fit_pca_gauss(images: np.ndarray, labels: np.ndarray, classnames: Sequence[str], *, components: int = 32,
                  residual_noise: bool = False) -> PCAGaussGenerator:
    """Fit the per-class Gaussians (module docstring) to uint8 images [N, S, S] with labels in 0..len(classnames)-1.
    Deterministic (an SVD per class, no random numbers). A class needs at least 2 images."""
    n, size, size2 = images.shape
    if size != size2 or len(labels) != n:
        raise ValueError(f"pca-gauss: images {images.shape} (square expected) and {len(labels)} labels")
    c, d = len(classnames), size * size
    k = int(components)
    if not 1 <= k <= d:
        raise ValueError(f"pca-gauss: components {k} outside 1..{d}")
    mean, basis = np.zeros((c, d)), np.zeros((c, k, d))
    scale, residual = np.zeros((c, k)), np.zeros(c)
    x_all = images.reshape(n, d).astype(np.float64) / 255.0
    for cls in range(c):
        x = x_all[labels == cls]
        if len(x) < 2:
            raise ValueError(f"pca-gauss: class {classnames[cls]!r} has {len(x)} training images; at least 2 needed")
        mean[cls] = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean[cls], full_matrices=False)
        var = s ** 2 / (len(x) - 1)  # eigenvalues of the class covariance, descending
        m = min(k, len(var))
        basis[cls, :m], scale[cls, :m] = vt[:m], np.sqrt(var[:m])
        residual[cls] = np.sqrt(var[m:].sum() / d) if len(var) > m else 0.0
    tensors = {"mean": torch.from_numpy(mean).float(), "basis": torch.from_numpy(basis).float(),
               "scale": torch.from_numpy(scale).float(), "residual_std": torch.from_numpy(residual).float()}
    config = {"classnames": list(classnames), "image_size": size, "components": k,
              "residual_noise": bool(residual_noise), "n_train": int(n)}
    return PCAGaussGenerator(tensors, config)
