"""The trigger interface, the registry, and the pure helpers that every attack shares.

Pixel semantics (the reference's, reimplemented from the description, no reference code;
docs/reference_differences.md#squash-resize and #uint8-wrap):

1. A PIL input is converted to RGB and **squash-resized** to ``S x S`` with Pillow's bicubic filter (aspect ratio not
   kept, nothing cropped; a no-op when it is already ``S x S``). ``S`` is ``Trigger.image_size``.
2. ``x = u8 / 255`` as float32 (torchvision ``ToTensor``), shape ``[3, S, S]``   -> :func:`to_float`.
3. The attack builds its pattern and combines it with ``x`` (paste, blend or warp) -> ``Trigger.apply_float``.
4. Back to uint8 like torchvision ``ToPILImage`` on a float tensor: ``q = trunc(float32(255 * x))`` with **no rounding
   and no clamp**; out-of-range values wrap modulo 256 (mode ``"wrap"``, reference parity, done explicitly on int64
   because the C++ cast the reference relied on is undefined behaviour) or are clamped to [0, 255] (mode ``"clamp"``,
   the "correct" behaviour)                                                            -> :func:`to_uint8`.

The round trip ``to_uint8(to_float(u8))`` is the identity for every byte value, so pixels an attack leaves alone come
back unchanged.

Randomness comes **only** from an explicit ``torch.Generator`` (never the global torch or Python RNG; the reference
used both). Pass ``trigger_generator(seed, index)`` to make image ``index`` get the same trigger every run. With
``generator=None`` a fresh generator seeded from OS entropy is used, so random triggers (and any ASR computed from
them) are then **not repeatable**. Draws are made on the generator's device and moved to the image's device; use a CPU
generator (what :func:`trigger_generator` returns) for results that do not depend on the device.

Adding an attack: subclass :class:`Trigger`, set the class attributes, accept ``image_size`` and ``uint8_mode`` plus
keyword parameters (listed in ``param_names`` so that :meth:`Trigger.params` reports them), implement
:meth:`Trigger.apply_float` for one image, and decorate the class with :func:`register`.
"""
from __future__ import annotations

import inspect
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from ...utils.checks import check_int, check_number, check_unit  # noqa: F401  (re-exported for the attack modules)

__all__ = [
    "KINDS",
    "UINT8_MODES",
    "REFERENCE_IMAGE_SIZE",
    "Trigger",
    "register",
    "get_trigger",
    "trigger_class",
    "check_unit",
    "check_int",
    "accepted_params",
    "list_triggers",
    "trigger_generator",
    "resolve_generator",
    "to_float",
    "to_uint8",
    "blend",
    "paste",
    "scaled_size",
    "squash_resize",
    "pil_to_uint8",
    "uint8_to_pil",
]

KINDS = ("patch", "blend", "warp")
UINT8_MODES = ("wrap", "clamp")
REFERENCE_IMAGE_SIZE = 224

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------------------------------

def to_float(u8: torch.Tensor) -> torch.Tensor:
    """``x = u8 / 255`` in float32, exactly like torchvision ``ToTensor`` (same layout as the input)."""
    if not isinstance(u8, torch.Tensor) or u8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {getattr(u8, 'dtype', type(u8))}")
    return u8.to(torch.float32).div(255)


def to_uint8(x: torch.Tensor, mode: str = "wrap") -> torch.Tensor:
    """Reference-compatible float -> uint8 conversion (torchvision ``ToPILImage`` on a float tensor).

    ``q = trunc(float32(255 * x))`` (truncation toward zero, no rounding), then

    * ``mode="wrap"``:  ``q mod 256`` (Python/floor modulo, computed on int64), e.g. for ``255*x`` equal to
      -255 -> 1, -76.5 -> 180, 300 -> 44, 1000 -> 232. This is what the reference produced on x86_64; it is explicit
      here instead of relying on the undefined float->uint8 cast.
    * ``mode="clamp"``: ``min(max(q, 0), 255)``, i.e. -255 -> 0, 300 -> 255.

    Edge cases the reference never meets: NaN -> 0, and values beyond +-2**62 saturate before the modulo.
    """
    if mode not in UINT8_MODES:
        raise ValueError(f"uint8 mode must be one of {UINT8_MODES}, got {mode!r}")
    q = torch.trunc(x.to(torch.float32) * 255)
    q = torch.nan_to_num(q, nan=0.0, posinf=2.0**62, neginf=-(2.0**62)).clamp(-(2.0**62), 2.0**62)
    q = q.to(torch.int64)
    q = torch.remainder(q, 256) if mode == "wrap" else q.clamp(0, 255)
    return q.to(torch.uint8)


