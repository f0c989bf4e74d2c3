"""PAR's Blended-Text (Singh, Croce, Hein, arXiv 2412.00727; reference ``patch_type="water_patt"``): red "Watermarked"
text blended onto the red channel, with our own mask by default (docs/reference_differences.md#pattern-files)."""
from __future__ import annotations

import functools
import os
import pathlib

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ._pattern_files import TENSOR_SUFFIXES, load_tensor_file, tensor_sha256
from .base import REFERENCE_IMAGE_SIZE, Trigger, blend, check_unit, register

__all__ = ["DEFAULT_TEXT", "REFERENCE_FOOTPRINTS", "default_font_path", "render_text_mask", "load_text_mask",
           "BlendedText"]

DEFAULT_TEXT = "Watermarked"

# Ink bounding boxes of the reference's mask files (first row, last row, first col, last col; inclusive).
# Other resolutions scale the 224-px box linearly.
REFERENCE_FOOTPRINTS = {224: (103, 125, 13, 208), 336: (167, 202, 8, 323)}


def default_font_path() -> str:
    """DejaVu Sans Mono as shipped inside matplotlib (a parclip dependency; Bitstream Vera / DejaVu licence, free to
    use and redistribute). The reference used Noto Mono, which is not installed with our dependencies."""
    import matplotlib

    path = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono.ttf"
    if not path.is_file():  # pragma: no cover - a matplotlib installation without its fonts
        raise FileNotFoundError(f"DejaVu Sans Mono not found at {path}; pass font=PATH (a .ttf) or mask=PATH")
    return str(path)


def _target_box(image_size: int) -> tuple[float, float]:
    """(ink row centre, ink width) the rendered text should have at this resolution."""
    S = image_size
    r0, r1, c0, c1 = REFERENCE_FOOTPRINTS.get(S) or tuple(v * S / REFERENCE_IMAGE_SIZE
                                                         for v in REFERENCE_FOOTPRINTS[REFERENCE_IMAGE_SIZE])
    return (r0 + r1) / 2, c1 - c0 + 1


def _render_ink(text: str, font_path: str, size: int) -> np.ndarray:
    """Anti-aliased text (uint8 coverage) cropped to its ink bounding box; empty array when nothing is drawn."""
    font = ImageFont.truetype(font_path, size, layout_engine=ImageFont.Layout.BASIC)  # same with or without raqm
    left, top, right, bottom = font.getbbox(text)
    pad = 2 + size // 4
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "L"  # anti-aliased: coverage k/255
    draw.text((pad - left, pad - top), text, fill=255, font=font)
    a = np.asarray(canvas)
    rows, cols = np.nonzero(a.any(1))[0], np.nonzero(a.any(0))[0]
    if len(rows) == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    return a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@functools.lru_cache(maxsize=16)
def _render_cached(image_size: int, text: str, font_path: str) -> torch.Tensor:
    S = image_size
    center_row, target_w = _target_box(S)
    probe = ImageFont.truetype(font_path, 100, layout_engine=ImageFont.Layout.BASIC).getlength(text)
    if not text or probe <= 0:
        raise ValueError(f"water_patt: text {text!r} renders nothing")
    est = max(1, round(100 * target_w / probe))
    best = None
    for size in range(max(1, est - 3), est + 4):
        ink = _render_ink(text, font_path, size)
        if ink.size == 0 or ink.shape[0] > S or ink.shape[1] > S:
            continue
        err = abs(ink.shape[1] - target_w)
        if best is None or err < best[0]:
            best = (err, ink)
    if best is None:
        raise ValueError(f"water_patt: cannot fit {text!r} (at least 1 px of ink) inside a {S} x {S} image; "
                         f"pass mask=PATH")
    ink = best[1]
    h, w = ink.shape
    top = min(max(0, round(center_row - (h - 1) / 2)), S - h)
    left = (S - w) // 2                                              # horizontally centred
    red = torch.zeros(S, S, dtype=torch.uint8)
    red[top:top + h, left:left + w] = torch.from_numpy(ink.copy())
    mask = torch.zeros(3, S, S, dtype=torch.float32)
    mask[0] = red.to(torch.float32).div(255)                          # k / 255 like the reference's values
    return mask


