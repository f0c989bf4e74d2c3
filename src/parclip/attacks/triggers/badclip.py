"""BadCLIP (Liang et al., CVPR 2024, arXiv 2311.12075): an optimised patch pasted at the centre of the image (the
reference's ``badclip`` trigger at location ``middle``; docs/reference_differences.md#badclip). Reimplemented from the
description; no reference code.

The pattern is a user-supplied patch file; parclip ships none (the released ``badCLIP.jpg`` carries no licence).
Create one for your own model with ``parclip attack optimize-patch`` (:mod:`parclip.attacks.patch_opt`), or pass the released
file.

**The released ``badCLIP.jpg`` has its red and blue channels swapped.** The reference optimiser wrote the patch with
``cv2.imwrite``, which expects BGR, so the file's R and B are exchanged relative to the optimised patch (and it is a
lossy 16 x 16 JPEG). All poisoning and evaluation in the reference read that file with PIL as RGB, i.e. used the
*swapped* colours, and the attack is self-consistent that way. So:

* to match the released BadCLIP checkpoints, keep ``swap_rb=False`` and pass the file as-is (the cyan-looking patch,
  channel means about (74, 156, 167));
* ``swap_rb=True`` recovers the colours of the optimised patch (yellow-ish, banana-like) - not what the released
  models were poisoned with.

Patches written by ``parclip attack optimize-patch`` are lossless RGB PNGs without that swap: use them with
``swap_rb=False``.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...utils.files import sha256_file
from ._pattern_files import load_tensor_file
from .base import REFERENCE_IMAGE_SIZE, Trigger, check_int, paste, register, scaled_size

__all__ = ["BadCLIPPatch", "center_offset", "default_patch_size", "load_patch", "placeholder_patch",
           "BADCLIP_PATCH_SIZE", "IMAGE_SUFFIXES", "ARRAY_SUFFIXES"]

#: the reference's patch side at 224 px
BADCLIP_PATCH_SIZE = 16
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".safetensors")

_NO_PATCH = ("badclip needs a patch: pass patch=PATH (a PNG/JPEG image, or a .npy/.safetensors float [3, l, l] "
             "array in [0, 1]), e.g. get_trigger('badclip', patch='badCLIP.jpg'), or create one for your model with "
             "`parclip attack optimize-patch --model ... --data TABLE.csv --target banana --out patch.png`. parclip "
             "does not bundle the released badCLIP.jpg (no licence).")


def center_offset(image_size: int, patch_size: int) -> int:
    """Top-left row (= column) of the reference's ``middle`` paste: ``int(int(S / 2) - l / 2)``.

    224 and 16 -> 104 (rows [104, 120)), 336 and 16 -> 160, 336 and 24 -> 156, 28 and 2 -> 13.
    """
    if not 1 <= patch_size <= image_size:
        raise ValueError(f"a patch of side {patch_size} does not fit in a {image_size} x {image_size} image")
    return int(image_size // 2 - patch_size / 2)


def default_patch_size(image_size: int) -> int:
    """16 px at 224, scaled linearly with the image (``scaled_size(16, S)``: 24 at 336, 2 at 28)."""
    return scaled_size(BADCLIP_PATCH_SIZE, image_size)


def _sha256_tensor(t: torch.Tensor) -> str:
    arr = np.ascontiguousarray(t.detach().cpu().to(torch.float32).numpy())
    h = hashlib.sha256(f"float32{list(arr.shape)}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _check_array(t: torch.Tensor, where: str) -> torch.Tensor:
    if t.ndim != 3 or t.shape[0] != 3 or t.shape[1] != t.shape[2] or t.shape[1] < 1:
        raise ValueError(f"{where}: expected a square float patch of shape [3, l, l], got {list(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{where}: expected a float patch with values in [0, 1], got dtype {t.dtype} (for 0..255 "
                         f"pixels save an image file instead)")
    t = t.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise ValueError(f"{where}: patch values must be finite and in [0, 1], got range "
                         f"[{t.min().item():.4g}, {t.max().item():.4g}]")
    return t.contiguous()


def load_patch(path: str | os.PathLike) -> torch.Tensor:
    """Read a patch file as float32 ``[3, l, l]`` in [0, 1] at its own size (no resize, no channel swap).

    Images (PNG, JPEG, ...) are read with PIL and converted to RGB (``u8 / 255``, as ToTensor); ``.npy`` holds one
    array, ``.safetensors`` one tensor (or one named ``patch``), both float ``[3, l, l]`` in [0, 1].
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"badclip: patch file not found: {path}")
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return _check_array(load_tensor_file(path, "badclip patch", preferred_keys=("patch",)), str(path))
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises many types
        raise ValueError(f"badclip: cannot read patch {path} as an image ({type(e).__name__}: {e}); accepted: image "
                         f"files ({', '.join(IMAGE_SUFFIXES)}) or float arrays ({', '.join(ARRAY_SUFFIXES)})") from e
    if rgb.width != rgb.height:
        raise ValueError(f"badclip: the patch must be square, {path} is {rgb.width} x {rgb.height}")
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div(255).contiguous()