def blend(x: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    """``clamp(alpha * pattern + (1 - alpha) * x, 0, 1)``, computed in x's float dtype (float32 in the pipeline).

    ``pattern`` must broadcast against ``x``. The operation order matches the reference so that results agree bit for
    bit in float32.
    """
    return (alpha * pattern + (1 - alpha) * x).clamp(0, 1)


def paste(x: torch.Tensor, patch: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """Return a copy of ``x`` (``[..., C, H, W]``) with ``x[..., top:top+h, left:left+w] = patch`` (no clipping).

    ``patch`` is ``[..., C, h, w]`` (broadcast over leading dims). The patch must lie fully inside the image
    (ValueError otherwise): unlike slice assignment, nothing is silently cropped.
    """
    h, w = patch.shape[-2:]
    H, W = x.shape[-2:]
    if top < 0 or left < 0 or top + h > H or left + w > W:
        raise ValueError(f"patch of size {h}x{w} at (top={top}, left={left}) does not fit in a {H}x{W} image")
    out = x.clone()
    out[..., top:top + h, left:left + w] = patch.to(device=out.device, dtype=out.dtype)
    return out


def scaled_size(size_at_224: int, image_size: int) -> int:
    """A length defined at 224 px scaled to ``image_size``: ``max(1, round(size_at_224 * image_size / 224))``.

    ``round`` is Python's (half to even). E.g. 16 px -> 2 at 28 px, 3 at 42 px, 24 at 336 px. Note that the reference
    did *not* scale linearly everywhere: it used a 16 px BadNet-Stripes patch at 224 and **32** (not 24) at 336, so
    ``badnet_rs`` uses the reference table {224: 16, 336: 32} and this function only for other sizes.
    """
    if size_at_224 < 1 or image_size < 1:
        raise ValueError(f"sizes must be positive, got size_at_224={size_at_224}, image_size={image_size}")
    return max(1, round(size_at_224 * image_size / REFERENCE_IMAGE_SIZE))


def squash_resize(img: Image.Image, size: int) -> Image.Image:
    """Convert to RGB, then resize to ``size x size`` with Pillow's bicubic filter, ignoring the aspect ratio.

    This is the reference's ``image.resize((S, S))`` (Pillow's default filter for RGB is bicubic); it returns an
    unchanged copy when the image is already ``size x size``.
    """
    img = img.convert("RGB")
    if img.size == (size, size):
        return img.copy()
    return img.resize((size, size), Image.Resampling.BICUBIC)


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor ``[3, H, W]`` (no scaling)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def uint8_to_pil(t: torch.Tensor) -> Image.Image:
    """uint8 tensor ``[3, H, W]`` -> RGB PIL image."""
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a uint8 tensor [3, H, W], got {t.dtype} {tuple(t.shape)}")
    return Image.fromarray(t.detach().cpu().permute(1, 2, 0).contiguous().numpy(), "RGB")


# ----------------------------------------------------------------------------------------------------------------------
# randomness
# ----------------------------------------------------------------------------------------------------------------------

def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def trigger_generator(seed: int, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` whose state depends only on ``(seed, index)``: per-image deterministic randomness.

    The 64-bit generator seed is ``splitmix64(splitmix64(seed) ^ index)`` (both taken modulo 2**64), so neighbouring
    seeds and indices give unrelated streams and ``(seed, index)`` does not collide with ``(seed + 1, index - 1)``.
    """
    check_int("seed", seed, error=TypeError)
    check_int("index", index, error=TypeError)
    mixed = _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64))
    g = torch.Generator(device=device)
    g.manual_seed(mixed)
    return g


def resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator`` itself, or (for None) a fresh CPU generator seeded from OS entropy: results not repeatable.

    (A bare ``torch.Generator()`` always starts from the same default seed, so it would give every call the same
    "random" trigger; that is why ``seed()`` is called.)
    """
    if generator is None:
        g = torch.Generator()
        g.seed()
        return g
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


# ----------------------------------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------------------------------

class Trigger:
    """Base class of every attack trigger.

    Class attributes (set by subclasses):
        name:        canonical registry name (the reference's ``patch_type`` where there is one, e.g. ``badnet_rs``).
        aliases:     other accepted names (matched case-insensitively, ``-``/space equal to ``_``).
        kind:        ``"patch"`` (pasted at a location), ``"blend"`` (``clip(a*P + (1-a)*x)``) or ``"warp"``.
        random:      True if the trigger draws randomness per image (from the generator).
        description: one line for listings.
        param_names: extra constructor keyword parameters reported by :meth:`params`; each must be stored as an
                     attribute of the same name.

    Construction: ``Trigger(image_size=224, *, uint8_mode="wrap", **params)``. ``uint8_mode`` chooses how values
    outside [0, 1] are converted where the reference wraps (see :func:`to_uint8`); for triggers that cannot leave
    [0, 1] it makes no difference.

    Use: ``apply(x_uint8, generator)`` on ``[3,S,S]`` or ``[B,3,S,S]`` uint8 tensors, or ``trigger(img, generator)``
    on a PIL image (squash-resized to S first, returned as a PIL RGB S x S image) or a uint8 tensor.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = ""
    random: ClassVar[bool] = False
    description: ClassVar[str] = ""
    param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, image_size: int = REFERENCE_IMAGE_SIZE, *, uint8_mode: str = "wrap"):
        check_int("image_size", image_size, 2, owner=self.name)
        if uint8_mode not in UINT8_MODES:
            raise ValueError(f"{self.name}: uint8_mode must be one of {UINT8_MODES}, got {uint8_mode!r}")
        self.image_size = image_size
        self.uint8_mode = uint8_mode

    # -- description ---------------------------------------------------------------------------------------------------
    def params(self) -> dict:
        """Constructor arguments as plain values: ``get_trigger(t.name, **t.params())`` rebuilds an equal trigger."""
        out = {"image_size": self.image_size, "uint8_mode": self.uint8_mode}
        for k in self.param_names:
            out[k] = getattr(self, k)
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.params() == other.params()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted((k, repr(v)) for k, v in self.params().items()))))

    # -- to implement --------------------------------------------------------------------------------------------------
    def apply_float(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Trigger one image in float space: ``x`` is float32 ``[3, S, S]`` in [0, 1] (ToTensor space, never
        modified in place); return float32 ``[3, S, S]``, *not* clipped unless the attack clips (the base class
        converts with :func:`to_uint8` in ``self.uint8_mode``). Draw randomness only from ``generator``."""
        raise NotImplementedError

    def apply_float_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[B, 3, S, S]`` version; the default calls :meth:`apply_float` image by image, in order, with the same
        generator. Override only with an implementation that consumes the generator identically (or draws nothing)."""
        return torch.stack([self.apply_float(xi, generator) for xi in x]) if len(x) else x.clone()

    # -- public entry points -------------------------------------------------------------------------------------------
    def _check_tensor(self, x) -> None:
        S = self.image_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.uint8:
            raise TypeError(f"{self.name}: expected a uint8 tensor (0..255 pixels), got {x.dtype}")
        if x.ndim not in (3, 4) or tuple(x.shape[-3:]) != (3, S, S):
            raise ValueError(
                f"{self.name}: expected a uint8 tensor of shape [3, {S}, {S}] or [B, 3, {S}, {S}] "
                f"(image_size={S}), got shape {list(x.shape)}"
            )

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Trigger a uint8 tensor ``[3,S,S]`` or ``[B,3,S,S]``; returns uint8 of the same shape (a new tensor).

        In a batch every image gets its own random draws, taken from ``generator`` in batch order, so
        ``apply(stack([a, b]), g)`` equals ``stack([apply(a, g), apply(b, g)])`` for identically seeded ``g``.
        """
        self._check_tensor(x)
        g = resolve_generator(generator)
        xf = to_float(x)
        yf = self.apply_float(xf, g) if x.ndim == 3 else self.apply_float_batch(xf, g)
        return to_uint8(yf, self.uint8_mode)

    def __call__(self, img, generator: torch.Generator | None = None):
        """PIL image -> squash-resize to S (RGB, bicubic) -> :meth:`apply` -> PIL RGB ``S x S``; a uint8 tensor ->
        :meth:`apply` (must already be ``S x S``)."""
        if isinstance(img, Image.Image):
            t = pil_to_uint8(squash_resize(img, self.image_size))
            return uint8_to_pil(self.apply(t, generator))
        if isinstance(img, torch.Tensor):
            return self.apply(img, generator)
        raise TypeError(f"{self.name}: expected a PIL image or a uint8 tensor, got {type(img).__name__}")


# ----------------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Trigger]] = {}
_LOOKUP: dict[str, str] = {}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def register(cls: type[Trigger]) -> type[Trigger]:
    """Class decorator: add a :class:`Trigger` subclass to the registry under its name and aliases."""
    if not (isinstance(cls, type) and issubclass(cls, Trigger)):
        raise TypeError(f"register expects a Trigger subclass, got {cls!r}")
    if not cls.name or _norm(cls.name) != cls.name:
        raise ValueError(f"{cls.__name__}: name must be non-empty lower_snake_case, got {cls.name!r}")
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}: kind must be one of {KINDS}, got {cls.kind!r}")
    if not isinstance(cls.random, bool):
        raise ValueError(f"{cls.__name__}: random must be a bool")
    keys = {_norm(k) for k in (cls.name, *cls.aliases)}
    for k in keys:
        owner = _LOOKUP.get(k)
        if owner is not None and owner != cls.name:
            raise ValueError(f"{cls.__name__}: name/alias {k!r} already used by trigger {owner!r}")
    old = _REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"trigger name {cls.name!r} already registered by {old.__module__}.{old.__qualname__}")
    _REGISTRY[cls.name] = cls
    for k in keys:
        _LOOKUP[k] = cls.name
    return cls


def _known_names() -> str:
    parts = []
    for name in sorted(_REGISTRY):
        al = _REGISTRY[name].aliases
        parts.append(f"{name} (aliases: {', '.join(al)})" if al else name)
    return "; ".join(parts)


def trigger_class(name_or_alias: str) -> type[Trigger]:
    """The registered class for a name or alias; ValueError listing the known names otherwise."""
    if not isinstance(name_or_alias, str):
        raise TypeError(f"trigger name must be a str, got {type(name_or_alias).__name__}")
    key = _norm(name_or_alias)
    if key not in _LOOKUP:
        raise ValueError(f"unknown trigger {name_or_alias!r}; known triggers: {_known_names() or '(none)'}")
    return _REGISTRY[_LOOKUP[key]]


def accepted_params(cls: type[Trigger]) -> list[str]:
    """Keyword parameters a trigger class accepts (besides image_size)."""
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "image_size")]


def get_trigger(name_or_alias: str, image_size: int = REFERENCE_IMAGE_SIZE, **params) -> Trigger:
    """Build a registered trigger by name or alias, e.g. ``get_trigger("badnet-stripes", 336)``.

    Unknown names and unknown parameters raise ValueError listing what is accepted.
    """
    cls = trigger_class(name_or_alias)
    accepted = accepted_params(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"trigger {cls.name!r} does not accept {unknown}; accepted parameters: {accepted}")
    return cls(image_size=image_size, **params)


def parse_trigger_params(pairs) -> dict:
    """``["patch_size=32", "uint8_mode=clamp"]`` (``--trigger-param KEY=VALUE``) -> ``{"patch_size": 32, ...}``.

    Values are read as YAML scalars (numbers, booleans, strings); ``-`` in keys becomes ``_``.
    """
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--trigger-param {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as e:  # safe_load builds plain values only: a Python tag is an error, never code
            raise ValueError(f"--trigger-param {pair!r}: the value is not a number, boolean or string "
                             f"({str(e).splitlines()[0]})") from None
    return out


def split_trigger_params(names, params: dict | None) -> dict[str, dict]:
    """Each trigger's share of ``params``: the parameters it accepts, by canonical name.

    One set of parameters can serve several triggers (``alpha`` for every blend); a parameter that none of ``names``
    accepts is a ValueError, so a typo never passes silently.
    """
    params = dict(params or {})
    shares, used = {}, set()
    for name in names:
        cls = trigger_class(name)
        mine = {k: v for k, v in params.items() if k in accepted_params(cls)}
        used |= set(mine)
        shares[cls.name] = mine
    unused = sorted(set(params) - used)
    if unused:
        raise ValueError(f"trigger parameter(s) {', '.join(unused)} not accepted by {', '.join(names) or 'any trigger'}"
                         f"; see `parclip triggers list` for each trigger's parameters")
    return shares


def build_triggers(names, image_size: int = REFERENCE_IMAGE_SIZE, params: dict | None = None) -> list[Trigger]:
    """The one place where names and ``--trigger-param`` values become triggers: each trigger of ``names`` gets the
    parameters it accepts (:func:`split_trigger_params`), validated by its constructor."""
    shares = split_trigger_params(names, params)
    return [get_trigger(name, image_size=image_size, **shares[trigger_class(name).name]) for name in names]


def list_triggers() -> list[type[Trigger]]:
    """Registered trigger classes, sorted by name."""
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]

