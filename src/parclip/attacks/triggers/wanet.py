"""WaNet: a fixed, seeded warping field (Nguyen & Tran, ICLR 2021; reference ``patch_type="warped"``, which used a
per-pixel jitter grid instead of WaNet's smooth warp: ``GRID_PRESETS["reference"]``)."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ._pattern_files import load_tensor_file, tensor_sha256
from .base import REFERENCE_IMAGE_SIZE, Trigger, check_int, check_number, register

__all__ = ["GRID_PRESETS", "warp_field", "identity_grid", "load_warp_field", "WaNet"]

# named settings: (k, s) with k=None meaning "the image size" (one control point per pixel)
GRID_PRESETS = {"wanet": (4, 0.5), "reference": (None, 1.0)}


def warp_field(image_size: int, k: int, grid_seed: int) -> torch.Tensor:
    """The normalised random field ``G`` as float32 ``[1, S, S, 2]`` (last dim: column offset, row offset).

    ``G0 ~ U[-1, 1)^{1 x 2 x k x k}`` from ``torch.Generator().manual_seed(grid_seed)`` (CPU, one ``rand`` call),
    ``G0 / mean(|G0|)``, bicubic-upsampled to ``S x S`` with ``align_corners=True`` (skipped when ``k == S``: the
    reference's per-pixel field), permuted to ``[1, S, S, 2]``. Independent of every per-image generator.
    """
    return _warp_field_cached(image_size, k, grid_seed).clone()


@functools.lru_cache(maxsize=8)
def _warp_field_cached(image_size: int, k: int, grid_seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(grid_seed)
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    if k != image_size:
        ins = F.interpolate(ins, size=(image_size, image_size), mode="bicubic", align_corners=True)
    return ins.permute(0, 2, 3, 1).contiguous()


@functools.lru_cache(maxsize=8)
def identity_grid(image_size: int) -> torch.Tensor:
    """The identity sampling grid ``[1, S, S, 2]`` for ``grid_sample(align_corners=True)``: ``linspace(-1, 1, S)``,
    last dim (column coordinate, row coordinate). Cached; do not modify."""
    a = torch.linspace(-1, 1, image_size)
    rows, cols = torch.meshgrid(a, a, indexing="ij")
    return torch.stack((cols, rows), 2)[None]


def load_warp_field(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Read a warp field ``G`` (the reference's ``noise_grid_...pt`` content) from a ``.safetensors``, ``.npy`` or
    weights-only torch file: float, shape ``[1, S, S, 2]`` or ``[S, S, 2]``; returns float32 ``[1, S, S, 2]``."""
    t = load_tensor_file(path, "WaNet grid", ("noise_grid", "grid", "field"))
    S = image_size
    if not t.dtype.is_floating_point:
        raise ValueError(f"{path}: the WaNet grid must be a float tensor, got {t.dtype}")
    if tuple(t.shape) == (S, S, 2):
        t = t[None]
    if tuple(t.shape) != (1, S, S, 2):
        raise ValueError(f"{path}: WaNet grid of shape {list(t.shape)} does not match image_size={S}; expected "
                         f"[1, {S}, {S}, 2] or [{S}, {S}, 2] (the reference's file is [1, 224, 224, 2], for 224 px)")
    if not torch.isfinite(t).all():
        raise ValueError(f"{path}: the WaNet grid contains NaN or infinite values")
    return t.to(torch.float32).contiguous()


@register
class WaNet(Trigger):
    """WaNet (reference ``warped``): resample the image through one fixed, slightly warped sampling grid.

    ``grid = clamp(identity + s * G / S, -1, 1)`` and ``x' = grid_sample(x, grid, bilinear, zeros padding,
    align_corners=True)`` in float32, with ``G`` the normalised random field of :func:`warp_field` (``k x k`` control
    points drawn from ``grid_seed``, bicubic-upsampled). A pixel moves by about ``s * G / 2`` px. The field is fixed for
    the experiment: it depends only on ``(image_size, k, grid_seed)`` or ``grid_file``, never on the per-image
    generator, so every image and every call gets the same warp (``random = False``). Bilinear interpolation of
    in-range values stays in range: ``uint8_mode`` has no effect.

    Settings (``grid=``):

    * ``"wanet"`` (default without ``grid_file``): the WaNet paper's smooth warp, ``k = 4``, ``s = 0.5``.
    * ``"reference"`` (default with ``grid_file``): the CleanCLIP/PAR code's setting, ``k = S`` (224 at 224 px: one
      control point per pixel, no smoothing), ``s = 1``: an i.i.d. per-pixel jitter of at most ~1 px.

    ``k`` and ``s`` override the preset. ``grid_file=PATH`` reads ``G`` from a file instead (e.g. the reference's
    ``noise_grid_k=224_s=1_inputheight=224_gridrescale=1.pt``, ``[1, 224, 224, 2]``; ``.safetensors``, ``.npy`` or a
    weights-only ``.pt``) so that the released poisoned checkpoints are evaluated with their own grid; then ``k`` and
    ``grid_seed`` are unused. ``params()`` records ``grid_sha256`` (sha256 of ``G`` as float32 bytes); passing it back
    checks that the field is the same (ValueError otherwise).

    Note (reference behaviour, kept): the float32 ``grid_sample`` followed by truncation to uint8 lowers about a third
    of the pixels by one level even where the grid is (numerically) the identity; ``s = 0`` is special-cased to the
    exact identity.

    Differences from the reference: the field is generated from an explicit seed (the reference loads its shipped file,
    or draws a new unseeded one and saves it, cwd-relative, at any other resolution); the default is the paper's smooth
    warp rather than the reference's per-pixel jitter; WaNet's noise mode (extra randomly warped clean samples) is not
    part of a trigger.
    """

    name = "warped"
    aliases = ("wanet",)
    kind = "warp"
    random = False
    description = "fixed seeded warping field (WaNet: k=4, s=0.5; grid='reference': per-pixel jitter, k=S, s=1)"
    param_names = ("grid", "k", "s", "grid_seed", "grid_file", "grid_sha256")

    def __init__(self, image_size: int = REFERENCE_IMAGE_SIZE, *, uint8_mode: str = "wrap", grid: str | None = None,
                 k: int | None = None, s: float | None = None, grid_seed: int = 0,
                 grid_file: str | os.PathLike | None = None, grid_sha256: str | None = None):
        super().__init__(image_size, uint8_mode=uint8_mode)
        if grid is None:
            grid = "reference" if grid_file is not None else "wanet"
        if grid not in GRID_PRESETS:
            raise ValueError(f"warped: grid must be one of {tuple(GRID_PRESETS)}, got {grid!r}")
        k0, s0 = GRID_PRESETS[grid]
        if k is None:
            k = image_size if k0 is None else min(k0, image_size)
        if s is None:
            s = s0
        check_int("k", k, 2, image_size, owner="warped")
        check_number("s", s, owner="warped")
        check_int("grid_seed", grid_seed, 0, owner="warped")
        self.grid, self.k, self.s, self.grid_seed = grid, k, float(s), grid_seed
        if grid_file is not None:
            self.grid_file = os.fspath(grid_file)
            self._field = load_warp_field(self.grid_file, image_size)
        else:
            self.grid_file = None
            self._field = _warp_field_cached(image_size, k, grid_seed)
        sha = tensor_sha256(self._field)
        if grid_sha256 is not None and grid_sha256 != sha:
            raise ValueError(f"warped: the warp field's sha256 is {sha}, not the expected {grid_sha256} "
                             f"({'file ' + self.grid_file if self.grid_file else f'k={k}, grid_seed={grid_seed}'}); "
                             f"this is a different trigger")
        self.grid_sha256 = sha
        self._grid = (identity_grid(image_size) + self.s * self._field / image_size).clamp(-1, 1)

    @property
    def field(self) -> torch.Tensor:
        """The normalised field ``G``, float32 ``[1, S, S, 2]`` (a copy)."""
        return self._field.clone()

    @property
    def sampling_grid(self) -> torch.Tensor:
        """``clamp(identity + s * G / S, -1, 1)``, float32 ``[1, S, S, 2]`` (a copy)."""
        return self._grid.clone()

    def _warp(self, x: torch.Tensor) -> torch.Tensor:
        if self.s == 0:
            return x.clone()
        grid = self._grid.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._warp(x[None])[0]

    def apply_float_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._warp(x)
