"""Training-time image augmentation.

PAR's augmentation (par.md §3.5), on images already resized and centre-cropped to the model resolution S:

    x ∈ [0,1]^{3×S×S}
    with p = 0.5:  x ← clip( x + clip(σ·ε, 0, 1), 0, 1 ),  ε ~ N(0, I), σ = 0.2   ("one-sided": only brightens)
    x ← Normalize(x)
    with p = 0.5:  zero (= the dataset-mean colour) a square of area S²·U(0.005, 0.01) at a uniform position (CutOut)

The reference calls the first step "Gaussian noise"; the noise is clipped to [0,1] *before* it is added, so it is
one-sided (mean added ≈ σ/√(2π) ≈ 0.08). We keep that by default for parity and name it honestly; a symmetric
variant x + σ·ε is available. CutOut is torchvision's RandomErasing with ratio 1.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from parclip.models import image_size

__all__ = ["one_sided_gaussian_noise", "gaussian_noise", "NOISES", "par_train_transform", "AUGMENTATIONS"]


def one_sided_gaussian_noise(x: torch.Tensor, sigma: float = 0.2, generator: torch.Generator | None = None):
    """x' = clip(x + clip(σ·ε, 0, 1), 0, 1), ε ~ N(0, I): the reference's noise, which can only brighten."""
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x + (sigma * eps).clamp(0, 1)).clamp(0, 1)


def gaussian_noise(x: torch.Tensor, sigma: float = 0.2, generator: torch.Generator | None = None):
    """x' = clip(x + σ·ε, 0, 1), ε ~ N(0, I): symmetric Gaussian noise (not in the reference)."""
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x + sigma * eps).clamp(0, 1)


NOISES = {"one_sided": one_sided_gaussian_noise, "symmetric": gaussian_noise}


class _Noise(torch.nn.Module):
    def __init__(self, kind: str, sigma: float):
        super().__init__()
        if kind not in NOISES:
            raise ValueError(f"unknown noise {kind!r}; choose one of {', '.join(NOISES)}")
        self.fn, self.sigma, self.kind = NOISES[kind], sigma, kind

    def forward(self, x):
        return self.fn(x, self.sigma)

    def __repr__(self):
        return f"{self.kind}_gaussian_noise(sigma={self.sigma})"


AUGMENTATIONS = ("none", "par")


def par_train_transform(preprocess_cfg: dict, *, noise: str = "one_sided", noise_sigma: float = 0.2,
                        noise_p: float = 0.5, erase_p: float = 0.5, erase_scale=(0.005, 0.01)) -> T.Compose:
    """PIL image → augmented, normalised tensor, following PAR's pipeline (see the module docstring).

    `preprocess_cfg` is the model's open_clip preprocess config (size, mean, std, interpolation).
    """
    size = image_size(preprocess_cfg)
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}.get(
        preprocess_cfg.get("interpolation", "bicubic"), InterpolationMode.BICUBIC)
    return T.Compose([
        T.Resize(size, interpolation=interp),
        T.CenterCrop(size),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.RandomApply([_Noise(noise, noise_sigma)], p=noise_p),
        T.Normalize(preprocess_cfg["mean"], preprocess_cfg["std"]),
        T.RandomErasing(p=erase_p, scale=tuple(erase_scale), ratio=(1.0, 1.0), value=0),
    ])
