"""SIG: a horizontal sinusoid signal (Barni et al. 2019), as the CLIP-backdoor codebases build it (CleanCLIP blends
it, BadCLIP adds it: ``SIG_MODES``)."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .base import REFERENCE_IMAGE_SIZE, Trigger, blend, check_number, check_unit, register

__all__ = ["SIG_MODES", "sig_pattern", "SIG"]

SIG_MODES = ("add", "blend")


@functools.lru_cache(maxsize=8)
def _sig_pattern_cached(image_size: int, delta: float, freq: float) -> torch.Tensor:
    j = np.arange(image_size, dtype=np.float64)
    row = (delta / 255.0) * np.sin(2.0 * math.pi * freq * j / image_size)       # float64, then one rounding
    return torch.from_numpy(row.astype(np.float32)).expand(3, image_size, image_size).contiguous()


def sig_pattern(image_size: int, delta: float = 60.0, freq: float = 6.0) -> torch.Tensor:
    """``v[c, i, j] = (delta / 255) * sin(2 pi * freq * j / S)`` as float32 ``[3, S, S]`` (computed in float64 and
    rounded once), constant down each column and equal in every channel: ``freq`` vertical-stripe periods across the
    width at any resolution, amplitude ``delta`` grey levels. Returns a new tensor."""
    return _sig_pattern_cached(image_size, float(delta), float(freq)).clone()


@register
class SIG(Trigger):
    """SIG: the sinusoid ``v`` of :func:`sig_pattern` (``delta = 60`` levels, ``freq = 6`` periods per width) added
    to or blended with the image, in float32, then the reference uint8 conversion (the result is clipped, so nothing
    wraps). Deterministic: draws nothing, identical pixels at every call.

    * ``mode="add"`` (default): ``x' = clip(x + v, 0, 1)``, BadCLIP's implementation. It is the default because it is
      the original SIG attack (an additive signal of amplitude 60/255 that keeps the image's brightness).
    * ``mode="blend"``: ``x' = clip(alpha * v + (1 - alpha) * x, 0, 1)`` with ``alpha = 0.2``, CleanCLIP's
      implementation (SIG routed through its ``blended`` location): the signal shrinks to +-12 levels and the image is
      darkened by 20 %.

    Parameters: ``delta`` (60.0, in 0..255 grey levels), ``freq`` (6.0), ``mode`` ("add"), ``alpha`` (0.2, used only
    by ``mode="blend"``).

    Differences from the references: one trigger with both variants, named explicitly (the two codebases disagree under
    the same name ``SIG``; PAR lists the choice but implements no branch); the sinusoid is defined at the trigger's
    resolution (``j / S``), which is the references' formula at 224 px.
    """

    name = "sig"
    aliases = ()
    kind = "blend"
    random = False
    description = "horizontal sinusoid (60 levels, 6 periods), x' = clip(x + v) (SIG; mode='blend': CleanCLIP's)"
    param_names = ("delta", "freq", "mode", "alpha")

    def __init__(self, image_size: int = REFERENCE_IMAGE_SIZE, *, uint8_mode: str = "wrap", delta: float = 60.0,
                 freq: float = 6.0, mode: str = "add", alpha: float = 0.2):
        super().__init__(image_size, uint8_mode=uint8_mode)
        check_number("delta", delta, 0, owner="sig")
        check_number("freq", freq, 0, owner="sig")
        if mode not in SIG_MODES:
            raise ValueError(f"sig: mode must be one of {SIG_MODES}, got {mode!r}")
        check_unit("alpha", alpha, owner="sig")
        self.delta = float(delta)
        self.freq = float(freq)
        self.mode = mode
        self.alpha = float(alpha)

    @property
    def pattern(self) -> torch.Tensor:
        """The signal ``v`` (float32 ``[3, S, S]``, a fresh copy)."""
        return sig_pattern(self.image_size, self.delta, self.freq)

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        v = _sig_pattern_cached(self.image_size, self.delta, self.freq).to(device=x.device, dtype=x.dtype)
        if self.mode == "add":
            return (x + v).clamp(0, 1)
        return blend(x, v, self.alpha)

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._combine(x)

    def apply_float_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._combine(x)
