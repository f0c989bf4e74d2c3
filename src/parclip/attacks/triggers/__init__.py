"""Backdoor triggers: one small module per attack, one interface (:class:`Trigger`), found by name in a registry.

    get_trigger(name_or_alias, image_size=224, **params) -> Trigger
    build_triggers(names, image_size, params) -> list[Trigger]   # names + --trigger-param values, the one way
    list_triggers() -> list[type[Trigger]]
    trigger_generator(seed, index) -> torch.Generator      # per-image deterministic randomness

A trigger works on the squash-resized ``S x S`` image in uint8 (``apply``) or on a PIL image (``__call__``); see
:mod:`parclip.attacks.triggers.base` for the exact pixel semantics (float32 ToTensor space, truncating uint8 conversion with
the reference's modulo-256 wrap or a clamp). Importing this package registers every attack module listed below.
"""
from .base import (
    KINDS,
    REFERENCE_IMAGE_SIZE,
    UINT8_MODES,
    Trigger,
    blend,
    accepted_params,
    build_triggers,
    get_trigger,
    trigger_class,
    list_triggers,
    parse_trigger_params,
    paste,
    pil_to_uint8,
    register,
    resolve_generator,
    scaled_size,
    split_trigger_params,
    squash_resize,
    to_float,
    to_uint8,
    trigger_generator,
    uint8_to_pil,
)

# attack modules (importing registers them)
from . import stripes  # noqa: F401  badnet_rs, blended_rs
from . import badnet  # noqa: F401  badnet (reference 'random')
from . import blended  # noqa: F401  blended
from . import triangles  # noqa: F401  tri_patt
from . import text  # noqa: F401  water_patt
from . import wanet  # noqa: F401  warped
from . import sig  # noqa: F401  sig
from . import badclip  # noqa: F401  badclip

__all__ = [
    "KINDS",
    "REFERENCE_IMAGE_SIZE",
    "UINT8_MODES",
    "Trigger",
    "blend",
    "get_trigger",
    "build_triggers",
    "parse_trigger_params",
    "split_trigger_params",
    "trigger_class",
    "accepted_params",
    "list_triggers",
    "paste",
    "pil_to_uint8",
    "register",
    "resolve_generator",
    "scaled_size",
    "squash_resize",
    "to_float",
    "to_uint8",
    "trigger_generator",
    "uint8_to_pil",
]