def _resize_patch(patch: torch.Tensor, side: int, from_image: bool) -> torch.Tensor:
    """Resize a [3, l, l] patch to ``side``: images with PIL bicubic on the 8-bit pixels (what the reference did),
    float arrays with torch bicubic (antialiased when shrinking), clipped to [0, 1]."""
    if patch.shape[-1] == side:
        return patch
    if from_image:
        u8 = patch.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        im = Image.fromarray(u8, "RGB").resize((side, side), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).to(torch.float32).div(255).contiguous()
    out = F.interpolate(patch[None], size=(side, side), mode="bicubic", align_corners=False,
                        antialias=side < patch.shape[-1])[0]
    return out.clamp(0, 1).contiguous()


def placeholder_patch(side: int = BADCLIP_PATCH_SIZE, seed: int = 0) -> torch.Tensor:
    """A generated stand-in patch (float32 ``[3, side, side]``) for illustrations when no real patch is at hand.

    Seeded colour noise around a yellow tone; it is **not** an optimised BadCLIP patch and triggers nothing.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([0.95, 0.85, 0.15])[:, None, None]
    return (base + 0.25 * (torch.rand(3, side, side, generator=g) - 0.5)).clamp(0, 1)


@register
class BadCLIPPatch(Trigger):
    """BadCLIP (``badclip``): an optimised ``l x l`` patch pasted at the centre, rows and columns
    ``[s, s + l)`` with ``s = int(int(S/2) - l/2)`` (the reference's ``middle``): [104, 120) at 224 for l = 16.

    Parameters:
        patch: the patch. A file path - an image (PNG/JPEG/..., read with PIL as RGB, ``u8 / 255``) or a ``.npy`` /
            ``.safetensors`` float ``[3, l, l]`` array in [0, 1] - or the array itself (tensor, numpy array or
            nested list, e.g. from :func:`parclip.attacks.patch_opt.optimize_patch`). Required: without it a ValueError says
            how to get one.
        swap_rb: exchange the red and blue channels after loading. ``False`` (default) reproduces the reference,
            which used the released ``badCLIP.jpg`` as PIL reads it (see the module docstring); ``True`` recovers the
            optimised colours of that file.
        patch_size: the pasted side ``l``. Default ``scaled_size(16, S)``: 16 at 224, 24 at 336, 2 at 28. The
            reference pasted its 16 px file **unscaled** at 336 (rows [160, 176)); pass ``patch_size=16`` for that.
            A patch whose side differs from ``l`` is resized: image files with PIL bicubic on the 8-bit pixels (the
            reference's ``resize``), arrays with torch bicubic.
        patch_sha256: the SHA-256 of the patch file's bytes (of the float32 array for an in-memory patch). Filled in
            by :meth:`params`; when given, the patch must match it (a ValueError otherwise), so a recorded
            configuration cannot silently run with a different patch.

    Pixel semantics: the patch (float in [0, 1]) replaces the pixels of the squash-resized image, then the standard
    truncating uint8 conversion; an 8-bit patch file therefore lands exactly (pixel for pixel), a float array is
    truncated like the reference's ToTensor patch. Nothing is random (``random = False``); everything outside the
    patch is unchanged.
    """

    name = "badclip"
    aliases = ("badclip-patch", "badclip_patch", "ours_tnature")
    kind = "patch"
    random = False
    description = "optimised l x l patch (user file) pasted at the image centre, [104,120) at 224 (BadCLIP)"
    param_names = ("patch", "swap_rb", "patch_size", "patch_sha256")

    def __init__(self, image_size: int = REFERENCE_IMAGE_SIZE, *, uint8_mode: str = "wrap", patch=None,
                 swap_rb: bool = False, patch_size: int | None = None, patch_sha256: str | None = None):
        super().__init__(image_size, uint8_mode=uint8_mode)
        if not isinstance(swap_rb, bool):
            raise ValueError(f"badclip: swap_rb must be True or False, got {swap_rb!r}")
        explicit_size = patch_size is not None
        if patch_size is None:
            patch_size = default_patch_size(image_size)
        check_int("patch_size", patch_size, 1, image_size, context=f" for image_size={image_size},", owner=self.name)
        if patch is None or (isinstance(patch, str) and not patch.strip()):
            raise ValueError(_NO_PATCH)

        if isinstance(patch, (str, os.PathLike)):
            path = Path(patch).expanduser()
            raw = load_patch(path)
            digest = sha256_file(path)
            from_image = path.suffix.lower() not in ARRAY_SUFFIXES
            self.patch = os.fspath(patch)
            where = str(path)
        else:
            try:
                t = patch if isinstance(patch, torch.Tensor) else torch.as_tensor(np.asarray(patch, dtype=np.float32))
            except (TypeError, ValueError) as e:
                raise ValueError(f"badclip: patch must be a file path or a float [3, l, l] array, got "
                                 f"{type(patch).__name__}") from e
            raw = _check_array(t, "badclip patch")
            digest = _sha256_tensor(raw)
            from_image = False
            self.patch = raw.tolist()  # plain values: params() stays JSON-serialisable and round-trips exactly
            where = "the in-memory patch"
        if patch_sha256 is not None and patch_sha256 != digest:
            raise ValueError(f"badclip: {where} has sha256 {digest}, but patch_sha256={patch_sha256} was recorded: "
                             f"the patch changed")
        src_side = raw.shape[-1]
        if not explicit_size and src_side not in (BADCLIP_PATCH_SIZE, patch_size):
            warnings.warn(f"badclip: the {src_side} px patch from {where} is resized to {patch_size} px (16 px at 224, "
                          f"scaled to image_size={image_size}); pass patch_size={src_side} to paste it at its own size",
                          stacklevel=2)
        self.swap_rb = swap_rb
        self.patch_size = patch_size
        self.patch_sha256 = digest
        pattern = _resize_patch(raw, patch_size, from_image)
        if swap_rb:
            pattern = pattern[[2, 1, 0]]
        self._pattern = pattern.contiguous()
        self.offset = center_offset(image_size, patch_size)

    # -- description (an in-memory patch is a long list: show its hash instead) -------------------------------------
    def __repr__(self) -> str:
        parts = []
        for k, v in self.params().items():
            if k == "patch" and isinstance(v, list):
                v = f"<array {len(v)}x{len(v[0])}x{len(v[0][0])}>"
                parts.append(f"{k}={v}")
            else:
                parts.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    @property
    def pattern(self) -> torch.Tensor:
        """The pasted patch: float32 ``[3, l, l]`` in [0, 1], after resizing and the optional R/B swap (a copy)."""
        return self._pattern.clone()

    @property
    def region(self) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of the pasted square (end-exclusive)."""
        s, l = self.offset, self.patch_size
        return s, s, s + l, s + l

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return paste(x, self._pattern, self.offset, self.offset)

    def apply_float_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return paste(x, self._pattern, self.offset, self.offset)  # no randomness: one paste for the whole batch
