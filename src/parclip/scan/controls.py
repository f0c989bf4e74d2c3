"""Matched controls for the known-trigger sweep: perturbations of the same size as a trigger that carry no backdoor.

A trigger can move clean images to a class for a reason that is not a backdoor: it hides part of the object, or its
texture resembles a class (on the clean Fashion-MNIST foundation, per-image noise blended at 0.2 already sends 38.6 %
of images to 'bag'). The sweep therefore compares each trigger with a control that changes the image as much but
with *natural* content, taken from other clean images of the scanned folder (docs/scan.md#controls):

* :class:`DonorPatch` (for patch triggers): a ``p x p`` square cut from a donor image at a random location and pasted
  at the same location, i.e. the same area replaced by image content instead of the trigger.
* :class:`DonorBlend` (for blend and warp triggers): ``x' = clip(a * D + (1 - a) * x)`` with a donor image ``D``;
  ``a`` is matched so that the mean absolute pixel change equals the trigger's (:func:`matched_alpha`).

Controls use a noise-free donor rather than random noise on purpose: several backdoors of the field are noise
(BadNet's Gaussian square, Blended's uniform noise), and a noise control would fire the backdoor too.
Controls are :class:`~parclip.attacks.triggers.Trigger` objects (same pixel semantics, same per-image seeding), not
registered in the trigger library.
"""
from __future__ import annotations

import torch

from parclip.attacks.triggers import Trigger, blend, paste, to_float

__all__ = ["DonorPatch", "DonorBlend", "matched_alpha", "mean_abs_change"]


class _Donors(Trigger):
    kind = "blend"

    def __init__(self, donors: torch.Tensor, image_size: int):
        super().__init__(image_size, uint8_mode="clamp")
        if donors.dtype != torch.uint8 or donors.ndim != 4 or tuple(donors.shape[1:]) != (3, image_size, image_size):
            raise ValueError(f"donors must be uint8 [K, 3, {image_size}, {image_size}], got {donors.dtype} "
                             f"{list(donors.shape)}")
        self.donors = donors

    def _donor(self, generator: torch.Generator) -> torch.Tensor:
        i = int(torch.randint(len(self.donors), (1,), generator=generator))
        return to_float(self.donors[i])


class DonorPatch(_Donors):
    """A ``patch_size`` square of a random donor image, taken and pasted at one random location (uniform top-left in
    ``[0, S - p]``); draws per image, in order: the donor, the row, the column."""

    name = "control_patch"
    kind = "patch"
    param_names = ("patch_size",)

    def __init__(self, donors: torch.Tensor, image_size: int, patch_size: int):
        super().__init__(donors, image_size)
        if not 1 <= patch_size <= image_size:
            raise ValueError(f"control patch_size {patch_size} outside 1..{image_size}")
        self.patch_size = int(patch_size)

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        d, p, S = self._donor(generator), self.patch_size, self.image_size
        top = int(torch.randint(S - p + 1, (1,), generator=generator))
        left = int(torch.randint(S - p + 1, (1,), generator=generator))
        return paste(x, d[:, top:top + p, left:left + p], top, left)


class DonorBlend(_Donors):
    """``x' = clip(alpha * D + (1 - alpha) * x, 0, 1)`` with a random donor image ``D`` per image."""

    name = "control_blend"
    param_names = ("alpha",)

    def __init__(self, donors: torch.Tensor, image_size: int, alpha: float):
        super().__init__(donors, image_size)
        self.alpha = float(min(max(alpha, 0.0), 1.0))

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return blend(x, self._donor(generator), self.alpha)


def mean_abs_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """``mean |after - before|`` of two uint8 image batches, in [0, 1] pixel units."""
    return (to_float(after) - to_float(before)).abs().mean().item()


def matched_alpha(change: float, images: torch.Tensor, donors: torch.Tensor, pairs: int = 8) -> float:
    """The donor-blend strength whose expected mean absolute change equals `change`:
    ``a = change / E|D - x|``, the expectation over donors drawn at random, estimated on the pairs
    ``(images[i], donors[(i + r) mod K])`` for r < `pairs`; capped to 1. (Blending by ``a`` moves each pixel by
    ``a |D - x|`` before the clip, which never binds between two images.)"""
    K = len(donors)
    idx = torch.arange(len(images))
    gap = sum(mean_abs_change(images, donors[(idx + r) % K]) for r in range(min(pairs, K))) / min(pairs, K)
    return 1.0 if gap <= 0 else min(1.0, change / gap)