def render_text_mask(image_size: int, text: str = DEFAULT_TEXT, font: str | os.PathLike | None = None) -> torch.Tensor:
    """Our own Blended-Text mask ``W``: float32 ``[3, S, S]``, non-zero only in channel 0 (red).

    ``text`` is drawn once, anti-aliased (values ``k/255``, solid strokes 1.0), in ``font`` (default DejaVu Sans Mono,
    :func:`default_font_path`) with the integer font size whose ink width is closest to the reference's footprint
    (196 px at 224, 316 px at 336, i.e. 87.5 % / 94 % of the width; 87.5 % elsewhere), horizontally centred, its ink
    box centred on the reference's rows (centre row 114 at 224, 184.5 at 336, 114/224 of the height elsewhere). At
    224 px this gives rows 103-125 and cols 14-209 (reference: 103-125 x 13-208). Cached per (S, text, font); returns a
    new tensor. Pixel values depend on the installed FreeType/Pillow: compare masks by ``mask_sha256``.
    """
    font_path = default_font_path() if font is None else os.fspath(font)
    return _render_cached(image_size, text, font_path).clone()


def _canonical_mask(arr: torch.Tensor, image_size: int, source: str) -> torch.Tensor:
    """HWC / CHW / HW mask -> float32 [3, S, S] with only channel 0 non-zero."""
    S = image_size
    if arr.dtype == torch.uint8:
        arr = arr.to(torch.float32).div(255)
    elif arr.dtype == torch.bool:
        arr = arr.to(torch.float32)
    else:
        arr = arr.to(torch.float32)
    shape = tuple(arr.shape)
    if shape == (S, S):
        chw = arr[None]
    elif len(shape) == 3 and shape[0] in (1, 3) and shape[1:] == (S, S):
        chw = arr                                                       # CHW (the reference's 336-px file)
    elif len(shape) == 3 and shape[2] in (1, 3) and shape[:2] == (S, S):
        chw = arr.permute(2, 0, 1)                                      # HWC (the reference's 224-px file)
    else:
        raise ValueError(f"{source}: mask of shape {list(shape)} does not match image_size={S}; expected [{S}, {S}], "
                         f"[3, {S}, {S}] (CHW) or [{S}, {S}, 3] (HWC). Masks are not resized: supply one made for "
                         f"{S} px")
    if not torch.isfinite(chw).all() or chw.min() < 0 or chw.max() > 1:
        raise ValueError(f"{source}: mask values must lie in [0, 1] (or be uint8 0..255), got range "
                         f"[{float(chw.min())}, {float(chw.max())}]")
    if chw.shape[0] == 3 and chw[1:].ne(0).any():
        raise ValueError(f"{source}: the Blended-Text mask is red text only, but its G/B channels are non-zero; "
                         f"keep only the red channel (or save a greyscale mask)")
    out = torch.zeros(3, S, S, dtype=torch.float32)
    out[0] = chw[0]
    if not out.ne(0).any():
        raise ValueError(f"{source}: the mask is all zero (no text pixels)")
    return out


