"""Training-time image augmentation.

PAR's augmentation (as its reference code applies it; docs/reference_differences.md#noise-augmentation), on images
already resized and centre-cropped to the model resolution S:

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

from parclip.models import eval_transform, image_size

__all__ = ["one_sided_gaussian_noise", "gaussian_noise", "NOISES", "FixedThenRandom", "par_train_transform",
           "AUGMENTATIONS", "autoaugment_view", "roclip_train_transform", "train_transform"]


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


AUGMENTATIONS = ("none", "par", "roclip")


class FixedThenRandom(T.Compose):
    """``random(fixed(image))``: a Compose whose first transforms (`fixed`) give the same output for an image every
    time and use no random numbers, and whose last ones (`random`) draw them. It transforms exactly as the Compose of
    both lists does; the split lets a data set keep ``fixed(image)`` in memory and draw only `random` each epoch
    (:meth:`parclip.data.sources.TrainingData.keep_in_memory`); `random` is None when there is none."""

    def __init__(self, fixed: list, random: list):
        super().__init__([*fixed, *random])
        self.fixed, self.random = T.Compose(fixed), (T.Compose(random) if random else None)


def par_train_transform(preprocess_cfg: dict, *, noise: str = "one_sided", noise_sigma: float = 0.2,
                        noise_p: float = 0.5, erase_p: float = 0.5, erase_scale=(0.005, 0.01)) -> FixedThenRandom:
    """PIL image → augmented, normalised tensor, following PAR's pipeline (see the module docstring): the resize, crop
    and conversion to a tensor are its fixed part, the noise, normalisation and CutOut its random part.

    `preprocess_cfg` is the model's open_clip preprocess config (size, mean, std, interpolation).
    """
    size = image_size(preprocess_cfg)
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}.get(
        preprocess_cfg.get("interpolation", "bicubic"), InterpolationMode.BICUBIC)
    return FixedThenRandom([
        T.Resize(size, interpolation=interp),
        T.CenterCrop(size),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
    ], [
        T.RandomApply([_Noise(noise, noise_sigma)], p=noise_p),
        T.Normalize(preprocess_cfg["mean"], preprocess_cfg["std"]),
        T.RandomErasing(p=erase_p, scale=tuple(erase_scale), ratio=(1.0, 1.0), value=0),
    ])


def _interpolation(preprocess_cfg: dict) -> InterpolationMode:
    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}.get(
        preprocess_cfg.get("interpolation", "bicubic"), InterpolationMode.BICUBIC)


def autoaugment_view(preprocess_cfg: dict) -> T.Compose:
    """CleanCLIP's augmented image view: torchvision's AutoAugment (ImageNet policy, a fresh draw each call) on the raw
    RGB image *before* the model's preprocessing (resize, center crop, normalize)."""
    return T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.AutoAugment(T.AutoAugmentPolicy.IMAGENET),
                      eval_transform(preprocess_cfg)])


def roclip_train_transform(preprocess_cfg: dict) -> T.Compose:
    """RoCLIP's cross-augmentation (it replaces the plain view in every epoch):
        RandomResizedCrop(S, scale (0.08, 1)), horizontal flip p 0.5, ColorJitter(0.5, 0.5, 0.5, 0.1) with p 0.8,
        grayscale p 0.2, GaussianBlur(kernel k, σ ∈ [0.1, 2]) always, then ToTensor and Normalize.
    The reference's kernel is 21 px at 224; here k = the odd number nearest 21·S/224 (at least 3), so the blur means the
    same at every resolution (at 224, k = 21 as in the reference)."""
    size = image_size(preprocess_cfg)
    k = max(3, int(round(21 * size / 224)) | 1)
    return T.Compose([
        T.Lambda(lambda im: im.convert("RGB")),
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=_interpolation(preprocess_cfg)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.GaussianBlur(k, sigma=(0.1, 2.0)),
        T.ToTensor(),
        T.Normalize(preprocess_cfg["mean"], preprocess_cfg["std"]),
    ])


def train_transform(augment: str, preprocess_cfg: dict, *, noise: str = "one_sided", noise_sigma: float = 0.2):
    """The plain view's transform for `augment` in AUGMENTATIONS: none (the model's eval transform), par, roclip."""
    if augment == "par":
        return par_train_transform(preprocess_cfg, noise=noise, noise_sigma=noise_sigma)
    if augment == "roclip":
        return roclip_train_transform(preprocess_cfg)
    if augment == "none":  # the model's eval transform: all of it fixed
        return FixedThenRandom(list(eval_transform(preprocess_cfg).transforms), [])
    raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
