"""PAR's stripe triggers (Singh, Croce, Hein, arXiv 2412.00727): BadNet-Stripes (``badnet_rs``) and Blended-Stripes
(``blended_rs``).

Both draw, for every image, one uniform ``u ~ U[0,1)`` per (channel, column) and use the sign ``s = sign(2u - 1)``
(+-1; exactly 0 only when ``u == 0.5``, probability 2**-24 per draw, kept for parity: such a channel pastes 0 / blends
towards 0). The pattern is constant down each column, i.e. vertical 1-px stripes whose colour is one of the 8 RGB
corners.
"""
from __future__ import annotations

import torch

from .base import REFERENCE_IMAGE_SIZE, Trigger, blend, check_int, check_unit, paste, register, scaled_size

__all__ = ["stripe_signs", "vertical_stripes", "badnet_rs_patch_size", "BadNetStripes", "BlendedStripes"]

# The reference's BadNet-Stripes patch side per model resolution (eval/validate.py): 16 at 224 and 32 (not the linear
# 24) at 336. Other sizes scale linearly from 224 with scaled_size.
BADNET_RS_REFERENCE_SIZES = {224: 16, 336: 32}


def stripe_signs(n_columns: int, generator: torch.Generator, *, channels: int = 3, order: str = "column") -> torch.Tensor:
    """Random signs ``s[c, j] = sign(2 u[c, j] - 1)``, float32 ``[channels, n_columns]``, with ``u ~ U[0,1)``.

    ``order`` is the order in which the uniforms are drawn from ``generator`` (drawn on the generator's device):

    * ``"column"``: column by column, all channels of column 0 first (``torch.rand(n_columns, channels)``); this is the
      reference's Blended-Stripes order (one ``rand(3,1,1)`` per column).
    * ``"channel"``: channel by channel (``torch.rand(channels, n_columns)``); the reference's BadNet-Stripes order (one
      ``rand(1,3,1,p)``).

    On CPU one call of n values consumes the stream exactly like successive smaller calls, so with a generator seeded
    like the reference's global RNG these are the reference's signs.
    """
    dev = generator.device
    if order == "column":
        u = torch.rand(n_columns, channels, generator=generator, device=dev).T
    elif order == "channel":
        u = torch.rand(channels, n_columns, generator=generator, device=dev)
    else:
        raise ValueError(f"order must be 'column' or 'channel', got {order!r}")
    return torch.sign(2 * u - 1).contiguous()


def vertical_stripes(signs: torch.Tensor, height: int, width: int = 1, total_width: int | None = None) -> torch.Tensor:
    """Pattern ``P[c, i, j] = signs[c, j // width]`` of shape ``[C, height, total_width]`` (a broadcast view; clone
    before writing). ``total_width`` defaults to ``n_columns * width``; extra stripe columns are cut off at the right."""
    if width < 1:
        raise ValueError(f"stripe width must be >= 1, got {width}")
    cols = signs.repeat_interleave(width, dim=1)
    if total_width is not None:
        if cols.shape[1] < total_width:
            raise ValueError(f"{signs.shape[1]} stripes of width {width} cannot cover {total_width} columns")
        cols = cols[:, :total_width]
    return cols[:, None, :].expand(cols.shape[0], height, cols.shape[1])


def badnet_rs_patch_size(image_size: int) -> int:
    """Default BadNet-Stripes patch side: the reference table {224: 16, 336: 32}, else ``scaled_size(16, S)``
    (e.g. 2 at 28 px, 3 at 42 px)."""
    return BADNET_RS_REFERENCE_SIZES.get(image_size, scaled_size(16, image_size))