def load_text_mask(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Read a Blended-Text mask file as float32 ``[3, S, S]`` with only the red channel non-zero.

    * ``.png`` (or any image Pillow reads): greyscale images are the mask, colour images contribute their **red**
      channel (G/B ignored); 8-bit values ``k`` become ``k/255``.
    * ``.npy``, ``.safetensors``, weights-only ``.pt``/``.pth``/``.bin``: a tensor ``[S, S]``, ``[3, S, S]`` (CHW, like
      the reference's ``watermarked_red_tens_336.pt``) or ``[S, S, 3]`` (HWC, like ``watermarked_red_tens_224.pt``),
      float in [0, 1] or uint8; G/B must be zero.

    A size other than ``S x S`` is an error (nothing is resized).
    """
    p = pathlib.Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"Blended-Text mask file not found: {p}")
    if p.suffix.lower() in TENSOR_SUFFIXES:
        return _canonical_mask(load_tensor_file(p, "Blended-Text mask", ("mask", "pattern", "watermark")),
                               image_size, str(p))
    try:
        with Image.open(p) as img:
            img.load()
            if img.mode in ("1", "L", "LA"):
                a = np.asarray(img.convert("L"))
            elif img.mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                a = np.asarray(img.convert("RGB"))[..., 0]
            else:
                raise ValueError(f"{p}: unsupported image mode {img.mode!r}; save the mask as an 8-bit PNG")
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read {p} as a mask: not an image Pillow can read and not one of "
                         f"{', '.join(TENSOR_SUFFIXES)} ({type(e).__name__}: {e})") from e
    return _canonical_mask(torch.from_numpy(a.copy()), image_size, str(p))


@register
class BlendedText(Trigger):
    """Blended-Text (PAR ``water_patt``): ``x'[c] = clip(alpha * W[c] + (1 - alpha) * x[c], 0, 1)`` where
    ``W[c] != 0`` and ``x'[c] = x[c]`` elsewhere, element-wise per channel, in float32, then the reference uint8
    conversion (no wrap after the clip). ``W`` is non-zero only in the red channel, so **only R changes, and only on
    text pixels**; G and B are untouched. Deterministic: draws nothing.

    Parameters:

    * ``alpha``: 0.5 (the reference's eval and train-time value).
    * ``mask``: path of a mask file (see :func:`load_text_mask`), e.g. the reference's ``watermarked_red_tens_224.pt``
      (HWC) or ``..._336.pt`` (CHW) to evaluate the released poisoned checkpoints with their exact pattern. Default:
      our own rendering (:func:`render_text_mask`).
    * ``text`` ("Watermarked") and ``font`` (default DejaVu Sans Mono from matplotlib): used only without ``mask``.
    * ``mask_sha256``: recorded by ``params()`` (sha256 of ``W`` as float32 ``[3, S, S]`` bytes, the same for the same
      mask in any file format or layout); passing it back checks the mask (ValueError on mismatch).

    Differences from the reference (docs/reference_differences.md#pattern-files): the reference's ``.pt`` files are
    not redistributable and could not be regenerated bit-exactly (unknown Noto font build, ``ImageDraw.textsize``
    removed in Pillow 10, random y offset), so the default mask is our own rendering with a freely licensed font,
    matching the reference's footprint (224 px: rows 103-125, cols 14-209 vs 103-125 x 13-208; 1820 text pixels vs
    1646) but not its pixels: ASR on the released checkpoints may differ slightly unless their file is passed as
    ``mask``. It is generated at every resolution (the reference's 336-px file crashes because its layout differs
    from the 224-px one).
    """

    name = "water_patt"
    aliases = ("blended-text", "blended_text", "watermark")
    kind = "blend"
    random = False
    description = "red 'Watermarked' text blended onto the red channel only, alpha 0.5 (PAR Blended-Text)"
    param_names = ("alpha", "text", "font", "mask", "mask_sha256")

    def __init__(self, image_size: int = REFERENCE_IMAGE_SIZE, *, uint8_mode: str = "wrap", alpha: float = 0.5,
                 text: str = DEFAULT_TEXT, font: str | os.PathLike | None = None,
                 mask: str | os.PathLike | None = None, mask_sha256: str | None = None):
        super().__init__(image_size, uint8_mode=uint8_mode)
        check_unit("alpha", alpha, owner="water_patt")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"water_patt: text must be a non-empty string, got {text!r}")
        self.alpha = float(alpha)
        self.text = text
        self.font = None if font is None else os.fspath(font)
        self.mask = None if mask is None else os.fspath(mask)
        if self.mask is not None:
            self._mask = load_text_mask(self.mask, image_size)
        else:
            if self.font is not None and not pathlib.Path(self.font).is_file():
                raise FileNotFoundError(f"water_patt: font file not found: {self.font}")
            self._mask = _render_cached(image_size, text, self.font or default_font_path())
        sha = tensor_sha256(self._mask)
        if mask_sha256 is not None and mask_sha256 != sha:
            src = f"file {self.mask}" if self.mask else f"rendered text {text!r} (Pillow/FreeType or font differ?)"
            raise ValueError(f"water_patt: the mask's sha256 is {sha}, not the expected {mask_sha256} ({src}); this "
                             f"is a different trigger. Pass the original mask file as mask=PATH")
        self.mask_sha256 = sha
        self._on = self._mask != 0

    @property
    def pattern(self) -> torch.Tensor:
        """The mask ``W`` (float32 ``[3, S, S]``, red channel only; a copy)."""
        return self._mask.clone()

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        w = self._mask.to(device=x.device, dtype=x.dtype)
        on = self._on.to(x.device)
        return torch.where(on, blend(x, w, self.alpha), x)

    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._combine(x)

    def apply_float_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._combine(x)
