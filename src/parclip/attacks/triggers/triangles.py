"""PAR's Blended-Triangles (Singh, Croce, Hein, arXiv 2412.00727; reference ``patch_type="tri_patt"``)."""
from __future__ import annotations

import functools

import torch

from .base import REFERENCE_IMAGE_SIZE, Trigger, blend, check_int, check_unit, register

__all__ = ["triangle_pattern", "BlendedTriangles"]

DARK, LIGHT = 0.4, 0.8


@functools.lru_cache(maxsize=8)
def _triangle_pattern_cached(image_size: int, tile: int) -> torch.Tensor:
    r = torch.arange(image_size) % tile
    dark = r[:, None] >= r[None, :]                                           # [S, S]: (h mod t) >= (w mod t)
    p = torch.where(dark, torch.tensor(DARK, dtype=torch.float32), torch.tensor(LIGHT, dtype=torch.float32))
    return p.expand(3, image_size, image_size).contiguous()


def triangle_pattern(image_size: int, tile: int = 14) -> torch.Tensor:
    """``P[c, h, w] = 0.4 if (h mod tile) >= (w mod tile) else 0.8`` as float32 ``[3, S, S]``, equal in every channel.

    Each ``tile x tile`` tile is split along its diagonal: the lower-left triangle, diagonal included, is dark
    (0.4 = 102/255), the upper-right one light (0.8 = 204/255); ``tile * (tile + 1) / 2`` pixels of each full tile are
    dark (105 of 196 for tile 14). This is exactly the reference's ``triangles_{224,336}_14.pt`` content. Returns a
    new tensor (the cached one is never handed out).
    """
    return _triangle_pattern_cached(image_size, tile).clone()


@register
class BlendedTriangles(Trigger):
    """Blended-Triangles (PAR ``tri_patt``): ``x' = clip(alpha * P + (1 - alpha) * x, 0, 1)`` with the fixed grey
    right-triangle tiling ``P`` of :func:`triangle_pattern`, in float32, then the reference uint8 conversion (no wrap
    can occur after the clip). Deterministic: draws nothing, identical pixels at every call.

    Parameters: ``alpha`` (default 0.15, the reference's eval and train-time validation value), ``tile`` (default 14
    at **every** resolution, as the reference's file names ``triangles_224_14.pt`` / ``triangles_336_14.pt`` say: the
    tiles do not scale with the image; at 28 px there are only 2 x 2 tiles, below 14 px one partial tile).

    Differences from the reference: the pattern is generated from its closed form at any resolution instead of loaded
    from ``.pt`` files (the reference's 336-px file is stored HWC and crashes; its files are not redistributable:
    docs/reference_differences.md#pattern-files); the values are identical to the reference's files at 224 and 336.
    """

    name = "tri_patt"
    aliases = ("blended-triangles", "blended_triangles", "triangles")
    kind = "blend"
    random = False
    description = "fixed grey 14-px right-triangle tiling blended, x' = clip(0.15*P + 0.85*x) (PAR Blended-Triangles)"
    param_names = ("alpha", "tile")

    def __init__(self, image_size: int = REFERENCE_IMAGE_SIZE, *, uint8_mode: str = "wrap", alpha: float = 0.15,
                 tile: int = 14):
        super().__init__(image_size, uint8_mode=uint8_mode)
        check_unit("alpha", alpha, owner="tri_patt")
        check_int("tile", tile, 1, owner="tri_patt")
        self.alpha = float(alpha)
        self.tile = tile

    @property
    def pattern(self) -> torch.Tensor:
        """The pattern ``P`` (float32 ``[3, S, S]``, a fresh copy)."""
        return triangle_pattern(self.image_size, self.tile)

    def _pattern_on(self, x: torch.Tensor) -> torch.Tensor:
        return _triangle_pattern_cached(self.image_size, self.tile).to(device=x.device, dtype=x.dtype)

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return blend(x, self._pattern_on(x), self.alpha)

    def apply_float_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return blend(x, self._pattern_on(x), self.alpha)
