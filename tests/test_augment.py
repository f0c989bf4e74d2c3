import math

import pytest
import torch
from PIL import Image

from parclip.defences.augment import gaussian_noise, one_sided_gaussian_noise, par_train_transform

CFG = {"size": 224, "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
       "interpolation": "bicubic"}


def test_one_sided_noise_only_brightens_with_the_expected_mean():
    x = torch.zeros(3, 224, 224)
    g = torch.Generator().manual_seed(0)
    y = one_sided_gaussian_noise(x, 0.2, generator=g)
    assert (y >= x).all()
    assert y.mean().item() == pytest.approx(0.2 / math.sqrt(2 * math.pi), abs=0.002)
    x = torch.full((3, 64, 64), 0.5)
    assert (one_sided_gaussian_noise(x, 0.2, generator=g) >= 0.5).all()
    assert (gaussian_noise(x, 0.2, generator=g) < 0.5).any()


def test_par_transform_shape_normalization_and_cutout_side():
    torch.manual_seed(0)
    img = Image.new("RGB", (300, 250), (124, 117, 104))  # ≈ the OpenAI mean colour
    t = par_train_transform(CFG, noise_p=0.0, erase_p=1.0)
    sides = []
    for _ in range(20):
        x = t(img)
        assert x.shape == (3, 224, 224)
        zero = (x == 0).all(dim=0)
        rows, cols = zero.any(dim=1).sum().item(), zero.any(dim=0).sum().item()
        sides.append((rows, cols))
    # a square of area 224²·U(0.005, 0.01) → side 16..22 (plus mean-coloured pixels that normalise to ~0 are excluded
    # because the image colour is not exactly the mean)
    assert all(r == c and 16 <= r <= 22 for r, c in sides), sides
    t = par_train_transform(CFG, noise_p=0.0, erase_p=0.0)
    x = t(Image.new("RGB", (224, 224), (0, 0, 0)))
    assert torch.allclose(x[0], torch.full((224, 224), -0.48145466 / 0.26862954), atol=1e-5)