@register
class BadNetStripes(Trigger):
    """BadNet-Stripes (PAR ``badnet_rs``): a ``p x p`` patch of vertical 1-px stripes pasted at a random location.

    Per image: signs ``s[c, j]`` for the p columns (uniforms drawn channel-major, as the reference's ``rand(1,3,1,p)``),
    ``P[c, i, j] = s[c, j]``; then the top-left corner ``h`` and then ``w``, each uniform on ``[0, S-1-p]`` inclusive
    (so row and column S-1 are never covered, as in the reference). ``x[:, h:h+p, w:w+p] = P`` unclipped, then
    :func:`~parclip.attacks.triggers.base.to_uint8`: +1 -> 255 and -1 -> **1** with ``uint8_mode="wrap"`` (reference parity:
    -255 wraps to 1), or 0 with ``"clamp"``. Everything outside the patch is unchanged.

    Parameters: ``patch_size`` (default: 16 at 224, 32 at 336 as in the reference's eval code, else 16 scaled
    linearly from 224).

    Differences from the reference: all draws (signs *and* location) come from the one explicit generator, in the
    order signs, h, w (the reference used the global torch RNG for the signs and Python's global ``random`` for the
    location, unseeded); the wrap is computed explicitly instead of by an undefined float->uint8 cast; the patch size
    follows the image size the trigger is built for (the reference's COCO eval always triggered at 224 with a 32-px
    patch for 336 models, docs/reference_differences.md#resolution-336: build it with ``image_size=224,
    patch_size=32`` for that parity mode).
    """

    name = "badnet_rs"
    aliases = ("badnet-stripes", "badnet_stripes", "badnetstripes")
    kind = "patch"
    random = True
    description = "p x p patch of random-colour vertical 1-px stripes at a random location (PAR BadNet-Stripes)"
    param_names = ("patch_size",)

    def __init__(self, image_size: int = REFERENCE_IMAGE_SIZE, *, uint8_mode: str = "wrap",
                 patch_size: int | None = None):
        super().__init__(image_size, uint8_mode=uint8_mode)
        if patch_size is None:
            patch_size = badnet_rs_patch_size(image_size)
        check_int("patch_size", patch_size, 1, image_size - 1, context=f" for image_size={image_size}", owner=self.name)
        self.patch_size = patch_size

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p, S = self.patch_size, self.image_size
        signs = stripe_signs(p, generator, order="channel")                  # [3, p]
        dev = generator.device
        h = int(torch.randint(0, S - p, (1,), generator=generator, device=dev))   # [0, S-1-p]
        w = int(torch.randint(0, S - p, (1,), generator=generator, device=dev))
        patch = vertical_stripes(signs, p).to(x.device)
        return paste(x, patch, h, w)


@register
class BlendedStripes(Trigger):
    """Blended-Stripes (PAR ``blended_rs``): full-image vertical stripes blended with weight ``alpha``.

    Per image: one sign per (channel, stripe) for the ``ceil(S / width)`` stripes, uniforms drawn column by column
    (the reference's one ``rand(3,1,1)`` per stripe), ``P[c, i, j] = s[c, j // width]``, and
    ``x' = clip(alpha * P + (1 - alpha) * x, 0, 1)`` in float32, then the reference uint8 conversion (truncation; no
    wrap can occur after the clip, so ``uint8_mode`` has no effect).

    Note the size of the change: a +1 column raises a channel by ``alpha * (1 - x)`` (at most ~0.03, 7 levels), a -1
    column lowers it by ``alpha * (1 + x)`` (up to ~0.06, 16 levels on bright pixels), not a symmetric +-alpha.

    Parameters: ``alpha`` (default 0.03, the reference's eval and train-time validation value; its poison-creation
    script defaulted to 0.05, and which value built the released poisoned models is not recorded), ``width`` (stripe
    width in px, default 1 as in every reference run).

    Differences from the reference: signs come from the explicit generator instead of the global torch RNG.
    """

    name = "blended_rs"
    aliases = ("blended-stripes", "blended_stripes", "blendedstripes")
    kind = "blend"
    random = True
    description = "full-image random-colour vertical stripes, x' = clip(a*P + (1-a)*x), a = 0.03 (PAR Blended-Stripes)"
    param_names = ("alpha", "width")

    def __init__(self, image_size: int = REFERENCE_IMAGE_SIZE, *, uint8_mode: str = "wrap", alpha: float = 0.03,
                 width: int = 1):
        super().__init__(image_size, uint8_mode=uint8_mode)
        check_unit("alpha", alpha, owner="blended_rs")
        check_int("width", width, 1, image_size, owner="blended_rs")
        self.alpha = float(alpha)
        self.width = width

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        S = self.image_size
        n = -(-S // self.width)
        signs = stripe_signs(n, generator, order="column")                   # [3, n]
        pattern = vertical_stripes(signs, 1, self.width, S).to(x.device)     # [3, 1, S], broadcasts down the rows
        return blend(x, pattern, self.alpha)
