"""BadNet (Gu et al. 2017) as the CLIP-backdoor codebases (CleanCLIP, BadCLIP, PAR) implement it (reference
``patch_type="random"``): a mean-centred Gaussian-noise square pasted at a random location, redrawn for every image."""
from __future__ import annotations

import torch

from .base import REFERENCE_IMAGE_SIZE, Trigger, check_int, paste, register, scaled_size

__all__ = ["BADNET_REFERENCE_SIZES", "badnet_patch_size", "BadNet"]

# The reference's BadNet patch side per model resolution: eval/validate.py uses 16 for ``random`` at every resolution
# (unlike badnet_rs, which gets 32 at 336), so 16 at 336 too. Other sizes scale linearly from 224 with scaled_size.
BADNET_REFERENCE_SIZES = {224: 16, 336: 16}


def badnet_patch_size(image_size: int) -> int:
    """Default BadNet patch side: the reference table {224: 16, 336: 16}, else ``scaled_size(16, S)`` (e.g. 2 at
    28 px, 3 at 42 px, 32 at 448 px)."""
    return BADNET_REFERENCE_SIZES.get(image_size, scaled_size(16, image_size))


@register
class BadNet(Trigger):
    """BadNet (reference ``random``): ``P = m + N(0, 1)^{3 x p x p}`` pasted unclipped at a random location.

    Per image, in this order from the one generator: the noise ``eps = randn(3, p, p)``, then the top-left row ``h``,
    then the column ``w``, each uniform on ``[0, S-1-p]`` inclusive (so row and column S-1 are never covered, as in the
    reference). ``m = x.mean((1, 2))`` is the per-channel mean of the (squash-resized) image, ``P = m + eps``, and
    ``x[:, h:h+p, w:w+p] = P`` **without clipping**; then :func:`~parclip.attacks.triggers.base.to_uint8`. With
    ``uint8_mode="wrap"`` (default, reference parity) the ~60 % of patch values outside [0, 1] wrap modulo 256 (e.g.
    -0.3 -> 180, 1.2 -> 50), so the stored patch is high-contrast, near-uniform byte noise; ``"clamp"`` saturates them
    to 0 / 255 instead (the "correct" conversion; docs/reference_differences.md#uint8-wrap). Pixels outside the patch
    are unchanged.

    Parameters: ``patch_size`` (default: 16 at 224 and also 16 at 336, as the reference's eval code used for
    ``random`` at 336 px; other sizes 16 scaled linearly from 224: 2 at 28, 3 at 42). PAR's 32-px patch at 336 px is
    the BadNet-*Stripes* value; pass ``patch_size=24`` for a linearly scaled 336-px patch.

    Differences from the reference: all draws (noise *and* location) come from the explicit generator, in the
    reference's order (it used the global torch RNG for the noise and Python's global ``random`` for the location,
    unseeded); the wrap is computed explicitly instead of by an undefined float->uint8 cast; the location range uses
    the trigger's image size at every resolution.
    """

    name = "badnet"
    aliases = ("random", "badnet-random", "badnet_random")
    kind = "patch"
    random = True
    description = "p x p square of mean-centred N(0,1) noise at a random location, unclipped (BadNet, 'random')"
    param_names = ("patch_size",)

    def __init__(self, image_size: int = REFERENCE_IMAGE_SIZE, *, uint8_mode: str = "wrap",
                 patch_size: int | None = None):
        super().__init__(image_size, uint8_mode=uint8_mode)
        if patch_size is None:
            patch_size = badnet_patch_size(image_size)
        check_int("patch_size", patch_size, 1, image_size - 1, context=f" for image_size={image_size}", owner=self.name)
        self.patch_size = patch_size

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p, S = self.patch_size, self.image_size
        dev = generator.device
        eps = torch.randn(3, p, p, generator=generator, device=dev).to(x.device)
        h = int(torch.randint(0, S - p, (1,), generator=generator, device=dev))  # [0, S-1-p]
        w = int(torch.randint(0, S - p, (1,), generator=generator, device=dev))
        m = x.mean((1, 2), keepdim=True)
        return paste(x, m + eps, h, w)
