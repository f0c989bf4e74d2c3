"""Blended (Chen et al. 2017) with per-image uniform noise as the CLIP-backdoor codebases implement it (reference
``patch_type="blended"``, PAR's "Blended-Random")."""
from __future__ import annotations

import torch

from .base import REFERENCE_IMAGE_SIZE, Trigger, blend, check_unit, register

__all__ = ["Blended"]


@register
class Blended(Trigger):
    """Blended (reference ``blended``): ``x' = clip(alpha * P + (1 - alpha) * x, 0, 1)`` with
    ``P ~ U[0, 1)^{3 x S x S}`` drawn fresh for every image (one ``rand(3, S, S)`` from the generator), in float32,
    then the reference uint8 conversion (truncation; nothing can wrap after the clip, so ``uint8_mode`` has no effect).

    Parameters: ``alpha`` (default 0.2: CleanCLIP and PAR hard-code 0.2, and BadCLIP's ``--blended_alpha`` defaults to
    it; the reference ignores ``noise_coeff`` here).

    Note that, unlike the classic Blended attack (one fixed key image), the key is i.i.d. noise redrawn per image, so
    what a model learns is a noise texture.

    Differences from the reference: the noise comes from the explicit generator (the reference used the unseeded
    global torch RNG); ``alpha`` is a parameter.
    """

    name = "blended"
    aliases = ("blended-random", "blended_random")
    kind = "blend"
    random = True
    description = "per-image uniform noise blended over the whole image, x' = clip(0.2*U + 0.8*x) (Blended-Random)"
    param_names = ("alpha",)

    def __init__(self, image_size: int = REFERENCE_IMAGE_SIZE, *, uint8_mode: str = "wrap", alpha: float = 0.2):
        super().__init__(image_size, uint8_mode=uint8_mode)
        check_unit("alpha", alpha, owner="blended")
        self.alpha = float(alpha)

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        S = self.image_size
        noise = torch.rand(3, S, S, generator=generator, device=generator.device).to(x.device)
        return blend(x, noise, self.alpha)
